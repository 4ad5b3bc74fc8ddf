"""``release.py``: a tiny stage folder (tiny base models placed like real ones, perturbed delta, an
evaluation result) -> a Hub folder that lists every file, holds no base weights and no empty or untrained
tensors, loads back through ``toollmm.load`` with the same outputs, and whose card snippet (run as written,
in a fresh interpreter) gives the same logits with plain transformers + peft. Offline; the upload itself
is untested (a recording stand-in checks the calls).

The slow ``test_release_of_a_real_checkpoint`` runs the same checks on a trained stage folder
(``TOOLLMM_RELEASE_CHECKPOINT``, default ``outputs/demo/stage_3``; ``TOOLLMM_RELEASE_FOLDER`` = a folder
already written by ``scripts/release.sh --dry-run --out``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from entry_points import load_script
from toollmm.checkpoint.bases import local_base_overrides
from toollmm.checkpoint.delta import delta_tensors
from toollmm.checkpoint.stage import load_stage, read_manifest, save_stage
from toollmm.core.batch import IGNORE_INDEX, Batch, MediaInputs, SignalTargets
from toollmm.core.config import (
    DecoderConfig,
    LoraSettings,
    OutputProjConfig,
    SourceConfig,
    load_config,
)
from toollmm.core.paths import resolve
from toollmm.core.tokens import MODALITIES
from toollmm.model.tiny import TinyLlama, build_base_models
from toollmm.model.toollmm_model import build_model
from toollmm.release.folder import ReleaseError, describe_bases, tensor_report
from toollmm.release.upload import upload

TRAINED_3 = [
    "lora",
    "input_proj",
    *(f"output_proj.{m}" for m in MODALITIES),
    "token_rows.signal",
    "token_rows.tool",
]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
REPO_ID = "me/toollmm-tiny"
DEMO_EVAL = Path(__file__).parents[1] / "fixtures" / "demo_eval" / "demo.json"


def _load_entry():
    return load_script("code/release.py", "release")


release_cli = _load_entry()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _release(stage: Path, out: Path, *extra: str, capsys=None) -> tuple[int, str]:
    code = release_cli.main(
        ["--checkpoint", str(stage), "--repo-id", REPO_ID, "--dry-run", "--out", str(out), *extra]
    )
    return code, (capsys.readouterr().out if capsys is not None else "")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_dir):
    """Tiny bases; stage_2 and stage_3 folders of one perturbed model (stage 3 with an eval result)."""
    root = tmp_path_factory.mktemp("release")
    cfg = load_config(config_files=["config/presets/encoder_tiny.yaml"]).config
    paths = build_base_models(
        root / "base", tiny_tokenizer_dir, cfg.model, llm=TinyLlama(32, 64, 2, 2, 2, 256)
    )
    m = cfg.model
    m.encoder.checkpoint = str(paths["encoder"])
    m.llm.path, m.llm.dtype, m.llm.gradient_checkpointing = str(paths["llm_init"]), "float32", False
    m.llm.lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    m.feature_cache.dir = str(root / "features")
    small = OutputProjConfig(
        d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32
    )
    m.output_proj = {k: small for k in MODALITIES}
    m.decoders = {k: DecoderConfig(path=str(paths[f"decoder_{k}"])) for k in MODALITIES}
    torch.manual_seed(0)
    model = build_model(m)
    cfg.run.name = "tiny"
    stages = {}
    for stage, trainable, source in (
        (2, [*(f"output_proj.{k}" for k in MODALITIES), "token_rows.signal"], "t2x_image"),
        (3, TRAINED_3, "tools"),
    ):
        model.trainable_parameters(trainable)
        with torch.no_grad():  # stands in for training: every trained tensor moves away from its init
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        cfg.run.stage, cfg.train.trainable = stage, trainable
        cfg.train.init_from = str(stages[2]) if stage == 3 else None
        cfg.data.train = [SourceConfig(path=f"data/demo/train/{source}.jsonl", weight=0.5)]
        stages[stage] = save_stage(model, cfg, root / "run" / f"stage_{stage}", extra={"steps": 10 * stage})
    model.requires_grad_(False)
    model.eval()
    _write_eval(stages[3] / "eval")
    return {"model": model, "stage": stages[3], "base": root / "base", "paths": paths, "cfg": cfg}


def _write_eval(out: Path) -> None:
    from toollmm.eval import run_benchmark

    refs = Path(__file__).parents[1] / "fixtures" / "samples" / "viot" / "test_crowd.json"
    run_benchmark("viot", [refs], lambda prompts: [{"text": "no tool needed"} for _ in prompts], out, limit=2)
    # what `evaluate.py demo` wrote for the demo's stage 3 (a real run's eval/demo.json, trimmed examples)
    shutil.copy(DEMO_EVAL, out / "demo.json")


@pytest.fixture(scope="module")
def released(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "hub"
    assert _release(world["stage"], out)[0] == 0
    return out


# ------------------------------------------------------------------------------------------ shared checks
def _listed(text: str) -> set[str]:
    return {line.split("\t")[0].strip() for line in text.splitlines() if line.startswith("  ")}


def _check_folder(out: Path, base_paths: list[Path], model) -> None:
    """No base weights (by content or by name), the delta exactly the model's delta tensors, the adapter
    LoRA only, every tensor non-empty, no trained matrix all zero."""
    on_disk = [p for p in out.rglob("*") if p.is_file() and not p.relative_to(out).parts[0] == "merged"]
    base_weights = [
        f for b in base_paths for f in ([b] if b.is_file() else b.rglob("*")) if f.suffix in WEIGHT_SUFFIXES
    ]
    assert len(base_weights) >= 5  # LLM, ImageBind, the decoders' UNets / VAEs / text encoders
    assert not {_sha(p) for p in base_weights} & {_sha(p) for p in on_disk}
    names = [p.name for p in on_disk]
    assert not [
        n for n in names if n.startswith(("model", "pytorch_model", "diffusion")) or n.endswith(".pth")
    ]
    assert sorted(n for n in names if n.endswith(".safetensors")) == [
        "adapter_model.safetensors",
        "delta.safetensors",
    ]
    delta = tensor_report(out / "delta.safetensors")
    assert set(delta) == set(delta_tensors(model, read_manifest(out)["parts"]))
    adapter = tensor_report(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    for rep in (delta, adapter):
        for key, v in rep.items():
            assert v["numel"] > 0, key
            assert not (len(v["shape"]) >= 2 and v["all_zero"]), f"{key} is all zero"


def _probe_batch(model) -> Batch:
    """Text + one image (cached feature) + tool tokens + an image signal span with a target."""
    tok, ids, proj_in = model.bundle.tokenizer, model.bundle.token_ids, model.input_proj
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    seq = [1, *enc("USER: what is in"), *[ids.placeholder["image"]] * proj_in.tokens_per_input]
    seq += [*enc("ASSISTANT: a red circle"), *ids.tool.values()]
    start = len(seq)
    seq += [*ids.signal["image"], 2]
    g = torch.Generator().manual_seed(1)
    proj = model.output_proj["image"]
    target = torch.randn(1, proj.n_query, proj.cond_dim, generator=g)
    t = torch.tensor([seq])
    return Batch(
        t,
        torch.where(torch.arange(len(seq)) > 5, t, torch.full_like(t, IGNORE_INDEX)),
        torch.ones_like(t),
        media={"image": MediaInputs(features=torch.randn(1, 1, proj_in.in_dim, generator=g), keys=["p"])},
        signal_targets={"image": SignalTargets(torch.tensor([[0, start]]), target)},
    )


def _assert_same_outputs(saved, loaded) -> None:
    batch = _probe_batch(saved)
    with torch.no_grad():
        a, b = saved.run_llm(batch).logits, loaded.run_llm(batch).logits
        la, lb = saved(batch), loaded(batch)
    assert torch.equal(a, b)
    assert la["align_image"] > 0 and all(torch.equal(la[k], lb[k]) for k in la)
    parts = sorted(saved.delta_parts)
    da, db = delta_tensors(saved, parts), delta_tensors(loaded, parts)
    assert all(torch.equal(da[k], db[k]) for k in da)


def _snippet(card: str, marker: str, repo: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    (code,) = [b for b in blocks if marker in b]
    return re.sub(r"^REPO = .*$", f"REPO = {str(repo)!r}", code, count=1, flags=re.M)


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "snippet.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _assert_peft_snippet_matches(folder: Path, model, tmp_path: Path) -> None:
    """The card's transformers + peft snippet as written (only REPO pointed at the local folder) in a
    fresh interpreter: resize with the released tokenizer, write the token rows, PeftModel.from_pretrained."""
    code = _snippet((folder / "README.md").read_text(), "PeftModel.from_pretrained", folder)
    tok, ids = model.bundle.tokenizer, model.bundle.token_ids
    probe = [1, *tok.encode("USER: hi ASSISTANT:", add_special_tokens=False), *ids.signal["audio"]]
    probe += list(ids.tool.values())
    out = tmp_path / "logits.pt"
    _run(code + f"\ntorch.save(model(input_ids=torch.tensor([{probe}])).logits, {str(out)!r})\n", tmp_path)
    with torch.no_grad():
        want = model.llm(input_ids=torch.tensor([probe])).logits
    got = torch.load(out)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------------------------- the folder
def test_dry_run_lists_every_file_and_holds_no_base_weights(world, tmp_path, capsys):
    out = tmp_path / "hub"
    code, text = _release(world["stage"], out, capsys=capsys)
    assert code == 0 and f"dry run: would upload to https://huggingface.co/{REPO_ID}" in text
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert _listed(text) == on_disk
    assert {"README.md", "config.json", "stage.json", "config.yaml", "delta.safetensors"} <= on_disk
    assert {"adapter_config.json", "adapter_model.safetensors"} <= on_disk  # at the root: peft reads them
    assert not any(f.startswith("adapter/") for f in on_disk)
    assert any(f.startswith("tokenizer/") for f in on_disk) and not any(
        f.startswith("merged/") for f in on_disk
    )
    _check_folder(out, [world["base"]], world["model"])


def test_config_manifest_and_card(world, released):
    from toollmm.eval import BENCHMARKS

    cfg = json.loads((released / "config.json").read_text())
    assert cfg["format"] == "toollmm-release/1" and cfg["stage"] == 3
    bases = cfg["base_models"]
    assert set(bases) == {"llm", "encoder", *MODALITIES}
    assert bases["llm"]["sha256"] and bases["llm"]["ref"] == str(world["paths"]["llm_init"])
    assert bases["encoder"]["license"] == "cc-by-nc-4.0"
    assert cfg["token_rows"]["signal"] == world["model"].bundle.token_ids.group_ids("signal")
    assert read_manifest(released)["release"]["repo_id"] == REPO_ID  # the manifest matches the files
    card = (released / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert {"license", "library_name", "tags", "datasets"} <= set(meta) and meta["library_name"] == "peft"
    assert "base_model" not in meta  # no base of this tiny world has a Hub id
    assert "CC-BY-NC 4.0" in card and "ImageBind" in card
    assert "| 2 | output_proj.image" in card and "| 3 | lora" in card and "tools ×0.5" in card
    result = json.loads((world["stage"] / "eval" / "viot.json").read_text())
    spec = BENCHMARKS["viot"]
    assert "**viot**" in card and "| | " + " | ".join(spec.columns) + " |" in card
    assert all(f"| {name} | " in card for name, _ in spec.rows(result["metrics"]))


def test_card_records_the_demo_evaluation(released):
    """``evaluate.py demo``'s eval/demo.json goes into the card instead of "No evaluation results"."""
    card = (released / "README.md").read_text()
    assert "No evaluation results were recorded" not in card
    assert "**demo held-out split** (`code/evaluate.py demo` on stage 3" in card
    assert "| tools | tool name accuracy (%) | 85.0 | | 40 |" in card
    assert "| tools | tool call exact (%) | 20.0 | | 40 |" in card
    demo = json.loads(DEMO_EVAL.read_text())
    img = demo["x2t"]["image"]
    want = f"| image -> text | caption exact (%) | {100 * img['exact']:.1f} | {100 * img['chance']:.1f} | {img['n']} |"
    assert want in card
    assert "| text -> audio | caption retrieval top-1 (%) |" in card


