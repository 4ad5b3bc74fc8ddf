"""``model.llm.fused_kernels``: liger-kernel's Triton kernels in the training forward of Llama layers and a fused
linear cross-entropy over the supervised positions (CUDA only, opt-in, off by default).

What runs (training mode on CUDA tensors; evaluation, decoding and CPU tensors take the model's own code):

- every ``LlamaRMSNorm`` (each layer's two and the final one): liger's RMSNorm (``liger_rms_norm``, "llama"
  casting: statistics in fp32, the normalised input cast back to the input dtype before the weight, as
  transformers computes it), out of place: liger's in-place backward writes dX over the incoming gradient,
  which is only safe when no other consumer reads that buffer, and here the final norm's output also feeds
  the output projections;
- RoPE and SwiGLU inside the fused-projection training forward of ``toollmm.model.fused`` (this option needs
  ``model.llm.fused_projections``): ``liger_rotary_pos_emb`` on q/k and ``liger_swiglu(gate, up)`` for
  ``act_fn(gate) * up``; where that forward falls back to the layer's own (ZeRO-3, LoRA variants ...),
  transformers' RoPE and activation run, the same math;
- the LM loss: :func:`fused_lm_loss` runs liger's ``LigerFusedLinearCrossEntropyLoss`` on the final hidden
  states at the supervised positions only (``toollmm.model.losses.next_token_targets``) against the LM head's
  effective matrix (:func:`head_matrix`: the frozen weight with the new tokens' rows taken from their
  trainable ``TokenRows``, in the graph), so it sees the same logits as ``lm_loss_at(head(h), targets)``
  without ever holding the ``[N, V]`` logits. Same reduction: the sum over the N supervised tokens / N
  (liger's ``mean`` over targets none of which is ignored), an exact 0 with a graph when N is 0. Gradients
  reach the trainable token rows through that matrix (liger accumulates the head's gradient in fp32 when
  the rows train; with frozen rows it computes none). ZeRO-3 (a partitioned head) keeps the unfused loss.

Why not ``liger_kernel.transformers.apply_liger_kernel_to_llama(model=...)``: besides the instance it rebinds
names in transformers' ``modeling_llama`` for the whole process (``apply_rotary_pos_emb``, ``LlamaRMSNorm``,
``LlamaMLP``), so every Llama built or run later in the process (a reference model, the inference model)
would take liger's kernels too, RoPE on CPU tensors included; its SwiGLU patch rebinds the MLP's
``forward``, which the fused projections' forward replaces (or is replaced by, depending on order); and its
fused cross-entropy patch replaces ``LlamaForCausalLM.forward``, which ToolLMM does not use for its loss.
Here each instance gets its kernels, nothing global changes, and the fused forward calls the RoPE / SwiGLU
kernels itself.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from toollmm.core.batch import IGNORE_INDEX
from toollmm.core.errors import UserError

from . import fused
from .fused import ATTENTION_CLASSES, MLP_CLASSES
from .losses import lm_loss_at
from .token_rows import RowLMHead

log = logging.getLogger(__name__)

OPTION = "model.llm.fused_kernels"
NORM_CLASSES = ("LlamaRMSNorm",)
#: SwiGLU = silu(gate) * up: what liger's kernel computes
SWIGLU_ACTS = ("silu", "swish")
#: where an RMSNorm keeps its own forward, and the kernels left on instances
RMS_OWN = "_toollmm_rms_own_forward"
KERNEL_ATTRS = ("_toollmm_rms_norm", "_toollmm_rope", "_toollmm_swiglu")


def unavailable(cuda: bool | None = None) -> str | None:
    """Why the option cannot run in this process (``cuda``: whether a CUDA device is usable; default: ask
    torch), or None when it can."""
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return "needs a CUDA GPU (liger-kernel's kernels are Triton GPU kernels) and this process sees none"
    if importlib.util.find_spec("liger_kernel") is None:
        return "needs the liger-kernel package (pinned in constraints.txt), which is not installed"
    return None


def require_fused_kernels(cuda: bool | None = None) -> None:
    """Raise a :class:`UserError` naming the option when it cannot run here (never ignored silently)."""
    why = unavailable(cuda)
    if why:
        raise UserError(f"{OPTION}: true {why}; set {OPTION}=false")


def _rms_norm_forward(self, hidden_states):
    """``LlamaRMSNorm.forward`` through liger's kernel (training, CUDA); otherwise the own forward."""
    if not self.training or not fused.on_kernel_device(hidden_states):
        return self.__dict__[RMS_OWN](hidden_states)
    return self._toollmm_rms_norm(
        hidden_states, self.weight, self.variance_epsilon, offset=0.0, casting_mode="llama", in_place=False
    )


