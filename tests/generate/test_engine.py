"""The KV-cached sampler against a full recomputation, and its settings, stops and sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import compose_config
from xgen.config import ExecutionConfig, ModelConfig
from xgen.generate import Engine, SamplingConfig
from xgen.model.transformer import XGenModel
from xgen.runtime import Runtime
from xgen.tokenizer import Tokenizer
from xgen.tokenizer.xgen import xgen_encoding

# Large init so that a random model's greedy choices are far from ties.
CFG = ModelConfig(name="t", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, init_std=0.5)
TOK = Tokenizer.xgen()


@pytest.fixture(scope="module")
def model():
    return XGenModel(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def engine(model):
    return Engine(Runtime.local(CFG), nnx.state(model, nnx.Param), TOK, max_len=256)


def greedy_by_recomputation(model, prompt, n, width=64):
    """Each token from a full forward pass over everything before it (right-padded to one
    width: causal attention makes the padding invisible to earlier positions)."""
    forward = nnx.jit(lambda m, t: m(t))
    seq = list(prompt)
    for _ in range(n):
        logits = forward(model, jnp.array([seq + [0] * (width - len(seq))]))[0, len(seq) - 1]
        logits = jnp.where(jnp.arange(logits.shape[0]) < TOK.n_tokens, logits, -jnp.inf)
        seq.append(int(jnp.argmax(logits)))
    return seq[len(prompt) :]


PROMPTS = ["def add(a, b):\n    return", "The capital of France is", "x"]


def test_cached_greedy_decoding_equals_full_recomputation_for_a_ragged_batch(model, engine):
    prompts = [TOK.encode(p) for p in PROMPTS]
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=10))
    for p, c in zip(prompts, out):
        assert c.finish_reason == "length" and len(c.tokens) == 10
        assert c.tokens == greedy_by_recomputation(model, p, 10)
        assert c.text == TOK.decode(c.tokens)
    # One compiled decoding step serves every position: the cache never changes shape.
    assert engine._decode._cache_size() == 1


def test_logprobs_of_generation_equal_scoring_the_completed_text(engine):
    prompt = TOK.encode(PROMPTS[0])
    (c,) = engine.generate([prompt], SamplingConfig(max_new_tokens=6), logprobs=3)
    (s,) = engine.score([prompt + c.tokens], top_logprobs=3)
    assert s.token_logprobs[0] is None
    np.testing.assert_allclose(s.token_logprobs[len(prompt) :], c.token_logprobs, atol=1e-4)
    for top, chosen, lp in zip(c.top_logprobs, c.tokens, c.token_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp, abs=1e-5) and chosen in top


def test_sampling_is_seeded_per_row_and_filters_as_asked(engine):
    prompts = [TOK.encode(p) for p in PROMPTS[:2]]
    hot = dict(max_new_tokens=8, temperature=1.5)
    batch = engine.generate(prompts, [SamplingConfig(seed=1, **hot), SamplingConfig(seed=2, **hot)])
    alone = engine.generate(prompts[:1], SamplingConfig(seed=1, **hot))
    assert batch[0].tokens == alone[0].tokens  # a row's sample does not depend on its batch
    other_seed = engine.generate(prompts[:1], SamplingConfig(seed=3, **hot))
    assert other_seed[0].tokens != alone[0].tokens
    greedy = engine.generate(prompts[:1], SamplingConfig(max_new_tokens=8))[0].tokens
    assert engine.generate(prompts[:1], SamplingConfig(top_k=1, **hot))[0].tokens == greedy
    assert engine.generate(prompts[:1], SamplingConfig(top_p=1e-6, **hot))[0].tokens == greedy
    # top_k=5: every sampled token is among the 5 most likely at its step.
    (c,) = engine.generate(prompts[:1], SamplingConfig(top_k=5, seed=7, **hot), logprobs=5)
    assert all(t in top for t, top in zip(c.tokens, c.top_logprobs))


def test_stop_strings_cut_the_text_and_streaming_delivers_exactly_it(engine):
    prompt = TOK.encode(PROMPTS[1])
    full = engine.generate([prompt], SamplingConfig(max_new_tokens=12))[0]
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip(), full.text
    streamed = []
    (c,) = engine.generate(
        [prompt], SamplingConfig(max_new_tokens=12, stop=(stop,)), on_text=lambda r, d: streamed.append(d)
    )
    assert c.finish_reason == "stop"
    assert c.text == full.text[: full.text.find(stop)] and stop not in c.text
    assert "".join(streamed) == c.text
    assert TOK.decode(c.tokens).startswith(c.text) and len(c.tokens) <= len(full.tokens)


def test_end_of_text_ends_a_row_without_appearing(model):
    prompt = TOK.encode(PROMPTS[2])
    first = Engine(Runtime.local(CFG), nnx.state(model, nnx.Param), TOK, max_len=256).generate([prompt], SamplingConfig(max_new_tokens=4))[0]
    # A tokenizer whose end-of-text id is the model's third greedy token.
    eos = first.tokens[2]
    engine = Engine(Runtime.local(CFG), nnx.state(model, nnx.Param), Tokenizer(xgen_encoding(), eos), max_len=256)
    (c,) = engine.generate([prompt], SamplingConfig(max_new_tokens=4))
    assert c.finish_reason == "stop" and c.eos and c.tokens == first.tokens[:2]


def test_too_long_prompts_are_refused_with_the_numbers(engine):
    with pytest.raises(ValueError, match="exceeds the model's 256"):
        engine.generate([[1] * 250], SamplingConfig(max_new_tokens=10))


@pytest.mark.parametrize(
    "mesh", [(1, 4, 1, 2), (2, 2, 1, 2), (1, 2, 4, 1)], ids=["fsdp4xtensor2", "data2xfsdp2xtensor2", "fsdp2xcontext4"]
)
def test_sharded_generation_and_scores_equal_one_devices(model, engine, mesh):
    data, fsdp, context, tensor = mesh
    hw = compose_config(
        "hardware=cpu_8", f"hardware.mesh.data={data}", f"hardware.mesh.fsdp={fsdp}", f"hardware.mesh.tensor={tensor}",
        f"hardware.mesh.context={context}",
    ).hardware
    runtime = Runtime.build(CFG, ExecutionConfig(), hw)
    params = nnx.state(model, nnx.Param)
    sharded = jax.device_put(params, runtime.shardings_of(params))
    if fsdp > 1:
        assert all(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(sharded))
    ours = Engine(runtime, sharded, TOK, max_len=256)
    prompts = [TOK.encode(p) for p in PROMPTS]  # 3 rows: padded to the batch shards, dropped after
    settings = [SamplingConfig(max_new_tokens=8), SamplingConfig(max_new_tokens=8, temperature=0.9, seed=3)] * 2
    got, ref = ours.generate(prompts, settings[:3], logprobs=2), engine.generate(prompts, settings[:3], logprobs=2)
    assert len(got) == 3
    assert [c.tokens for c in got] == [c.tokens for c in ref]
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)
        assert [list(t) for t in a.top_logprobs] == [list(t) for t in b.top_logprobs]
    # The caches were sharded by the rules: rows over data x fsdp, key/value heads over tensor,
    # slots (the length) over context.
    k, _ = ours.runtime.kv_caches(ours.row_multiple, 128)[0]
    shard = (ours.row_multiple // (data * fsdp), CFG.n_kv_heads // tensor, 16, 128 // context)
    assert k.sharding.shard_shape(k.shape) == shard
    sequences = [TOK.encode(p + " and more") for p in PROMPTS]
    for a, b in zip(ours.score(sequences, top_logprobs=1), engine.score(sequences, top_logprobs=1)):
        np.testing.assert_allclose(a.token_logprobs[1:], b.token_logprobs[1:], atol=1e-4)
        assert a.greedy_tokens == b.greedy_tokens
    np.testing.assert_allclose(
        ours.next_token_logprobs(sequences, [11, 12]), engine.next_token_logprobs(sequences, [11, 12]), atol=1e-4
    )
    tails = zip(ours.score_tails(sequences, [2, 1, 2]), engine.score_tails(sequences, [2, 1, 2]))
    for (lp_a, g_a), (lp_b, g_b) in tails:
        np.testing.assert_allclose(lp_a, lp_b, atol=1e-4)
        assert g_a == g_b


def test_kv_caches_are_in_the_compute_dtype_unless_set(model):
    hw = compose_config("hardware=cpu_8", "hardware.mesh.data=1", "hardware.mesh.fsdp=8", "hardware.mesh.tensor=1").hardware
    bf16 = Runtime.build(CFG, ExecutionConfig(compute_dtype="bfloat16"), hw)
    assert bf16.dtype == jnp.bfloat16 and bf16.kv_caches(8, 128)[0][0].dtype == jnp.bfloat16
    f32_cache = Runtime.build(CFG, ExecutionConfig(compute_dtype="bfloat16", kv_cache_dtype="float32"), hw)
    assert f32_cache.kv_caches(8, 128)[1][1].dtype == jnp.float32
    params = jax.device_put(nnx.state(model, nnx.Param), bf16.shardings_of(nnx.state(model, nnx.Param)))
    out = Engine(bf16, params, TOK, max_len=256).generate([TOK.encode("x")], SamplingConfig(max_new_tokens=3))
    assert len(out[0].tokens) == 3
