"""Model FLOPs per token and the chip's peak, for tokens/s per chip and MFU.

FLOPs per trained token = 6 N + 6 L T d: 6 N for the matmuls of the forward (2 N) and the
backward (4 N) pass, with N the parameters that take part in matmuls (all but the input
embedding, which is a gather); and per layer the attention scores and their weighted sum,
2 * 2 * T * d forward for a sequence of T tokens, times 3 with the backward, halved for the
causal mask (as MaxText and FlashAttention's benchmarks count it; PaLM's 12 L T d counts
the full square). Rematerialized work is not added: MFU counts the model's FLOPs, not the
kernel's.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from xgen.config import ModelConfig
from xgen.model import count_params


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    n_matmul = count_params(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    return 6.0 * n_matmul + 6.0 * cfg.n_layers * seq_len * cfg.d_model


def attention_square_flops(cfg: ModelConfig, seq_len: int, batch_tokens: int, remat: bool) -> tuple[float, float]:
    """(FLOPs of one step's attention matmuls over the full T x T square, the part of them
    above the diagonal): what a kernel that computes masked blocks (`chunked`, `dense`) does,
    4 T d per token and layer forward, twice that backward, once more when blocks are
    recomputed (remat); causal kernels (`block_causal`, `splash`, `cudnn`) skip the
    (T - 1) / 2T above the diagonal."""
    full = 4.0 * batch_tokens * seq_len * cfg.d_model * cfg.n_layers * (4 if remat else 3)
    return full, full * (seq_len - 1) / (2 * seq_len)


@functools.cache
def measure_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of a few square matmuls on device 0: the CPU's practical peak.
    Measured once per process (the machine does not change; each trainer paid ~0.5 s)."""
    a = jnp.ones((size, size), jnp.dtype(dtype))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best
