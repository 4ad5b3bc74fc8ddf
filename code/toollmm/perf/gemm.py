"""The machine's matrix-multiply rate, measured in the process that uses it (same threads, same load).

``gemm_gflops(seconds)`` times fp32 (CPU) or bf16 (GPU) GEMMs of a few shapes and returns the best rate:
a large square one and the shapes a ~100M Llama step multiplies (1024 tokens x hidden 768 x 768 / 2048).
The best of them is the denominator of MFU, so a step can reach 1.0 only by running every FLOP at the
fastest GEMM rate this process saw.
"""

from __future__ import annotations

import time

import torch

SHAPES = ((2048, 2048, 2048), (1024, 768, 2048), (1024, 2048, 768), (1024, 768, 768))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(m: int, k: int, n: int, seconds: float, device=None, dtype=None) -> float:
    """FLOP/s of ``[m, k] @ [k, n]`` repeated for about ``seconds`` (after two warm-up products)."""
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        reps += 1
        if reps % 4 == 0:
            _sync(device)
            dt = time.perf_counter() - t0
            if dt >= seconds:
                return 2.0 * m * k * n * reps / dt


#: the MFU bursts: a large square product and the ~100M model's MLP product, each long enough to see the
#: same machine load as a training step (on a shared machine a 0.1 s burst can catch a moment when the other
#: core is free and read twice the rate a multi-second step can sustain)
BURST_SHAPES = ((2048, 2048, 2048), (1024, 768, 2048))


def gemm_gflops(seconds: float = 1.0, device=None, dtype=None, shapes=SHAPES) -> dict:
    """``{"gflops": best, "by_shape": {"MxKxN": gflops}}`` over ``shapes``, ``seconds`` split among them."""
    per = seconds / len(shapes)
    rates = {f"{m}x{k}x{n}": gemm_rate(m, k, n, per, device, dtype) / 1e9 for m, k, n in shapes}
    return {"gflops": max(rates.values()), "by_shape": {k: round(v, 1) for k, v in rates.items()}}
