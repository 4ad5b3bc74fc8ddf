"""The language model: any Hugging Face causal LM directory + toollmm's tokens + optional peft LoRA.

``build_llm(llm_cfg, tokens_cfg)`` loads the model and tokenizer, adds the token contract
(``toollmm.core.tokens``), gives the new tokens their own trainable rows in the input embedding and the lm_head
(``toollmm.model.token_rows``), turns on gradient checkpointing if asked, and wraps the model with a peft
LoRA adapter (r 32, alpha 32, dropout 0.1, q/k/v/o by default), then the fused projections
(``toollmm.model.fused``) and, with ``model.llm.fused_kernels``, liger-kernel's kernels
(``toollmm.model.kernels``; CUDA only, refused with a UserError elsewhere). Every parameter leaves this module
frozen; ``ToolLMM.trainable_parameters`` decides what trains.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from toollmm.core.config import LLMConfig, LoraSettings, TokenConfig
from toollmm.core.errors import UserError
from toollmm.core.paths import resolve
from toollmm.core.safefiles import naming_refused_pickles
from toollmm.core.tokens import TokenContract, TokenIds

from .token_rows import TokenRows, attach_token_rows

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """'auto' = bfloat16 when the target is a CUDA device that supports it, float32 otherwise (CPU)."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"model.llm.dtype: unknown dtype {name!r} (auto, {', '.join(_DTYPES)})")
        return _DTYPES[name]
    dev = torch.device(device) if device is not None else None
    cuda = torch.cuda.is_available() if dev is None else dev.type == "cuda"
    return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32


def _model_source(path: str, what: str) -> str:
    """A local folder (relative paths from the repo root) or, if no such folder exists, a Hub id."""
    local = resolve(path)
    if local is not None and local.is_dir():
        return str(local)
    if local is not None and local.exists():
        raise FileNotFoundError(f"{what}: {local} is a file; expected a Hugging Face model folder")
    parts = str(path).split("/")
    if len(parts) == 2 and all(parts) and not str(path).startswith((".", "~")):
        return str(
            path
        )  # looks like a Hub id: let transformers resolve (offline runs will fail clearly there)
    raise FileNotFoundError(
        f"{what}: no model folder at {local} (see pretrained_checkpoint/README.md for getting the weights)"
    )


def load_causal_lm(llm_cfg: LLMConfig, device: torch.device | str | None = None):
    """``(model, tokenizer)`` from ``llm_cfg.path`` / ``llm_cfg.tokenizer`` with the dtype policy."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .encoder import CheckpointError

    src = _model_source(llm_cfg.path, "model.llm.path")
    tok_src = _model_source(llm_cfg.tokenizer or llm_cfg.path, "model.llm.tokenizer")
    dtype = resolve_dtype(llm_cfg.dtype, device)
    impl = llm_cfg.attn_implementation
    if impl == "sdpa":  # the same kernels, attending inside each packed sample only
        from .packed_attention import register

        impl = register()
    try:
        with naming_refused_pickles("model.llm.path", src):  # a .bin is read weights_only; a refusal names it
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=dtype, attn_implementation=impl, weights_only=True
            )
        tokenizer = AutoTokenizer.from_pretrained(tok_src)
    except UserError:
        raise
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        # a damaged weights file or a folder that is no model: name the folder
        raise CheckpointError(f"model.llm.path {src}: not loadable: {type(e).__name__}: {e}") from e
    log.info(
        "loaded %s (%s, %s attention) from %s", type(model).__name__, dtype, llm_cfg.attn_implementation, src
    )
    return model, tokenizer


def enable_gradient_checkpointing(model, use_reentrant: bool = False) -> None:
    """Activation checkpointing on every decoder layer of a HF model. transformers also registers
    ``enable_input_require_grads`` so that, with a frozen embedding, the checkpointed layers' inputs
    still require grad and LoRA weights inside them receive gradients (needed for reentrant checkpoints)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if not getattr(
        model, "_require_grads_hooks", None
    ):  # transformers adds it when main_input_name is input_ids
        model.enable_input_require_grads()
    if hasattr(model, "config"):
        model.config.use_cache = False


