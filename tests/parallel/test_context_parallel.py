"""Context parallelism on 8 virtual CPU devices: sequences split 4 ways (context) under FSDP 2
give one device's logits, loss and gradients, with and without document masking, with the
dense and the tiled (block_causal) kernels, the ring and splash; and the balanced (zigzag) layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import compose_config
from xgen.model.context_parallel import context_shards, zigzag_order
from xgen.model.loss import loss_fn
from xgen.runtime import Runtime

CONTEXT = ("hardware=cpu_8", "hardware.mesh.data=1", "hardware.mesh.fsdp=2", "hardware.mesh.context=4", "hardware.mesh.tensor=1")
ROWS, LENGTH = 2, 64  # 64 tokens: 8 chunks of 8, two per device


def batch(document_masking: bool, length: int = LENGTH) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, size=(ROWS, length + 1)).astype(np.int32)
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if document_masking:  # packed documents, boundaries at uneven places (one crosses devices)
        starts = np.zeros((ROWS, length), np.int32)
        starts[0, [length * f // 64 for f in (5, 19, 40)]] = 1
        starts[1, [length * 33 // 64]] = 1
        seg = np.cumsum(starts, axis=1).astype(np.int32)
        first = np.maximum.accumulate(np.where(starts == 1, np.arange(length), 0), axis=1)
        out |= {"segment_ids": seg, "positions": (np.arange(length) - first).astype(np.int32)}
    return out


def run(runtime: Runtime, params, data):
    """Logits, loss and gradients of one batch, compiled for the runtime's mesh."""
    graphdef = runtime.graphdef
    tokens = runtime.sharding(("batch", "length"))
    data = {k: jax.device_put(v, tokens) for k, v in data.items()}

    @jax.jit
    def f(params, data):
        logits = nnx.merge(graphdef, params)(data["inputs"], data.get("positions"), data.get("segment_ids"))
        loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, data)
        return logits, loss, grads

    return jax.device_get(f(jax.device_put(params, runtime.shardings_of(runtime.param_shapes)), data))


@pytest.mark.parametrize("kernel", ["dense", "block_causal", "ring"])
@pytest.mark.parametrize("document_masking", [False, True])
def test_context_4_by_fsdp_2_equals_one_device(kernel, document_masking):
    """`ring`: block_causal tiles with the keys passed around the context axis, not gathered."""
    strategy = ("execution.attention=block_causal", "execution.context_strategy=ring") if kernel == "ring" else (
        f"execution.attention={kernel}",)  # fmt: skip
    cfg = compose_config(*CONTEXT, *strategy, "execution.attention_chunk=4")
    split = Runtime.of(cfg)
    assert context_shards(split.constrain) == (("context",), 4)
    one = Runtime.local(cfg.model, cfg.execution)
    params = jax.device_get(one.init_params(jax.random.key(0)))
    data = batch(document_masking)
    want_logits, want_loss, want_grads = run(one, params, data)
    got_logits, got_loss, got_grads = run(split, params, data)
    np.testing.assert_allclose(got_logits, want_logits, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-4, err_msg=jax.tree_util.keystr(path))
    # The comparison can see attention: without the document boundaries the loss differs.
    if document_masking:
        unmasked = {k: v for k, v in data.items() if k in ("inputs", "targets")}
        assert abs(float(run(split, params, unmasked)[1]) - float(got_loss)) > 1e-4


@pytest.mark.parametrize("document_masking", [False, True])
def test_splash_under_context_parallelism_equals_one_device(document_masking):
    """Pallas splash (interpret mode on the CPU): each device runs the kernel of the whole
    512-token sequence on its own rows of the mask tables (queries in zigzag order, 128 per
    device), against the gathered keys put back in order."""
    cfg = compose_config(*CONTEXT, "execution.attention=splash", "execution.attention_chunk=128")
    one = Runtime.local(cfg.model)  # dense, in order
    params = jax.device_get(one.init_params(jax.random.key(0)))
    data = batch(document_masking, length=512)
    want_logits, want_loss, want_grads = run(one, params, data)
    got_logits, got_loss, got_grads = run(Runtime.of(cfg), params, data)
    np.testing.assert_allclose(got_logits, want_logits, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-4, err_msg=jax.tree_util.keystr(path))


