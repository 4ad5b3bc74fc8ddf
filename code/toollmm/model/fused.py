"""Fused projections for training Llama layers with LoRA: fewer, larger GEMMs and fewer passes, same math.

``fuse_llama_layers(model)`` gives every ``LlamaAttention`` and ``LlamaMLP`` inside ``model`` (peft-wrapped or
not) a training forward that

- on CUDA, computes the base projections that read the same input in ONE product: q/k/v (``[N, H] x [H, q+k+v]``)
  and gate/up (``[N, H] x [H, 2I]``) (``CONCAT``: on this project's 2-core CPU the concatenated products ran no
  faster than three and the split's backward cost a copy, so the CPU keeps one product per module);
- draws each LoRA dropout mask as ``torch.rand >= p`` (Bernoulli(1 - p), as ``nn.Dropout``) and applies it with
  ``where``, leaving the 1 / (1 - p) rescale to the small LoRA product (CPU ``bernoulli_`` + divide + multiply
  took ~2.5x as long over a 1000 x 768 input);
- adds each module's LoRA update into its slice of that output in place (``addmm_(A(dropout(x)), B^T,
  alpha=scaling)``), instead of peft's ``result + B(A(dropout(x))) * scaling`` (two extra passes over the
  output per module); ``o_proj`` / ``down_proj`` get the same in-place update on their own base product.

Exactness: the sum is the same (fp32 rounding differs at the 1e-6 level) and the masks are drawn in the order
peft draws them (q, k, v, o), so the loss and gradients equal those of the unfused model whose dropout draws
its mask the same way (``tests/model/test_fused.py``, with and without activation checkpointing, sdpa and
eager); without dropout they equal plain peft's. LoRA semantics are
unchanged unless ``model.llm.lora.shared_dropout`` is set, which draws ONE dropout mask for the modules of a
group (q/k/v; gate/up when they carry adapters) and runs their A matrices as one product: a different
regulariser (the three updates see the same dropped input), offered as an option and measured in
docs/benchmarks.md, never the default.

The fused forward runs in training mode only (evaluation and decoding with a KV cache take the model's own
forward), and falls back to the own forward, per call, for anything it does not cover: DeepSpeed ZeRO-3
(partitioned weights are gathered by hooks on each module, which one product would bypass), merged or
disabled adapters, DoRA / LoRA variants, LoRA biases, mixed-adapter batches, or base weights that train.

With ``model.llm.fused_kernels`` (``toollmm.model.kernels``) this forward is also where liger-kernel's RoPE
and SwiGLU run: the kernels module leaves ``_toollmm_rope`` / ``_toollmm_swiglu`` on the instances and the
forward below calls them instead of transformers' ``apply_rotary_pos_emb`` / ``act_fn(gate) * up`` (CUDA
tensors only). A fallback to the own forward runs transformers' versions: the same math.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: the layer classes whose forward this module reproduces (transformers' Llama code); others stay unfused
ATTENTION_CLASSES = ("LlamaAttention",)
MLP_CLASSES = ("LlamaMLP",)


class _Unfusable(Exception):
    """This call takes the module's own forward."""


def _lora_parts(mod: nn.Module) -> tuple[nn.Linear, list[tuple]]:
    """``(base Linear, [(lora_A, lora_B, dropout, scaling), ...])`` of a plain or peft LoRA Linear."""
    if type(mod) is nn.Linear:
        return mod, []
    base = getattr(mod, "base_layer", None)
    if type(base) is not nn.Linear or not hasattr(mod, "lora_A"):
        raise _Unfusable(f"{type(mod).__name__} is not a Linear or a peft LoRA Linear")
    if getattr(mod, "disable_adapters", False):
        if getattr(mod, "merged", False):
            raise _Unfusable("disabled adapters that are merged (peft unmerges them in its forward)")
        return base, []
    if getattr(mod, "merged", False):
        return base, []
    parts = []
    for name in mod.active_adapters:
        if name not in mod.lora_A:
            continue
        if name in getattr(mod, "lora_variant", {}) or getattr(mod, "lora_bias", {}).get(name, False):
            raise _Unfusable("LoRA variant (DoRA, ...) or LoRA bias")
        a, b = mod.lora_A[name], mod.lora_B[name]
        if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
            raise _Unfusable("LoRA A/B are not bias-free Linears")
        parts.append((a, b, mod.lora_dropout[name], mod.scaling[name]))
    return base, parts


