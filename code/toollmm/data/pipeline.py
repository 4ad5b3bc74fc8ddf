"""Sample -> SampleTensors: render, check length and supervision, decode media, attach caption targets.

This is the one adapter between the stream and its neighbours, kept small on purpose:

* ``render(record, where=...)``: ``Renderer.render`` (``toollmm.data.render``): ``input_ids`` and
  ``labels`` with every placeholder expanded to ``media_tokens[modality]`` ids, ``media`` [(modality, ref)]
  in order, ``signals`` [(start, modality, caption, embedding, train)] in ``generate`` order.
* ``decode(modality, Media, where) -> ("pixels" | "features", tensor)``: :class:`MediaDecoder` wraps the
  encoder side (``toollmm.data.preprocess.load_media``, optional feature-cache lookup).

Signal span ``j`` belongs to the record's ``generate`` target ``j``; a supervised span whose caption
embedding is known (shard member or caption store) becomes a signal target. A renderer error keeps its
reason (one vocabulary: ``toollmm.data.records.REASONS``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from toollmm.core.batch import IGNORE_INDEX
from toollmm.core.tokens import MODALITIES, TokenIds

from .collate import SampleTensors
from .records import BadSample, Media, RecordError, Sample
from .render import RenderedRecord, Renderer, media_tokens_from_config

RenderFn = Callable[..., "RenderedRecord | None"]  # Renderer.render: (record, where=...) -> ids, labels, ...
DecodeFn = Callable[[str, Media, str], tuple[str, torch.Tensor]]
FeatureLookup = Callable[[str, "bytes | list[bytes]"], "torch.Tensor | None"]


class MediaDecoder:
    """Media bytes -> encoder input tensors (``pixels``), or cached features when available.

    ``preprocess`` is a ``PreprocessConfig``; ``feature_lookup(modality, data)`` (e.g. a bound
    ``FeatureCache.lookup``) returns ``[n_out, D]`` or None. Features stored in a shard win.
    """

    def __init__(self, preprocess=None, feature_lookup: FeatureLookup | None = None):
        self.preprocess = preprocess
        self.feature_lookup = feature_lookup
        # import the decoders' heavy modules once here, so forked DataLoader workers inherit them
        # (torchvision alone takes seconds to import, and workers start afresh every epoch)
        import torchaudio  # noqa: F401
        import torchvision.transforms  # noqa: F401

        from . import preprocess as _  # noqa: F401

    def __call__(self, modality: str, media: Media, where: str) -> tuple[str, torch.Tensor]:
        if media.features is not None:
            return "features", torch.as_tensor(np.asarray(media.features, dtype=np.float32)).reshape(
                -1, media.features.shape[-1]
            )
        if self.feature_lookup is not None:
            feats = self.feature_lookup(modality, media.data)
            if feats is not None:
                return "features", feats
        from toollmm.data.preprocess import MediaError, load_media

        try:
            return "pixels", load_media(modality, media.data, self.preprocess, name=media.name)
        except MediaError as e:
            raise BadSample("corrupt_media", where, str(e)) from None


def _runs(ids: torch.Tensor, token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``token``."""
    hit = (ids == token).long()
    if not hit.any():
        return []
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.long), hit, torch.zeros(1, dtype=torch.long)]))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


