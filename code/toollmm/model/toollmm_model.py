"""The composed model: (frozen encoder) -> input projection -> LLM (+LoRA, + new token rows) -> output
projections. It holds its parts (compose, don't inherit) and speaks the batch contract of
``toollmm.core.batch``: projected encoder tokens are written, in row-major order, at the placeholder
positions the renderer already expanded to their final count.

``forward(batch)`` returns every loss term by name: ``lm``, ``align_<modality>`` for each modality
with an output projection (0 when the batch has no target for it) and ``loss``, their weighted sum
(``train.loss_weights``: ``lm``, ``align`` and per-modality ``align_<modality>``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from toollmm.core.batch import Batch, MediaInputs
from toollmm.core.config import ModelConfig, OptimConfig
from toollmm.core.tokens import MODALITIES

from .decoders import condition_shape
from .kernels import fused_lm_loss, fused_loss_head
from .llm import LLMBundle, build_llm
from .losses import (
    align_weight,
    check_loss_weights,
    l2_alignment,
    lm_loss_at,
    next_token_targets,
    prepare_attention_mask,
)
from .packed_attention import packed_attention_kwargs
from .projections import InputProjection, OutputProjection

log = logging.getLogger(__name__)

#: THE vocabulary of the model's trainable parts, one set of names for everything that speaks of them:
#: ``train.trainable`` and ``train.optim.group_lr``, the ``parts`` a delta file and a stage manifest record
#: (``toollmm.checkpoint.delta``) and the release card. ``token_rows.<group>`` are the new rows of one
#: token group (embedding and untied lm_head rows); a delta holds every new token row whatever its parts.
PARTS = (
    "input_proj",
    *(f"output_proj.{m}" for m in MODALITIES),
    "lora",
    "token_rows.signal",
    "token_rows.tool",
    "llm",
)
#: param_groups assigns a parameter to the first part (in this order) that holds it
_GROUP_PRECEDENCE = (
    ("lora", "token_rows.signal", "token_rows.tool", "input_proj")
    + tuple(f"output_proj.{m}" for m in MODALITIES)
    + ("llm",)
)


class ToolLMM(nn.Module):
    def __init__(
        self,
        llm: LLMBundle,
        input_proj: InputProjection,
        output_proj: dict[str, OutputProjection],
        encoder: nn.Module | None = None,
        loss_weights: dict[str, float] | None = None,
    ):
        super().__init__()
        self.bundle = llm
        self.llm = llm.model
        self.input_proj = input_proj
        self.output_proj = nn.ModuleDict(output_proj)
        self.encoder = encoder
        if encoder is not None:
            encoder.eval()
        self.requires_grad_(False)  # nothing trains until trainable_parameters() says so
        self.loss_weights = loss_weights if loss_weights is not None else {"lm": 1.0, "align": 1.0}
        self.trainable_names: list[str] = []  # the PARTS training now
        self.delta_parts: set[str] = set()  # PARTS trained or loaded so far: what a delta must hold

    @property
    def loss_weights(self) -> dict[str, float]:
        return self._loss_weights

    @loss_weights.setter
    def loss_weights(self, weights: dict[str, float]) -> None:
        self._loss_weights = check_loss_weights(weights)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen, always
        return self

    # ------------------------------------------------------------------------------- forward
    def media_features(self, modality: str, media: MediaInputs) -> torch.Tensor:
        """Encoder outputs ``[N, n_out, D]`` for one modality's media (cached features or the encoder)."""
        if media.features is not None:
            return media.features
        if media.pixels is not None:
            if self.encoder is None:
                raise ValueError(
                    f"batch has {modality} pixels (keys {media.keys[:3]}...) but the model was built "
                    "without an encoder; build it with the encoder or feed cached features"
                )
            with torch.no_grad():
                return self.encoder.encode(modality, media.pixels)
        raise ValueError(f"batch.media[{modality!r}] holds neither features nor pixels")

    def media_tokens(self, modality: str, media: MediaInputs) -> torch.Tensor:
        """Projected LLM tokens ``[N, n_out * tokens_per_input, H]`` for one modality's media."""
        return self.input_proj(self.media_features(modality, media))

    def _project_all(
        self, feats: list[torch.Tensor], device
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """ONE input-projection call per forward for every modality's features (each vector is
        projected on its own, so this equals one call per modality), with a zero stand-in when the batch
        has no media. Under ZeRO-3 every rank must call the same modules in the same order (parameter
        gathers are collectives) whatever its data; the stand-in's ``0 * sum`` also gives the projection
        a (zero) gradient on every rank. Returns the tokens per modality and that zero term."""
        dim = self.input_proj.in_dim
        flat = [f.reshape(-1, 1, dim) for f in feats] or [torch.zeros(1, 1, dim)]
        tokens = self.input_proj(torch.cat([f.to(device=device, dtype=torch.float32) for f in flat]))
        if not feats:
            return [], tokens.sum() * 0.0
        out, start = [], 0
        for f in feats:
            n = f.shape[0] * f.shape[1]
            out.append(tokens[start : start + n].reshape(f.shape[0], -1, tokens.shape[-1]))
            start += n
        return out, None

    def embed(self, batch: Batch) -> torch.Tensor:
        """Input embeddings ``[B, T, H]`` with projected media written at the placeholder positions."""
        ids = batch.input_ids
        embeds = self.llm.get_input_embeddings()(ids)
        ph = self.bundle.token_ids.placeholder
        counts = torch.stack([(ids == ph[m]).sum() for m in MODALITIES]).tolist()
        unknown = sorted(set(batch.media) - set(MODALITIES))
        if unknown:
            raise ValueError(f"batch.media: unknown modality {unknown}; known: {list(MODALITIES)}")
        present, feats = [], []
        for m, count in zip(MODALITIES, counts):
            media = batch.media.get(m)
            if media is None or len(media) == 0:
                if count:
                    raise ValueError(
                        f"{count} {m} placeholder tokens but no {m} media in the batch "
                        f"(samples {batch.sample_ids})"
                    )
                continue
            present.append((m, count, media))
            feats.append(self.media_features(m, media))
        projected, zero = self._project_all(feats, ids.device)
        if zero is not None:
            return embeds + zero.to(embeds.dtype)
        for (m, count, media), tokens in zip(present, projected):
            if count != tokens.shape[0] * tokens.shape[1]:
                raise ValueError(
                    f"{m}: {count} placeholder tokens in input_ids but {tokens.shape[0]} media x "
                    f"{tokens.shape[1]} tokens each = {tokens.shape[0] * tokens.shape[1]} "
                    f"(media {media.keys}, samples {batch.sample_ids}); the renderer's media_tokens must "
                    "equal encoder outputs per input x input_proj.tokens_per_input"
                )
            mask = (ids == ph[m]).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, tokens.to(embeds.dtype))
        return embeds

    def run_llm(
        self,
        batch: Batch,
        embeds: torch.Tensor | None = None,
        *,
        logits_at: torch.Tensor | None = None,
        hidden_states: bool = True,
    ):
        """The LLM's output on the batch: logits (``[B, T, V]``, or ``[N, V]`` at the True positions of
        the bool ``logits_at [B, T]``) and, with ``hidden_states``, the hidden states of every layer (the
        last one after the final norm)."""
        embeds = self.embed(batch) if embeds is None else embeds
        impl = self.bundle.attn_implementation
        mask = prepare_attention_mask(batch.attention_mask, impl, embeds.dtype)
        extra = {} if logits_at is None else {"logits_to_keep": logits_at}
        if batch.attention_mask.dim() == 4 and batch.position_ids is not None:
            # packed: sample spans once per batch (one host sync), handed to every layer's kernel
            extra.update(packed_attention_kwargs(impl, batch.position_ids))
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=batch.position_ids,
            output_hidden_states=hidden_states,
            use_cache=False,
            **extra,
        )

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        embeds = self.embed(batch)
        packed = batch.attention_mask.dim() == 4 and batch.position_ids is not None
        starts = (batch.position_ids == 0) if packed else None
        # Logits only where a supervised token is predicted. Hidden states only when the model has output
        # projections: they then run on every micro-batch (idle ones on a zero span wired to the last
        # hidden state, below), so this depends on the model, never on a rank's data.
        keep, targets = next_token_targets(batch.labels, starts)
        needs_hidden = bool(self.output_proj)
        head = self._fused_loss_head()
        if head is None:
            out = self.run_llm(batch, embeds, logits_at=keep, hidden_states=needs_hidden)
            losses = {"lm": lm_loss_at(out.logits, targets)}
        else:  # model.llm.fused_kernels: the same loss from the final hidden states, no [N, V] logits
            out = self.run_llm(batch, embeds, logits_at=torch.zeros_like(keep), hidden_states=True)
            losses = {"lm": fused_lm_loss(out.hidden_states[-1][keep], head, targets)}
        total = self.loss_weights.get("lm", 1.0) * losses["lm"]
        hidden = out.hidden_states[-1] if needs_hidden else None
        orphan = [
            m for m, t in batch.signal_targets.items() if m not in self.output_proj and len(t.positions)
        ]
        if orphan:
            raise ValueError(
                f"batch has signal targets for {orphan} but the model has no output projection for them "
                f"(output projections: {list(self.output_proj)})"
            )
        for m, proj in self.output_proj.items():
            w = align_weight(self.loss_weights, m)
            targets = batch.signal_targets.get(m)
            with torch.set_grad_enabled(torch.is_grad_enabled() and w != 0.0):
                if targets is None or targets.positions.shape[0] == 0:
                    # The projection still runs, on a zero span wired to the same tensors as a real one
                    # (hidden states + input embeddings): under ZeRO-3 every rank and micro-batch must
                    # make the same module calls in the same order, backward included; it also gives
                    # the projection a (zero) gradient on every rank.
                    span = len(self.bundle.token_ids.signal[m])
                    zero_span = ((hidden[:1, :1] + embeds[:1, :1]) * 0.0).expand(1, span, -1)
                    term = proj(zero_span).sum().float() * 0.0
                    losses[f"align_{m}"] = hidden.new_zeros((), dtype=torch.float32)
                else:
                    term = self._align(m, batch, hidden, embeds)
                    losses[f"align_{m}"] = term
            if w != 0.0:
                total = total + w * term
        losses["loss"] = total
        return losses

    def _fused_loss_head(self) -> nn.Module | None:
        """The LM head when ``model.llm.fused_kernels`` computes this training call's LM loss (liger's fused
        linear cross-entropy, ``toollmm.model.kernels``), else None."""
        if not (self.bundle.fused_kernels and self.training):
            return None
        return fused_loss_head(self.llm)

    def _align(self, m: str, batch: Batch, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        targets = batch.signal_targets[m]
        sig = torch.tensor(self.bundle.token_ids.signal[m], device=hidden.device)
        pos = targets.positions.to(hidden.device).long()
        rows, idx = pos[:, :1], pos[:, 1:] + torch.arange(len(sig), device=hidden.device)
        t = batch.input_ids.shape[1]
        ok = (idx < t).all(1) & (batch.input_ids[rows, idx.clamp(max=t - 1)] == sig).all(1)
        if not bool(ok.all()):
            bad = [(int(r), int(s)) for (r, s), good in zip(pos.tolist(), ok.tolist()) if not good]
            raise ValueError(
                f"signal_targets[{m!r}]: spans at (row, start) {bad} are not a full {m} signal span "
                f"{self.bundle.contract.signal_text(m)} in input_ids (samples {batch.sample_ids})"
            )
        pred = self.output_proj[m](hidden[rows, idx] + embeds[rows, idx])
        target = targets.embeddings
        if tuple(target.shape[1:]) != tuple(pred.shape[1:]):
            raise ValueError(
                f"signal_targets[{m!r}]: caption embeddings are {tuple(target.shape[1:])} but the {m} decoder "
                f"is conditioned on {tuple(pred.shape[1:])}; re-embed the captions with this decoder"
            )
        return l2_alignment(pred, target.to(pred.device))

    # --------------------------------------------------------------------------- trainability
    def named_parts(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Each of :data:`PARTS` -> the (qualified name, parameter) pairs it covers."""
        llm_named = list(self.llm.named_parameters(prefix="llm"))
        rows = {id(p): g for r in self.bundle.rows.values() for g, p in r.rows.items()}
        groups = {"input_proj": list(self.input_proj.named_parameters(prefix="input_proj"))}
        for m in MODALITIES:
            proj = self.output_proj[m] if m in self.output_proj else None
            groups[f"output_proj.{m}"] = (
                list(proj.named_parameters(prefix=f"output_proj.{m}")) if proj else []
            )
        groups["lora"] = [(n, p) for n, p in llm_named if "lora_" in n]
        for g in ("signal", "tool"):
            groups[f"token_rows.{g}"] = [(n, p) for n, p in llm_named if rows.get(id(p)) == g]
        groups["llm"] = llm_named
        return groups

    def available_parts(self) -> list[str]:
        """The :data:`PARTS` this model holds (``llm`` is always there but only saved when trained)."""
        out = ["input_proj", *(f"output_proj.{m}" for m in MODALITIES if m in self.output_proj)]
        return out + (["lora"] if self.bundle.lora else []) + ["token_rows.signal", "token_rows.tool"]

    def trainable_parameters(self, names: list[str]) -> dict[str, int]:
        """Make exactly the parameters named by ``names`` trainable (everything else frozen); returns
        the parameter count per name."""
        bad = [n for n in names if n not in PARTS]
        if bad:
            raise ValueError(f"train.trainable: unknown name(s) {bad}; vocabulary: {list(PARTS)}")
        if "lora" in names and not self.bundle.lora:
            raise ValueError("train.trainable lists `lora` but model.llm.lora.enabled is false")
        missing = [
            n for n in names if n.startswith("output_proj.") and n.split(".", 1)[1] not in self.output_proj
        ]
        if missing:
            raise ValueError(
                f"train.trainable lists {missing} but the model has no such output projection "
                "(model.decoders.<m>.path is null or model.output_proj.<m>.enabled is false)"
            )
        groups = self.named_parts()
        self.requires_grad_(False)
        for n in names:
            for _, p in groups[n]:
                p.requires_grad_(True)
        self.trainable_names = list(dict.fromkeys(names))
        self.delta_parts |= set(names)
        counts = {n: sum(p.numel() for _, p in groups[n]) for n in self.trainable_names}
        log.info("trainable parameters: %s", counts)
        return counts

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """Optimiser groups: one learning rate per trainable name (``optim.group_lr``, else ``optim.lr``),
        no weight decay on norms, biases (any 1-D parameter) and token rows."""
        bad = [k for k in optim.group_lr if k not in PARTS]
        if bad:
            raise ValueError(f"train.optim.group_lr: unknown name(s) {bad}; vocabulary: {list(PARTS)}")
        groups = self.named_parts()
        row_ids = {id(p) for r in self.bundle.rows.values() for p in r.rows.values()}
        seen: set[int] = set()
        out: list[dict] = []
        for name in _GROUP_PRECEDENCE:
            if name not in self.trainable_names:
                continue
            decay, no_decay = [], []
            for pname, p in groups[name]:
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                plain = p.ndim < 2 or "norm" in pname.lower() or id(p) in row_ids
                (no_decay if plain else decay).append(p)
            lr = optim.group_lr.get(name, optim.lr)
            for suffix, params, wd in (("", decay, optim.weight_decay), (".no_decay", no_decay, 0.0)):
                if params:
                    out.append({"name": name + suffix, "params": params, "lr": lr, "weight_decay": wd})
        return out


def build_model(
    cfg: ModelConfig,
    *,
    llm: LLMBundle | None = None,
    encoder: nn.Module | None = None,
    with_encoder: bool = False,
    condition_shapes: dict[str, tuple[int, int]] | None = None,
    loss_weights: dict[str, float] | None = None,
) -> ToolLMM:
    """Build the composed model from ``cfg``. ``llm``: an already prepared LLM (tests, meta device);
    ``encoder``/``with_encoder``: without one the batches must carry cached features;
    ``condition_shapes``: per-modality ``(n_query, cond_dim)``, else read from ``cfg.decoders[m].path``."""
    llm = llm if llm is not None else build_llm(cfg.llm, cfg.tokens)
    if encoder is None and with_encoder:
        from .encoder import build_encoder

        encoder = build_encoder(cfg)
    enc_dim = int(encoder.out_dim) if encoder is not None else cfg.encoder.dims.out_embed_dim
    hidden = llm.hidden_size
    dtype = llm.hf_model.get_input_embeddings().weight.dtype
    input_proj = InputProjection(enc_dim, hidden, cfg.input_proj)
    outs: dict[str, OutputProjection] = {}
    for m in MODALITIES:
        pc, dc = cfg.output_proj.get(m), cfg.decoders.get(m)
        if pc is None or not pc.enabled:
            continue
        if condition_shapes is not None and m in condition_shapes:
            shape = condition_shapes[m]
        elif dc is not None and dc.path:
            shape = condition_shape(dc.path)
        else:
            continue
        outs[m] = OutputProjection(hidden, int(shape[0]), int(shape[1]), pc)
    model = ToolLMM(
        llm,
        input_proj.to(dtype=dtype),
        {m: p.to(dtype=dtype) for m, p in outs.items()},
        encoder,
        loss_weights,
    )
    log.info("output projections: %s", {m: (p.n_query, p.cond_dim) for m, p in outs.items()})
    return model
