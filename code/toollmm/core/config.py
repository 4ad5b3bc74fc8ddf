"""The typed configuration of toollmm: every knob, its default and what it means.

Merge order (later wins): ``config/model.yaml`` -> ``config/stage_N.yaml`` (when training stage N) ->
each ``--config FILE`` in order (a preset may carry per-stage blocks ``stages: {1: {...}, 2: ...}``,
applied right after that file's top level) -> ``key=value`` overrides. Unknown keys are errors; all
problems are reported at once. Relative paths resolve against the repo root (``toollmm.core.paths``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from toollmm.core import configlib
from toollmm.core.configlib import ConfigError, opt
from toollmm.core.paths import CONFIG_DIR, resolve
from toollmm.core.tokens import MODALITIES

Modality = Literal["image", "video", "audio"]


# ----------------------------------------------------------------------------------------- model
@dataclass
class EncoderDims:
    """ImageBindModel keyword arguments (all six towers are always built by the package)."""

    out_embed_dim: int = opt(1024, "joint embedding size (1024 for imagebind_huge)")
    vision_embed_dim: int = opt(1280, "vision tower width")
    vision_num_blocks: int = opt(32, "vision tower depth")
    vision_num_heads: int = opt(16, "vision tower heads")
    audio_embed_dim: int = opt(768, "audio tower width")
    audio_num_blocks: int = opt(12, "audio tower depth")
    audio_num_heads: int = opt(12, "audio tower heads")
    audio_drop_path: float = opt(0.1, "audio tower stochastic depth (inactive in eval mode)")
    text_embed_dim: int = opt(1024, "text tower width")
    text_num_blocks: int = opt(24, "text tower depth")
    text_num_heads: int = opt(16, "text tower heads")
    depth_embed_dim: int = opt(384, "depth tower width")
    depth_num_blocks: int = opt(12, "depth tower depth")
    depth_num_heads: int = opt(8, "depth tower heads")
    depth_drop_path: float = opt(0.0, "depth tower stochastic depth")
    thermal_embed_dim: int = opt(768, "thermal tower width")
    thermal_num_blocks: int = opt(12, "thermal tower depth")
    thermal_num_heads: int = opt(12, "thermal tower heads")
    thermal_drop_path: float = opt(0.0, "thermal tower stochastic depth")
    imu_embed_dim: int = opt(512, "IMU tower width")
    imu_num_blocks: int = opt(6, "IMU tower depth")
    imu_num_heads: int = opt(8, "IMU tower heads")
    imu_drop_path: float = opt(0.7, "IMU tower stochastic depth")


@dataclass
class EncoderConfig:
    preset: str = opt(
        "huge",
        "'huge' = the official imagebind_huge dims (enforced); any other name (e.g. 'tiny') uses `dims`",
    )
    dims: EncoderDims = opt(factory=EncoderDims, help="architecture; `huge` values by default")
    checkpoint: str | None = opt(
        "pretrained_checkpoint/imagebind_ckpt/huge/imagebind_huge.pth",
        "weights file (torch.load weights_only, strict keys); null = random init from `seed` (tests, demo)",
    )
    seed: int = opt(0, "init seed when `checkpoint` is null; part of the feature-cache identity")
    output: Literal["pooled", "tokens"] = opt(
        "pooled", "'pooled': one embedding per input (NExT-GPT legacy, PandaGPT); 'tokens': one per clip"
    )

    def check(self) -> list[str]:
        if self.preset != "huge":
            return []
        huge = EncoderDims()  # its defaults are the package's imagebind_huge dims (tests/model/test_encoder.py)
        return [
            f"dims.{k}: {v} differs from imagebind_huge's {getattr(huge, k)} (preset 'huge'; "
            "use another preset name for custom dims)"
            for k, v in vars(self.dims).items()
            if v != getattr(huge, k)
        ]


@dataclass
class PreprocessConfig:
    """ImageBind's own preprocessing defaults."""

    image_size: int = opt(224, "square crop size")
    audio_sample_rate: int = opt(16000, "resample audio to this rate")
    audio_clip_duration: float = opt(2.0, "seconds per audio clip")
    audio_clips: int = opt(3, "clips sampled per audio file")
    audio_mel_bins: int = opt(128, "kaldi fbank bins")
    audio_target_length: int = opt(204, "fbank frames per clip (padded / cut)")
    audio_mean: float = opt(-4.268, "fbank normalisation mean (ImageBind)")
    audio_std: float = opt(9.138, "fbank normalisation std (ImageBind)")
    video_clips: int = opt(5, "clips per video")
    video_clip_duration: float = opt(2.0, "seconds per video clip")
    video_frames_per_clip: int = opt(2, "frames per clip")
    video_spatial_crops: int = opt(3, "spatial crops per clip (left/centre/right), 3 or 1 (centre)")
    video_frame_list_fps: float = opt(
        1.0, "a video given as a list of frame images (LaViA) is read as sampled at this rate"
    )


