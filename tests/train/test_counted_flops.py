"""FLOPs counted in a program's jaxpr: loops times their trip counts (XLA's cost analysis
counts a loop body once), and the model's step the same scanned or unrolled."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xgen.config import ExecutionConfig, ModelConfig
from xgen.model import XGenModel
from xgen.model.loss import loss_fn
from xgen.train.counted_flops import jaxpr_flops, step_flops
from xgen.train.throughput import attention_square_flops, flops_per_token

CFG = ModelConfig(name="t", d_model=64, n_layers=4, n_heads=4, d_ff=128, vocab_size=256, max_positions=512)


def test_matmuls_loops_and_branches_are_counted():
    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
    assert jaxpr_flops(jax.make_jaxpr(jnp.dot)(a, b)) == 2 * 3 * 5 * 4
    scanned = lambda a, b: jax.lax.scan(lambda c, _: (c, jnp.dot(a, b)), 0.0, None, length=7)[1]  # noqa: E731
    assert jaxpr_flops(jax.make_jaxpr(scanned)(a, b)) == 7 * 120
    branchy = lambda p, a, b: jax.lax.cond(p, lambda: jnp.dot(a, b).sum(), lambda: a.sum())  # noqa: E731
    assert jaxpr_flops(jax.make_jaxpr(branchy)(True, a, b)) == 120  # the costliest branch
    looped = lambda a, b: jax.lax.while_loop(lambda c: c.sum() < 10, lambda c: c + jnp.dot(a, b), jnp.zeros((3, 5)))  # noqa: E731
    with pytest.raises(ValueError, match="while loop"):
        jaxpr_flops(jax.make_jaxpr(looped)(a, b))


def grad_flops(execution: ExecutionConfig, t: int = 256) -> float:
    graphdef, params = nnx.split(XGenModel(CFG, execution, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((2, t), jnp.int32)
    return step_flops(jax.jit(jax.grad(loss_fn), static_argnums=1), params, graphdef, {"inputs": tokens, "targets": tokens})


@pytest.mark.parametrize("remat", ["none", "full"])
def test_a_scanned_model_counts_as_its_unrolled_self(remat):
    unrolled = grad_flops(ExecutionConfig(scan_layers=False, remat=remat))
    assert grad_flops(ExecutionConfig(scan_layers=True, remat=remat)) == unrolled
    # Dense attention computes the whole square: the MFU formula's causal count plus the masked half.
    model = flops_per_token(CFG, 256) * 512
    full, masked = attention_square_flops(CFG, 256, 512, remat=remat != "none")
    if remat == "none":
        np.testing.assert_allclose(unrolled, model + masked, rtol=0.01)
    else:  # remat recomputes the blocks' forward pass: more than the formula, never less
        assert unrolled > model + masked


def test_block_causal_skips_the_blocks_above_the_diagonal():
    dense = grad_flops(ExecutionConfig())
    block_causal = grad_flops(ExecutionConfig(attention="block_causal", attention_chunk=64))
    full, _ = attention_square_flops(CFG, 256, 512, remat=False)
    # Dense computes the whole square once forward and twice backward (`full`). Block-causal
    # computes 10 of the 4 x 4 block pairs: forward (1/3 of full), the scores again in its
    # backward (1/6), and the four backward products (2/3); a backward left uncounted fails this.
    attention = block_causal - (dense - full)
    assert attention == pytest.approx(10 / 16 * (1 / 3 + 1 / 6 + 2 / 3) * full, rel=0.01)
