"""Shared metric arithmetic and the results table.

``bleu1`` is pycocoevalcap's ``Bleu(n=1).compute_score({1: [reference]}, {1: [hypothesis]})[0][0]`` for one
sentence pair (tylin/coco-caption ``pycocoevalcap/bleu/bleu_scorer.py``, ``compute_score`` with
``option='closest'``), which is what GPT4Tools' ``eval/evaluate_result.py`` calls per text argument:

    tokens       = str.split()                      (whitespace, case kept)
    correct      = sum over hypothesis words w of min(count_hyp(w), count_ref(w))
    precision    = (correct + 1e-15) / (len(hyp) + 1e-9)
    ratio        = (len(hyp) + 1e-15) / (len(ref) + 1e-9)
    BLEU-1       = precision * (exp(1 - 1/ratio) if ratio < 1 else 1)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

SMALL = 1e-9  # pycocoevalcap's constants (bleu_scorer.compute_score)
TINY = 1e-15


def bleu1(reference: str, hypothesis: str) -> float:
    """Sentence BLEU-1 with pycocoevalcap's smoothing constants and brevity penalty (see module doc)."""
    ref, hyp = reference.split(), hypothesis.split()
    ref_counts = Counter(ref)
    correct = sum(min(n, ref_counts[w]) for w, n in Counter(hyp).items())
    score = (correct + TINY) / (len(hyp) + SMALL)
    ratio = (len(hyp) + TINY) / (len(ref) + SMALL)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return score


def mean(values: Sequence[float], empty: float = 0.0) -> float:
    return sum(values) / len(values) if values else empty


def fraction(hits: Iterable[bool | float]) -> float:
    vals = [float(h) for h in hits]
    return mean(vals)


def format_table(rows: list[tuple[str, dict]], columns: Sequence[str], title: str = "") -> str:
    """A plain-text table: one row per (name, metrics); fractions shown as percentages, counts as ints."""
    head = ["", *columns]
    body = []
    for name, metrics in rows:
        cells = [name]
        for c in columns:
            v = metrics.get(c)
            if v is None:
                cells.append("-")
            elif c == "n" or isinstance(v, int) and not isinstance(v, bool):
                cells.append(str(v))
            else:
                cells.append(f"{100 * float(v):.2f}")
        body.append(cells)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))
    out = [title] if title else []
    out += [line, "-" * len(line)]
    for r in body:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    out.append("(metrics in %)")
    return "\n".join(out)
