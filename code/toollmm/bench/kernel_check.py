"""The kernel invariants, measured on ``ToolLMM`` and its real decode step model for one attention kernel:

(a) a packed batch of several rows gives each sample the logits it gets alone;
(b) prefill + appends of 1, 2 and 7 tokens through the KV cache give the logits and last hidden states of
    one full forward over the same tokens.

``check_kernel`` returns per-case ``{"max_abs", "scale", "rel", "pass"}``; it raises nothing for a wrong
result (a GPU check records every case). Kept small so it can be swapped for the library's own invariant
function once one exists.
"""

from __future__ import annotations

import torch

from ..batch import Batch
from ..data.collate import block_causal_mask


def _case(got: torch.Tensor, want: torch.Tensor, tol: float) -> dict:
    diff = float((got.float() - want.float()).abs().max())
    scale = float(want.float().abs().max().clamp_min(1e-6))
    return {"max_abs": diff, "scale": scale, "rel": diff / scale, "pass": bool(diff / scale <= tol)}


def _merge(cases: list[dict], tol: float) -> dict:
    worst = max(cases, key=lambda c: c["rel"])
    return {**worst, "pass": all(c["pass"] for c in cases), "tol": tol}


@torch.no_grad()
def packed_vs_alone(model, lengths: list[list[int]], vocab: int, tol: float, seed: int = 0) -> dict:
    """Rows of packed samples (``lengths[r]``: the row's sample lengths) vs each sample alone."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    width = max(sum(r) for r in lengths) + 3  # some padding after the longest row too
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    pos = torch.zeros_like(ids)
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            pos[r, start : start + n] = torch.arange(n)
            start += n
    mask = block_causal_mask(lengths, width)
    batch = Batch(ids, torch.full_like(ids, -100), mask, position_ids=pos).to(device)
    packed = model.run_llm(batch, hidden_states=False).logits
    cases = []
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            one = ids[r : r + 1, start : start + n]
            alone = Batch(
                one,
                torch.full_like(one, -100),
                torch.ones_like(one),
                position_ids=pos[r : r + 1, start : start + n],
            )
            want = model.run_llm(alone.to(device), hidden_states=False).logits[0]
            cases.append(_case(packed[r, start : start + n], want, tol))
            start += n
    return _merge(cases, tol)


@torch.no_grad()
def appends_vs_full(model, prefix: int, appends: list[int], vocab: int, tol: float, seed: int = 1) -> dict:
    """Prefill ``prefix`` tokens, then append chunks of ``appends`` tokens through the step model's cache;
    compare each chunk's last logits and its hidden states with one full forward."""
    from ..model.step import ToolLMMStepModel

    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(3, vocab, (1, prefix + sum(appends)), generator=g)
    full_batch = Batch(ids, torch.full_like(ids, -100), torch.ones_like(ids)).to(device)
    full = model.run_llm(full_batch, hidden_states=True)
    step = ToolLMMStepModel(model)
    state, _ = step.start([ids[0, :prefix].tolist()])
    out, at = {}, prefix
    for n in appends:
        got = step.step(state, [ids[0, at : at + n].tolist()])
        logits = _case(got.logits[0, : full.logits.shape[-1]], full.logits[0, at + n - 1].cpu(), tol)
        hidden = _case(got.hidden[0], full.hidden_states[-1][0, at : at + n], tol)
        out[f"append_{n}"] = {"logits": logits, "hidden": hidden, "pass": logits["pass"] and hidden["pass"]}
        at += n
    return out


def check_kernel(model, vocab: int, tol: float, sizes: dict) -> dict:
    """Both invariants for the kernel ``model`` was loaded with (``sizes``: ``rows`` for (a), ``prefix``
    and ``appends`` for (b)). Each case is recorded, pass or fail, or with the error it raised."""
    out: dict = {}
    try:
        out["packed_vs_alone"] = packed_vs_alone(model, sizes["rows"], vocab, tol)
    except Exception as e:  # a kernel that refuses a case is a result, not a crash
        out["packed_vs_alone"] = {"pass": False, "error": f"{type(e).__name__}: {e}"[:500]}
    try:
        out.update(appends_vs_full(model, sizes["prefix"], sizes["appends"], vocab, tol))
    except Exception as e:
        for n in sizes["appends"]:
            out[f"append_{n}"] = {"pass": False, "error": f"{type(e).__name__}: {e}"[:500]}
    return out