def _fused_weight(bases: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The bases' weights (and biases) concatenated along the output dimension, in the graph, every call: a
    cache would miss in-place changes made through ``.data`` (peft's merge does that), and the copy is small
    against the product (3 x H^2 elements per layer). Without activation checkpointing the copy lives until
    the layer's backward, like the activations."""
    weights = [b.weight for b in bases]
    biases = [b.bias for b in bases]
    has_bias = [x is not None for x in biases]
    if any(has_bias) and not all(has_bias):
        raise _Unfusable("some projections have a bias and some not")
    return torch.cat(weights), (torch.cat(biases) if all(has_bias) else None)


#: concatenate the base weights of a group into one GEMM (False: one GEMM per module, each output contiguous)
CONCAT = {"cpu": False, "cuda": True}


def _mask_input(drop: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(x with dropped elements zeroed, 1 / keep probability)``: the module's dropout with the rescale left
    for the (small) LoRA product. The mask is ``torch.rand >= p`` (Bernoulli(1 - p) per element, as
    ``nn.Dropout``), kept as ``where`` so that the backward pass is one masked pass as well."""
    if isinstance(drop, nn.Identity) or not drop.training:
        return x, 1.0
    if not isinstance(drop, nn.Dropout):
        raise _Unfusable(f"LoRA dropout {type(drop).__name__}")
    p = float(drop.p)
    if p == 0.0:
        return x, 1.0
    if p >= 1.0:
        return torch.zeros_like(x), 0.0
    return torch.where(torch.rand_like(x) >= p, x, 0.0), 1.0 / (1.0 - p)


def fused_linear(mods: list[nn.Module], x: torch.Tensor, shared_dropout: bool):
    """``[mod(x) for mod in mods]`` as base products plus in-place LoRA updates (see the module docstring)."""
    plan = [_lora_parts(m) for m in mods]
    sizes = [base.out_features for base, _ in plan]
    lead = x.shape[:-1]
    # 2-D throughout: an in-place update of a view would cost a clone in backward
    x = x.reshape(-1, x.shape[-1])
    concat = len(mods) > 1 and CONCAT.get(x.device.type, False)
    for base, _ in plan:
        if hasattr(base.weight, "ds_id"):
            raise _Unfusable("DeepSpeed ZeRO-3 partitioned weights")
    if concat:
        w, b = _fused_weight([base for base, _ in plan])
        fused = F.linear(x, w, b)
        outs = list(fused.split(sizes, dim=-1))
    else:
        outs = [F.linear(x, base.weight, base.bias) for base, _ in plan]
    adapted = [i for i, (_, parts) in enumerate(plan) if parts]
    if shared_dropout and len(adapted) > 1:
        if any(len(plan[i][1]) != 1 for i in adapted):
            raise _Unfusable("shared dropout with several active adapters")
        first = plan[adapted[0]][1][0]
        xin = x if x.dtype == first[0].weight.dtype else x.to(first[0].weight.dtype)
        xm, rescale = _mask_input(first[2], xin)
        u_all = F.linear(xm, torch.cat([plan[i][1][0][0].weight for i in adapted]))
        col, updates = 0, {}
        for i in adapted:
            a, bmat, _, scaling = plan[i][1][0]
            updates[i] = [(u_all[:, col : col + a.out_features], bmat, scaling * rescale)]
            col += a.out_features
    else:
        updates = {}
        for i in adapted:
            updates[i] = []
            for a, bmat, drop, scaling in plan[i][1]:
                xin = x if x.dtype == a.weight.dtype else x.to(a.weight.dtype)
                xm, rescale = _mask_input(drop, xin)
                u = F.linear(xm, a.weight)
                updates[i].append((u, bmat, scaling * rescale))
    for i, ups in updates.items():
        flat = outs[i]
        for u, bmat, alpha in ups:
            u, bt = u.to(flat.dtype), bmat.weight.t().to(flat.dtype)
            if concat:  # a view into the fused output: out of place (in place would clone it in backward)
                flat = torch.addmm(flat, u, bt, alpha=alpha)
            else:
                flat = flat.addmm_(u, bt, alpha=alpha)
        outs[i] = flat
    return [o.view(*lead, n) for o, n in zip(outs, sizes)]


def on_kernel_device(t: torch.Tensor) -> bool:
    """Whether liger's Triton kernels (``model.llm.fused_kernels``) take ``t``: CUDA tensors only."""
    return t.is_cuda


def _attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
):
    """transformers' ``LlamaAttention.forward`` with fused q/k/v and o projections (training only)."""
    if not self.training or past_key_values is not None:
        return self._toollmm_own_forward(
            hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs
        )
    from transformers.models.llama.modeling_llama import (
        ALL_ATTENTION_FUNCTIONS,
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    try:
        _lora_parts(self.o_proj)  # checked first: a fallback must not have drawn dropout masks already
        q, k, v = fused_linear([self.q_proj, self.k_proj, self.v_proj], hidden_states, self._toollmm_shared)
    except _Unfusable as e:
        _note_fallback(self, e)
        return self._toollmm_own_forward(
            hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs
        )
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = q.view(hidden_shape).transpose(1, 2)
    k = k.view(hidden_shape).transpose(1, 2)
    v = v.view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    # model.llm.fused_kernels (toollmm.model.kernels), CUDA only
    rope = self.__dict__.get("_toollmm_rope")
    q, k = (rope if rope is not None and on_kernel_device(q) else apply_rotary_pos_emb)(q, k, cos, sin)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward
    )
    out, weights = interface(
        self, q, k, v, attention_mask, dropout=self.attention_dropout, scaling=self.scaling, **kwargs
    )
    out = out.reshape(*input_shape, -1).contiguous()
    (out,) = fused_linear([self.o_proj], out, False)
    return out, weights


def _mlp_forward(self, x):
    """transformers' ``LlamaMLP.forward`` with fused gate/up and down projections (training only)."""
    if not self.training:
        return self._toollmm_own_forward(x)
    try:
        _lora_parts(self.down_proj)
        gate, up = fused_linear([self.gate_proj, self.up_proj], x, self._toollmm_shared)
    except _Unfusable as e:
        _note_fallback(self, e)
        return self._toollmm_own_forward(x)
    # model.llm.fused_kernels (toollmm.model.kernels), CUDA only
    swiglu = self.__dict__.get("_toollmm_swiglu")
    act = swiglu(gate, up) if swiglu is not None and on_kernel_device(gate) else self.act_fn(gate) * up
    (out,) = fused_linear([self.down_proj], act, False)
    return out


def _note_fallback(mod: nn.Module, why: Exception) -> None:
    if not mod.__dict__.get("_toollmm_fallback_logged"):
        mod.__dict__["_toollmm_fallback_logged"] = True
        log.info("fused projections: %s takes its own forward (%s)", type(mod).__name__, why)


def patch_forward(mod: nn.Module, fn, own_key: str = "_toollmm_own_forward") -> None:
    """Give the instance ``mod`` the forward ``fn`` (bound to it), keeping its own forward under ``own_key``
    (once: patching again keeps the original)."""
    if own_key not in mod.__dict__:
        mod.__dict__[own_key] = mod.forward
    mod.forward = types.MethodType(fn, mod)


def restore_forwards(model: nn.Module, own_key: str, attrs: tuple[str, ...] = ()) -> None:
    """Undo :func:`patch_forward` (``own_key``) on every module of ``model`` and drop the instance
    attributes ``attrs``."""
    for mod in model.modules():
        if mod.__dict__.pop(own_key, None) is not None:
            mod.__dict__.pop("forward", None)
        for attr in attrs:
            mod.__dict__.pop(attr, None)


def fuse_llama_layers(model: nn.Module, shared_dropout: bool = False) -> int:
    """Give every Llama attention / MLP module in ``model`` the fused training forward; returns how many.
    Idempotent; :func:`unfuse` undoes it."""
    n = 0
    for mod in model.modules():
        name = type(mod).__name__
        if name in ATTENTION_CLASSES:
            patch_forward(mod, _attention_forward)
        elif name in MLP_CLASSES:
            patch_forward(mod, _mlp_forward)
        else:
            continue
        mod._toollmm_shared = bool(shared_dropout)
        n += 1
    if n == 0:
        log.info("fused projections: no Llama attention / MLP layers found; the model's own forward runs")
    return n


def unfuse(model: nn.Module) -> None:
    """Restore the own forwards."""
    restore_forwards(model, "_toollmm_own_forward", ("_toollmm_shared",))


def is_fused(model: nn.Module) -> bool:
    return any("_toollmm_own_forward" in m.__dict__ for m in model.modules())
