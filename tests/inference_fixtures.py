"""A tiny stage folder for the inference tests, and a steered step model (imported by test_inference_*.py).

``build_tiny_stage`` writes tiny base models placed like real checkpoints (ImageBind weights file, a Llama
folder, three diffusers pipelines), builds the composed model from a config and saves it with
``save_stage``: a real stage folder that ``toollmm.load`` / ``code/inference.py`` load like any other.

An untrained tiny model writes nothing useful, so tests that need a tool call or a signal span STEER it:
``Steered`` runs the real model (its forward, KV cache and hidden states, which the signal hook projects
and decodes) and only replaces the choice of the next token by a script picked by the prompt text.
"""

from __future__ import annotations

from pathlib import Path

from toollmm.agent.protocol import StepOutput
from toollmm.agent.scripted import ScriptedModel
from toollmm.checkpoint.stage import save_stage
from toollmm.core.config import load_config
from toollmm.model.tiny import TinyLlama, write_encoder, write_llm

TINY_LLM = TinyLlama(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
SMALL_PROJ = {
    "d_model": 16,
    "num_heads": 2,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "dim_feedforward": 32,
}
TRAINED = [
    "input_proj",
    "output_proj.image",
    "output_proj.video",
    "output_proj.audio",
    "lora",
    "token_rows.signal",
]


def tiny_overrides(base: Path) -> list[str]:
    out = [
        f"model.encoder.checkpoint={base / 'imagebind_tiny.pth'}",
        f"model.llm.path={base / 'llm'}",
        "model.llm.dtype=float32",
        "model.llm.lora.r=4",
        "model.llm.lora.alpha=8",
        "model.llm.lora.dropout=0.0",
        "model.feature_cache.enabled=false",
        "inference.tool_sets=[builtin,gpt4tools]",
        "inference.tool_imports=[toollmm.demo.toolset]",
        "inference.max_new_tokens=200",  # a budget of its own (config/inference.yaml must not replace it)
        "run.stage=3",
    ]
    for m, folder in (("image", "tiny-sd"), ("video", "tiny-t2v"), ("audio", "tiny-audioldm")):
        out += [
            f"model.decoders.{m}.path={base / 'diffusion' / folder}",
            f"model.decoders.{m}.num_inference_steps=2",
        ]
        out += [f"model.output_proj.{m}.{k}={v}" for k, v in SMALL_PROJ.items()]
    # the pipelines' own small defaults, not model.yaml's ZeroScope / AudioLDM sizes
    return out + [
        "model.decoders.video.height=32",
        "model.decoders.video.width=32",
        "model.decoders.video.num_frames=3",
        "model.decoders.audio.audio_length_s=null",
    ]


def build_tiny_stage(root: Path, tokenizer_dir: Path) -> Path:
    """``root/stage_3``: a loadable stage folder over tiny base models in ``root/base``."""
    import torch

    from toollmm.model.tiny_decoders import build_tiny_decoders
    from toollmm.model.toollmm_model import build_model

    base = root / "base"
    cfg = load_config(
        config_files=["config/presets/encoder_tiny.yaml"], overrides=tiny_overrides(base)
    ).config
    write_encoder(base / "imagebind_tiny.pth", cfg.model)
    write_llm(base / "llm", tokenizer_dir, TINY_LLM)
    build_tiny_decoders(base / "diffusion")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.trainable_parameters(TRAINED)  # these parts go into the delta (at their initial values)
    return save_stage(model, cfg, root / "stage_3")


class Steered:
    """The real step model, with the next token chosen by a script: ``rules`` = ``[(key, continuation)]``;
    each row follows the continuation of the key found LAST in its prompt text (so in a chat the newest
    user message decides), or ends at once when no key occurs."""

    max_append = None

    def __init__(self, inner, tokenizer, rules: list[tuple[str, str]]):
        self.inner, self.tok, self.rules = inner, tokenizer, rules
        self.brackets = (
            tokenizer.convert_tokens_to_ids("<tool_result>"),
            tokenizer.convert_tokens_to_ids("</tool_result>"),
        )
        self.starts = 0

    def script(self, prompt: list[int]) -> list[int]:
        text = self.tok.decode(prompt)
        found = [(text.rfind(key), cont) for key, cont in self.rules if key in text]
        if not found:
            return [self.tok.eos_token_id]
        cont = max(found)[1]
        return self.tok.encode(cont, add_special_tokens=False) + [self.tok.eos_token_id]

    def start(self, prompts, media=None):
        self.starts += 1
        state, out = self.inner.start(prompts, media)
        scripted = ScriptedModel(
            [self.script(p) for p in prompts],
            len(self.tok),
            self.tok.eos_token_id,
            forced_brackets=self.brackets,
        )
        s_state, s_out = scripted.start(prompts)
        return (state, scripted, s_state), StepOutput(s_out.logits, out.hidden)

    def step(self, state, tokens):
        inner_state, scripted, s_state = state
        out = self.inner.step(inner_state, tokens)
        return StepOutput(scripted.step(s_state, tokens).logits, out.hidden)


def steer(rt, rules: list[tuple[str, str]]):
    """Make runtime ``rt`` follow ``rules`` (see ``Steered``); returns ``rt``."""
    from toollmm.infer.step import ToolLMMStepModel

    rt.set_step_model(Steered(ToolLMMStepModel(rt.model), rt.tokenizer, rules))
    return rt


def call_text(name: str, arguments: str) -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>'


IMAGE_SPAN = "[IMG0][IMG1][IMG2][IMG3]"
