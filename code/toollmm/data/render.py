"""One renderer: a record -> ``input_ids`` + ``labels`` + media slots + signal spans, built together.

How ids and labels stay in step (LLaVA #779's "tokenization mismatch" left the loss at 0): the conversation
is laid out as text parts (``conversation_parts``: text, supervised?, kind), the joined text is tokenised
ONCE exactly as ``tokenizer.apply_chat_template`` tokenises our Jinja template's output, and each token takes
its label from the part its characters come from (the tokenizer's offsets). So the ids equal
``apply_chat_template``'s by construction, nothing is re-tokenised to find label boundaries, and a token
that straddles a supervised/masked boundary is an error naming the record, never a silently shifted label.
(Encoding parts one by one would not do: sentencepiece adds a dummy-prefix ``▁`` to every separately
encoded string, and added special tokens split the text around them.)

In the same pass each ``<image>/<video>/<audio>`` id is expanded into ``media_tokens[m]`` copies (see
``toollmm.core.batch``) and paired with the next entry of the record's media list; each signal span is reported
with the caption / embedding key of its ``generate`` entry. Over-long samples are never cut through a media,
signal or tool span: ``overlong='raise'`` (default) names the record, ``'skip'`` counts it, ``'truncate'``
keeps the longest prefix of whole assistant turns that fits (counted; skipped if nothing supervised is left).
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Literal, NamedTuple

from toollmm.core.batch import IGNORE_INDEX
from toollmm.core.tokens import MODALITIES, TOOL_RESULT_END, TOOL_RESULT_START, TokenContract

from .records import MEDIA_KEYS, Problem, RecordError, check_record
from .templates import VICUNA_SYSTEM, ChatFormat, FormatError, Part, conversation_parts

log = logging.getLogger(__name__)

Overlong = Literal["raise", "skip", "truncate"]


class SignalSpan(NamedTuple):
    start: int  # index of the span's first signal token in input_ids
    modality: str
    caption: str | None
    embedding: str | None  # key of a precomputed caption embedding
    train: bool = True  # the span is supervised (False inside a `train: false` turn)


@dataclass
class RenderedRecord:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not supervised; unshifted
    media: list[tuple[str, Any]] = field(default_factory=list)  # (modality, path or frame list), in order
    signals: list[SignalSpan] = field(default_factory=list)
    source: str = ""
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def media_tokens_from_config(model_cfg) -> dict[str, int]:
    """``toollmm.core.batch``'s rule: (1 when pooled, clips when per-clip) * input_proj.tokens_per_input."""
    per = model_cfg.input_proj.tokens_per_input
    if model_cfg.encoder.output == "pooled":
        return {m: per for m in MODALITIES}
    pre = model_cfg.preprocess
    return {"image": per, "audio": pre.audio_clips * per, "video": pre.video_clips * per}


class _EncodeState:
    """Output of one ``Renderer._encode`` pass; ``token`` handles placeholders, signals and control tokens."""

    def __init__(self, renderer: Renderer, record: dict, where: str, rid: str):
        self.r = renderer
        self.where, self.rid = where, rid
        self.media_lists = {m: record.get(MEDIA_KEYS[m]) or [] for m in MODALITIES}
        self.used = dict.fromkeys(MODALITIES, 0)
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.media: list[tuple[str, Any]] = []
        self.media_starts: list[int] = []
        self.signals: list[SignalSpan] = []
        self.turn_ends: list[int] = []  # index after each completed assistant turn

    def fail(self, reason: str, msg: str) -> RecordError:
        return RecordError(self.where, self.rid, [Problem(reason, msg)])

    def token(self, tid: int, part: Part) -> None:
        r = self.r
        m = r._placeholder.get(tid)
        if m is not None:
            if part.train:
                raise self.fail("media_mismatch", f"<{m}> inside supervised text")
            if self.used[m] >= len(self.media_lists[m]):
                raise self.fail("media_mismatch", f"<{m}> #{self.used[m] + 1} has no `{MEDIA_KEYS[m]}` entry")
            self.media.append((m, self.media_lists[m][self.used[m]]))
            self.media_starts.append(len(self.ids))
            self.used[m] += 1
            self.ids.extend([tid] * r.media_tokens[m])
            self.labels.extend([IGNORE_INDEX] * r.media_tokens[m])
            return
        if tid in r._signal_start and part.kind == "signal":
            g = part.generate or {}
            span = SignalSpan(len(self.ids), g["modality"], g.get("caption"), g.get("embedding"), part.train)
            self.signals.append(span)
        elif tid in r._control and part.kind == "content":
            name = r.tokenizer.convert_ids_to_tokens(tid)
            raise self.fail("forbidden_token", f"record text contains the special token {name!r}")
        self.ids.append(tid)
        self.labels.append(tid if part.train else IGNORE_INDEX)


