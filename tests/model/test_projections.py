"""Input and output projections; the conditioning shape comes from the decoder's config files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from toollmm.core.config import InputProjConfig, OutputProjConfig
from toollmm.model.decoders import condition_shape
from toollmm.model.param_count import input_proj_count, output_proj_count
from toollmm.model.projections import InputProjection, OutputProjection

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("k", [1, 3])
def test_input_projection_emits_tokens_per_input(kind, k):
    proj = InputProjection(16, 24, InputProjConfig(type=kind, tokens_per_input=k))
    feats = torch.randn(5, 2, 16)  # 5 media, 2 encoder outputs each (per-clip)
    out = proj(feats)
    assert out.shape == (5, 2 * k, 24)
    # token j of output i depends only on encoder output i (per-output projection, no mixing)
    feats2 = feats.clone()
    feats2[:, 1] += 1.0
    out2 = proj(feats2)
    torch.testing.assert_close(out2[:, :k], out[:, :k])
    assert not torch.allclose(out2[:, k:], out[:, k:])
    assert sum(p.numel() for p in proj.parameters()) == input_proj_count(16, 24, kind, k)
    with pytest.raises(ValueError, match=r"\[N, n_out, 16\]"):
        proj(torch.randn(5, 17))


@pytest.mark.parametrize(
    "folder, expected",
    [("stable-diffusion-v1-5", (77, 768)), ("zeroscope_v2_576w", (77, 1024)), ("audioldm-l-full", (1, 512))],
)
def test_output_projection_shape_is_read_from_the_decoder_config(folder, expected):
    shape = condition_shape(FIXTURES / "decoders" / folder)  # the real decoders' committed configs
    assert shape == expected
    cfg = OutputProjConfig(
        d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64
    )
    proj = OutputProjection(48, *shape, cfg)
    signal_states = torch.randn(3, 4, 48)  # 3 spans of 4 signal tokens
    assert proj(signal_states).shape == (3, *expected)
    assert sum(p.numel() for p in proj.parameters()) == output_proj_count(48, *expected, 32, 64, 2, 2)


def test_default_output_projection_is_nextgpt_shaped():
    proj = OutputProjection(4096, 77, 768, OutputProjConfig())
    layers = proj.transformer.encoder.layers, proj.transformer.decoder.layers
    assert [len(x) for x in layers] == [4, 4]
    assert proj.inp.out_features == 512 and proj.queries.shape == (77, 512)
    assert layers[0][0].self_attn.num_heads == 4 and layers[0][0].linear1.out_features == 2048
    assert layers[0][0].norm_first and proj.out.out_features == 768
