"""Context parallelism: one sequence split over several devices, attention over gathered keys (or a ring).

When the rules table maps the logical `length` axis to mesh axes of more than one device
(`hardware.mesh.context`), every activation [batch, length, ...] holds a part of each
sequence per device, and everything but attention is per token. Attention runs per device
(a shard_map through the model's sharding hook): the device's queries against the keys
and values of the whole sequence, all-gathered over the context axes (MaxText's
`context_parallel_strategy=all_gather`). The gather moves 2 x length x kv_heads x head_dim
values per layer, small next to the attention it feeds at long lengths, and its
backward is the matching reduce-scatter, which JAX derives.

Causal load balance: with contiguous parts, the device holding the first part has almost
nothing to attend to and the last one everything. `zigzag_order` gives device r the
chunks r and 2C-1-r of the 2C equal chunks instead, so every device attends over the same
number of (query, key) pairs; the model permutes its input tokens into that order once and
the final hidden states back, so nothing outside the model (data, loss) sees the order.
Attention decides what a query sees from positions and segments, never from array
order, so the permuted layout needs no other change: a key is seen when it is in the
query's document at a position not after the query's (within a document, positions grow
with the index, so this is the causal mask).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from xgen.model.attention import masked_attention
from xgen.model.block_causal import block_attention
from xgen.model.layers import Constrain, kernel_platform, run_local
from xgen.model.ring import ring_attention
from xgen.model.splash import splash_attention_ordered

Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")
TOKEN_AXES = ("batch", "length")


def context_shards(constrain: Constrain) -> tuple[tuple[str, ...], int]:
    """The mesh axes the hook splits sequences over (`length`'s, those of more than one
    device) and how many parts a sequence has: ((), 1) without context parallelism."""
    axes_of = getattr(constrain, "mesh_axes", None)
    if axes_of is None:
        return (), 1
    axes = tuple(a for a, size in axes_of("length") if size > 1)
    return axes, math.prod(size for _, size in axes_of("length"))


def balanced_order(length: int, shards: int) -> np.ndarray | None:
    """The order the model holds a sequence of `length` in when it is split into `shards`
    parts: zigzag where it splits into 2 x shards chunks (training lengths always do), None
    (in order, placed by XLA) otherwise or without context parallelism."""
    return zigzag_order(length, shards) if shards > 1 and length % (2 * shards) == 0 else None


def zigzag_order(length: int, shards: int) -> np.ndarray:
    """A permutation of 0..length-1 whose r-th of `shards` equal parts holds chunks r and
    2*shards-1-r of the 2*shards equal chunks: the causal work balanced over the parts."""
    if length % (2 * shards):
        raise ValueError(f"a length of {length} tokens does not split into 2 x {shards} equal chunks")
    chunks = np.arange(length).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * shards - 1 - r]]) for r in range(shards)])


def gathered_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    *,
    constrain: Constrain,
    axes: tuple[str, ...],
    parts: int,
    kernel: str,
    block: int,
    strategy: str = "all_gather",
) -> jax.Array:
    """Attention of q [B, T, H, D] over k, v [B, T, KV, D] with T split into `parts` over
    `axes` (held in `balanced_order`): each device's queries against every key, gathered. `dense` masks a
    [local, T] score matrix; `splash` runs the TPU kernel of the whole sequence on this
    device's rows of its mask tables, over the keys put back in order; every other kernel
    visits [block x block] tiles, skipping those no query sees. `strategy=ring` passes the
    keys around instead of gathering them (ring.py; tiles, whatever the kernel)."""
    b, t = positions.shape
    segments = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    order = balanced_order(t, parts)
    order = np.arange(t) if order is None else order

    def local(q_, k_, v_, pos_, seg_):
        if strategy == "ring":
            return ring_attention(q_, k_, v_, pos_, seg_, axes=axes, parts=parts, block=block)
        gather = lambda x: jax.lax.all_gather(x, axes, axis=1, tiled=True)  # noqa: E731
        k_all, v_all, pos_all, seg_all = gather(k_), gather(v_), gather(pos_), gather(seg_)
        if kernel == "splash":
            in_order = np.argsort(order)
            return splash_attention_ordered(
                q_, k_all[:, in_order], v_all[:, in_order], seg_, seg_all[:, in_order], order=order,
                part=jax.lax.axis_index(axes), parts=parts, block=block, interpret=kernel_platform(constrain) != "tpu",
            )  # fmt: skip
        if kernel == "dense":
            allowed = (pos_[:, :, None] >= pos_all[:, None, :]) & (seg_[:, :, None] == seg_all[:, None, :])
            return masked_attention(q_, k_all, v_all, allowed)
        return block_attention(q_, k_all, v_all, pos_, pos_all, seg_, seg_all, block=block)

    names = (Q_AXES, KV_AXES, KV_AXES, TOKEN_AXES, TOKEN_AXES)
    return run_local(constrain, local, names, Q_AXES)(q, k, v, positions.astype(jnp.int32), segments)
