"""`execution.loss_chunk`: the same loss and gradients as the whole-logits loss, without a
[batch, length, vocab] array anywhere in the gradient's program."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from xgen.config import ExecutionConfig, ModelConfig
from xgen.model import XGenModel
from xgen.model.loss import loss_fn

CFG = ModelConfig(name="t", d_model=32, n_layers=2, n_heads=4, d_ff=64, vocab_size=128, max_positions=64)


def split(loss_chunk: int, tie: bool):
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    model = XGenModel(cfg, ExecutionConfig(loss_chunk=loss_chunk), rngs=nnx.Rngs(0))
    return nnx.split(model, nnx.Param)


@pytest.mark.parametrize("tie,masked", [(False, True), (True, False)])
def test_chunked_loss_and_gradients_equal_the_whole_logits_ones(tie, masked):
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 128, (2, 18)), "targets": rng.integers(0, 128, (2, 18))}
    if masked:  # a prompt-masked batch (SFT): the loss is over the kept targets only
        batch["loss_mask"] = (rng.random((2, 18)) > 0.4).astype(np.int32)
    graph, params = split(0, tie)
    chunked_graph, _ = split(5, tie)  # 18 is not a multiple of 5: the padding weighs nothing
    want, want_grads = jax.value_and_grad(loss_fn)(params, graph, batch)
    got, got_grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(params, chunked_graph, batch)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
    whole = jax.make_jaxpr(jax.grad(loss_fn), static_argnums=1)(params, graph, batch)
    chunked = jax.make_jaxpr(jax.grad(loss_fn), static_argnums=1)(params, chunked_graph, batch)
    logits_shape = "f32[2,18,128]"
    assert logits_shape in str(whole) and logits_shape not in str(chunked)