class Renderer:
    """Renders records for training (``render``) and prompts for inference (``render_for_generation``)."""

    def __init__(
        self,
        tokenizer,
        template: str = "vicuna_v1",
        *,
        contract: TokenContract | None = None,
        tool_format: str = "tokens",
        system_prompt: str = VICUNA_SYSTEM,
        media_tokens: dict[str, int] | None = None,
        max_length: int | None = None,
        overlong: Overlong = "raise",
    ):
        if overlong not in ("raise", "skip", "truncate"):
            raise ValueError(f"overlong must be 'raise', 'skip' or 'truncate', got {overlong!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the renderer needs a fast (tokenizers-backed) tokenizer for token offsets")
        self.tokenizer = tokenizer
        self.contract = contract or TokenContract()
        self.token_ids = self.contract.ids(tokenizer)
        self.fmt = ChatFormat.build(
            template, self.contract, tokenizer, system_prompt=system_prompt, tool_format=tool_format
        )
        self.media_tokens = {m: 1 for m in MODALITIES}
        for m, n in (media_tokens or {}).items():
            if m not in MODALITIES or not isinstance(n, int) or n < 1:
                raise ValueError(
                    f"media_tokens: need a positive int per modality {MODALITIES}, got {m}={n!r}"
                )
            self.media_tokens[m] = n
        self.max_length = max_length
        self.overlong = overlong
        self._placeholder = {i: m for m, i in self.token_ids.placeholder.items()}
        self._signal_start = {ids[0]: m for m, ids in self.token_ids.signal.items()}
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self._control = special - set(self._placeholder)  # never allowed inside record text
        self._watch = set(self._placeholder) | set(self._signal_start) | self._control
        self.rendered = 0
        self.truncated = 0
        self.skipped: Counter[str] = Counter()

    @classmethod
    def from_config(
        cls,
        cfg,
        tokenizer,
        media_tokens: dict[str, int] | None = None,
        overlong: Overlong | None = None,
    ) -> Renderer:
        """From a full ``toollmm.core.config.Config`` (model.chat_template/tool_format/system_prompt/tokens, data.*);
        ``overlong`` replaces ``data.overlong`` when given."""
        return cls(
            tokenizer,
            cfg.model.chat_template,
            contract=TokenContract.from_config(cfg.model.tokens),
            tool_format=cfg.model.tool_format,
            system_prompt=cfg.model.system_prompt,
            media_tokens=media_tokens or media_tokens_from_config(cfg.model),
            max_length=cfg.data.max_length,
            overlong=overlong or cfg.data.overlong,
        )

    # --------------------------------------------------------------------------------- public API
    def render(self, record: dict, *, where: str | None = None) -> RenderedRecord | None:
        """Ids, labels, media and signals of a training record; None when skipped (counted in ``skipped``)."""
        where = where or str(record.get("source", "<record>"))
        parts = self._parts(record, where, add_generation_prompt=False)
        sample, turn_ends, media_starts = self._encode(parts, record, where)
        if sample.num_supervised == 0:
            raise RecordError(where, sample.id, [Problem("empty_conversation", "nothing to supervise")])
        if self.max_length is not None and len(sample) > self.max_length:
            sample = self._overlong(sample, turn_ends, media_starts, where)
            if sample is None:
                return None
        self.rendered += 1
        return sample

    def render_for_generation(
        self,
        messages: list[dict],
        *,
        tools: list | None = None,
        images: list | None = None,
        videos: list | None = None,
        audios: list | None = None,
        record_id: str = "<prompt>",
    ) -> RenderedRecord:
        """The prompt up to the assistant header (``... ASSISTANT:``), all labels masked. A conversation that
        ends with a tool message gets no header: the assistant turn continues after the tool result."""
        record = {"id": record_id, "source": "inference", "messages": messages}
        for key, val in (("tools", tools), ("images", images), ("videos", videos), ("audios", audios)):
            if val:
                record[key] = list(val)
        problems = check_record(record, require_supervised=False)
        if problems:
            raise RecordError("render_for_generation", record_id, problems)
        parts = self._parts(record, "render_for_generation", add_generation_prompt=True)
        parts = [Part(p.text, False, p.kind, p.generate) for p in parts]
        return self._encode(parts, record, "render_for_generation")[0]

    def tool_result_ids(self, content: str) -> list[int]:
        """Ids the agent forces in after ``</tool_call>`` (token format): exactly what training saw."""
        text = TOOL_RESULT_START + content + TOOL_RESULT_END
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends a generated turn besides the eos token (v0: ``###``; ReAct: ``Observation:``)."""
        extra = ("Observation:",) if self.fmt.tool_format == "react" else ()
        return self.fmt.template.stop_strings + extra

    # ----------------------------------------------------------------------------------- internals
    def _parts(self, record: dict, where: str, add_generation_prompt: bool) -> list[Part]:
        try:
            return conversation_parts(
                record["messages"],
                self.fmt,
                tools=record.get("tools"),
                meta=record.get("meta"),
                add_generation_prompt=add_generation_prompt,
            )
        except FormatError as e:
            raise RecordError(where, record.get("id"), [Problem("format", str(e))]) from None

    def _encode(
        self, parts: list[Part], record: dict, where: str
    ) -> tuple[RenderedRecord, list[int], list[int]]:
        rid = str(record.get("id", ""))
        text = "".join(p.text for p in parts)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tids, offsets = enc["input_ids"], enc["offset_mapping"]
        ends = list(accumulate(len(p.text) for p in parts))  # part k covers chars [ends[k-1], ends[k])
        starts = [o[0] for o in offsets]
        # tokens of part k: those whose first character lies in it (offsets are non-decreasing)
        bounds = [bisect_left(starts, x) for x in ends[:-1]] + [len(tids)]
        st = _EncodeState(self, record, where, rid)
        a = 0
        for k, b in enumerate(bounds):
            part = parts[k]
            if b > a and offsets[b - 1][1] > ends[k]:  # a token runs into the next part(s)
                self._check_straddle(parts, ends, k, offsets[b - 1], tids[b - 1], text, st)
            seg = tids[a:b]
            if self._watch.isdisjoint(seg):  # the common case: plain text, copied in bulk
                st.ids.extend(seg)
                st.labels.extend(seg if part.train else [IGNORE_INDEX] * len(seg))
            else:
                for tid in seg:
                    st.token(tid, part)
            if part.kind == "turn_end":
                st.turn_ends.append(len(st.ids))
            a = b
        for m in MODALITIES:
            if st.used[m] != len(st.media_lists[m]):
                raise st.fail(
                    "media_mismatch", f"{st.used[m]} <{m}> in the text but {len(st.media_lists[m])} listed"
                )
        sample = RenderedRecord(rid, st.ids, st.labels, st.media, st.signals, str(record.get("source", "")))
        return sample, st.turn_ends, st.media_starts

    def _check_straddle(self, parts, ends, k, offset, tid, text, st) -> None:
        s, e = offset
        k2 = bisect_right(ends, e - 1)
        if any(parts[j].train != parts[k].train for j in range(k + 1, min(k2, len(parts) - 1) + 1)):
            raise st.fail(
                "format",
                f"token {self.tokenizer.convert_ids_to_tokens(tid)!r} spans {text[s:e]!r} across a "
                "supervised/masked boundary (this tokenizer merges across the template's boundaries)",
            )

    def _overlong(
        self, sample: RenderedRecord, turn_ends: list[int], media_starts: list[int], where: str
    ) -> RenderedRecord | None:
        n, limit = len(sample), self.max_length
        if self.overlong == "raise":
            raise RecordError(
                where,
                sample.id,
                [
                    Problem(
                        "overlong",
                        f"{n} tokens (media tokens included) > max_length {limit}; raise data.max_length, "
                        "or set data.overlong to skip / truncate",
                    )
                ],
            )
        cut = max((t for t in turn_ends if t <= limit), default=0) if self.overlong == "truncate" else 0
        if cut and any(x != IGNORE_INDEX for x in sample.labels[:cut]):
            kept_media = sum(1 for st in media_starts if st < cut)  # turn ends never fall inside a span
            self.truncated += 1
            return RenderedRecord(
                sample.id,
                sample.input_ids[:cut],
                sample.labels[:cut],
                sample.media[:kept_media],
                [s for s in sample.signals if s.start < cut],
                sample.source,
                truncated=True,
            )
        self.skipped["overlong"] += 1
        log.debug("%s: record %r skipped: %d tokens > max_length %d", where, sample.id, n, limit)
        return None
