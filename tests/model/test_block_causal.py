"""The block-causal kernel equals `dense` in values and gradients: causal, grouped-query
heads, lengths that are not a multiple of the block, and document (segment) masking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xgen.model.attention import causal_attention
from xgen.model.block_causal import block_causal_attention


def inputs(t: int, segments: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, t, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, t, 2, 16)), jnp.float32) for _ in range(2))
    seg = None
    if segments:  # packed documents: boundaries at random places, one row ends with a long document
        starts = np.zeros((2, t), np.int32)
        starts[0, rng.choice(np.arange(1, t), 5, replace=False)] = 1
        starts[1, [t // 3]] = 1
        seg = jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)
    return q, k, v, seg


@pytest.mark.parametrize("t,block,segments", [(70, 16, False), (45, 16, True)])
def test_values_and_gradients_equal_dense(t, block, segments):
    q, k, v, seg = inputs(t, segments)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, t, 4, 16)), jnp.float32)

    def loss(kernel):
        def f(q, k, v):
            if kernel == "block":
                out = block_causal_attention(q, k, v, seg, block=block)
            else:
                out = causal_attention(q, k, v, segment_ids=seg, kernel="dense")
            return (out * weights).sum(), out

        return f

    (want, want_out), want_grads = jax.value_and_grad(loss("dense"), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (got, got_out), got_grads = jax.jit(jax.value_and_grad(loss("block"), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(got_out, want_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_bfloat16_inputs_stay_close_to_float32():
    q, k, v, seg = inputs(64, True)
    want = causal_attention(q, k, v, segment_ids=seg, kernel="dense")
    got = block_causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg, block=16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2)
