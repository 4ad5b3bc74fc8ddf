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
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1000,
    split_newlines: bool = True,
    space_piece: bool = False,
) -> Path:
    """Train a BPE sentencepiece model on ``texts`` and write a Llama tokenizer folder to ``out_dir``.

    ``split_newlines`` keeps "\\n" a piece of its own, as in Llama's vocabulary (ReAct label boundaries
    sit at newlines); False lets BPE merge it, to test that the renderer refuses such a vocabulary.
    ``space_piece`` makes the word-boundary mark "▁" a piece of its own that never merges: a word then
    splits into the same pieces after a space as after a quote (``in Zurich`` and ``"city":"Zurich"``),
    so copying a value from a request into a JSON tool call is a token-for-token copy. (With "▁" merged
    into a word's first piece, an unseen word splits differently in the two places: ``▁sa|v|an|na`` against
    ``s|a|v|an|na``, and a tiny LM cannot learn that respelling for words it never saw.)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if split_newlines:  # train on lines: no learned piece can contain a newline
        sentences = [line for t in texts for line in t.split("\n") if line]
    else:
        sentences = [t for t in texts if t]
    if not sentences:
        raise ValueError("build_sentencepiece_tokenizer: no text to train on")

    if space_piece:  # learn merges inside words only: train on the words, no word-start mark anywhere
        sentences = [w for line in sentences for w in line.split(" ") if w]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,  # any unseen character still encodes (as Llama's tokenizer does)
        character_coverage=1.0,
        required_chars=_REQUIRED_CHARS + ("\u2581" if space_piece else ""),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=not space_piece,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    proto = _space_piece_model(buf.getvalue()) if space_piece else buf.getvalue()
    (out / "tokenizer.model").write_bytes(proto)
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


def _space_piece_model(model: bytes) -> bytes:
    """A model trained on single words (no "▁" in any merge), set to encode text as Llama's does (a dummy
    "▁" before the first word, "▁" for each space): "▁" is then always a piece of its own. (Not
    ``user_defined_symbols=["▁"]``: transformers loads a user-defined piece as a special added token, which
    decoders and the agent's forced tool results then drop, spaces and all.)"""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    merged = [
        p.piece for p in proto.pieces if p.type == normal and "\u2581" in p.piece and p.piece != "\u2581"
    ]
    if merged or not any(p.piece == "\u2581" for p in proto.pieces):
        raise ValueError(
            f"build_sentencepiece_tokenizer: word-start pieces {merged[:5]} or no '\u2581' piece"
        )
    proto.normalizer_spec.add_dummy_prefix = True
    return proto.SerializeToString()
