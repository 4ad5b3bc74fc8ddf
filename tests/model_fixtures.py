"""Tiny composed models and hand-built batches for the model tests (imported by test_*.py files)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from toollmm.core.batch import IGNORE_INDEX, Batch, MediaInputs, SignalTargets
from toollmm.core.config import LLMConfig, LoraSettings, ModelConfig, OutputProjConfig
from toollmm.model.toollmm_model import ToolLMM, build_model

ENC_DIM = 32
TINY_COND = {"image": (4, 24), "video": (6, 32), "audio": (1, 16)}  # (n_query, cond_dim) of tiny decoders


def write_tiny_llama(
    tokenizer_dir, out_dir, *, tied: bool = False, seed: int = 0, vocab_pad: int = 0
) -> Path:
    """A 2-layer Llama (hidden 64, GQA 4/2 heads) saved with its tokenizer, like a real checkpoint folder.
    ``vocab_pad``: extra unused rows beyond the tokenizer (models that pad their vocabulary)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok) + vocab_pad,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_config(
    llm_dir,
    *,
    lora: bool = True,
    r: int = 4,
    dropout: float = 0.0,
    attn: str = "sdpa",
    tokens_per_input: int = 1,
    proj_type: str = "linear",
    grad_ckpt: bool = False,
) -> ModelConfig:
    cfg = ModelConfig()
    cfg.llm = LLMConfig(
        path=str(llm_dir),
        dtype="float32",
        attn_implementation=attn,
        gradient_checkpointing=grad_ckpt,
        lora=LoraSettings(enabled=lora, r=r, alpha=2 * r, dropout=dropout),
    )
    cfg.encoder.dims.out_embed_dim = ENC_DIM
    cfg.input_proj.tokens_per_input = tokens_per_input
    cfg.input_proj.type = proj_type
    small = OutputProjConfig(
        d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32
    )
    cfg.output_proj = {m: small for m in TINY_COND}
    return cfg


def build_tiny(llm_dir, seed: int = 0, **kw) -> ToolLMM:
    torch.manual_seed(seed)
    return build_model(tiny_config(llm_dir, **kw), condition_shapes=TINY_COND)


class BatchMaker:
    """Builds batches by hand from segments, following the batch contract (expanded placeholders,
    media and signal spans in row-major order). A sample is a list of segments:
    ``("user", text)`` unsupervised, ``("asst", text)`` supervised, ``("media", modality, n_out)``,
    ``("signal", modality)`` (a supervised span with a random caption embedding)."""

    def __init__(self, model: ToolLMM, seed: int = 0):
        self.model, self.tok, self.ids = model, model.bundle.tokenizer, model.bundle.token_ids
        self.k = model.input_proj.tokens_per_input
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, *segments) -> dict:
        ids, labels, media, signals = [1], [IGNORE_INDEX], {}, {}
        for seg in segments:
            kind = seg[0]
            if kind in ("user", "asst"):
                t = self.tok.encode(seg[1], add_special_tokens=False)
                ids += t
                labels += t if kind == "asst" else [IGNORE_INDEX] * len(t)
            elif kind == "media":
                m, n_out = seg[1], seg[2]
                ids += [self.ids.placeholder[m]] * (n_out * self.k)
                labels += [IGNORE_INDEX] * (n_out * self.k)
                media.setdefault(m, []).append(torch.randn(1, n_out, ENC_DIM, generator=self.gen))
            elif kind == "signal":
                m = seg[1]
                signals.setdefault(m, []).append(
                    (len(ids), torch.randn(1, *TINY_COND[m], generator=self.gen))
                )
                ids += self.ids.signal[m]
                labels += self.ids.signal[m]
            else:
                raise ValueError(kind)
        return {"ids": ids + [2], "labels": labels + [2], "media": media, "signals": signals}

    @staticmethod
    def _collect(samples, offsets):
        media: dict[str, list] = {}
        targets: dict[str, tuple[list, list]] = {}
        for (row, off), s in zip(offsets, samples):
            for m, feats in s["media"].items():
                media.setdefault(m, []).extend(feats)
            for m, spans in s["signals"].items():
                pos, emb = targets.setdefault(m, ([], []))
                for start, e in spans:
                    pos.append([row, off + start])
                    emb.append(e)
        return (
            {
                m: MediaInputs(features=torch.cat(v), keys=[f"{m}{i}" for i in range(len(v))])
                for m, v in media.items()
            },
            {m: SignalTargets(torch.tensor(p), torch.cat(e)) for m, (p, e) in targets.items()},
        )

    def batch(self, samples) -> Batch:
        """One sample per row, right-padded, 2-D mask."""
        t = max(len(s["ids"]) for s in samples)
        b = len(samples)
        ids = torch.zeros(b, t, dtype=torch.long)
        labels = torch.full((b, t), IGNORE_INDEX)
        mask = torch.zeros(b, t, dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(s["ids"]), torch.tensor(s["labels"]), 1
        media, targets = self._collect(samples, [(i, 0) for i in range(b)])
        return Batch(ids, labels, mask, None, media, targets, [[f"s{i}"] for i in range(b)], int(mask.sum()))

    def packed(self, samples, pad: int = 3) -> Batch:
        """All samples in one row: restarted position_ids and a block-diagonal causal 4-D mask."""
        lens = [len(s["ids"]) for s in samples]
        t = sum(lens) + pad
        ids = torch.zeros(1, t, dtype=torch.long)
        labels = torch.full((1, t), IGNORE_INDEX)
        pos = torch.zeros(1, t, dtype=torch.long)
        mask = torch.zeros(1, 1, t, t, dtype=torch.bool)
        offsets, off = [], 0
        for s, n in zip(samples, lens):
            ids[0, off : off + n], labels[0, off : off + n] = (
                torch.tensor(s["ids"]),
                torch.tensor(s["labels"]),
            )
            pos[0, off : off + n] = torch.arange(n)
            mask[0, 0, off : off + n, off : off + n] = torch.ones(n, n, dtype=torch.bool).tril()
            offsets.append((0, off))
            off += n
        media, targets = self._collect(samples, offsets)
        return Batch(
            ids, labels, mask, pos, media, targets, [[f"s{i}" for i in range(len(samples))]], sum(lens)
        )


def mixed_samples(maker: BatchMaker) -> list[dict]:
    """Mixed modalities, several media per sample, signal spans of all three modalities, tool tokens."""
    return [
        maker.sample(
            ("user", "USER: what is in"),
            ("media", "image", 1),
            ("user", "and"),
            ("media", "image", 1),
            ("asst", "ASSISTANT: a red circle <tool_call>{}</tool_call>"),
            ("signal", "image"),
        ),
        maker.sample(
            ("user", "USER: describe the sound"),
            ("media", "audio", 3),
            ("asst", "ASSISTANT: a high tone"),
            ("signal", "audio"),
        ),
        maker.sample(
            ("user", "USER:"),
            ("media", "video", 2),
            ("asst", "ASSISTANT: moving <tool_result>ok</tool_result>"),
            ("signal", "video"),
            ("asst", "done"),
        ),
    ]
