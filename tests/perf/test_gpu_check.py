"""``bash scripts/gpu_check.sh --cpu`` runs every section of the GPU check at tiny sizes (so the script the
GPU host runs cannot rot): the JSON holds every section, the kernel invariants on the real ToolLMM and its
step model for each kernel the CPU runs, a real DeepSpeed step per stage, and the exit status says whether
every invariant held."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from toollmm.core.paths import REPO_ROOT

SECTIONS = ("env", "gemm", "invariants", "stage_1", "stage_2", "stage_3", "encoder", "fused_kernels")


@pytest.mark.slow
def test_gpu_check_cpu_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check"
    # DeepSpeed's CPU comm op is JIT-built once into a folder of this checkout's own (a lock left in a
    # shared build folder by a killed build elsewhere would stall every stage until its timeout)
    ext = REPO_ROOT / ".cache" / "torch_extensions_gpu_check"
    env = {**os.environ, "OUT": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(ext)}
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    report = json.loads((out / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.json").is_file() and (
        tmp_path / "gpu_check.log"
    ).is_file()  # copied to $OUT
    assert report["mode"] == "cpu" and set(report["sections"]) == set(SECTIONS), proc.stdout
    # the op is built before the sections, so none of them builds it inside its timeout
    assert report["ops"]["ok"] and report["ops"]["cpu_comm_op_s"] >= 0, report["ops"]
    failed = {k: v.get("error") for k, v in report["sections"].items() if not v.get("ok")}
    assert not failed, (failed, proc.stdout)
    inv = report["sections"]["invariants"]
    want = {"packed_logits", "prefill_logits"} | {
        f"append_{n}_{w}" for n in (1, 2, 7) for w in ("logits", "hidden")
    }
    for kernel in ("sdpa", "eager"):  # both hold on CPU in fp32 (toollmm.infer.kernel_check)
        assert set(inv[kernel]) == want, inv[kernel]
        assert all(c["pass"] and c["max_abs"] <= 1e-4 for c in inv[kernel].values()), inv[kernel]
    for stage in ("stage_1", "stage_2", "stage_3"):
        s = report["sections"][stage]
        assert s["loss_finite"] and s["tokens_per_s"] > 0 and s["memory_estimate_gib"] > 0, s
        assert s["backend"] == "gloo" and s["world"] == 1
    assert report["sections"]["stage_1"]["features"]["media"], "stage 1 encodes its media"
    assert report["sections"]["stage_2"]["features"] is None  # no media: the encoder is never built
    assert report["sections"]["gemm"]["tflops"] > 0
    assert "no CUDA" in report["sections"]["fused_kernels"]["skipped"]  # recorded, no numbers
    assert proc.returncode == (0 if report["invariants_pass"] else 1), proc.stdout
    assert report["invariants_pass"] == (not inv["failed"])


def test_invariant_verdict_counts_only_kernels_the_config_accepts():
    """flex_attention fails the packed case on an H200 (2.73 in bf16 logits); the config refuses it, so
    it is reported without failing the check, while a failure of an accepted kernel still fails it."""
    from toollmm.perf.gpu_check import accepted_kernels, verdict

    accepted = accepted_kernels()
    assert set(accepted) == {"sdpa", "eager", "flash_attention_2"}
    ok = {"max_abs": 0.0, "pass": True}
    bad = {"max_abs": 2.7, "pass": False}
    flex_bad = {
        "sdpa": {"packed_logits": ok},
        "eager": {"packed_logits": ok},
        "flex_attention": {"packed_logits": bad},
    }
    v = verdict(flex_bad, accepted)
    assert v["pass"] and v["failed"] == ["flex_attention.packed_logits"]
    sdpa_bad = dict(flex_bad, sdpa={"packed_logits": bad})
    assert not verdict(sdpa_bad, accepted)["pass"]
    assert not verdict(dict(flex_bad, eager={"error": "OSError: x"}), accepted)["pass"]


def test_fused_kernels_section_is_skipped_without_cuda(tmp_path, monkeypatch):
    """A CPU run records why the fused_kernels section did not run (no CUDA), with no numbers; the driver's
    summary says so and the skip neither fails the check nor counts as a passed numerics check."""
    import json

    from entry_points import load_script
    from toollmm.perf.gpu_check import run_section, section_fused_kernels

    got = section_fused_kernels(tmp_path, cpu=True)
    assert (
        set(got) == {"skipped"}
        and "no CUDA" in got["skipped"]
        and "model.llm.fused_kernels" in got["skipped"]
    )
    out = tmp_path / "section.json"
    monkeypatch.chdir(REPO_ROOT)  # run_section works from the repo root; restored after the test
    run_section("fused_kernels", tmp_path, True, out)  # what the driver's child process runs
    written = json.loads(out.read_text())
    assert written["skipped"] == got["skipped"] and "numerics" not in written and "speed" not in written
    driver = load_script("scripts/gpu_check.py", "gpu_check_driver")
    assert "fused_kernels" in driver.ORDER and "fused_kernels" in driver.TIMEOUT
    report = {"mode": "cpu", "status": "running", "wall_s": 1.0, "sections": {
        "invariants": {"ok": True, "pass": True}, "fused_kernels": {"ok": True, **written}}}  # fmt: skip
    driver.derived(report)
    driver.finish(report)
    assert report["status"] == "pass" and report["invariants_pass"]
    assert any("fused_kernels skipped: no CUDA" in line for line in driver.summary(report))


def test_failed_fused_numerics_fail_the_check_and_speed_gets_mfu():
    """Where the section ran (a GPU host), its numerics verdict joins the invariants, and the driver adds MFU
    to each variant's speed against the gemm section's rate."""
    from entry_points import load_script

    driver = load_script("scripts/gpu_check.py", "gpu_check_driver")
    speed = {v: {"tokens_per_s": t, "model_tflop_per_s": f, "peak_gib": 40.0} for v, t, f in
             (("off", 1000.0, 300.0), ("on", 1200.0, 360.0))}  # fmt: skip
    fused = {"ok": True, "pass": False, "liger_kernel": "x", "speed": speed,
             "numerics": {"failed": ["grad.lora"], "max_rel_on_off": 0.5}}  # fmt: skip
    report = {"mode": "gpu", "status": "running", "wall_s": 1.0, "sections": {
        "gemm": {"ok": True, "tflops": 600.0, "dtype": "bf16"},
        "invariants": {"ok": True, "pass": True}, "fused_kernels": fused}}  # fmt: skip
    driver.derived(report)
    assert speed["off"]["mfu"] == pytest.approx(0.5) and speed["on"]["mfu"] == pytest.approx(0.6)
    driver.finish(report)
    assert report["status"] == "fail" and not report["invariants_pass"] and report["sections_ok"]
    lines = driver.summary(report)
    assert any("FAIL" in line and "grad.lora" in line for line in lines)
    fused["pass"] = True
    driver.finish(report)
    assert report["status"] == "pass"


def test_liger_kernel_is_pinned_for_the_wheelhouse_and_survives_a_refreeze():
    """gpu_check.sh carries liger-kernel (WHEELS), pinned in constraints.txt's gpu-only block, which
    ``setup.sh --refreeze`` (freeze_constraints.py) keeps although this environment never installs it."""
    from entry_points import load_script

    sh = (REPO_ROOT / "scripts" / "gpu_check.sh").read_text()
    wheels = sh.split("WHEELS=(", 1)[1].split(")", 1)[0].split()
    assert "liger-kernel" in wheels
    text = (REPO_ROOT / "constraints.txt").read_text()
    freeze = load_script("scripts/freeze_constraints.py", "freeze_constraints")
    block = freeze.kept_block(text)
    pins = [x for x in block if x.startswith("liger-kernel==")]
    assert len(pins) == 1 and block[0].startswith("# >>> gpu-only") and block[-1] == "# <<< gpu-only"
    assert freeze.kept_block("a==1\n") == []


def test_build_locks_left_by_a_killed_section_are_cleared_and_older_ones_kept(tmp_path, monkeypatch):
    """A JIT build killed half-way (a section past its timeout) leaves ``<op>/lock``; torch's next load of
    that op waits on it forever, so every later section timed out too (CI, 2026-12-05). The driver removes
    the locks taken since the killed section started; a lock older than that (another live build) stays."""
    import time

    from toollmm.core.paths import clear_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old = tmp_path / "other_op" / "lock"
    old.parent.mkdir()
    old.write_text("")
    os.utime(old, (time.time() - 100, time.time() - 100))
    since = time.time() - 1
    new = tmp_path / "deepspeed_shm_comm" / "lock"
    new.parent.mkdir()
    new.write_text("")
    (tmp_path / "deepspeed_shm_comm" / "shm.o").write_text("")  # build outputs are not locks
    assert clear_build_locks(since) == [new]
    assert not new.exists() and old.exists() and (tmp_path / "deepspeed_shm_comm" / "shm.o").exists()
    assert clear_build_locks(since) == []
