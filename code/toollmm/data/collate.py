"""Rendered samples -> one :class:`toollmm.core.batch.Batch`: padding or packing, media in placeholder order.

* Padded: one sample per row, right-padded to the longest; ``attention_mask`` ``[B, T]`` 0/1.
* Packed: samples placed into as few rows of at most ``max_length`` tokens as first-fit decreasing
  needs, balanced so the longest row is short;
  ``position_ids`` restart at 0 for each sample and ``attention_mask`` is a bool ``[B, 1, T, T]``
  block-diagonal causal mask, so a sample's logits equal its logits run alone. Padding positions attend
  only to themselves (an all-False row would make SDPA return NaN there).
* Media of each modality are listed in row-major order of their placeholder runs (the batch contract),
  signal targets as ``(row, start)`` with their caption embeddings.
* ``real_tokens`` counts the samples' tokens; a batch with no samples is a *padding batch*: one masked
  token, labels all ignored, ``real_tokens == 0`` (zero loss; it keeps ranks in step).

Transformers passes a 4-D mask to the attention kernel as is: SDPA reads bool (True = attend); the
``eager`` kernel ADDS the mask to the scores, so it needs :func:`additive_mask` first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from toollmm.core.batch import IGNORE_INDEX, Batch, MediaInputs, SignalTargets


@dataclass
class SampleTensors:
    """One sample ready to batch (the output of ``toollmm.data.pipeline.SampleProcessor``)."""

    id: str
    input_ids: torch.Tensor  # long [L], placeholders already expanded to their media-token runs
    labels: torch.Tensor  # long [L], IGNORE_INDEX where not supervised
    media: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # modality -> per input, in order
    media_kind: dict[str, str] = field(default_factory=dict)  # modality -> "features" | "pixels"
    signals: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)  # (modality, start, embedding)
    where: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row, each row's total at most ``capacity``: as few rows as first-fit decreasing
    needs, then balanced (longest first into the emptiest row that fits) so the batch width, the longest
    row, is as short as possible."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if lengths and lengths[order[0]] > capacity:
        raise ValueError(
            f"sample {order[0]} has {lengths[order[0]]} tokens, more than the row capacity {capacity}"
        )
    ffd: list[list[int]] = []
    room: list[int] = []
    for i in order:
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:
            ffd.append([])
            room.append(capacity)
            r = len(ffd) - 1
        ffd[r].append(i)
        room[r] -= lengths[i]
    rows: list[list[int]] = [[] for _ in ffd]
    fill = [0] * len(ffd)
    for i in order:
        fits = [r for r in range(len(rows)) if fill[r] + lengths[i] <= capacity]
        if not fits:
            return ffd
        r = min(fits, key=lambda r: (fill[r], r))
        rows[r].append(i)
        fill[r] += lengths[i]
    return rows if max(fill, default=0) <= capacity - min(room, default=0) else ffd


def block_causal_mask(segments: list[list[int]], length: int) -> torch.Tensor:
    """Bool ``[B, 1, T, T]``: causal inside each segment (a row's sample lengths in order), nothing across;
    positions after a row's segments attend only to themselves."""
    mask = torch.zeros(len(segments), 1, length, length, dtype=torch.bool)
    tril = torch.tril(torch.ones(length, length, dtype=torch.bool))
    for r, lens in enumerate(segments):
        start = 0
        for n in lens:
            mask[r, 0, start : start + n, start : start + n] = tril[:n, :n]
            start += n
        idx = torch.arange(start, length)
        mask[r, 0, idx, idx] = True
    return mask


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool 4-D mask -> additive float mask (0 = attend, dtype min = blocked) for eager attention."""
    out = torch.zeros(mask.shape, dtype=dtype)
    return out.masked_fill(~mask, torch.finfo(dtype).min)


def padding_batch(pad_id: int, packed: bool = False) -> Batch:
    """A batch that trains nothing (see the module docstring)."""
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool) if packed else torch.ones(1, 1, dtype=torch.long)
    return Batch(
        input_ids=torch.full((1, 1), pad_id, dtype=torch.long),
        labels=torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
        attention_mask=mask,
        position_ids=torch.zeros(1, 1, dtype=torch.long),
        sample_ids=[[]],
        real_tokens=0,
    )


def _media(rows: list[list[SampleTensors]]) -> dict[str, MediaInputs]:
    per: dict[str, list[tuple[str, torch.Tensor, SampleTensors]]] = {}
    for row in rows:
        for s in row:
            for m, items in s.media.items():
                per.setdefault(m, []).extend((s.media_kind[m], t, s) for t in items)
    out = {}
    for m, items in per.items():
        kinds = {k for k, _, _ in items}
        shapes = {tuple(t.shape) for _, t, _ in items}
        if len(kinds) > 1 or len(shapes) > 1:
            who = ", ".join(f"{s.id}: {k} {tuple(t.shape)}" for k, t, s in items)
            raise ValueError(f"{m} inputs in one batch must share kind and shape; got {who}")
        stacked = torch.stack([t for _, t, _ in items])
        keys = [s.id for _, _, s in items]
        out[m] = (
            MediaInputs(features=stacked, keys=keys)
            if kinds == {"features"}
            else MediaInputs(pixels=stacked, keys=keys)
        )
    return out


def _signals(rows: list[list[SampleTensors]]) -> dict[str, SignalTargets]:
    per: dict[str, tuple[list, list, list]] = {}
    for r, row in enumerate(rows):
        offset = 0
        for s in row:
            for m, start, emb in s.signals:
                pos, embs, who = per.setdefault(m, ([], [], []))
                pos.append((r, offset + start))
                embs.append(emb)
                who.append(s.id)
            offset += len(s)
    out = {}
    for m, (pos, embs, who) in per.items():
        if len({tuple(e.shape) for e in embs}) > 1:
            raise ValueError(f"{m} caption embeddings of different shapes in one batch (records {who})")
        out[m] = SignalTargets(torch.tensor(pos, dtype=torch.long), torch.stack(embs).float())
    return out


def collate(
    samples: list[SampleTensors], pad_id: int, packing: bool = False, max_length: int | None = None
) -> Batch:
    """Batch ``samples`` (see the module docstring); ``max_length`` is the packed row capacity."""
    if not samples:
        return padding_batch(pad_id, packing)
    lengths = [len(s) for s in samples]
    if packing:
        rows = [[samples[i] for i in row] for row in pack_rows(lengths, max_length or max(lengths))]
    else:
        rows = [[s] for s in samples]
    width = max(sum(len(s) for s in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            n = len(s)
            ids[r, start : start + n] = s.input_ids
            labels[r, start : start + n] = s.labels
            pos[r, start : start + n] = torch.arange(n)
            start += n
    if packing:
        mask = block_causal_mask([[len(s) for s in row] for row in rows], width)
    else:
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        pos = torch.arange(width).expand(len(rows), width).clone()
    return Batch(
        input_ids=ids,
        labels=labels,
        attention_mask=mask,
        position_ids=pos,
        media=_media(rows),
        signal_targets=_signals(rows),
        sample_ids=[[s.id for s in row] for row in rows],
        real_tokens=sum(lengths),
    )
