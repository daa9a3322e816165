"""execution.attention=splash (Pallas TPU splash attention) in Pallas interpret mode on the CPU,
against the dense kernel: outputs and gradients, with document masks, grouped-query heads,
a length that is not a multiple of the block, and under an 8-device mesh (shard_map)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.conftest import compose_config
from xgen.config import ExecutionConfig, ModelConfig
from xgen.model import XGenModel
from xgen.model.attention import causal_attention
from xgen.model.splash import splash_block
from xgen.runtime import Runtime


def qkv(b, t, h, kv, d, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (b, t, h, d)),
        jax.random.normal(keys[1], (b, t, kv, d)),
        jax.random.normal(keys[2], (b, t, kv, d)),
    )


def test_blocks_are_lane_multiples_and_pad_the_length():
    assert splash_block(200, 512) == (256, 256)
    assert splash_block(8192, 512) == (512, 8192)
    assert splash_block(1000, 384) == (384, 1152)
    assert splash_block(64, 1024) == (128, 128)


def test_splash_equals_dense_with_documents_and_grouped_heads():
    q, k, v = qkv(2, 200, 4, 2, 32)  # 200: padded to 256 inside
    segments = jnp.asarray(np.stack([np.repeat([0, 1, 2], [70, 90, 40]), np.repeat([5, 7], [13, 187])]))

    def loss(kernel, q, k, v):
        out = causal_attention(q, k, v, segment_ids=segments, kernel=kernel, chunk=128)
        return jnp.sum(out * jnp.cos(out)), out

    (ref_loss, ref), ref_grads = jax.value_and_grad(lambda *a: loss("dense", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (got_loss, got), got_grads = jax.value_and_grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=2e-5)
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-5)
    for name, g, r in zip("qkv", got_grads, ref_grads):
        scale = float(jnp.abs(r).max())
        np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(r) / scale, rtol=0, atol=1e-4, err_msg=name)


def test_splash_runs_per_shard_under_a_mesh():
    """On 8 devices (data 2 x fsdp 2 x tensor 2) the kernel runs inside shard_map over batch
    and heads; the model's logits equal the dense model's on one device."""
    cfg = ModelConfig(name="t", d_model=64, n_layers=2, n_heads=4, d_ff=96, vocab_size=128, max_positions=256)
    mesh = ("hardware.mesh.data=2", "hardware.mesh.fsdp=2", "hardware.mesh.tensor=2")
    hw = compose_config("hardware=cpu_8", *mesh).hardware
    runtime = Runtime.build(cfg, ExecutionConfig(attention="splash", attention_chunk=128), hw)
    assert runtime.constrain.platform == "cpu"
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (4, 128)))
    params = runtime.init_params(jax.random.key(0))
    splash = nnx.merge(runtime.graphdef, params)
    got = jax.jit(lambda m, x: m(x))(splash, jax.device_put(tokens, runtime.sharding(("batch", "length"))))
    dense = XGenModel(cfg, rngs=nnx.Rngs(0))
    nnx.update(dense, jax.device_get(params))
    want = dense(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