@dataclass
class FeatureCacheConfig:
    enabled: bool = opt(True, "cache encoder outputs on disk; stages read them instead of re-encoding")
    dir: str = opt(".cache/features", "cache root (shared by ranks; atomic writes)")
    batch_size: int = opt(16, "media per encoder forward when filling the cache")


@dataclass
class LoraSettings:
    enabled: bool = opt(True, "wrap the LLM with a peft LoRA adapter")
    r: int = opt(32, "LoRA rank (MLLM-Tool / NExT-GPT / PandaGPT: 32)")
    alpha: int = opt(32, "LoRA alpha")
    dropout: float = opt(0.1, "LoRA dropout")
    target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "modules that get adapters")
    shared_dropout: bool = opt(
        False,
        "one dropout mask for the LoRA inputs of modules reading the same input (q/k/v; gate/up) and one A "
        "product for them: a different regulariser than peft's per-module masks, faster (needs fused_projections)",
    )


@dataclass
class LLMConfig:
    path: str = opt(
        "pretrained_checkpoint/llm_ckpt/vicuna_7b", "Hugging Face causal LM directory (or Hub id)"
    )
    tokenizer: str | None = opt(None, "tokenizer directory; null = same as `path`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "'auto' = bfloat16 on a CUDA GPU with bf16, float32 on CPU"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = opt(
        "sdpa", "attention kernel (flash_attention_2 needs a GPU and the flash-attn package)"
    )
    gradient_checkpointing: bool = opt(False, "recompute activations; works with LoRA + frozen embeddings")
    fused_projections: bool = opt(
        True,
        "training: q/k/v and gate/up base projections as one GEMM each, LoRA updates added in place (Llama "
        "layers; same loss and gradients; ZeRO-3 and LoRA variants take the unfused forward)",
    )
    fused_kernels: bool = opt(
        False,
        "CUDA only: liger-kernel's RMSNorm, SwiGLU, RoPE for Llama layers and a fused linear cross-entropy over "
        "the supervised positions only (training; needs the liger-kernel package and fused_projections)",
    )
    lora: LoraSettings = opt(factory=LoraSettings, help="LoRA adapter")


@dataclass
class TokenConfig:
    num_image_signal: int = opt(4, "[IMG0]..[IMGn-1] (NExT-GPT: 4)")
    num_video_signal: int = opt(24, "[VID0].. (NExT-GPT: 24)")
    num_audio_signal: int = opt(8, "[AUD0].. (NExT-GPT: 8)")
    init_noise_std: float = opt(0.02, "new rows = mean of existing rows + N(0, std * row-std) noise")
    init_seed: int = opt(0, "seed of that noise")


@dataclass
class InputProjConfig:
    type: Literal["linear", "mlp"] = opt("linear", "'linear' (anchors' default) or 'mlp' (2-layer GELU)")
    tokens_per_input: int = opt(1, "LLM tokens emitted per encoder output (pooled or per clip)")


