"""One invariant, every attention kernel: what the model computes does not depend on how tokens reach it.

:func:`kernel_invariants` measures, on a built :class:`~toollmm.model.toollmm_model.ToolLMM` (whatever its
``attn_implementation``), the max abs differences of

* ``packed``: a packed batch of several rows (the real collator, ``collate(packing=True)``: restarted
  ``position_ids``, block-diagonal mask, padding) against each sample run alone (logits of every token);
* ``append_<n>``: prefill + appends of ``n`` tokens through the KV cache of the real decode step model
  (:class:`~toollmm.infer.step.ToolLMMStepModel`, two rows appending ragged chunks in the same step)
  against one full forward (the logits after each append and the last hidden state of every appended token).

The tests assert it on CPU in float32 for every kernel the config accepts; ``scripts/gpu_check.sh`` calls the
same function on CUDA in bf16. Samples hold ordinary tokens and an image placeholder run written from
random encoder features (so ``ToolLMM.embed`` and the input projection are on the path).
"""

from __future__ import annotations

import torch

from toollmm.core.batch import Batch, MediaInputs

from ..data.collate import SampleTensors, collate

#: sample lengths of the packed case (several rows at ``PACKED_CAPACITY``, one sample per row alone too)
PACKED_LENGTHS = (13, 9, 6, 11, 5, 8, 3)
PACKED_CAPACITY = 20
APPENDS = (1, 2, 7)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max ``|a - b|`` on the host in float32; ``inf`` when either side is not finite (NaN must never
    read as agreement: ``max(0.0, nan)`` is 0.0 in Python)."""
    d = (a.detach().float().cpu() - b.detach().float().cpu()).abs()
    return float("inf") if not bool(torch.isfinite(d).all()) else float(d.max())


def ordinary_ids(model) -> torch.Tensor:
    vocab = model.llm.get_input_embeddings().num_embeddings
    special = set(model.bundle.token_ids.new_ids)
    tok = model.bundle.tokenizer
    special |= {
        i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if i is not None
    }
    return torch.tensor([i for i in range(vocab) if i not in special])


def random_sample(
    model, n: int, gen: torch.Generator, pool: torch.Tensor, with_image: bool, name: str
) -> SampleTensors:
    """``n`` tokens: BOS-like first token, ordinary tokens, and (``with_image``) one image placeholder run."""
    ids = pool[torch.randint(len(pool), (n,), generator=gen)]
    media: dict[str, list[torch.Tensor]] = {}
    k = model.input_proj.tokens_per_input
    if with_image and n > k + 2:
        ids[2 : 2 + k] = model.bundle.token_ids.placeholder["image"]
        media["image"] = [torch.randn(1, model.input_proj.in_dim, generator=gen)]
    return SampleTensors(
        name, ids, torch.full_like(ids, -100), media, {m: "features" for m in media}, where=name
    )


def _alone(model, s: SampleTensors, device, dtype) -> torch.Tensor:
    b = collate([s], pad_id=0).to(device, dtype)
    return model.run_llm(b, hidden_states=False).logits[0].float()


def packed_case(model, seed: int = 0) -> tuple[list[SampleTensors], Batch]:
    """The packed case's samples and their batch (the real collator; several rows, padding)."""
    gen = torch.Generator().manual_seed(seed)
    pool = ordinary_ids(model)
    samples = [
        random_sample(model, n, gen, pool, i % 2 == 0, f"packed{i}") for i, n in enumerate(PACKED_LENGTHS)
    ]
    batch = collate(samples, pad_id=0, packing=True, max_length=PACKED_CAPACITY)
    if batch.input_ids.shape[0] < 2:
        raise AssertionError("the packed case must have several rows")
    return samples, batch


def _packed_diff(model, seed, device, dtype) -> float:
    samples, batch = packed_case(model, seed)
    logits = model.run_llm(batch.to(device, dtype), hidden_states=False).logits.float()
    by_id = {s.id: s for s in samples}
    worst = 0.0
    for r, ids in enumerate(batch.sample_ids):
        off = 0
        for sid in ids:
            s = by_id[sid]
            ref = _alone(model, s, device, dtype)
            worst = max(worst, max_abs_diff(logits[r, off : off + len(s)], ref))
            off += len(s)
    return worst


def _append_diffs(model, gen, pool, device, dtype, appends) -> dict[str, float]:
    from .step import ToolLMMStepModel

    step = ToolLMMStepModel(model)
    prefix = [random_sample(model, n, gen, pool, True, f"prefix{i}") for i, n in enumerate((12, 7))]
    plans = [list(appends), list(reversed(appends))]  # ragged: the rows append different counts per step
    tails = [pool[torch.randint(len(pool), (sum(appends),), generator=gen)] for _ in prefix]
    full = []
    for s, tail in zip(prefix, tails):
        whole = SampleTensors(
            s.id, torch.cat([s.input_ids, tail]), torch.cat([s.labels, tail * 0 - 100]), s.media, s.media_kind
        )
        out = model.run_llm(collate([whole], pad_id=0).to(device, dtype))
        full.append((out.logits[0].float().cpu(), out.hidden_states[-1][0].float().cpu()))
    media = [
        {m: MediaInputs(features=torch.stack(v).to(device, dtype)) for m, v in s.media.items()}
        for s in prefix
    ]
    state, out = step.start([s.input_ids.tolist() for s in prefix], media)
    diffs = {"prefill_logits": 0.0}
    for r, s in enumerate(prefix):
        diffs["prefill_logits"] = max(
            diffs["prefill_logits"], max_abs_diff(out.logits[r], full[r][0][len(s) - 1])
        )
    done = [0, 0]
    for k in range(len(appends)):
        chunks = []
        for r in range(len(prefix)):
            n = plans[r][k]
            chunks.append(tails[r][done[r] : done[r] + n].tolist())
        out = step.step(state, chunks)
        for r, s in enumerate(prefix):
            n = len(chunks[r])
            end = len(s) + done[r] + n
            lg = max_abs_diff(out.logits[r], full[r][0][end - 1])
            hs = max_abs_diff(out.hidden[r], full[r][1][end - n : end])
            for key, v in ((f"append_{n}_logits", lg), (f"append_{n}_hidden", hs)):
                diffs[key] = max(diffs.get(key, 0.0), v)
            done[r] += n
    return diffs


@torch.no_grad()
def kernel_invariants(
    model,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    appends: tuple[int, ...] = APPENDS,
    seed: int = 0,
) -> dict[str, float]:
    """Max abs differences per case for ``model`` (a ``ToolLMM``, any ``attn_implementation``):

    ``packed_logits`` (packed rows vs each sample alone), ``prefill_logits``, and per append length ``n``
    ``append_<n>_logits`` / ``append_<n>_hidden`` (cache appends vs one full forward). ``device`` /
    ``dtype`` move and cast the model first (in place); None keeps it where it is. The model is put in
    eval mode (dropout off). 0.0 everywhere means bit-exact; float32 kernels give ~1e-6, bf16 ~1e-2."""
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    model.eval()
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    out = {"packed_logits": _packed_diff(model, seed, device, dtype)}
    gen = torch.Generator().manual_seed(seed + 1)
    pool = ordinary_ids(model)
    out.update(_append_diffs(model, gen, pool, device, dtype, tuple(appends)))
    return out
