"""`splash`: Pallas splash attention, the TPU's fused causal kernel (what MaxText trains with).

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) computes blocks of
queries against blocks of keys in VMEM with an online softmax, skipping every block the
causal mask (and, with packed documents, the segment ids) leaves empty, forward and
backward; nothing of size length x length is ever in HBM. It is a Pallas TPU (Mosaic)
kernel: on a TPU it compiles to one; elsewhere it runs in Pallas interpret mode (slow, for
tests), and on GPUs `cudnn` is the fused choice.

Grouped-query attention runs as `heads / kv_heads` query heads against one key-value head
(splash's MQA form), mapped over the batch and the key-value heads, so keys and values are
never repeated. The kernel sees one device's shard: under a mesh the model runs it inside
the sharding hook's `local` (a shard_map over batch and heads; the length stays whole).
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

LANE = 128  # TPU kernels tile the key axis in multiples of 128


@lru_cache(maxsize=32)
def _kernel(length: int, heads_per_kv: int, block: int, interpret: bool) -> sa.SplashAttentionKernel:
    """One causal kernel per (length, query heads per key-value head, block); the mask's
    block structure is worked out once, here, not per step, as concrete arrays even when the
    first call comes from inside a trace (a cached tracer would leak into the next one)."""
    with jax.ensure_compile_time_eval():
        return _make_kernel(length, heads_per_kv, block, interpret)


def _make_kernel(length: int, heads_per_kv: int, block: int, interpret: bool) -> sa.SplashAttentionKernel:
    mask = sa.MultiHeadMask([sa.CausalMask((length, length)) for _ in range(heads_per_kv)])
    sizes = sa.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_block(length: int, block: int) -> tuple[int, int]:
    """(block, padded length): the block a multiple of 128 and at most the padded length."""
    padded_min = -(-length // LANE) * LANE
    block = max(LANE, min(block, padded_min) // LANE * LANE)
    return block, -(-length // block) * block


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *, block: int, interpret: bool
) -> jax.Array:
    """q [B, T, H, D], k and v [B, T, KV, D] -> [B, T, H, D], causal within each segment.

    A length that is not a multiple of the block is padded at the end with positions of
    their own segment (no real query sees them: they come after it), cut off after."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    if h % kv:
        raise ValueError(f"splash attention: {h} query heads on this device do not group over {kv} key-value heads")
    r = h // kv
    block, padded = splash_block(t, block)
    pad = padded - t
    if pad:
        seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        segment_ids = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).min)
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    kernel = _kernel(padded, r, block, interpret)
    scale = jnp.asarray(d**-0.5, q.dtype)
    qg = (q * scale).reshape(b, padded, kv, r, d).transpose(0, 2, 3, 1, 4)  # [B, KV, R, T, D]
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]
    if segment_ids is None:
        out = jax.vmap(jax.vmap(kernel))(qg, kg, vg)
    else:
        ids = segment_ids.astype(jnp.int32)

        def per_row(q_, k_, v_, seg):
            segments = sa.SegmentIds(q=seg, kv=seg)
            return jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=segments))(q_, k_, v_)

        out = jax.vmap(per_row)(qg, kg, vg, ids)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, padded, h, d)
    return out[:, :t].astype(q.dtype)