def enable_fused_kernels(model: nn.Module) -> dict[str, int]:
    """Give every Llama RMSNorm in ``model`` liger's kernel and every Llama attention / MLP liger's RoPE /
    SwiGLU (used by the fused-projection forward); returns how many modules of each. Idempotent;
    :func:`disable_fused_kernels` undoes it. Needs liger-kernel (:func:`require_fused_kernels`)."""
    from liger_kernel.transformers import liger_rotary_pos_emb
    from liger_kernel.transformers.functional import liger_rms_norm, liger_swiglu

    for mod in model.modules():  # checked before anything is patched: a refusal leaves the model as it was
        act = getattr(getattr(mod, "config", None), "hidden_act", None)
        if type(mod).__name__ in MLP_CLASSES and act not in SWIGLU_ACTS:
            raise UserError(
                f"{OPTION}: liger's SwiGLU computes silu(gate) * up; this model's MLP uses {act!r}"
            )
    counts = {"rms_norm": 0, "rope": 0, "swiglu": 0}
    for mod in model.modules():
        name = type(mod).__name__
        if name in NORM_CLASSES:
            mod.__dict__["_toollmm_rms_norm"] = liger_rms_norm
            fused.patch_forward(mod, _rms_norm_forward, RMS_OWN)
            counts["rms_norm"] += 1
        elif name in ATTENTION_CLASSES:
            mod.__dict__["_toollmm_rope"] = liger_rotary_pos_emb
            counts["rope"] += 1
        elif name in MLP_CLASSES:
            mod.__dict__["_toollmm_swiglu"] = liger_swiglu
            counts["swiglu"] += 1
    log.info("fused kernels (liger-kernel): %s modules", counts)
    return counts


def disable_fused_kernels(model: nn.Module) -> None:
    """Restore transformers' RMSNorm forward and drop the RoPE / SwiGLU kernels."""
    fused.restore_forwards(model, RMS_OWN, KERNEL_ATTRS)


def has_fused_kernels(model: nn.Module) -> bool:
    return any(k in m.__dict__ for m in model.modules() for k in KERNEL_ATTRS)


def head_matrix(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` with ``F.linear(h, weight, bias) == head(h)``: for a :class:`RowLMHead` the frozen
    weight with the rows of the new tokens replaced by their ``TokenRows`` (``index_copy`` in the graph, so
    trainable rows get their gradients; the bias is read at the same ids either way)."""
    if isinstance(head, RowLMHead):
        rows = head.token_rows
        return head.weight.index_copy(0, rows.ids, rows.matrix().to(head.weight.dtype)), head.bias
    if type(head) is nn.Linear:
        return head.weight, head.bias
    raise TypeError(f"{OPTION}: the LM head is a {type(head).__name__}, not a Linear")


def fused_loss_head(llm: nn.Module) -> nn.Module | None:
    """The LM head when the fused loss can run on it (a CUDA, non-partitioned Linear head), else None (the
    caller keeps the unfused loss; logged once)."""
    head = llm.get_output_embeddings()
    why = None
    if head is None or not isinstance(head, nn.Linear):
        why = f"the LM head is {type(head).__name__}"
    elif hasattr(head.weight, "ds_id"):
        why = "DeepSpeed ZeRO-3 partitions the LM head (its weight is gathered by the module's own call)"
    elif not fused.on_kernel_device(head.weight):
        why = "not on a CUDA device"
    if why is None:
        return head
    if not llm.__dict__.get("_toollmm_fused_loss_logged"):
        llm.__dict__["_toollmm_fused_loss_logged"] = True
        log.info("fused kernels: the LM loss takes the unfused path (%s)", why)
    return None


def fused_lm_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """``lm_loss_at(head(hidden), targets)`` (``hidden [N, H]`` at the supervised positions, ``targets [N]``)
    through liger's fused linear cross-entropy: chunked logits, never ``[N, V]`` at once, the cross-entropy
    in fp32 as ``lm_loss_at`` computes it."""
    if targets.shape[0] == 0:  # nothing supervised: the unfused exact 0 (with a graph) costs nothing
        return lm_loss_at(head(hidden), targets)
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    weight, bias = head_matrix(head)
    loss = LigerFusedLinearCrossEntropyLoss(
        ignore_index=IGNORE_INDEX, reduction="mean", accum_dtype=torch.float32
    )
    return loss(weight, hidden.contiguous(), targets, bias)
