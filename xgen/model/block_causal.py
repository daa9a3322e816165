"""Block-causal attention: blocks of queries against blocks of keys, skipping what no query sees.

`chunked` compares every block of queries with every key and masks half of the products
away; here a scan walks only the block pairs on and below the diagonal, n(n+1)/2 of n^2
(56% at 8 blocks, 53% at 16), and skips (`lax.cond`) pairs where document masking leaves
no query a key. Scores live one [block x block] tile at a time: the forward pass keeps a
running maximum and sum per query (the online softmax of flash attention) and returns the
log-sum-exp, and the backward pass (a custom VJP, FlashAttention-2's) recomputes each
tile's probabilities from it instead of storing them, so memory grows with the block, not
with the length. Forward and backward equal `dense` up to float rounding
(tests/model/test_block_causal.py).

What a query sees is decided by positions and segments, never by array order
(`block_attention`): context parallelism gives each device a part of the queries, in a
balanced order, against all the keys (context_parallel.py); `block_causal_attention` is the
case of one sequence in order.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

NEG = float(jnp.finfo(jnp.float32).min)


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(query block, key block) for every pair on or below the diagonal, row by row."""
    i, j = np.tril_indices(n)
    return i.astype(np.int32), j.astype(np.int32)


def _all_pairs(n_q: int, n_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (query block, key block): for queries and keys in any order (context
    parallelism), where only the positions say which pairs are empty."""
    i, j = np.divmod(np.arange(n_q * n_k), n_k)
    return i.astype(np.int32), j.astype(np.int32)


def _mask(where, i, j, c):
    """Which of query block i's queries may see which of key block j's keys: [B, 1, 1, c, c].
    `where` = (query positions, key positions, query segments, key segments), each [B, T]:
    a key is seen when it is in the query's segment at a position not after the query's."""
    q_pos, k_pos, q_seg, k_seg = (jax.lax.dynamic_slice_in_dim(x, at * c, c, axis=1) for x, at in zip(where, (i, j, i, j)))
    allowed = (q_pos[:, :, None] >= k_pos[:, None, :]) & (q_seg[:, :, None] == k_seg[:, None, :])  # [B, c, c]
    return allowed[:, None, None]


def _scores(q, k, i, j, c, scale):
    """Scores [B, KV, R, c, c] (float32) of query block i against key block j."""
    qi = jax.lax.dynamic_slice_in_dim(q, i * c, c, axis=1)  # [B, c, KV, R, D]
    kj = jax.lax.dynamic_slice_in_dim(k, j * c, c, axis=1)  # [B, c, KV, D]
    return jnp.einsum("bqgrd,bkgd->bgrqk", qi, kj, preferred_element_type=jnp.float32) * scale


def _block_pairs(q, k, c, ordered):
    """The block pairs to visit: those on and below the diagonal when queries and keys are
    the same sequence in order (`ordered`), else all of them."""
    return _pairs(q.shape[1] // c) if ordered else _all_pairs(q.shape[1] // c, k.shape[1] // c)


def _forward(q, k, v, where, c, ordered):
    """out [B, Tq, KV, R, D] and log-sum-exp [B, KV, R, Tq] (Tq and Tk multiples of c)."""
    b, t, g, r, d = q.shape
    scale = d**-0.5
    m0 = jnp.full((b, g, r, t), NEG, jnp.float32)
    acc0 = jnp.zeros((b, g, r, t, d), jnp.float32)

    def pair(carry, ij):
        m, l, acc = carry
        i, j = ij
        allowed = _mask(where, i, j, c)  # cheap: a skipped pair computes no scores

        def update(carry):
            m, l, acc = carry
            s = _scores(q, k, i, j, c, scale)
            mi = jax.lax.dynamic_slice_in_dim(m, i * c, c, axis=3)
            li = jax.lax.dynamic_slice_in_dim(l, i * c, c, axis=3)
            ai = jax.lax.dynamic_slice_in_dim(acc, i * c, c, axis=3)
            m_new = jnp.maximum(mi, jnp.where(allowed, s, NEG).max(-1))
            p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
            fix = jnp.exp(mi - m_new)
            vj = jax.lax.dynamic_slice_in_dim(v, j * c, c, axis=1)
            pv = jnp.einsum("bgrqk,bkgd->bgrqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return (
                jax.lax.dynamic_update_slice_in_dim(m, m_new, i * c, axis=3),
                jax.lax.dynamic_update_slice_in_dim(l, li * fix + p.sum(-1), i * c, axis=3),
                jax.lax.dynamic_update_slice_in_dim(acc, ai * fix[..., None] + pv, i * c, axis=3),
            )

        return jax.lax.cond(allowed.any(), update, lambda carry: carry, (m, l, acc)), None

    (m, l, acc), _ = jax.lax.scan(pair, (m0, jnp.zeros_like(m0), acc0), _block_pairs(q, k, c, ordered))
    # A query that sees no key at all (only padding does) gets zeros, never 0/0.
    out = (acc / jnp.where(l == 0, 1.0, l)[..., None]).transpose(0, 3, 1, 2, 4)  # [B, Tq, KV, R, D]
    return out.astype(q.dtype), m + jnp.log(l)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, where, c, ordered):
    return _forward(q, k, v, where, c, ordered)[0]


def _attention_fwd(q, k, v, where, c, ordered):
    out, lse = _forward(q, k, v, where, c, ordered)
    return out, (q, k, v, where, out, lse)


def _attention_bwd(c, ordered, res, d_out):
    q, k, v, where, out, lse = res
    b, t, g, r, d = q.shape
    scale = d**-0.5
    do = d_out.astype(jnp.float32)
    delta = jnp.einsum("bqgrd,bqgrd->bgrq", do, out.astype(jnp.float32))  # rowsum(dO * O)

    def pair(carry, ij):
        i, j = ij
        allowed = _mask(where, i, j, c)

        def update(carry):
            dq, dk, dv = carry
            s = _scores(q, k, i, j, c, scale)
            p = jnp.where(allowed, jnp.exp(s - jax.lax.dynamic_slice_in_dim(lse, i * c, c, axis=3)[..., None]), 0.0)
            doi = jax.lax.dynamic_slice_in_dim(do, i * c, c, axis=1)  # [B, c, KV, R, D]
            qi = jax.lax.dynamic_slice_in_dim(q, i * c, c, axis=1).astype(jnp.float32)
            kj = jax.lax.dynamic_slice_in_dim(k, j * c, c, axis=1).astype(jnp.float32)
            vj = jax.lax.dynamic_slice_in_dim(v, j * c, c, axis=1).astype(jnp.float32)
            dv_j = jnp.einsum("bgrqk,bqgrd->bkgd", p, doi)
            dp = jnp.einsum("bqgrd,bkgd->bgrqk", doi, vj)
            ds = p * (dp - jax.lax.dynamic_slice_in_dim(delta, i * c, c, axis=3)[..., None]) * scale
            dq_i = jnp.einsum("bgrqk,bkgd->bqgrd", ds, kj)
            dk_j = jnp.einsum("bgrqk,bqgrd->bkgd", ds, qi)
            add = lambda x, y, at: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                x, jax.lax.dynamic_slice_in_dim(x, at, c, axis=1) + y, at, axis=1
            )
            return add(dq, dq_i, i * c), add(dk, dk_j, j * c), add(dv, dv_j, j * c)

        return jax.lax.cond(allowed.any(), update, lambda carry: carry, carry), None

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    (dq, dk, dv), _ = jax.lax.scan(pair, (zeros(q), zeros(k), zeros(v)), _block_pairs(q, k, c, ordered))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)

def attention_part(q, k, v, where, block):
    """Queries q [B, Tq, KV, R, D] over one part of the keys (k, v [B, Tk, KV, D]), `where` =
    (query positions, key positions, query segments, key segments): the output normalized over
    that part and its log-sum-exp [B, KV, R, Tq], what a ring step combines (ring.py)."""
    return _forward(q, k, v, where, block, False)


def attention_part_grads(q, k, v, where, block, out, lse, d_out):
    """dq, dk, dv of one part of the keys, given the output and log-sum-exp over all of them
    (FlashAttention-2's backward needs only those: each part's share is exact)."""
    return _attention_bwd(block, False, (q, k, v, where, out, lse), d_out)[:3]


PAD_SEGMENT = jnp.iinfo(jnp.int32).min  # padding's own segment: it sees only padding


def _padded(x, pad, value=0):
    return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=value)


def block_causal_attention(q, k, v, segment_ids=None, block: int = 512):
    """q [B, T, H, D], k and v [B, T, KV, D] (KV divides H) -> [B, T, H, D], causal within
    each segment (document). A length that is not a multiple of `block` is padded with
    queries and keys of a segment of their own, cut off after."""
    b, t, h, d = q.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return block_attention(q, k, v, positions, positions, segment_ids, segment_ids, block=block, ordered=True)


def block_attention(q, k, v, q_positions, k_positions, q_segments=None, k_segments=None, *, block: int = 512, ordered=False):
    """Queries q [B, Tq, H, D] over keys and values [B, Tk, KV, D], a key seen by a query when
    it is in the query's segment (document) at a position not after the query's. Queries and
    keys may be in any order and of different lengths: context parallelism gives each device
    a part of the queries against all the keys. `ordered` (queries and keys the same
    sequence, positions ascending) visits only the block pairs on and below the diagonal;
    otherwise every pair is looked at and the empty ones skipped."""
    b, tq, h, d = q.shape
    tk, g = k.shape[1], k.shape[2]
    c = min(block, tq, tk)
    pad_q, pad_k = -tq % c, -tk % c
    seg = lambda s, t: jnp.zeros((b, t), jnp.int32) if s is None else s.astype(jnp.int32)  # noqa: E731
    where = (
        _padded(q_positions.astype(jnp.int32), pad_q),
        _padded(k_positions.astype(jnp.int32), pad_k),
        _padded(seg(q_segments, tq), pad_q, PAD_SEGMENT),
        _padded(seg(k_segments, tk), pad_k, PAD_SEGMENT),
    )
    # Tied to the queries: the masks depend only on positions and segments, which are the same in
    # every layer, and JAX's partial evaluation of scanned layers would otherwise compute every
    # block pair's mask once, before the loop, and keep them all ([pairs, ..., c, c]: 32 GiB
    # per chip for the 7B model at 32K).
    q, where = jax.lax.optimization_barrier((q, where))
    out = _attention(_padded(q, pad_q).reshape(b, tq + pad_q, g, h // g, d), _padded(k, pad_k), _padded(v, pad_k), where, c, ordered)
    return out.reshape(b, tq + pad_q, h, d)[:, :tq]