def test_peft_loads_the_release_as_the_hub_snippet_does(world, released):
    """The Hub's own peft snippet: PeftConfig / PeftModel.from_pretrained(base, REPO) on the folder."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    cfg = PeftConfig.from_pretrained(str(released))
    assert cfg.base_model_name_or_path == str(world["paths"]["llm_init"]) and cfg.r == 4
    base = AutoModelForCausalLM.from_pretrained(cfg.base_model_name_or_path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(released))
    got = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    want = {k: v for k, v in world["model"].llm.state_dict().items() if "lora_" in k}
    assert got and set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(float(v.abs().sum()) > 0 for k, v in got.items() if "lora_B" in k)  # the trained adapter


def test_release_and_stage_files_respect_the_umask(world, released):
    """Weight files were 0600 (mkstemp, safetensors) while everything else was 0644."""
    from toollmm.core.files import file_mode

    for folder in (released, world["stage"]):
        modes = {
            str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()
        }
        assert "delta.safetensors" in modes
        assert {k: oct(v) for k, v in modes.items() if v != file_mode()} == {}


def test_hub_ids_of_bases_and_local_copies(world, tmp_path, capsys):
    """--base-id maps every base to a Hub id (card metadata, config.yaml, adapter_config); a user with
    local copies loads it with overrides, with the same outputs."""
    import toollmm

    out = tmp_path / "hub"
    ids = {
        "llm": "lmsys/vicuna-7b-v1.5",
        "image": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "video": "cerspense/zeroscope_v2_576w",
        "audio": "cvssp/audioldm-l-full",
    }
    flags = [a for role, hub in ids.items() for a in ("--base-id", f"{role}={hub}")]
    assert _release(world["stage"], out, *flags, "--dataset", "liuhaotian/LLaVA-Instruct-150K")[0] == 0
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert meta["base_model"] == list(ids.values()) and meta["datasets"] == ["liuhaotian/LLaVA-Instruct-150K"]
    tree = yaml.safe_load((out / "config.yaml").read_text())
    assert tree["model"]["llm"]["path"] == ids["llm"]
    assert tree["model"]["decoders"]["audio"]["path"] == ids["audio"]
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == ids["llm"]
    p = world["paths"]
    local = [f"model.llm.path={p['llm_init']}"]
    local += [f"model.decoders.{m}.path={p[f'decoder_{m}']}" for m in MODALITIES]
    _assert_same_outputs(world["model"], toollmm.load(out, overrides=local).model)


def test_known_local_places_map_to_hub_ids_and_back(monkeypatch, tmp_path):
    from toollmm.core import configlib

    tree = configlib.to_dict(load_config().config)  # config/model.yaml: the documented places
    bases = describe_bases(tree, {"base_models": {}})
    assert bases["llm"]["hub_id"] == "lmsys/vicuna-7b-v1.5"
    assert bases["video"]["hub_id"] == "cerspense/zeroscope_v2_576w"
    assert bases["audio"]["license"] == "cc-by-nc-sa-4.0"
    assert bases["encoder"]["url"].endswith("imagebind_huge.pth") and "hub_id" not in bases["encoder"]
    assert bases["encoder"]["ref"] == "pretrained_checkpoint/imagebind_ckpt/huge/imagebind_huge.pth"
    with pytest.raises(ReleaseError, match="unknown role"):
        describe_bases(tree, {}, {"lm": "a/b"})
    # a released config naming a Hub id uses the documented local copy when it exists
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"model": {"llm": {"path": "lmsys/vicuna-7b-v1.5"}}})
    )
    monkeypatch.setattr("toollmm.checkpoint.bases.REPO_ROOT", tmp_path / "repo")
    assert local_base_overrides(tmp_path) == []
    (tmp_path / "repo" / "pretrained_checkpoint" / "llm_ckpt" / "vicuna_7b").mkdir(parents=True)
    assert local_base_overrides(tmp_path) == ["model.llm.path=pretrained_checkpoint/llm_ckpt/vicuna_7b"]


# ------------------------------------------------------------------------------------------ loading back
def test_reloaded_model_gives_the_same_outputs(world, released):
    import toollmm

    rt = toollmm.load(released)
    assert rt.stage.path == released
    _assert_same_outputs(world["model"], rt.model)


def test_card_peft_snippet_runs_and_matches(world, released, tmp_path):
    _assert_peft_snippet_matches(released, world["model"], tmp_path)


@pytest.mark.slow
def test_card_toollmm_snippet_runs(released, tmp_path):
    """The card's toollmm snippet, as written (REPO pointed at the local folder), in a fresh interpreter."""
    run = _run(_snippet((released / "README.md").read_text(), "toollmm.load(REPO)", released), tmp_path)
    assert "[]" in run.stdout  # the tool_results / signals lists printed after the text


