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

Under context parallelism (`splash_attention_ordered`) a device holds part of the queries,
in the balanced order of context_parallel.py, and every key: the kernel is made for the
whole sequence with its rows in that order (`q_sequence`, MaxText's load-balanced causal
mask) and split into as many parts along the queries (`q_seq_shards`); each device reads
its own part of the mask tables.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec

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


# ---- context parallelism: local queries in a balanced order, all keys -------------------


class _OrderedCausalMask(sa.CausalMask):
    """Causal over keys in order, for query rows in `order` (row i is position order[i]):
    splash computes `q_sequence[row] >= key` in the kernel, so only the rows' positions
    change (MaxText's load-balanced causal mask)."""

    def __init__(self, order: np.ndarray):
        super().__init__((len(order), len(order)))
        self.q_sequence = np.asarray(order, np.int32)


class _QuerySplit:
    """What `SplashAttentionKernel.manual_sharding_spec` reads of a sharding: the kernel's
    mask tables split along the query blocks into `parts` (axis name "q")."""

    spec = PartitionSpec(None, "q")

    def __init__(self, parts: int):
        self.parts = parts

    def shard_shape(self, shape):
        return (shape[0], shape[1] // self.parts, *shape[2:])


@lru_cache(maxsize=32)
def _ordered_kernel(order: tuple[int, ...], parts: int, heads_per_kv: int, block: int, interpret: bool):
    """The kernel over the whole sequence with rows in `order`, its mask tables split into
    `parts` along the queries, and each table's split axis (None: whole on every part)."""
    with jax.ensure_compile_time_eval():
        mask = sa.MultiHeadMask([_OrderedCausalMask(np.asarray(order)) for _ in range(heads_per_kv)])
        sizes = sa.BlockSizes(
            block_q=block, block_kv=block, block_kv_compute=block,
            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
            block_q_dq=block, block_kv_dq=block,
        )  # fmt: skip
        kernel = sa.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=parts, interpret=interpret)
    is_spec = lambda x: isinstance(x, PartitionSpec) or x is None  # noqa: E731
    axes = jax.tree.map(
        lambda spec: None if spec is None or "q" not in tuple(spec) else tuple(spec).index("q"),
        kernel.manual_sharding_spec(_QuerySplit(parts)),
        is_leaf=is_spec,
    )
    return kernel, axes


def splash_attention_ordered(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segments: jax.Array,
    k_segments: jax.Array,
    *,
    order: np.ndarray,
    part: jax.Array,
    parts: int,
    block: int,
    interpret: bool,
) -> jax.Array:
    """Part `part` of `parts` of the queries (q [B, T/parts, H, D], rows order[part*T/parts:...])
    against every key in order (k, v [B, T, KV, D]), causal within each segment: the splash
    kernel of the whole sequence, reading only this part's rows of its mask tables."""
    b, t_local, h, d = q.shape
    kv = k.shape[2]
    r = h // kv
    block = splash_block(t_local, block)[0]
    if t_local % block:
        raise ValueError(f"splash attention: {t_local} queries per device are not a multiple of its {block}-token block")
    kernel, axes = _ordered_kernel(tuple(int(i) for i in order), parts, r, block, interpret)
    size = lambda x, axis: x.shape[axis] // parts  # noqa: E731
    local = jax.tree.map(
        lambda x, axis: x if axis is None else jax.lax.dynamic_slice_in_dim(x, part * size(x, axis), size(x, axis), axis),
        kernel, axes, is_leaf=lambda x: x is None,
    )  # fmt: skip
    scale = jnp.asarray(d**-0.5, q.dtype)
    qg = (q * scale).reshape(b, t_local, kv, r, d).transpose(0, 2, 3, 1, 4)  # [B, KV, R, T/parts, D]
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]

    def per_row(q_, k_, v_, q_seg, k_seg):
        segments = sa.SegmentIds(q=q_seg, kv=k_seg)
        return jax.vmap(lambda a, b_, c: local(a, b_, c, segment_ids=segments))(q_, k_, v_)

    out = jax.vmap(per_row)(qg, kg, vg, q_segments.astype(jnp.int32), k_segments.astype(jnp.int32))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t_local, h, d).astype(q.dtype)
