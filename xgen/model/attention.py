"""Causal attention kernels: XLA's dense `dot_product_attention`, or a query-chunked version.

The dense kernel materializes [batch, heads, length, length] scores; at 8K tokens that is
2 GiB per layer in float32, and on CPU (no flash kernel) XLA keeps every layer's. The
chunked kernel scans over blocks of queries, each against all keys under the causal (and
segment) mask, and recomputes each block in the backward pass (`jax.checkpoint`), so
memory grows with chunk x length instead of length squared. Same numbers, up to float
rounding; twice the score FLOPs (masked keys are computed), which is why it is a choice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_KERNELS = ("xla", "chunked")


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    kernel: str = "xla",
    chunk: int = 1024,
) -> jax.Array:
    """q [B, T, H, D], k and v [B, T, KV, D] (KV divides H) -> [B, T, H, D]."""
    t = q.shape[1]
    if kernel == "xla" or t <= chunk or t % chunk:
        mask = None if segment_ids is None else segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    return _chunked(q, k, v, segment_ids, chunk)


def _chunked(q, k, v, segment_ids, chunk):
    b, t, h, d = q.shape
    rep = h // k.shape[2]
    if rep > 1:
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    n = t // chunk
    scale = 1.0 / jnp.sqrt(jnp.float32(d)).astype(jnp.float32)
    q_blocks = q.reshape(b, n, chunk, h, d).swapaxes(0, 1)  # [n, B, c, H, D]
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
    seg_blocks = seg.reshape(b, n, chunk).swapaxes(0, 1)
    key_pos = jnp.arange(t)

    @jax.checkpoint
    def block(args):
        q_i, start, seg_i = args
        scores = jnp.einsum("bqhd,bkhd->bhqk", q_i, k, preferred_element_type=jnp.float32) * scale
        allowed = key_pos[None, :] <= (start + jnp.arange(chunk))[:, None]  # [c, T]
        allowed = allowed[None, None] & (seg_i[:, None, :, None] == seg[:, None, None, :])
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)

    out = jax.lax.map(block, (q_blocks, jnp.arange(n) * chunk, seg_blocks))
    return out.swapaxes(0, 1).reshape(b, t, h, d)