def apply_lora(model, lora: LoraSettings):
    """Wrap ``model`` in a ``PeftModelForCausalLM`` with one LoRA adapter named ``default``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with (
        warnings.catch_warnings()
    ):  # peft 0.21 still calls transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


@dataclass
class LLMBundle:
    """The LLM side of the composed model."""

    model: nn.Module  # PeftModelForCausalLM (LoRA on) or the HF PreTrainedModel (LoRA off)
    tokenizer: object
    contract: TokenContract
    token_ids: TokenIds
    rows: dict[str, TokenRows]  # {"embed": ..., "head": ...}; the same object when tied
    lora: bool
    attn_implementation: str
    fused_kernels: bool = False  # model.llm.fused_kernels (toollmm.model.kernels): ToolLMM's loss reads it

    @property
    def hf_model(self):
        """The underlying transformers model (inside the peft wrapper when LoRA is on)."""
        return self.model.get_base_model() if self.lora else self.model

    @property
    def hidden_size(self) -> int:
        return int(self.hf_model.get_input_embeddings().embedding_dim)

    @property
    def tied(self) -> bool:
        return self.rows["embed"] is self.rows["head"]


def prepare_llm(
    model,
    tokenizer,
    tokens_cfg: TokenConfig,
    lora: LoraSettings,
    gradient_checkpointing: bool = False,
    token_ids: TokenIds | None = None,
    fused_projections: bool = False,
    fused_kernels: bool = False,
) -> LLMBundle:
    """Add the token contract to ``tokenizer`` (or use ``token_ids`` as given, e.g. for a meta-device
    model without a matching tokenizer), attach per-group token rows, checkpointing and LoRA, the fused
    projections and liger's kernels when asked; freeze all."""
    if fused_kernels:
        _check_fused_kernels(fused_projections)
    contract = TokenContract.from_config(tokens_cfg)
    known = False
    if token_ids is None:
        if tokenizer is None:
            raise ValueError("prepare_llm needs a tokenizer or explicit token_ids")
        vocab = tokenizer.get_vocab()
        # a base that already holds toollmm's tokens (e.g. the demo's stand-in LM, pretrained with them)
        # keeps its trained rows; otherwise the new rows start at the mean of the existing ones
        known = all(t in vocab for t in contract.new_tokens) and model.get_input_embeddings().weight.shape[
            0
        ] > max(vocab[t] for t in contract.new_tokens)
        token_ids = contract.add_to(tokenizer)
    rows = attach_token_rows(
        model, token_ids, tokens_cfg.init_noise_std, tokens_cfg.init_seed, keep_existing=known
    )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    wrapped = apply_lora(model, lora) if lora.enabled else model
    if fused_projections:
        from .fused import fuse_llama_layers

        fuse_llama_layers(wrapped, shared_dropout=lora.enabled and lora.shared_dropout)
    elif lora.enabled and lora.shared_dropout:
        raise UserError("model.llm.lora.shared_dropout needs model.llm.fused_projections: true")
    if fused_kernels:
        from .kernels import enable_fused_kernels

        enable_fused_kernels(wrapped)
    for p in wrapped.parameters():
        p.requires_grad_(False)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    return LLMBundle(wrapped, tokenizer, contract, token_ids, rows, lora.enabled, impl, fused_kernels)


def _check_fused_kernels(fused_projections: bool) -> None:
    """``model.llm.fused_kernels``: a CUDA device, the liger-kernel package and the fused projections (whose
    training forward runs liger's RoPE and SwiGLU), or a :class:`UserError` naming the option."""
    from .kernels import require_fused_kernels

    require_fused_kernels()
    if not fused_projections:
        raise UserError(
            "model.llm.fused_kernels needs model.llm.fused_projections: true (liger's RoPE and SwiGLU run "
            "inside its training forward)"
        )


def build_llm(
    llm_cfg: LLMConfig, tokens_cfg: TokenConfig, device: torch.device | str | None = None
) -> LLMBundle:
    """Load ``llm_cfg.path`` and prepare it (tokens, rows, checkpointing, LoRA, fused projections / kernels)."""
    if llm_cfg.fused_kernels:  # before loading gigabytes of weights
        _check_fused_kernels(llm_cfg.fused_projections)
    model, tokenizer = load_causal_lm(llm_cfg, device)
    return prepare_llm(
        model,
        tokenizer,
        tokens_cfg,
        llm_cfg.lora,
        llm_cfg.gradient_checkpointing,
        fused_projections=llm_cfg.fused_projections,
        fused_kernels=llm_cfg.fused_kernels,
    )