@dataclass
class OutputProjConfig:
    enabled: bool = opt(True, "build this modality's output projection")
    d_model: int = opt(512, "transformer width")
    num_heads: int = opt(4, "attention heads")
    num_encoder_layers: int = opt(4, "encoder layers")
    num_decoder_layers: int = opt(4, "decoder layers")
    dim_feedforward: int = opt(2048, "feed-forward width")
    dropout: float = opt(0.0, "dropout inside the projection")


@dataclass
class DecoderConfig:
    path: str | None = opt(
        None, "diffusers pipeline directory (or Hub id); null disables this modality's output"
    )
    num_inference_steps: int = opt(50, "denoising steps at inference")
    guidance_scale: float = opt(7.5, "classifier-free guidance")
    height: int | None = opt(None, "output height; null = the pipeline's default")
    width: int | None = opt(None, "output width; null = the pipeline's default")
    num_frames: int | None = opt(None, "video frames (video only)")
    audio_length_s: float | None = opt(None, "audio seconds (audio only)")
    fps: int = opt(8, "frames per second of the written MP4 (video only)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "'auto' = bfloat16 on a CUDA GPU with bf16 (else float16); always float32 on CPU"
    )
    device: str | None = opt(None, "torch device for this pipeline; null = cuda if available, else cpu")


def _default_output_proj() -> dict[str, OutputProjConfig]:
    return {m: OutputProjConfig() for m in MODALITIES}


def _default_decoders() -> dict[str, DecoderConfig]:
    return {
        "image": DecoderConfig(path="pretrained_checkpoint/diffusion/stable-diffusion-v1-5"),
        "video": DecoderConfig(
            path="pretrained_checkpoint/diffusion/zeroscope_v2_576w",
            num_inference_steps=40,
            guidance_scale=7.5,
        ),
        "audio": DecoderConfig(
            path="pretrained_checkpoint/diffusion/audioldm-l-full",
            num_inference_steps=200,
            guidance_scale=2.5,
        ),
    }


@dataclass
class ModelConfig:
    encoder: EncoderConfig = opt(factory=EncoderConfig, help="frozen ImageBind")
    preprocess: PreprocessConfig = opt(factory=PreprocessConfig, help="media -> encoder input tensors")
    feature_cache: FeatureCacheConfig = opt(factory=FeatureCacheConfig, help="on-disk encoder output cache")
    llm: LLMConfig = opt(factory=LLMConfig, help="the language model")
    tokens: TokenConfig = opt(
        factory=TokenConfig, help="special-token counts (names are fixed by toollmm.core.tokens)"
    )
    input_proj: InputProjConfig = opt(factory=InputProjConfig, help="encoder -> LLM")
    output_proj: dict[str, OutputProjConfig] = opt(
        factory=_default_output_proj, help="per-modality LLM -> decoder conditioning"
    )
    decoders: dict[str, DecoderConfig] = opt(
        factory=_default_decoders, help="per-modality diffusion pipeline"
    )
    chat_template: Literal["vicuna_v1", "vicuna_v0"] = opt(
        "vicuna_v1",
        "'vicuna_v1' USER:/ASSISTANT: (default), 'vicuna_v0' ### Human:/### Assistant: (anchors' checkpoints)",
    )
    tool_format: Literal["tokens", "react"] = opt(
        "tokens", "tool calls as <tool_call>{json}</tool_call> or as GPT4Tools/VIoTGPT ReAct text"
    )
    system_prompt: str = opt(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        "default system message (Vicuna's)",
    )
    allow_base_mismatch: bool = opt(
        False,
        "load a stage (toollmm.load, train.init_from) on base models whose sha256 differs from the ones it was "
        "trained on (recorded in its stage.json), with a warning instead of an error; the result is usually "
        "garbage. Applies to this run or load only: never inherited from a saved stage folder",
    )

    def check(self) -> list[str]:
        bad = [k for k in list(self.output_proj) + list(self.decoders) if k not in MODALITIES]
        return [f"output_proj/decoders: unknown modality {k!r} (known: {list(MODALITIES)})" for k in bad]