def test_the_split_keeps_activations_on_their_part_of_the_sequence():
    """The hidden states are split over `context` along the length (not gathered whole)."""
    cfg = compose_config(*CONTEXT)
    split = Runtime.of(cfg)
    params = jax.device_put(
        jax.device_get(Runtime.local(cfg.model).init_params(jax.random.key(0))), split.shardings_of(split.param_shapes)
    )
    tokens = jax.device_put(batch(False)["inputs"], split.sharding(("batch", "length")))
    hidden = jax.jit(lambda p, t: nnx.merge(split.graphdef, p).hidden(t))(params, tokens)
    assert hidden.sharding.spec[:2] == ("fsdp", "context")
    assert hidden.addressable_shards[0].data.shape == (ROWS // 2, LENGTH // 4, cfg.model.d_model)


def test_zigzag_gives_every_part_the_same_causal_work():
    order = zigzag_order(64, 4)
    assert sorted(order) == list(range(64))
    parts = order.reshape(4, 16)
    assert list(parts[0][:8]) == list(range(0, 8)) and list(parts[0][8:]) == list(range(56, 64))
    # (query, key) pairs a causal mask allows, per part: equal (contiguous parts: 36 to 484).
    work = [int(sum(q + 1 for q in part)) for part in parts]
    assert len(set(work)) == 1
    with pytest.raises(ValueError, match="2 x 4 equal chunks"):
        zigzag_order(60, 4)


def test_the_tiled_kernel_agrees_with_dense_for_keys_in_any_order():
    """block_attention (the per-device kernel) over permuted, gathered keys: values and
    gradients equal dense attention over the sequence in order."""
    from xgen.model.attention import causal_attention
    from xgen.model.block_causal import block_attention

    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, 32, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 32, 2, 8)), jnp.float32) for _ in range(2))
    order = zigzag_order(32, 2)
    pos = jnp.broadcast_to(jnp.arange(32), (2, 32))[:, order]
    local = slice(8, 24)  # the second device's queries: chunks 1 and 2 of 4

    def tiled(q, k, v):
        qp, kp, vp = q[:, order], k[:, order], v[:, order]
        return block_attention(qp[:, local], kp, vp, pos[:, local], pos, block=4).sum()

    def dense(q, k, v):
        return causal_attention(q, k, v, kernel="dense")[:, order][:, local].sum()

    got, got_grads = jax.value_and_grad(tiled, argnums=(0, 1, 2))(q, k, v)
    want, want_grads = jax.value_and_grad(dense, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=2e-5)


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
def test_scanned_layers_keep_no_mask_per_block_pair(strategy):
    """The tiled kernel's masks depend only on positions and segments, the same in every layer:
    under scanned, rematerialized layers JAX's partial evaluation once computed all of them
    before the layer loop and kept every pair's ([pairs, ..., block, block]: 32 GiB per chip
    in the 7B 32K plan). The gradient's program holds no such stack."""
    import re

    block = 8
    cfg = compose_config(
        *CONTEXT, "execution.attention=block_causal", f"execution.attention_chunk={block}", "execution.remat=full",
        "execution.scan_layers=true", f"execution.context_strategy={strategy}",
    )  # fmt: skip
    split = Runtime.of(cfg)
    data = {"inputs": jnp.zeros((ROWS, LENGTH), jnp.int32), "targets": jnp.zeros((ROWS, LENGTH), jnp.int32)}
    program = str(jax.make_jaxpr(jax.grad(loss_fn))(split.abstract_params, split.graphdef, data))
    tiles = re.findall(rf"\[(\d+),\d+,\d+,\d+,{block},{block}\]", program)
    assert ("ppermute" if strategy == "ring" else "all_gather") in program  # the strategy's collective is in the program
    assert tiles == [], f"per-pair stacks of shape [{tiles[0]}, ..., {block}, {block}]"