class SampleProcessor:
    """Callable ``Sample -> SampleTensors`` raising :class:`BadSample` (picklable for DataLoader workers)."""

    def __init__(
        self,
        render: RenderFn,
        token_ids: TokenIds,
        media_tokens: dict[str, int],
        max_length: int,
        decode: DecodeFn,
    ):
        self.render, self.token_ids, self.decode = render, token_ids, decode
        self.media_tokens, self.max_length = dict(media_tokens), max_length

    def __call__(self, sample: Sample) -> SampleTensors:
        where = sample.where
        try:
            r = self.render(sample.record, where=where)
        except RecordError as e:  # the record cannot render (its reason is already a skip reason)
            detail = "; ".join(p.message for p in e.problems)  # not str(e): it would name `where` twice
            raise BadSample(e.reason, where, f"cannot render: {detail}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise BadSample("invalid_record", where, f"cannot render: {e}") from None
        if r is None:
            raise BadSample("overlong", where, "the renderer dropped it (over-long)")
        ids = torch.as_tensor(r.input_ids, dtype=torch.long)
        labels = torch.as_tensor(r.labels, dtype=torch.long)
        if len(ids) > self.max_length:
            raise BadSample("overlong", where, f"{len(ids)} tokens > data.max_length {self.max_length}")
        if not (labels != IGNORE_INDEX).any():
            raise BadSample("empty_conversation", where, "no supervised token after rendering")
        media, kinds = {}, {}
        for m in MODALITIES:
            used = sum(1 for mod, _ in r.media if mod == m)  # a truncated sample keeps a prefix of its media
            items = sample.media.get(m, [])[:used]
            runs = _runs(ids, self.token_ids.placeholder[m])
            n_tok = self.media_tokens.get(m, 1)
            if (
                used != len(items)
                or used * n_tok != sum(n for _, n in runs)
                or any(n % n_tok for _, n in runs)
            ):
                raise BadSample(
                    "media_mismatch",
                    where,
                    f"{len(items)} {m} input(s) x {n_tok} tokens vs placeholder runs {runs}",
                )
            if items:
                decoded = [self.decode(m, x, where) for x in items]
                if len({k for k, _ in decoded}) > 1:
                    raise BadSample(
                        "corrupt_media", where, f"{m}: some inputs have cached features, some not"
                    )
                kinds[m] = decoded[0][0]
                media[m] = [t for _, t in decoded]
        return SampleTensors(sample.id, ids, labels, media, kinds, self._signals(sample, r, ids), where)

    def _signals(self, sample: Sample, r, ids: torch.Tensor) -> list:
        """Supervised signal spans with a known caption embedding; span ``j`` is generate target ``j``."""
        out = []
        for j, sp in enumerate(r.signals):
            span = self.token_ids.signal[sp.modality]
            if ids[sp.start : sp.start + len(span)].tolist() != span:
                raise BadSample(
                    "invalid_record", sample.where, f"signal span {j} at {sp.start} is not complete"
                )
            if sp.train and j in sample.captions:
                emb = torch.as_tensor(np.asarray(sample.captions[j], dtype=np.float32))
                out.append((sp.modality, sp.start, emb))
        return out


def make_render_fn(cfg, tokenizer, media_tokens: dict[str, int] | None = None) -> Callable:
    """``Renderer.from_config(cfg, ...).render``; over-long samples raise into the stream's own policy
    (``data.overlong``), except ``truncate``, which the renderer applies."""
    overlong = "truncate" if cfg.data.overlong == "truncate" else "raise"
    return Renderer.from_config(cfg, tokenizer, media_tokens, overlong=overlong).render


def make_processor(cfg, tokenizer, feature_lookup: FeatureLookup | None = None) -> SampleProcessor:
    """The processor a training run uses: the renderer for ``cfg``, the token ids of ``cfg``'s contract
    on ``tokenizer`` (which must already hold them), the encoder's preprocessing, optional cached features.

    ``TrainStream.from_config(cfg, make_processor(cfg, tok), pad_id=tok.pad_token_id or 0)`` is the whole
    data side of ``train.py``."""
    from toollmm.core.tokens import TokenContract

    media_tokens = media_tokens_from_config(cfg.model)
    return SampleProcessor(
        make_render_fn(cfg, tokenizer, media_tokens),
        TokenContract.from_config(cfg.model.tokens).ids(tokenizer),
        media_tokens,
        cfg.data.max_length,
        MediaDecoder(cfg.model.preprocess, feature_lookup),
    )
