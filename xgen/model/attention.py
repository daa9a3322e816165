"""Causal attention kernels: `dense` (einsum), `xla` and `cudnn` (`jax.nn.dot_product_attention`),
`chunked`, `block_causal`, `splash`.

`dense` materializes [batch, heads, q, k] float32 scores with two einsums and a softmax,
what MaxText calls dot-product attention; the same function serves the chunked kernel and
decoding against a KV cache (a mask over cache slots). On this CPU one layer's forward and
backward at 4 x 512 tokens takes 98 ms against `xla`'s 138 ms, though the whole `small`
training step is no faster (docs/performance.md). `xla` is JAX's default implementation
(this JAX: XLA's own, on every platform). Both keep [B, H, T, T] scores per layer: 2 GiB
at 8K tokens in float32; `cudnn` asks for cuDNN's flash attention instead (GPUs). `chunked`
scans over blocks of queries, each against all keys under the causal (and segment) mask,
and recomputes each block in the backward pass (`jax.checkpoint`), so memory grows with
chunk x length instead of length squared; twice the score FLOPs (masked keys are
computed), which is why it is a choice. `block_causal` (block_causal.py) computes only the
block pairs on and below the diagonal, one tile at a time. `splash` (splash.py) is the
Pallas TPU kernel that does the same in VMEM, forward and backward. All agree up to float
rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xgen.model.block_causal import block_causal_attention
from xgen.model.layers import Constrain, kernel_platform, no_constraint, run_local
from xgen.model.splash import splash_attention

Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    kernel: str = "dense",
    chunk: int = 1024,
    constrain: Constrain = no_constraint,
) -> jax.Array:
    """q [B, T, H, D], k and v [B, T, KV, D] (KV divides H) -> [B, T, H, D]. `constrain`, the
    model's sharding hook, places kernels that run per device (splash)."""
    t = q.shape[1]
    if kernel == "splash":
        interpret = kernel_platform(constrain) != "tpu"
        arrays, names = (q, k, v), (Q_AXES, KV_AXES, KV_AXES)
        if segment_ids is not None:
            arrays, names = (*arrays, segment_ids), (*names, ("batch", "length"))

        def local(q_, k_, v_, seg=None):
            return splash_attention(q_, k_, v_, seg, block=chunk, interpret=interpret)

        return run_local(constrain, local, names, Q_AXES)(*arrays)
    if kernel == "block_causal":
        return block_causal_attention(q, k, v, segment_ids, block=chunk)
    if kernel in ("xla", "cudnn"):
        return fused_attention(q, k, v, segment_ids, implementation="cudnn" if kernel == "cudnn" else None)
    if kernel == "dense" or t <= chunk:
        allowed = jnp.tril(jnp.ones((t, t), bool))[None]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
        return masked_attention(q, k, v, allowed)
    return _chunked(q, k, v, segment_ids, chunk)


def fused_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, implementation: str | None
) -> jax.Array:
    """`jax.nn.dot_product_attention`, causal: `cudnn` is cuDNN's flash attention (GPUs, bf16
    or fp16), which skips the blocks above the diagonal; None lets JAX choose (XLA's).
    Documents are kept apart by a boolean [B, 1, T, T] mask (cuDNN reads it as a bias)."""
    mask = None if segment_ids is None else segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax attention of q [B, Tq, H, D] over k, v [B, Tk, KV, D] where `allowed`
    [B or 1, Tq, Tk] is true; float32 scores, grouped-query heads without copying k and v."""
    b, tq, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, tq, kv, h // kv, d) * jnp.asarray(d**-0.5, q.dtype)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, h, d).astype(q.dtype)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_cache_t: jax.Array,
    v_cache: jax.Array,
    allowed_cached: jax.Array,
    allowed_new: jax.Array,
) -> jax.Array:
    """Attention of new tokens over the cache as it was before them plus over themselves.

    q [B, t, H, D] and the new k, v [B, t, KV, D]; the cache holds keys transposed
    [B, KV, D, slots] and values [B, KV, slots, D], so both products are plain matmuls per
    head; `allowed_cached` [B, t, slots] and `allowed_new` [B, t, t] mask them. Reading the
    cache before this step's write (not after) lets XLA update it in place: reading the
    written cache makes it copy every layer's keys and values at every step."""
    b, tq, h, d = q.shape
    kv = k.shape[2]
    r = h // kv
    heads_first = lambda x: x.reshape(b, tq, kv, r, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, r * tq, d)  # noqa: E731
    q = heads_first(q * jnp.asarray(d**-0.5, q.dtype))
    old = jnp.einsum("bgqd,bgdk->bgqk", q, k_cache_t, preferred_element_type=jnp.float32)
    new = jnp.einsum("bgqd,bkgd->bgqk", q, k, preferred_element_type=jnp.float32)
    allowed = jnp.concatenate([allowed_cached, allowed_new], axis=-1)[:, None, None]  # [B, 1, 1, t, S + t]
    scores = jnp.concatenate([old, new], axis=-1).reshape(b, kv, r, tq, -1)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min).reshape(b, kv, r * tq, -1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    slots = v_cache.shape[2]
    out = jnp.einsum("bgqk,bgkd->bgqd", probs[..., :slots], v_cache, preferred_element_type=jnp.float32)
    out += jnp.einsum("bgqk,bkgd->bgqd", probs[..., slots:], v, preferred_element_type=jnp.float32)
    return out.reshape(b, kv, r, tq, d).transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d).astype(q.dtype)


def _chunked(q, k, v, segment_ids, chunk):
    """Query blocks of `chunk` rows against all keys. A length that is not a multiple of
    the chunk pads the queries (never the keys) with rows that match no key, cut off after:
    the result is the dense kernel's for any length, with the chunked kernel's memory."""
    b, t, h, d = q.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
    q_seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)  # padded rows: no key has segment -1
    q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, h, d).swapaxes(0, 1)  # [n, B, c, H, D]
    seg_blocks = q_seg.reshape(b, n, chunk).swapaxes(0, 1)
    key_pos = jnp.arange(t)

    @jax.checkpoint
    def block(args):
        q_i, start, seg_i = args
        allowed = key_pos[None, :] <= (start + jnp.arange(chunk))[:, None]  # [c, T]
        allowed = allowed[None] & (seg_i[:, :, None] == seg[:, None, :])
        return masked_attention(q_i, k, v, allowed)

    out = jax.lax.map(block, (q_blocks, jnp.arange(n) * chunk, seg_blocks))
    return out.swapaxes(0, 1).reshape(b, n * chunk, h, d)[:, :t]