# ------------------------------------------------------------------------------------------ data
@dataclass
class SourceConfig:
    path: str = opt(help="JSONL of unified records, or a webdataset shard folder / brace pattern")
    name: str | None = opt(None, "source name for mixture weights and logs (default: file stem)")
    weight: float = opt(
        1.0,
        "mixture weight: with data.mixture 'scale' the source gives weight x its size samples per epoch "
        "(1 = one pass, 0.5 = a random half, 2 = twice); with 'ratio' its share of the epoch",
    )
    media_root: str | None = opt(
        None,
        "folder that JSONL media paths are relative to (default: the file's folder); shards hold their media",
    )
    task: Literal["auto", "x2t", "t2x", "instruct"] = opt(
        "auto", "how records train; 'auto' infers from the record"
    )


@dataclass
class DataConfig:
    train: list[SourceConfig] = opt(factory=list, help="training sources")
    heldout: list[SourceConfig] = opt(factory=list, help="held-out sources for validation")
    max_length: int = opt(2048, "maximum tokens per sample (media tokens included)")
    on_error: Literal["raise", "skip"] = opt(
        "raise", "bad record: raise naming it, or skip and count per reason"
    )
    overlong: Literal["raise", "skip", "truncate"] = opt(
        "raise",
        "over-long sample: raise naming it, skip and count, or truncate to whole assistant turns "
        "(never inside a media, signal or tool span)",
    )
    packing: bool = opt(False, "pack several samples per sequence (attention kept inside each sample)")
    group_by_length: bool = opt(True, "length-grouped sampling to cut padding")
    group_window: int = opt(
        16, "micro-batches per window: a worker loads a window, sorts it by length and cuts it into batches"
    )
    shuffle: bool = opt(
        True, "shuffle training data (global shuffle of the index; deterministic for run.seed)"
    )
    num_workers: int = opt(2, "DataLoader workers")
    mixture: Literal["scale", "ratio"] = opt(
        "scale",
        "how source weights mix: 'scale' = weight x source size per epoch; 'ratio' = shares of the epoch",
    )
    epoch_samples: int | None = opt(
        None, "samples per epoch over all sources and ranks (null: the mixture's natural total)"
    )
    captions: str | None = opt(
        ".cache/captions",
        "caption-embedding store (prepare_data.py embed-captions) for text->X targets of JSONL sources",
    )

    def check(self) -> list[str]:
        out = [f"{k}: must be >= 1" for k in ("max_length", "group_window") if getattr(self, k) < 1]
        out += ["num_workers: must be >= 0"] if self.num_workers < 0 else []
        out += (
            ["epoch_samples: must be >= 1 or null"]
            if self.epoch_samples is not None and self.epoch_samples < 1
            else []
        )
        return out + [f"train[{i}].weight: must be >= 0" for i, s in enumerate(self.train) if s.weight < 0]


# ----------------------------------------------------------------------------------------- train
@dataclass
class OptimConfig:
    lr: float = opt(1e-4, "base learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay (never on norms, biases, token rows)")
    betas: list[float] = opt([0.9, 0.95], "AdamW betas")
    eps: float = opt(1e-8, "AdamW eps")
    group_lr: dict[str, float] = opt(
        factory=dict, help="per trainable group learning rate, e.g. {lora: 2e-4}"
    )
    warmup_steps: int = opt(0, "linear warmup steps")
    schedule: Literal["constant", "cosine", "linear"] = opt("cosine", "decay after warmup")
    min_lr_ratio: float = opt(0.0, "final lr as a fraction of lr")
    grad_clip: float = opt(1.0, "max grad norm (injected into the DeepSpeed dict)")


