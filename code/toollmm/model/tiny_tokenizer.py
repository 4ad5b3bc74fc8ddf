"""Build a Llama-style sentencepiece tokenizer directory from text, exactly as Vicuna ships one.

The folder holds ``tokenizer.model`` (sentencepiece BPE with byte fallback, ids 0/1/2 = unk/bos/eos)
and ``tokenizer_config.json``; ``AutoTokenizer.from_pretrained(folder)`` loads it the same way it loads
``pretrained_checkpoint/llm_ckpt/vicuna_7b``. It does NOT contain toollmm's special tokens:
``toollmm.core.tokens.TokenContract.add_to`` adds them, as it does to Vicuna's tokenizer.
Used by the demo corpus (trained on the corpus text) and by tests (trained on a few sentences).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

# Characters every chat template and tool call needs, even if the training text lacks them.
_REQUIRED_CHARS = "{}[]\":,._-/#<>=?!'()0123456789\n"


def build_sentencepiece_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000, split_newlines: bool = True
) -> Path:
    """Train a BPE sentencepiece model on ``texts`` and write a Llama tokenizer folder to ``out_dir``.

    ``split_newlines`` keeps "\\n" a piece of its own, as in Llama's vocabulary (ReAct label boundaries
    sit at newlines); False lets BPE merge it, to test that the renderer refuses such a vocabulary.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if split_newlines:  # train on lines: no learned piece can contain a newline
        sentences = [line for t in texts for line in t.split("\n") if line]
    else:
        sentences = [t for t in texts if t]
    if not sentences:
        raise ValueError("build_sentencepiece_tokenizer: no text to train on")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,  # any unseen character still encodes (as Llama's tokenizer does)
        character_coverage=1.0,
        required_chars=_REQUIRED_CHARS,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 4096,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n"
    )
    return out
