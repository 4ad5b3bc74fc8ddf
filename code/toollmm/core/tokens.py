"""The special-token contract. Every other module imports token names and ids from here.

* Modality placeholders ``<image> <video> <audio>``: stand for an input medium in the text; the model
  replaces each with the projected encoder tokens. Their embedding rows are never used or trained.
* Signal tokens ``[IMG0]..[IMG3] [VID0]..[VID23] [AUD0]..[AUD7]`` (NExT-GPT's counts, configurable):
  the LLM writes a whole span to ask for an output medium; their hidden states feed the output projection.
* Tool tokens ``<tool_call> </tool_call> <tool_result> </tool_result>`` wrap a JSON call and its result.

The tokens are added to a tokenizer as *added special tokens* (never split, never normalised), in the
fixed order placeholders -> signals (image, video, audio) -> tools, so the same config always yields the
same ids on the same base tokenizer. Loading a delta checks that the ids match (NExT-GPT #47).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from toollmm.core.errors import UserError

MODALITIES = ("image", "video", "audio")
PLACEHOLDER = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
PLACEHOLDER_TO_MODALITY = {v: k for k, v in PLACEHOLDER.items()}
SIGNAL_PREFIX = {"image": "IMG", "video": "VID", "audio": "AUD"}
PREFIX_TO_MODALITY = {v: k for k, v in SIGNAL_PREFIX.items()}

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESULT_START = "<tool_result>"
TOOL_RESULT_END = "</tool_result>"
TOOL_TOKENS = (TOOL_CALL_START, TOOL_CALL_END, TOOL_RESULT_START, TOOL_RESULT_END)

DEFAULT_SIGNAL_COUNTS = {"image": 4, "video": 24, "audio": 8}

#: any signal token in text, e.g. "[IMG0]" -> ("IMG", "0")
SIGNAL_RE = re.compile(r"\[(IMG|VID|AUD)(\d+)\]")
#: any placeholder in text
PLACEHOLDER_RE = re.compile(r"<(image|video|audio)>")

GROUPS = ("placeholder", "signal", "tool")


class TokenContractError(UserError, ValueError):
    """A tokenizer does not hold the tokens (or ids) this contract needs."""


def signal_token(modality: str, index: int) -> str:
    return f"[{SIGNAL_PREFIX[modality]}{index}]"


@dataclass(frozen=True)
class TokenIds:
    """Token ids of the contract on one tokenizer."""

    placeholder: dict[str, int]
    signal: dict[str, list[int]]
    tool: dict[str, int]
    _by_id: dict[int, tuple[str, str]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id: dict[int, tuple[str, str]] = {}
        for m, i in self.placeholder.items():
            by_id[i] = ("placeholder", m)
        for m, ids in self.signal.items():
            for i in ids:
                by_id[i] = ("signal", m)
        for t, i in self.tool.items():
            by_id[i] = ("tool", t)
        object.__setattr__(self, "_by_id", by_id)

    def group_ids(self, group: str) -> list[int]:
        if group == "placeholder":
            return sorted(self.placeholder.values())
        if group == "signal":
            return sorted(i for ids in self.signal.values() for i in ids)
        if group == "tool":
            return sorted(self.tool.values())
        raise KeyError(f"unknown token group {group!r}; groups: {GROUPS}")

    @property
    def new_ids(self) -> list[int]:
        return sorted(self._by_id)

    @property
    def trainable_ids(self) -> list[int]:
        """Rows that may train: signal and tool tokens (placeholders are replaced before the LLM sees them)."""
        return sorted(self.group_ids("signal") + self.group_ids("tool"))

    def kind(self, token_id: int) -> tuple[str, str] | None:
        """("placeholder", modality) | ("signal", modality) | ("tool", token) | None for ordinary tokens."""
        return self._by_id.get(int(token_id))

    def placeholder_modality(self, token_id: int) -> str | None:
        k = self._by_id.get(int(token_id))
        return k[1] if k and k[0] == "placeholder" else None

    def signal_modality(self, token_id: int) -> str | None:
        k = self._by_id.get(int(token_id))
        return k[1] if k and k[0] == "signal" else None

    def to_dict(self) -> dict:
        return {
            "placeholder": dict(self.placeholder),
            "signal": {k: list(v) for k, v in self.signal.items()},
            "tool": dict(self.tool),
        }


@dataclass(frozen=True)
class TokenContract:
    """Which tokens exist; built from ``model.tokens`` in the config."""

    num_signal: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIGNAL_COUNTS))

    @classmethod
    def from_config(cls, tokens_cfg) -> TokenContract:
        return cls(
            {
                "image": tokens_cfg.num_image_signal,
                "video": tokens_cfg.num_video_signal,
                "audio": tokens_cfg.num_audio_signal,
            }
        )

    def signal_tokens(self, modality: str) -> list[str]:
        return [signal_token(modality, i) for i in range(self.num_signal[modality])]

    def signal_text(self, modality: str) -> str:
        """The full span the model must write to request one output of ``modality``."""
        return "".join(self.signal_tokens(modality))

    @property
    def placeholders(self) -> list[str]:
        return [PLACEHOLDER[m] for m in MODALITIES]

    @property
    def new_tokens(self) -> list[str]:
        out = list(self.placeholders)
        for m in MODALITIES:
            out += self.signal_tokens(m)
        return out + list(TOOL_TOKENS)

    def add_to(self, tokenizer) -> TokenIds:
        """Add the contract's tokens to ``tokenizer`` (idempotent) and return their ids."""
        from tokenizers import AddedToken

        vocab = tokenizer.get_vocab()
        missing = [t for t in self.new_tokens if t not in vocab]
        if missing:
            tokenizer.add_tokens(
                [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
            )
        return self.ids(tokenizer)

    def ids(self, tokenizer) -> TokenIds:
        """Ids of the contract's tokens; raises naming every token the tokenizer lacks or splits."""
        problems = []
        got: dict[str, int] = {}
        vocab = tokenizer.get_vocab()
        for t in self.new_tokens:
            if t not in vocab:
                problems.append(f"{t} is not in the tokenizer")
                continue
            enc = tokenizer.encode(t, add_special_tokens=False)
            if enc != [vocab[t]]:
                problems.append(f"{t} is split into {enc} instead of the single id {vocab[t]}")
            got[t] = vocab[t]
        if problems:
            raise TokenContractError(
                "tokenizer does not hold toollmm's special tokens (was it saved with the checkpoint?): "
                + "; ".join(problems)
            )
        return TokenIds(
            placeholder={m: got[PLACEHOLDER[m]] for m in MODALITIES},
            signal={m: [got[t] for t in self.signal_tokens(m)] for m in MODALITIES},
            tool={t: got[t] for t in TOOL_TOKENS},
        )