@dataclass
class TrainConfig:
    trainable: list[str] = opt(
        factory=list, help="input_proj, output_proj.image|video|audio, lora, token_rows.signal|tool, llm"
    )
    init_from: str | None = opt(
        None,
        "stage folder to load strictly before training (e.g. outputs/<run>/stage_1); `previous` = this run's "
        "stage N-1 (<output_root>/<run.name>/stage_<N-1>)",
    )
    loss_weights: dict[str, float] = opt({"lm": 1.0, "align": 1.0}, "weight per loss term")
    optim: OptimConfig = opt(factory=OptimConfig, help="optimiser and schedule")
    micro_batch_size: int = opt(4, "samples per GPU per step")
    grad_accum: int = opt(1, "gradient accumulation steps")
    max_steps: int | None = opt(None, "stop after this many optimiser steps")
    epochs: float = opt(1.0, "epochs when max_steps is null")
    eval_every: int = opt(200, "validation every N steps (0 = only at the end)")
    save_every: int = opt(500, "resume checkpoint every N steps (0 = only at the end)")
    keep_last: int = opt(2, "resume checkpoints kept")
    log_every: int = opt(10, "metrics line every N steps")
    eval_batches: int | None = opt(None, "held-out batches per validation (null = the whole held-out split)")
    export_llm: str | None = opt(
        None, "also write the trained LLM as a plain Hugging Face folder here (the demo's stand-in base LM)"
    )
    deepspeed_config: str = opt("dsconfig/stage_3.json", "DeepSpeed JSON (systems settings only)")


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = opt(
        "offline", "wandb mode; offline runs write under the run folder"
    )
    wandb_project: str = opt("toollmm", "wandb project")
    level: str = opt("INFO", "python logging level on rank 0")


@dataclass
class RunConfig:
    name: str = opt("default", "run name: outputs are written under <output_root>/<name>/")
    output_root: str = opt("outputs", "root of all runs")
    seed: int = opt(0, "global seed (data order, dropout, init)")
    stage: int = opt(0, "stage being trained (set by train.py --stage)")


@dataclass
class InferenceConfig:
    max_new_tokens: int = opt(256, "generation budget per turn")
    temperature: float = opt(0.0, "0 = greedy")
    top_p: float = opt(1.0, "nucleus sampling")
    max_tool_steps: int = opt(5, "tool calls per turn before stopping")
    tool_timeout_s: float = opt(30.0, "wall limit per tool call")
    tools: list[str] = opt(factory=list, help="enabled tools (empty = all registered)")
    workspace: str | None = opt(
        None, "folder that tool file arguments must stay inside (default: output dir)"
    )
    partial_signal: Literal["complete", "report"] = opt(
        "complete", "incomplete signal span: force-complete it, or report it"
    )
    seed: int = opt(0, "seed for sampling and decoders")
    tool_sets: list[str] = opt(
        ["builtin", "gpt4tools", "gpt4tools_magicbrush", "viotgpt", "mllmtool"],
        "declared tool sets (toollmm.agent.toolsets); a declared tool without a backend answers with an error",
    )
    tool_imports: list[str] = opt(
        factory=list,
        help="user tools: 'pkg.module:function' (one @tool function) or 'pkg.module' (every @tool in it)",
    )
    tool_max_output_chars: int = opt(4000, "tool output longer than this is truncated (with a note)")
    tool_max_arg_chars: int = opt(8192, "serialised tool arguments longer than this are refused")
    tool_max_call_tokens: int = opt(1024, "a <tool_call> longer than this many tokens is abandoned")
    tool_max_json_depth: int = opt(
        8, "tool calls nested deeper than this (the call object is level 1) are refused, nothing is run"
    )
    max_repeated_calls: int = opt(
        2, "identical calls (same tool and arguments) allowed per turn; more stops the turn"
    )


@dataclass
class ServeConfig:
    max_batch_size: int = opt(8, "code/serve.py: most requests decoded together in one generate call")
    batch_wait_ms: float = opt(
        50.0,
        "code/serve.py: the longest a request waits for batch-mates before its batch starts "
        "(only while other clients are active; a lone client never waits)",
    )
    batched_decode: bool = opt(
        True,
        "decode a batch's rows in one forward per step (each row its own KV-cache row); "
        "false = one forward per row",
    )
    continuous: bool = opt(
        True,
        "continuous batching: requests join the running batch between decode steps and finished rows "
        "leave it (needs the batched step model); false = static batches (one generate call each)",
    )
    media_root: str | None = opt(
        None, "folder that file paths in image_url / video_url parts must stay inside (none: data: URLs only)"
    )
    max_request_mb: float = opt(64.0, "a request body larger than this is refused (413)")


