"""XLA's and PyTorch's own matmul speed on this CPU, float32 and bfloat16, for the shapes of
the `small` step: a square product and the output head's three (forward, input gradient,
weight gradient); best of 5, GFLOP/s.

    python bench/matmul_peak.py

The ceiling each library's training step works under (docs/performance.md, `bench:cpu-step`).
bench/train.py's PyTorch peak is `torch_matmul` of the square shape.
"""

from __future__ import annotations

import time

# (m, k, n) of an [m, k] x [k, n] product: square, then the head of 4 x 512 tokens, d 512,
# vocab 51,200: forward x @ W, input gradient g @ W^T, weight gradient x^T @ g.
SHAPES = {
    "square 2048": (2048, 2048, 2048),
    "head forward": (2048, 512, 51200),
    "head input gradient": (2048, 51200, 512),
    "head weight gradient": (512, 2048, 51200),
}


def _best(run, repeats: int) -> float:
    run()  # compile / warm the allocator
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def jax_matmul(m: int, k: int, n: int, dtype: str = "float32", repeats: int = 5) -> float:
    """FLOP/s of XLA's product, accumulating in float32 as xgen's `Linear` does."""
    import jax
    import jax.numpy as jnp

    a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    return 2.0 * m * k * n / _best(lambda: f(a, b).block_until_ready(), repeats)


def torch_matmul(m: int, k: int, n: int, dtype: str = "float32", repeats: int = 5) -> float:
    """FLOP/s of PyTorch's `torch.mm` of the same shape and dtype."""
    import torch

    a, b = torch.ones(m, k, dtype=getattr(torch, dtype)), torch.ones(k, n, dtype=getattr(torch, dtype))
    return 2.0 * m * k * n / _best(lambda: torch.mm(a, b), repeats)


def main() -> None:
    print("| product | shape | float32 XLA | float32 PyTorch | bfloat16 XLA | bfloat16 PyTorch |")
    print("|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        cells = [f(*shape, dtype) / 1e9 for dtype in ("float32", "bfloat16") for f in (jax_matmul, torch_matmul)]
        print(f"| {name} | {' x '.join(map(str, shape))} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
