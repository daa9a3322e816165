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


def _mask(seg, i, j, c):
    """Which of query block i's queries may see which of key block j's keys: [B, 1, 1, c, c]."""
    pos_q, pos_k = i * c + jnp.arange(c), j * c + jnp.arange(c)
    sq = jax.lax.dynamic_slice_in_dim(seg, i * c, c, axis=1)
    sk = jax.lax.dynamic_slice_in_dim(seg, j * c, c, axis=1)
    allowed = (pos_q[:, None] >= pos_k[None, :])[None] & (sq[:, :, None] == sk[:, None, :])  # [B, c, c]
    return allowed[:, None, None]


def _scores(q, k, i, j, c, scale):
    """Scores [B, KV, R, c, c] (float32) of query block i against key block j."""
    qi = jax.lax.dynamic_slice_in_dim(q, i * c, c, axis=1)  # [B, c, KV, R, D]
    kj = jax.lax.dynamic_slice_in_dim(k, j * c, c, axis=1)  # [B, c, KV, D]
    return jnp.einsum("bqgrd,bkgd->bgrqk", qi, kj, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, seg, c):
    """out [B, T, KV, R, D] and log-sum-exp [B, KV, R, T] (T a multiple of c)."""
    b, t, g, r, d = q.shape
    scale = d**-0.5
    m0 = jnp.full((b, g, r, t), NEG, jnp.float32)
    acc0 = jnp.zeros((b, g, r, t, d), jnp.float32)

    def pair(carry, ij):
        m, l, acc = carry
        i, j = ij
        allowed = _mask(seg, i, j, c)  # cheap: a skipped pair computes no scores

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

    (m, l, acc), _ = jax.lax.scan(pair, (m0, jnp.zeros_like(m0), acc0), _pairs(t // c))
    out = (acc / l[..., None]).transpose(0, 3, 1, 2, 4)  # [B, T, KV, R, D]
    return out.astype(q.dtype), m + jnp.log(l)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, seg, c):
    return _forward(q, k, v, seg, c)[0]


def _attention_fwd(q, k, v, seg, c):
    out, lse = _forward(q, k, v, seg, c)
    return out, (q, k, v, seg, out, lse)


def _attention_bwd(c, res, d_out):
    q, k, v, seg, out, lse = res
    b, t, g, r, d = q.shape
    scale = d**-0.5
    do = d_out.astype(jnp.float32)
    delta = jnp.einsum("bqgrd,bqgrd->bgrq", do, out.astype(jnp.float32))  # rowsum(dO * O)

    def pair(carry, ij):
        i, j = ij
        allowed = _mask(seg, i, j, c)

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
    (dq, dk, dv), _ = jax.lax.scan(pair, (zeros(q), zeros(k), zeros(v)), _pairs(t // c))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_causal_attention(q, k, v, segment_ids=None, block: int = 512):
    """q [B, T, H, D], k and v [B, T, KV, D] (KV divides H) -> [B, T, H, D], causal within
    each segment (document). A length that is not a multiple of `block` is padded with
    queries and keys of a segment of their own, cut off after."""
    b, t, h, d = q.shape
    g = k.shape[2]
    c = min(block, t)
    n = -(-t // c)
    pad = n * c - t
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).min)  # padding sees only padding
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
    out = _attention(widen(q).reshape(b, n * c, g, h // g, d), widen(k), widen(v), seg, c)
    return out.reshape(b, n * c, h, d)[:, :t]
