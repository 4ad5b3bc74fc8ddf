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

SECTIONS = ("env", "gemm", "invariants", "stage_1", "stage_2", "stage_3", "encoder")


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