def test_merged_llm_serves_without_peft(world, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hub"
    code, text = _release(world["stage"], out, "--merge", capsys=capsys)
    assert code == 0 and "WARNING: merged/ holds the whole LLM" in text
    assert "  merged/model.safetensors" in text
    _check_folder(out, [world["base"]], world["model"])  # outside merged/ nothing changes
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    tok = AutoTokenizer.from_pretrained(out / "merged")
    model = world["model"]
    probe = [
        1,
        *tok.encode("USER: hi", add_special_tokens=False),
        *model.bundle.token_ids.signal["video"][:3],
    ]
    with torch.no_grad():
        a, b = (
            merged(input_ids=torch.tensor([probe])).logits,
            model.llm(input_ids=torch.tensor([probe])).logits,
        )
    assert torch.allclose(a, b, atol=1e-5)
    assert all(v["numel"] > 0 for v in tensor_report(out / "merged" / "model.safetensors").values())


# ------------------------------------------------------------------------------------------ refusals
def test_refuses_an_untrained_adapter(world, tmp_path, capsys):
    model, cfg = world["model"], world["cfg"]
    lora_b = [p for n, p in model.llm.named_parameters() if "lora_B" in n]
    kept = [p.detach().clone() for p in lora_b]
    try:
        with torch.no_grad():
            for p in lora_b:
                p.zero_()
        stage = save_stage(model, cfg, tmp_path / "stage_3")
    finally:
        with torch.no_grad():
            for p, k in zip(lora_b, kept):
                p.copy_(k)
    assert _release(stage, tmp_path / "hub")[0] == 2
    assert "lora_B is all zero" in capsys.readouterr().err
    assert not (tmp_path / "hub").exists() and not (tmp_path / "hub.tmp").exists()


def test_bad_arguments_and_foreign_out_folder(world, tmp_path, capsys):
    assert release_cli.main(["--checkpoint", str(world["stage"]), "--repo-id", "no-owner", "--dry-run"]) == 2
    assert "--repo-id 'no-owner'" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert _release(world["stage"], foreign)[0] == 2
    assert "not a toollmm release folder" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert _release(tmp_path / "nothing", tmp_path / "hub")[0] == 2
    assert "no stage.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ upload
class RecordingApi:
    """Stands in for HfApi offline: records the calls the real upload would make."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))


def test_upload_calls_and_token_handling(world, released, tmp_path, monkeypatch, capsys):
    api = RecordingApi()
    assert upload(released, REPO_ID, private=True, api=api) == f"https://huggingface.co/{REPO_ID}"
    (_, repo, kw), (_, up) = api.calls
    assert repo == REPO_ID and kw["private"] is True and kw["exist_ok"] is True
    assert up["folder_path"] == str(released) and up["delete_patterns"] == "*" and up["repo_id"] == REPO_ID
    # without a token: a clear error, nothing uploaded
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no_token"))
    with pytest.raises(ReleaseError, match="hf auth login"):
        upload(released, REPO_ID)
    # a token in the environment is never printed or written
    monkeypatch.setenv("HF_TOKEN", "hf_secretTOKEN123")
    out = tmp_path / "hub"
    code, text = _release(world["stage"], out, capsys=capsys)
    assert code == 0 and "hf_secretTOKEN123" not in text
    assert not [p for p in out.rglob("*") if p.is_file() and b"hf_secretTOKEN123" in p.read_bytes()]


# ------------------------------------------------------------------------------------------ a real run
REAL = resolve(os.environ.get("TOOLLMM_RELEASE_CHECKPOINT", "outputs/demo/stage_3"))


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "stage.json").is_file(), reason=f"no stage folder {REAL}")
def test_release_of_a_real_checkpoint(tmp_path, capsys):
    """The checks above on a trained stage folder and its release (the demo's by default)."""
    import toollmm

    given = os.environ.get("TOOLLMM_RELEASE_FOLDER")
    out = resolve(given) if given else tmp_path / "hub"
    if not given:
        code, text = _release(REAL, out, capsys=capsys)
        assert code == 0 and _listed(text) == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    saved = load_stage(REAL).model
    bases = read_manifest(REAL, verify=False)["base_models"]
    paths = [bases["llm"], bases["encoder"], *bases.get("decoders", {}).values()]
    _check_folder(out, [resolve(b["path"]) for b in paths if b and b.get("path")], saved)
    _assert_same_outputs(saved, toollmm.load(out).model)
    _assert_peft_snippet_matches(out, saved, tmp_path)
