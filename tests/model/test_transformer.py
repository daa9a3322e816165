import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xgen.config import ExecutionConfig, ModelConfig
from xgen.model import XGenModel, count_params
from xgen.model.rope import apply_rope, rope_angles

TINY = ModelConfig(name="t", d_model=32, n_layers=2, n_heads=4, d_ff=64, vocab_size=128, max_positions=64)


def make(cfg: ModelConfig = TINY, seed: int = 0, execution: ExecutionConfig = ExecutionConfig()) -> XGenModel:
    return XGenModel(cfg, execution, rngs=nnx.Rngs(seed))


def closed_form_params(c: ModelConfig) -> int:
    head = c.d_model // c.n_heads
    kv = (c.n_kv_heads or c.n_heads) * head
    per_layer = 2 * c.d_model * c.d_model + 2 * c.d_model * kv + 3 * c.d_model * c.d_ff + 2 * c.d_model
    embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    return embeddings + c.n_layers * per_layer + c.d_model


def test_logits_shape_and_dtype():
    tokens = jnp.zeros((3, 10), jnp.int32)
    logits = make()(tokens)
    assert logits.shape == (3, 10, TINY.vocab_size) and logits.dtype == jnp.float32


def test_changing_token_t_never_changes_logits_before_t():
    model = make()
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY.vocab_size)
    base = model(tokens)
    for t in (0, 5, 15):
        changed = tokens.at[:, t].set((tokens[:, t] + 7) % TINY.vocab_size)
        out = model(changed)
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
        assert not np.allclose(out[:, t:], base[:, t:])


def test_xgen_7b_parameter_count_matches_closed_form(make_config):
    cfg = make_config("model=xgen_7b").model
    n = count_params(cfg)
    assert n == closed_form_params(cfg)
    assert n == 6_895_702_016  # LLaMA-7B's 6,738,415,616 plus 2 x 19,200 extra vocabulary rows x 4,096


def test_small_model_is_about_78m_parameters(make_config):
    cfg = make_config("model=small").model
    n = count_params(cfg)
    assert n == closed_form_params(cfg) and 77e6 < n < 79e6


def test_grouped_query_and_tied_variants_count_and_run():
    for cfg in (dataclasses.replace(TINY, n_kv_heads=2), dataclasses.replace(TINY, tie_embeddings=True)):
        assert count_params(cfg) == closed_form_params(cfg)
        assert make(cfg)(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, TINY.vocab_size)


def test_every_parameter_has_logical_axis_names_of_its_rank():
    state = nnx.state(make(), nnx.Param)
    known = {"embed", "vocab", "mlp", "heads", "kv_heads"}
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var[...].ndim, path
        assert set(names) <= known, path


def test_parameters_stay_float32_with_bfloat16_compute():
    model = XGenModel(TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits = model(jnp.zeros((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32
    ref = make()(jnp.zeros((1, 4), jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=2e-2)


def test_rope_is_rotate_half_and_depends_only_on_relative_position():
    head_dim = 8
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, head_dim))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, head_dim))

    def score(pq: int, pk: int) -> float:
        cq, sq = rope_angles(jnp.array([[pq]]), head_dim, 10000.0)
        ck, sk = rope_angles(jnp.array([[pk]]), head_dim, 10000.0)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    # Rotate-half layout: dimension i pairs with i + head_dim/2 (not with i+1 as in GPT-J).
    cos, sin = rope_angles(jnp.array([[1]]), head_dim, 10000.0)
    x = jnp.zeros((1, 1, 1, head_dim)).at[..., 0].set(1.0)
    y = apply_rope(x, cos, sin)
    y = np.asarray(y).reshape(head_dim)
    assert y[0] == pytest.approx(np.cos(1.0), rel=1e-6)
    assert y[head_dim // 2] == pytest.approx(np.sin(1.0), rel=1e-6)
    assert y[1] == 0.0


def test_segment_ids_keep_attention_inside_each_document():
    model = make()
    a = jax.random.randint(jax.random.key(5), (5,), 0, TINY.vocab_size)
    b = jax.random.randint(jax.random.key(6), (7,), 0, TINY.vocab_size)
    packed = jnp.concatenate([a, b])[None]
    positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None]
    segments = jnp.array([1] * 5 + [2] * 7)[None]
    out = model(packed, positions, segments)
    np.testing.assert_allclose(np.asarray(out[0, :5]), np.asarray(model(a[None])[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[0, 5:]), np.asarray(model(b[None])[0]), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_policies_give_the_same_loss_and_gradients(policy):
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, TINY.vocab_size)

    def loss_and_grads(execution):
        graphdef, params = nnx.split(make(TINY, execution=execution))
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)  # noqa: E731
        return jax.value_and_grad(loss)(params)

    (l0, g0), (l1, g1) = loss_and_grads(ExecutionConfig()), loss_and_grads(ExecutionConfig(remat=policy))
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel", ["xla", "chunked", "block_causal"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_kernels_match_dense_with_and_without_segments(kv_heads, kernel):
    cfg = dataclasses.replace(TINY, n_kv_heads=kv_heads)
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, TINY.vocab_size)
    segments = jnp.array([[1] * 6 + [2] * 10, [1] * 16])
    positions = jnp.array([list(range(6)) + list(range(10)), list(range(16))])
    a, b = make(cfg), make(cfg, execution=ExecutionConfig(attention=kernel, attention_chunk=4))
    np.testing.assert_allclose(np.asarray(a(tokens)), np.asarray(b(tokens)), atol=2e-5)
    np.testing.assert_allclose(
        np.asarray(a(tokens, positions, segments)), np.asarray(b(tokens, positions, segments)), atol=2e-5
    )


@pytest.mark.parametrize("length", [13, 17, 31])
def test_the_chunked_kernel_pads_an_uneven_length_and_matches_dense_values_and_gradients(length):
    from xgen.model.attention import _chunked, causal_attention

    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (2, length, 4, 8))
    k, v = (jax.random.normal(key, (2, length, 2, 8)) for key in keys[1:])
    segments = jnp.concatenate([jnp.ones((2, 5), jnp.int32), 2 * jnp.ones((2, length - 5), jnp.int32)], axis=1)
    for seg in (None, segments):
        dense = causal_attention(q, k, v, segment_ids=seg, kernel="dense")
        chunked = _chunked(q, k, v, seg, 4)  # length % 4 != 0: padded, not silently dense
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(dense), atol=2e-5)
        g_dense = jax.grad(lambda q: causal_attention(q, k, v, segment_ids=seg, kernel="dense").sum())(q)
        g_chunked = jax.grad(lambda q: causal_attention(q, k, v, segment_ids=seg, kernel="chunked", chunk=4).sum())(q)
        np.testing.assert_allclose(np.asarray(g_chunked), np.asarray(g_dense), atol=2e-5)
    # The chunked path ran (lax.map over query blocks is a scan), not a silent fall-back to dense.
    assert "scan" in str(jax.make_jaxpr(lambda q: causal_attention(q, k, v, kernel="chunked", chunk=4))(q))