@dataclass
class Config:
    run: RunConfig = opt(factory=RunConfig, help="run identity")
    model: ModelConfig = opt(factory=ModelConfig, help="architecture and checkpoint paths")
    data: DataConfig = opt(factory=DataConfig, help="datasets and batching")
    train: TrainConfig = opt(factory=TrainConfig, help="what trains and how")
    logging: LoggingConfig = opt(factory=LoggingConfig, help="metrics and trackers")
    inference: InferenceConfig = opt(factory=InferenceConfig, help="generation and tools")
    serve: ServeConfig = opt(factory=ServeConfig, help="the OpenAI-compatible server (code/serve.py)")
    vars: dict[str, str] = opt(
        factory=dict,
        help="named values for `${vars.NAME}` references in other values (any value may be referred to as"
        " `${dotted.key}`, e.g. `${run.output_root}/${run.name}/cache`)",
    )


# -------------------------------------------------------------------------------------- loading
@dataclass
class Loaded:
    config: Config
    sources: dict[str, str]

    def describe(self) -> str:
        return "\n".join(configlib.describe(self.config, self.sources))


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(CONFIG_DIR.parent))
    except ValueError:
        return str(path)


def load_config(
    stage: int | None = None,
    config_files: list[str | Path] = (),
    overrides: list[str] = (),
    base: str | Path | tuple[dict, str] | None = None,
    pinned: list[tuple[str, str]] = (),
) -> Loaded:
    """Resolve the layered configuration (see module docstring). ``base`` replaces config/model.yaml (a
    checkpoint's saved config.yaml: inference, evaluation); ``pinned`` are ``(key=value, source)`` layers
    applied right after it (what a loader sets, e.g. the checkpoint's own tokenizer folder)."""
    tree: dict = {}
    sources: dict[str, str] = {}
    layers: list[tuple[dict, str]] = []
    if isinstance(base, tuple):  # (tree, source): a saved config already read (and screened) by the caller
        layers.append(base)
    else:
        base_path = Path(resolve(base)) if base else CONFIG_DIR / "model.yaml"
        layers.append((configlib.load_yaml(base_path), _rel(base_path)))
    layers += [(configlib.parse_override(o), source) for o, source in pinned]
    if stage is not None:
        p = CONFIG_DIR / f"stage_{stage}.yaml"
        layers.append((configlib.load_yaml(p), _rel(p)))
    problems: list[str] = []
    for f in config_files:
        p = Path(resolve(f))
        t = configlib.load_yaml(p)
        stages = t.pop("stages", None) or {}
        layers.append((t, _rel(p)))
        if not isinstance(stages, dict):
            problems.append(f"{_rel(p)}: `stages` must map stage numbers to blocks")
            continue
        unknown = [k for k in stages if str(k) not in {"1", "2", "3", "0"}]
        problems += [f"{_rel(p)}: stages.{k}: unknown stage (use 0-3)" for k in unknown]
        if stage is not None:
            block = stages.get(stage, stages.get(str(stage)))
            if block:
                layers.append((block, f"{_rel(p)}#stages.{stage}"))
    for o in overrides:
        layers.append((configlib.parse_override(o), f"override {o.split('=', 1)[0]}"))
    for layer, name in layers:
        configlib.merge_tree(tree, layer, sources, name)
    if stage is not None:
        configlib.merge_tree(tree, {"run": {"stage": stage}}, sources, "--stage")
    try:
        cfg = configlib.build(Config, tree, sources)
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from None
    if problems:
        raise ConfigError(problems)
    return Loaded(cfg, sources)


def to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(configlib.to_dict(cfg), sort_keys=False)


def from_dict(tree: dict) -> Config:
    """Rebuild a Config saved with a checkpoint (strict, like every load)."""
    return configlib.build(Config, tree, {})
