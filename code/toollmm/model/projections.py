"""Projections between the frozen encoder, the LLM and the diffusion decoders.

* :class:`InputProjection`: encoder outputs ``[N, n_out, D_enc]`` -> LLM tokens ``[N, n_out * k, H]``
  (``k = tokens_per_input``), ``linear`` (the anchors' default) or ``mlp`` (2-layer GELU). One projection
  serves every modality (ImageBind's joint space).
* :class:`OutputProjection`: NExT-GPT's shape, one per modality. The signal span's states ``[K, S, H]``
  (last-layer hidden states + input embeddings of the signal tokens) go through
  Linear(H -> d_model) -> nn.Transformer (encoder over the span, decoder over ``n_query`` learned queries)
  -> Linear(d_model -> cond_dim), giving the decoder's conditioning ``[K, n_query, cond_dim]``.
  ``(n_query, cond_dim)`` is read from the decoder's own config (:func:`condition_shape_of`), so swapping
  a decoder cannot give a shape mismatch (NExT-GPT #102).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import InputProjConfig, OutputProjConfig


class InputProjection(nn.Module):
    def __init__(self, in_dim: int, hidden: int, cfg: InputProjConfig):
        super().__init__()
        if cfg.tokens_per_input < 1:
            raise ValueError(f"model.input_proj.tokens_per_input must be >= 1, got {cfg.tokens_per_input}")
        self.in_dim, self.hidden, self.tokens_per_input = in_dim, hidden, cfg.tokens_per_input
        out = hidden * cfg.tokens_per_input
        if cfg.type == "linear":
            self.net = nn.Linear(in_dim, out)
        elif cfg.type == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out))
        else:
            raise ValueError(f"model.input_proj.type: unknown {cfg.type!r} (linear, mlp)")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3 or features.shape[-1] != self.in_dim:
            raise ValueError(
                f"input projection expects features [N, n_out, {self.in_dim}], got {tuple(features.shape)}"
            )
        n, n_out, _ = features.shape
        w = next(self.parameters())
        y = self.net(features.to(w.dtype))
        return y.reshape(n, n_out * self.tokens_per_input, self.hidden)


class OutputProjection(nn.Module):
    def __init__(self, hidden: int, n_query: int, cond_dim: int, cfg: OutputProjConfig):
        super().__init__()
        self.n_query, self.cond_dim, self.hidden = n_query, cond_dim, hidden
        d = cfg.d_model
        self.inp = nn.Linear(hidden, d)
        layer = nn.TransformerEncoderLayer(
            d, cfg.num_heads, cfg.dim_feedforward, cfg.dropout, batch_first=True, norm_first=True
        )
        encoder = nn.TransformerEncoder(
            layer, cfg.num_encoder_layers, norm=nn.LayerNorm(d), enable_nested_tensor=False
        )
        self.transformer = nn.Transformer(
            d_model=d,
            nhead=cfg.num_heads,
            num_decoder_layers=cfg.num_decoder_layers,
            dim_feedforward=cfg.dim_feedforward,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=True,
            custom_encoder=encoder,
        )
        self.queries = nn.Parameter(torch.randn(n_query, d) * 0.02)
        self.out = nn.Linear(d, cond_dim)

    def forward(self, signal_states: torch.Tensor) -> torch.Tensor:
        """``[K, S, hidden]`` -> ``[K, n_query, cond_dim]``."""
        if signal_states.dim() != 3 or signal_states.shape[-1] != self.hidden:
            raise ValueError(
                f"output projection expects [K, span, {self.hidden}], got {tuple(signal_states.shape)}"
            )
        x = self.inp(signal_states.to(self.inp.weight.dtype))
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.out(self.transformer(x, q))


def condition_shape_of(pipeline_dir: str | Path) -> tuple[int, int]:
    """``(n_query, cond_dim)`` of a diffusers pipeline folder: what its UNet is conditioned on.

    LEAD-SWAP: ``toollmm.model.decoders.condition_shape`` (built by the decoder helper) is the owner of
    this fact; it is used as soon as it exists. The local fallback below only serves until that lands.
    """
    try:
        from .decoders import condition_shape
    except ImportError:
        return _fallback_condition_shape(pipeline_dir)
    return condition_shape(pipeline_dir)


def _fallback_condition_shape(pipeline_dir: str | Path) -> tuple[int, int]:
    """LEAD-SWAP fallback, to delete when ``toollmm.model.decoders`` is on main.

    AudioLDM's UNet takes one projected CLAP vector (``class_embed_type: simple_projection``):
    ``(1, projection_class_embeddings_input_dim)``. SD / ZeroScope's UNets cross-attend to the CLIP text
    encoder's sequence: ``(text_encoder.max_position_embeddings, unet.cross_attention_dim)``.
    """
    root = Path(pipeline_dir)

    def read(sub: str) -> dict:
        f = root / sub / "config.json"
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"decoder config missing: {f}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"decoder config {f} is not valid JSON: {e}") from None

    unet = read("unet")
    if unet.get("class_embed_type") == "simple_projection":
        return 1, int(unet["projection_class_embeddings_input_dim"])
    text = read("text_encoder")
    n_query = text.get("max_position_embeddings")
    cross = unet.get("cross_attention_dim")
    if n_query is None or cross is None:
        raise ValueError(
            f"{root}: cannot read the conditioning shape (text_encoder.max_position_embeddings="
            f"{n_query}, unet.cross_attention_dim={cross})"
        )
    return int(n_query), int(cross)
