"""Per-GPU memory of a training stage under ZeRO-2 and ZeRO-3, from the LLM's config (an estimate to size
hardware with, printed by ``scripts/memory_estimate.py``; the README's table comes from it).

Notation: N GPUs; P frozen base-LLM parameters (the vocabulary already grown by toollmm's new rows);
T trainable parameters of the stage (``toollmm.model.param_count``); b micro-batch, s max length
(media tokens included), h hidden size, L layers, V vocabulary; P_live the parameters ZeRO-3 keeps
gathered at a time (two of: one decoder layer or the embedding matrix, whichever is larger); E the
encoder's parameters (0 when the feature cache is on, the default). Bytes per GPU::

    base weights       2 P              ZeRO-2 (bf16, replicated)   2 P / N + 2 P_live   ZeRO-3
    trained weights    2 T              ZeRO-2                      2 T / N              ZeRO-3
    gradients          2 T (bf16, held whole until the one coalesced reduction per optimiser step)
    optimiser          16 T / N   (fp32 master 4 + Adam m 4 + v 4 + the fp32 gradient partition 4)
    activations        2 b s h L + 34 b s h   (gradient checkpointing: every layer's bf16 input, plus one
                                               layer recomputed in backward; sdpa attention: no s^2 term)
    logits             14 b s V   (bf16 logits 2 + fp32 copy 4 + log-softmax 4 + its gradient 4)
    encoder            2 E  (ZeRO-2 only; ZeRO-3 requires cached features)

The CUDA context and allocator slack (about 1-2 GB) come on top. Optimiser and gradient terms use the
DeepSpeed ZeRO paper's accounting (Rajbhandari et al. 2020: 2 + 2 + 12 bytes per trained parameter in
mixed precision, partitioned by N from stage 1 or 2 on); the activation constant is Korthikanti et al.
2022's ``34 s b h`` per layer without the attention-score term.
"""

from __future__ import annotations

from dataclasses import dataclass

from toollmm.core.tokens import TOOL_TOKENS

from ..model import param_count as pc

GiB = 2**30

#: lmsys/vicuna-7b-v1.5 config.json (the values that size the model)
VICUNA_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "tie_word_embeddings": False,
}
#: (n_query, cond_dim) of the default decoders: SD v1.5, ZeroScope v2, AudioLDM (read from their configs)
DECODER_SHAPES = {"image": (77, 768), "video": (77, 1024), "audio": (1, 512)}
IMAGEBIND_HUGE_PARAMS = 1_200_786_990  # ENVIRONMENT.md: imagebind_huge state dict elements


@dataclass
class Sizes:
    base: int  # P
    trainable: int  # T
    layer: int  # parameters of one decoder layer
    embed: int  # parameters of the (grown) input embedding
    hidden: int
    layers: int
    vocab: int
    micro_batch: int
    seq_len: int
    encoder: int = 0  # E


def llama_params(cfg: dict, extra_rows: int = 0) -> tuple[int, int, int]:
    """(all parameters, one decoder layer, embedding) of a Llama-shaped causal LM, vocabulary grown by
    ``extra_rows``: attention q/o (h x h), k/v (h x h*g/a), MLP 3 h i, two RMSNorms per layer, final norm."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    embed = (cfg["vocab_size"] + extra_rows) * h
    head = 0 if cfg.get("tie_word_embeddings") else embed
    return embed + n * layer + h + head, layer, embed


def stage_trainable(cfg: dict, model_cfg, trainable: list[str]) -> int:
    """Trainable parameters of a stage's ``train.trainable`` list for an LLM config and toollmm's model config."""
    h, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    a = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", a)
    tied = bool(cfg.get("tie_word_embeddings"))
    t = model_cfg.tokens
    lora = model_cfg.llm.lora
    total = 0
    for name in trainable:
        if name == "lora":
            total += pc.lora_count(h, n, a, kv, cfg["intermediate_size"], lora.r, lora.target_modules)
        elif name == "input_proj":
            ip = model_cfg.input_proj
            total += pc.input_proj_count(
                model_cfg.encoder.dims.out_embed_dim, h, ip.type, ip.tokens_per_input
            )
        elif name.startswith("output_proj."):
            m = name.split(".", 1)[1]
            o = model_cfg.output_proj[m]
            q, c = DECODER_SHAPES[m]
            total += pc.output_proj_count(
                h, q, c, o.d_model, o.dim_feedforward, o.num_encoder_layers, o.num_decoder_layers
            )
        elif name == "token_rows.signal":
            total += pc.token_rows_count(
                h, t.num_image_signal + t.num_video_signal + t.num_audio_signal, tied
            )
        elif name == "token_rows.tool":
            total += pc.token_rows_count(h, len(TOOL_TOKENS), tied)
        elif name == "llm":
            total += llama_params(cfg)[0]
        else:
            raise ValueError(f"no closed form for trainable name {name!r}")
    return total


def per_gpu_bytes(s: Sizes, zero: int, gpus: int) -> dict[str, float]:
    """The module docstring's terms, in bytes, for one GPU."""
    if zero not in (2, 3):
        raise ValueError(f"ZeRO stage {zero}: only 2 and 3 are estimated")
    n = gpus
    z3 = zero == 3
    return {
        "base weights": 2 * s.base / (n if z3 else 1) + (2 * 2 * max(s.layer, s.embed) if z3 else 0),
        "trained weights": 2 * s.trainable / (n if z3 else 1),
        "gradients": 2 * s.trainable,
        "optimiser": 16 * s.trainable / n,
        "activations": 2 * s.micro_batch * s.seq_len * s.hidden * (s.layers + 17),
        "logits": 14 * s.micro_batch * s.seq_len * s.vocab,
        "encoder": 0 if z3 else 2 * s.encoder,
    }


def stage_sizes(llm_cfg: dict, loaded_cfg, cached_features: bool = True) -> Sizes:
    """Sizes of the stage described by a loaded toollmm config (``train.*``, ``data.max_length``)."""
    from toollmm.core.tokens import TokenContract

    m = loaded_cfg.model
    n_new = len(TokenContract.from_config(m.tokens).new_tokens)
    base, layer, embed = llama_params(llm_cfg, extra_rows=n_new)
    return Sizes(
        base=base,
        trainable=stage_trainable(llm_cfg, m, loaded_cfg.train.trainable),
        layer=layer,
        embed=embed,
        hidden=llm_cfg["hidden_size"],
        layers=llm_cfg["num_hidden_layers"],
        vocab=llm_cfg["vocab_size"] + n_new,
        micro_batch=loaded_cfg.train.micro_batch_size,
        seq_len=loaded_cfg.data.max_length,
        encoder=0 if cached_features else IMAGEBIND_HUGE_PARAMS,
    )
