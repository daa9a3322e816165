"""Ring attention: context parallelism without gathering the whole sequence's keys.

Each device keeps its part of the queries and passes its keys and values around the
context axis (`ppermute`, C steps for C parts): at every step it attends over the part it
holds (`block_causal.attention_part`, tiles that no query sees skipped) and folds the
result into a running output by log-sum-exp, as flash attention folds tiles. The backward
pass goes around the ring again: each part's dq, dk, dv come from the final output and
log-sum-exp alone (FlashAttention-2), dq stays home and dk, dv travel with their keys,
arriving back at their owner after the last step. A device never holds more than its own
and one visiting part: the memory of attention no longer grows with the whole length,
at the cost of C latency-bound exchanges per layer (all_gather's one collective is cheaper
while the gathered keys fit; context_parallel.py).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from xgen.model.block_causal import attention_part, attention_part_grads


def ring_attention(q, k, v, positions, segments, *, axes: tuple[str, ...], parts: int, block: int) -> jax.Array:
    """Inside a shard_map over `axes` (`parts` devices): this device's queries q [B, T, H, D]
    over the keys and values of every device (k, v [B, T, KV, D] here), a key seen when it is
    in the query's segment at a position not after the query's."""
    b, t, h, d = q.shape
    g = k.shape[2]
    tile = math.gcd(min(block, t), t)
    ring = tuple((i, (i + 1) % parts) for i in range(parts))
    # Tied to the queries, as in block_attention: masks from positions alone would be the same
    # in every layer, and scanned layers would compute all of them before the loop and keep them.
    q, positions, segments = jax.lax.optimization_barrier((q, positions, segments))
    out = _ring(q.reshape(b, t, g, h // g, d), k, v, positions, segments, axes, ring, parts, tile)
    return out.reshape(b, t, h, d)


def _pass(axes, ring, *arrays):
    return tuple(jax.lax.ppermute(x, axes, ring) for x in arrays)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _ring(q, k, v, pos, seg, axes, ring, parts, tile):
    return _ring_forward(q, k, v, pos, seg, axes, ring, parts, tile)[0]


def _ring_forward(q, k, v, pos, seg, axes, ring, parts, tile):
    b, t, g, r, d = q.shape

    def step(carry, _):
        out, lse, k_, v_, kpos, kseg = carry
        part_out, part_lse = attention_part(q, k_, v_, (pos, kpos, seg, kseg), tile)
        new = jnp.logaddexp(lse, part_lse)
        old_w, part_w = (jnp.exp(x - new).transpose(0, 3, 1, 2)[..., None] for x in (lse, part_lse))  # [B, T, KV, R, 1]
        out = out * old_w + part_out.astype(jnp.float32) * part_w
        return (out, new, *_pass(axes, ring, k_, v_, kpos, kseg)), None

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((b, g, r, t), -jnp.inf, jnp.float32), k, v, pos, seg)
    (out, lse, *_), _ = jax.lax.scan(step, init, None, length=parts)
    return out.astype(q.dtype), lse


def _ring_fwd(q, k, v, pos, seg, axes, ring, parts, tile):
    out, lse = _ring_forward(q, k, v, pos, seg, axes, ring, parts, tile)
    return out, (q, k, v, pos, seg, out, lse)


def _ring_bwd(axes, ring, parts, tile, res, d_out):
    q, k, v, pos, seg, out, lse = res

    def step(carry, _):
        dq, k_, v_, kpos, kseg, dk, dv = carry
        dq_p, dk_p, dv_p = attention_part_grads(q, k_, v_, (pos, kpos, seg, kseg), tile, out, lse, d_out)
        dq = dq + dq_p.astype(jnp.float32)
        dk, dv = dk + dk_p.astype(jnp.float32), dv + dv_p.astype(jnp.float32)
        return (dq, *_pass(axes, ring, k_, v_, kpos, kseg, dk, dv)), None

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    init = (zeros(q), k, v, pos, seg, zeros(k), zeros(v))
    (dq, *_, dk, dv), _ = jax.lax.scan(step, init, None, length=parts)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
