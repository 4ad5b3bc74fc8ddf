"""Projections between the frozen encoder, the LLM and the diffusion decoders.

* :class:`InputProjection`: encoder outputs ``[N, n_out, D_enc]`` -> LLM tokens ``[N, n_out * k, H]``
  (``k = tokens_per_input``), ``linear`` (the anchors' default) or ``mlp`` (2-layer GELU). One projection
  serves every modality (ImageBind's joint space).
* :class:`OutputProjection`: NExT-GPT's shape, one per modality. The signal span's states ``[K, S, H]``
  (last-layer hidden states + input embeddings of the signal tokens) go through
  Linear(H -> d_model) -> nn.Transformer (encoder over the span, decoder over ``n_query`` learned queries)
  -> Linear(d_model -> cond_dim), giving the decoder's conditioning ``[K, n_query, cond_dim]``.
  ``(n_query, cond_dim)`` is read from the decoder's own config (``toollmm.model.decoders.condition_shape``), so swapping
  a decoder cannot give a shape mismatch (NExT-GPT #102).
"""

from __future__ import annotations

import torch
from torch import nn

from toollmm.core.config import InputProjConfig, OutputProjConfig


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
