"""Scanned layers (execution.scan_layers) against the unrolled model: init, loss, gradients,
decoding, and the per-layer checkpoint layout both ways."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xgen.config import ExecutionConfig, ModelConfig
from xgen.model import XGenModel
from xgen.model.loss import loss_fn
from xgen.model.scan import stack_layers, unstack_layers
from xgen.model.transformer import KVCache, scans_layers
from xgen.runtime import Runtime

CFG = ModelConfig(name="t", d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=96, max_positions=64)


def both(**execution) -> tuple[XGenModel, XGenModel]:
    unrolled = XGenModel(CFG, ExecutionConfig(scan_layers=False, **execution), rngs=nnx.Rngs(3))
    scanned = XGenModel(CFG, ExecutionConfig(scan_layers=True, **execution), rngs=nnx.Rngs(3))
    return unrolled, scanned


def assert_trees_close(a, b, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_the_same_seed_gives_the_same_model_stacked():
    unrolled, scanned = both()
    stacked = nnx.state(scanned, nnx.Param)
    assert stacked["layers"]["attn"]["q_proj"]["kernel"].shape == (3, 32, 32)
    assert stacked["layers"]["attn"]["k_proj"]["kernel"].get_metadata()["out_sharding"] == ("layers", "embed", "kv_heads")
    per_layer = unstack_layers(stacked, CFG.n_layers)
    assert_trees_close(per_layer, nnx.state(unrolled, nnx.Param), atol=0)
    assert_trees_close(stack_layers(per_layer), stacked, atol=0)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_loss_and_gradients_equal_the_unrolled_model(remat):
    unrolled, scanned = both(remat=remat)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 17)))
    segments = jnp.asarray(np.repeat([[1, 2, 3]], 2, axis=0).repeat([6, 6, 5], axis=1))
    positions = jnp.asarray(np.concatenate([np.arange(6), np.arange(6), np.arange(5)])[None].repeat(2, axis=0))
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "segment_ids": segments, "positions": positions}
    grads = {}
    for name, model in (("unrolled", unrolled), ("scanned", scanned)):
        graphdef, params = nnx.split(model)
        loss, g = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(params, graphdef, batch)
        grads[name] = (loss, g)
    np.testing.assert_allclose(grads["scanned"][0], grads["unrolled"][0], rtol=1e-6)
    assert_trees_close(unstack_layers(grads["scanned"][1], CFG.n_layers), grads["unrolled"][1], atol=2e-6)


def test_decoding_steps_through_the_stacked_layers():
    unrolled, scanned = both()
    tokens = jnp.asarray([[5, 9, 2, 7]])
    kv, hd = CFG.n_kv_heads, CFG.d_model // CFG.n_heads
    allowed_new = jnp.tril(jnp.ones((4, 4), bool))[None]
    caches = [
        KVCache(jnp.zeros((1, kv, hd, 8)), jnp.zeros((1, kv, 8, hd)), jnp.zeros((1, 4, 8), bool), allowed_new)
        for _ in range(CFG.n_layers)
    ]
    positions = jnp.arange(4)[None]
    a, new_a = unrolled.decode(tokens, positions, caches)
    b, new_b = scanned.decode(tokens, positions, caches)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
    assert_trees_close(new_b, new_a, atol=1e-6)
    np.testing.assert_allclose(np.asarray(scanned.logits(b)), np.asarray(scanned(tokens)), atol=1e-5)


def test_checkpoints_keep_the_per_layer_layout_and_restore_into_either(tmp_path):
    scanned_rt = Runtime.local(CFG, ExecutionConfig(scan_layers=True))
    unrolled_rt = Runtime.local(CFG, ExecutionConfig(scan_layers=False))
    assert scanned_rt.scanned and not unrolled_rt.scanned
    params = scanned_rt.init_params(jax.random.key(1))
    scanned_rt.save_params(tmp_path / "a", params, {"config": {}})
    # On disk the layers are numbered, as an unrolled model (and Hugging Face) names them.
    as_unrolled = unrolled_rt.restore_params(tmp_path / "a")
    assert_trees_close(as_unrolled, unstack_layers(params, CFG.n_layers), atol=0)
    back = scanned_rt.restore_params(tmp_path / "a")
    assert_trees_close(back, params, atol=0)
    # And an unrolled run's checkpoint restores stacked.
    unrolled_rt.save_params(tmp_path / "b", as_unrolled, {"config": {}})
    assert_trees_close(scanned_rt.restore_params(tmp_path / "b"), params, atol=0)


def test_place_params_stacks_a_per_layer_dict():
    scanned_rt = Runtime.local(CFG, ExecutionConfig(scan_layers=True))
    unrolled_rt = Runtime.local(CFG, ExecutionConfig(scan_layers=False))
    pure = jax.tree.map(np.asarray, unrolled_rt.init_params(jax.random.key(2)).to_pure_dict())
    placed = scanned_rt.place_params(pure)
    np.testing.assert_array_equal(np.asarray(placed["layers"]["mlp"]["up_proj"]["kernel"][...][2]), pure["layers"][2]["mlp"]["up_proj"]["kernel"])


def test_null_scans_from_sixteen_layers(make_config):
    for model, scans in (("tiny", False), ("small", False), ("1b", True), ("xgen_7b", True)):
        cfg = make_config(f"model={model}")
        assert scans_layers(cfg.model, cfg.execution) is scans, model
        assert scans_layers(cfg.model, dataclasses.replace(cfg.execution, scan_layers=not scans)) is (not scans)
