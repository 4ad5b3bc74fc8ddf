"""Conditioning shapes read from decoder configs: the real decoders' committed configs and bad folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from toollmm.model.decoders import DecoderError, condition_shape

FIXTURES = Path(__file__).parents[1] / "fixtures" / "decoders"
REAL = ["stable-diffusion-v1-5", "zeroscope_v2_576w", "audioldm-l-full"]


def test_real_decoders_condition_shapes():
    # The published shapes: CLIP ViT-L/14 77x768, OpenCLIP ViT-H 77x1024, one pooled CLAP 512 vector.
    assert condition_shape(FIXTURES / "stable-diffusion-v1-5") == (77, 768)
    assert condition_shape(FIXTURES / "zeroscope_v2_576w") == (77, 1024)
    assert condition_shape(FIXTURES / "audioldm-l-full") == (1, 512)


def _text_condition(name: str, n_query: int) -> torch.Tensor:
    """Run the real text encoder built from the fixture config on the meta device (no weights)."""
    from transformers import ClapTextConfig, ClapTextModelWithProjection, CLIPTextConfig, CLIPTextModel

    cfg_file = FIXTURES / name / "text_encoder" / "config.json"
    ids = torch.ones(1, n_query, dtype=torch.long)
    with torch.device("meta"):
        if name == "audioldm-l-full":
            te = ClapTextModelWithProjection(ClapTextConfig.from_json_file(cfg_file))
            # CLAP pools any caption to one vector (its forward needs real data for the mask, so start
            # from the pooled hidden state) and projects it: that projection decides the width.
            return te.text_projection(torch.zeros(1, te.config.hidden_size))[:, None]
        return CLIPTextModel(CLIPTextConfig.from_json_file(cfg_file))(ids).last_hidden_state


@pytest.mark.parametrize("name", REAL)
def test_real_configs_build_models_that_agree_with_the_shape(name):
    """The committed configs describe models diffusers/transformers can build, and the real UNet accepts
    exactly what the real text encoder emits: shape-level forward passes on the meta device."""
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    n_query, dim = condition_shape(FIXTURES / name)
    cond = _text_condition(name, n_query)
    assert tuple(cond.shape) == (1, n_query, dim)
    unet_cfg = json.loads((FIXTURES / name / "unet" / "config.json").read_text())
    video = name == "zeroscope_v2_576w"
    with torch.device("meta"):
        unet = (UNet3DConditionModel if video else UNet2DConditionModel).from_config(unet_cfg)
        sample = torch.zeros(1, unet.config.in_channels, *((2, 8, 8) if video else (8, 8)))

        def run(c):
            if name == "audioldm-l-full":  # AudioLDM: the pooled vector is a class embedding
                return unet(sample, 10, encoder_hidden_states=None, class_labels=c[:, 0]).sample
            return unet(sample, 10, encoder_hidden_states=c).sample

        assert run(cond).shape == sample.shape
        with pytest.raises(RuntimeError):  # one unit too wide: the UNet refuses it
            run(torch.zeros(1, n_query, dim + 1))


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DecoderError, match="decoder folder not found: .*nowhere"):
        condition_shape(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "rel", ["model_index.json", "text_encoder/config.json", "unet/config.json"], ids=lambda r: r.split("/")[0]
)
def test_missing_config_file_is_named(tmp_path, rel):
    folder = _copy("stable-diffusion-v1-5", tmp_path)
    (folder / rel).unlink()
    with pytest.raises(DecoderError, match=f"{folder / rel}: file not found"):
        condition_shape(folder)


def test_unreadable_json_is_named(tmp_path):
    folder = _copy("zeroscope_v2_576w", tmp_path)
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(DecoderError, match="unet/config.json: not readable JSON"):
        condition_shape(folder)


def test_text_encoder_unet_mismatch_names_both_files(tmp_path):
    folder = _copy("stable-diffusion-v1-5", tmp_path)
    _edit(folder / "unet" / "config.json", cross_attention_dim=1024)  # an SD 2.x UNet with a v1 encoder
    with pytest.raises(DecoderError) as e:
        condition_shape(folder)
    msg = str(e.value)
    assert "unet/config.json: cross_attention_dim 1024" in msg and "text_encoder/config.json" in msg


def test_tokenizer_length_mismatch_is_named(tmp_path):
    folder = _copy("stable-diffusion-v1-5", tmp_path)
    _edit(folder / "tokenizer" / "tokenizer_config.json", model_max_length=64)
    with pytest.raises(DecoderError, match="tokenizer_config.json: model_max_length 64"):
        condition_shape(folder)


def test_audioldm_projection_mismatch_is_named(tmp_path):
    folder = _copy("audioldm-l-full", tmp_path)
    _edit(folder / "text_encoder" / "config.json", projection_dim=768)
    with pytest.raises(DecoderError, match="unet/config.json: expected class_embed_type 'simple_projection'"):
        condition_shape(folder)


def test_unsupported_text_encoder_is_named(tmp_path):
    folder = _copy("stable-diffusion-v1-5", tmp_path)
    _edit(folder / "model_index.json", text_encoder=["transformers", "T5EncoderModel"])
    with pytest.raises(
        DecoderError, match="model_index.json: text encoder 'T5EncoderModel' is not supported"
    ):
        condition_shape(folder)


def test_bad_field_value_is_named(tmp_path):
    folder = _copy("zeroscope_v2_576w", tmp_path)
    _edit(folder / "text_encoder" / "config.json", hidden_size="1024")
    with pytest.raises(
        DecoderError, match="text_encoder/config.json: `hidden_size` must be a positive integer"
    ):
        condition_shape(folder)


def test_unfetchable_hub_id_is_a_clear_error():
    # Tests run offline (HF_HUB_OFFLINE=1): a Hub id with no local folder cannot be resolved.
    with pytest.raises(DecoderError, match="no folder at .* Hub repo's configs could not be fetched"):
        condition_shape("toollmm-test/not-a-real-decoder")
