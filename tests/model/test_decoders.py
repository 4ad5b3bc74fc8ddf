"""Tiny diffusion pipelines built from configs: save/load by path, conditioning, generation, the pool."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from toollmm.core.config import DecoderConfig
from toollmm.model.decoders import (
    DecoderError,
    DecoderPool,
    condition_shape,
    condition_shapes,
    device_and_dtype,
)
from toollmm.model.tiny_decoders import DEFAULT_SPECS, build_clip_tokenizer, build_tiny_decoders

MODALITIES = ("image", "video", "audio")
CAPTIONS = ["a red circle moving left", "a high tone followed by a low tone"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return build_tiny_decoders(tmp_path_factory.mktemp("tiny_decoders"), seed=0)


def _pool(tiny_dirs, **overrides) -> DecoderPool:
    settings = {"num_inference_steps": 2, "num_frames": 3, **overrides}
    return DecoderPool({m: DecoderConfig(path=str(p), **settings) for m, p in tiny_dirs.items()})


@pytest.fixture(scope="module")
def pool(tiny_dirs):
    return _pool(tiny_dirs)


def _load(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def test_tiny_condition_shapes_come_from_configs_and_differ(tiny_dirs):
    shapes = {m: condition_shape(p) for m, p in tiny_dirs.items()}
    assert shapes == {m: (DEFAULT_SPECS[m].n_query, DEFAULT_SPECS[m].cond_dim) for m in MODALITIES}
    assert len({s[1] for s in shapes.values()}) == 3, "cond dims must differ so a mix-up fails loudly"


def test_save_load_by_path_round_trip(tiny_dirs, tmp_path):
    from diffusers import AudioLDMPipeline, StableDiffusionPipeline, TextToVideoSDPipeline

    classes = {"image": StableDiffusionPipeline, "video": TextToVideoSDPipeline, "audio": AudioLDMPipeline}
    tokenizers = {"image": "CLIPTokenizer", "video": "CLIPTokenizer", "audio": "RobertaTokenizer"}
    again = build_tiny_decoders(tmp_path / "same_seed", seed=0, modalities=["image"])["image"]
    other = build_tiny_decoders(tmp_path / "other_seed", seed=1, modalities=["image"])["image"]
    for m, folder in tiny_dirs.items():
        generic, specific = _load(folder), classes[m].from_pretrained(folder)
        assert type(generic) is classes[m]
        assert type(specific.tokenizer).__name__ == tokenizers[m]
        ids = specific.tokenizer(CAPTIONS[0]).input_ids
        assert ids[0] == specific.tokenizer.bos_token_id and ids[-1] == specific.tokenizer.eos_token_id
        assert max(ids) < specific.text_encoder.config.vocab_size
        for name in ("unet", "text_encoder", "vae"):
            a, b = getattr(generic, name).state_dict(), getattr(specific, name).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (m, name)
    first, same, diff = (_load(d).unet.state_dict() for d in (tiny_dirs["image"], again, other))
    assert all(torch.equal(first[k], same[k]) for k in first), "same seed must give the same weights"
    assert not all(torch.equal(first[k], diff[k]) for k in first), "another seed must give other weights"


def test_clip_tokenizer_matches_imagebind_simple_tokenizer(tmp_path):
    """With every merge, the CLIP tokenizer built from imagebind's BPE file is OpenAI CLIP's tokenizer."""
    from toollmm.core.compat import apply

    apply()
    from imagebind.models.multimodal_preprocessors import SimpleTokenizer

    from toollmm.model.tiny_decoders import imagebind_bpe_path

    ours = build_clip_tokenizer(tmp_path, model_max_length=77, num_merges=48894)
    assert len(ours) == 49408  # CLIP's vocabulary size
    reference = SimpleTokenizer(str(imagebind_bpe_path()))
    sot, eot = reference.encoder["<|startoftext|>"], reference.encoder["<|endoftext|>"]
    for text in CAPTIONS + ["Thought: Do I need a tool? Yes, 3 dogs & a café!"]:
        assert ours(text).input_ids == [sot, *reference.encode(text), eot], text


def test_pool_constructs_each_pipeline_once(tiny_dirs):
    pool = _pool(tiny_dirs)
    assert sum(pool.constructions.values()) == 0, "nothing is loaded before it is needed"
    first = pool.pipeline("image")
    pool.encode_captions("image", CAPTIONS)
    assert pool.pipeline("image") is first
    assert pool.constructions == {"image": 1}


@pytest.mark.parametrize("modality", MODALITIES)
def test_encode_captions_is_the_pipelines_own_conditioning(pool, modality):
    pipe = pool.pipeline(modality)
    got = pool.encode_captions(modality, CAPTIONS, batch_size=1)
    assert got.shape == (len(CAPTIONS), *pool.condition_shape(modality)) and got.dtype == torch.float32
    with torch.no_grad():
        if modality == "audio":
            ref = pipe._encode_prompt(CAPTIONS[0], pipe.device, 1, False)[:, None]
            tok = pipe.tokenizer(CAPTIONS[0], padding="max_length", truncation=True, return_tensors="pt")
            manual = pipe.text_encoder(tok.input_ids, attention_mask=tok.attention_mask).text_embeds
            manual = torch.nn.functional.normalize(manual, dim=-1)[:, None]
        else:
            ref = pipe.encode_prompt(CAPTIONS[0], pipe.device, 1, False)[0]
            tok = pipe.tokenizer(CAPTIONS[0], padding="max_length", truncation=True, return_tensors="pt")
            manual = pipe.text_encoder(tok.input_ids)[0]
    assert torch.equal(got[:1], ref)
    torch.testing.assert_close(got[:1], manual)  # tokenizer + text encoder by hand agree too
    assert not torch.allclose(got[0], got[1]), "different captions, different targets"


def test_negative_embeds_are_the_empty_prompt_and_cached(pool):
    neg = pool.negative_embeds("image")
    assert torch.equal(neg, pool.encode_captions("image", [""])[0])
    assert pool.negative_embeds("image") is neg


def _read_png(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _read_mp4(path):
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _read_wav(path):
    import soundfile as sf

    return sf.read(str(path))


@pytest.mark.parametrize("modality", MODALITIES)
def test_generate_writes_a_readable_file_from_prompt_embeds(pool, tmp_path, modality):
    embeds = pool.encode_captions(modality, CAPTIONS[:1])  # [1, n_query, dim] is accepted as is
    path = pool.generate(modality, embeds, seed=3, out_path=tmp_path / modality)
    assert path.suffix == {"image": ".png", "video": ".mp4", "audio": ".wav"}[modality]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left"
    pipe = pool.pipeline(modality)
    if modality == "image":
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        assert _read_png(path).shape == (size, size, 3)
    elif modality == "video":
        frames = _read_mp4(path)
        assert frames.shape[0] == pool.config("video").num_frames and frames.shape[-1] == 3
    else:
        audio, rate = _read_wav(path)
        assert rate == pipe.vocoder.config.sampling_rate and audio.ndim == 1 and len(audio) > 0


def test_generation_is_deterministic_and_uses_the_empty_prompt_for_guidance(pool, tmp_path):
    cond = pool.encode_captions("image", CAPTIONS[:1])[0]
    a = _read_png(pool.generate("image", cond, seed=7, out_path=tmp_path / "a.png"))
    b = _read_png(pool.generate("image", cond, seed=7, out_path=tmp_path / "b.png"))
    explicit = pool.encode_captions("image", [""])[0]
    c = _read_png(pool.generate("image", cond, explicit, seed=7, out_path=tmp_path / "c.png"))
    d = _read_png(pool.generate("image", cond, seed=8, out_path=tmp_path / "d.png"))
    other = torch.zeros_like(cond)
    e = _read_png(pool.generate("image", cond, other, seed=7, out_path=tmp_path / "e.png"))
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert not np.array_equal(a, d), "another seed, another image"
    assert not np.array_equal(a, e), "the negative embedding takes part in guidance"


def test_wrong_shape_is_refused_naming_the_expected_shape(pool, tmp_path):
    video_cond = pool.encode_captions("video", CAPTIONS[:1])
    (vq, vd), (iq, idim) = pool.condition_shape("video"), pool.condition_shape("image")
    with pytest.raises(DecoderError, match=rf"shape \(1, {vq}, {vd}\).* takes \({iq}, {idim}\)"):
        pool.generate("image", video_cond, out_path=tmp_path / "x.png")
    bad = torch.full(pool.condition_shape("audio"), float("nan"))
    with pytest.raises(DecoderError, match="NaN"):
        pool.generate("audio", bad, out_path=tmp_path / "x.wav")
    with pytest.raises(ValueError, match=r"x.jpg: a generated image is written as \.png"):
        pool.generate("image", pool.negative_embeds("image"), out_path=tmp_path / "x.jpg")


def test_pool_errors_name_the_problem(tiny_dirs, tmp_path):
    swapped = DecoderPool({"image": DecoderConfig(path=str(tiny_dirs["audio"]))})
    with pytest.raises(
        DecoderError, match="image needs a StableDiffusionPipeline, this folder is a AudioLDM"
    ):
        swapped.pipeline("image")
    missing = DecoderPool({"video": DecoderConfig(path=str(tmp_path / "no_such_pipeline"))})
    with pytest.raises(DecoderError, match="decoder folder not found: .*no_such_pipeline"):
        missing.pipeline("video")
    assert missing.constructions["video"] == 0
    broken = shutil.copytree(tiny_dirs["audio"], tmp_path / "broken")
    (broken / "model_index.json").unlink()
    with pytest.raises(DecoderError, match="broken/model_index.json: file not found"):
        DecoderPool({"audio": DecoderConfig(path=str(broken))}).pipeline("audio")
    disabled = DecoderPool({"audio": DecoderConfig(path=None)})
    assert disabled.enabled() == []
    with pytest.raises(
        DecoderError, match=r"audio decoder is disabled \(model.decoders.audio.path is null\)"
    ):
        disabled.encode_captions("audio", ["x"])
    with pytest.raises(DecoderError, match="no decoder configured for 'video'"):
        disabled.generate("video", torch.zeros(1, 1), out_path=tmp_path / "v")


def test_device_and_dtype_policy():
    # CPU is always float32, whatever precision was asked for (GPU dtypes are only used on CUDA).
    for asked in ("auto", "float32", "bfloat16", "float16"):
        assert device_and_dtype(asked, "cpu") == (torch.device("cpu"), torch.float32)
    if not torch.cuda.is_available():  # asking for a GPU that torch cannot use stops with a clear error
        with pytest.raises(DecoderError, match="'cuda:0' requested but CUDA is not available"):
            device_and_dtype("auto", "cuda:0")


def test_tiny_configs_are_small(tiny_dirs):
    # Small enough for every test and the demo: each whole pipeline folder stays under 4 MB.
    for m, folder in tiny_dirs.items():
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size < 4_000_000, (m, size)
        assert json.loads((folder / "model_index.json").read_text())["_class_name"].endswith("Pipeline")


def test_condition_shapes_of_enabled_decoders(tiny_dirs):
    decoders = {"image": DecoderConfig(path=str(tiny_dirs["image"])), "video": DecoderConfig(path=None)}
    assert condition_shapes(decoders) == {"image": condition_shape(tiny_dirs["image"])}


@pytest.mark.slow
def test_tiny_decoder_timings(tmp_path):
    """Build, construct (load by path) and 2-step generation times; prints a table (run with -s)."""
    import time

    import diffusers  # noqa: F401  (import cost is not the pipelines' cost)
    from diffusers import AudioLDMPipeline, StableDiffusionPipeline, TextToVideoSDPipeline  # noqa: F401

    rows = []
    for m in MODALITIES:
        start = time.perf_counter()
        folder = build_tiny_decoders(tmp_path, seed=0, modalities=[m])[m]
        built = time.perf_counter() - start
        pool = DecoderPool({m: DecoderConfig(path=str(folder), num_inference_steps=2, num_frames=8)})
        start = time.perf_counter()
        pool.pipeline(m)
        loaded = time.perf_counter() - start
        cond = pool.encode_captions(m, CAPTIONS[:1])[0]
        pool.negative_embeds(m)
        gens = []
        for seed in range(3):
            start = time.perf_counter()
            pool.generate(m, cond, seed=seed, out_path=tmp_path / f"{m}{seed}")
            gens.append(time.perf_counter() - start)
        rows.append((m, built, loaded, float(np.median(gens))))
    print("\nmodality  build_s  load_s  generate_2_steps_s (median of 3, incl. writing the file)")
    for m, b, ld, g in rows:
        print(f"{m:8s}  {b:7.3f}  {ld:6.3f}  {g:7.3f}")
    assert all(g < 5.0 for *_, g in rows), rows  # target is well under 1 s; 5 s leaves room on busy hosts
