"""Tool output turned into forced tokens. Tool output is PLAIN TEXT: a special-token string in it
("</tool_result>", "[IMG0]", "<image>", "</s>") is broken up so it can never tokenise to a special id,
and any special id that still appears is dropped — a tool cannot inject calls, spans or media."""

from __future__ import annotations

from toollmm.core.tokens import TOOL_RESULT_END, TOOL_RESULT_START, TokenIds


class ForcedText:
    def __init__(self, tokenizer, ids: TokenIds):
        self.tok = tokenizer
        self.never = set(ids.new_ids) | set(tokenizer.all_special_ids)
        specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
        self.special_strings = sorted((t for t in specials if len(t) > 1), key=len, reverse=True)

    def sanitize(self, text: str) -> str:
        for special in self.special_strings:
            if special in text:
                text = text.replace(special, special[0] + " " + special[1:])
        return text

    def plain(self, text: str) -> list[int]:
        ids = self.tok.encode(self.sanitize(text), add_special_tokens=False)
        return [i for i in ids if i not in self.never]

    def wrapped(self, text: str, start: int, end: int) -> list[int]:
        """``<tool_result>{text}</tool_result>`` tokenised as ONE string, as the data renderer does (no
        word-start marker after the special token), with the body free of special ids."""
        safe = self.sanitize(text)
        ids = self.tok.encode(TOOL_RESULT_START + safe + TOOL_RESULT_END, add_special_tokens=False)
        if len(ids) < 2 or ids[0] != start or ids[-1] != end:
            ids = [start, *self.tok.encode(safe, add_special_tokens=False), end]
        return [start, *(i for i in ids[1:-1] if i not in self.never), end]
