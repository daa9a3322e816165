"""XLA's and PyTorch's own matmul speed on this CPU, float32 and bfloat16, for the shapes of the
`small` step (square, and the output head's three products); best of 5, GFLOP/s.

    python bench/matmul_peak.py

The ceiling each library's training step works under (docs/performance.md, `bench:cpu-step`).
"""

import time

import jax
import jax.numpy as jnp
import torch


def tj(dt, m, k, n, rep=5):
    a = jnp.ones((m, k), dt)
    b = jnp.ones((k, n), dt)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = 9
    for _ in range(rep):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def tt(dt, m, k, n, rep=5):
    a = torch.ones(m, k, dtype=dt)
    b = torch.ones(k, n, dtype=dt)
    torch.mm(a, b)
    best = 9
    for _ in range(rep):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


if __name__ == "__main__":
    for shape in [(2048, 2048, 2048), (2048, 512, 51200), (2048, 51200, 512), (512, 2048, 51200)]:
        print(
            shape,
            "f32 jax %.0f torch %.0f | bf16 jax %.0f torch %.0f"
            % (tj(jnp.float32, *shape), tt(torch.float32, *shape), tj(jnp.bfloat16, *shape), tt(torch.bfloat16, *shape)),
        )
