"""The KV-cached sampler against a full recomputation, and its settings, stops and sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import compose_config
from xgen.config import ModelConfig
from xgen.generate import Engine, SamplingSettings
from xgen.model.transformer import XGenModel
from xgen.parallel.mesh import axis_rules, make_mesh, state_shardings
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
    return Engine(CFG, nnx.state(model, nnx.Param), TOK, max_len=256)


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
    out = engine.generate(prompts, SamplingSettings(max_new_tokens=10))
    for p, c in zip(prompts, out):
        assert c.finish_reason == "length" and len(c.tokens) == 10
        assert c.tokens == greedy_by_recomputation(model, p, 10)
        assert c.text == TOK.decode(c.tokens)
    # One compiled decoding step serves every position: the cache never changes shape.
    assert engine._decode._cache_size() == 1


def test_logprobs_of_generation_equal_scoring_the_completed_text(engine):
    prompt = TOK.encode(PROMPTS[0])
    (c,) = engine.generate([prompt], SamplingSettings(max_new_tokens=6), logprobs=3)
    (s,) = engine.score([prompt + c.tokens], top_logprobs=3)
    assert s.token_logprobs[0] is None
    np.testing.assert_allclose(s.token_logprobs[len(prompt) :], c.token_logprobs, atol=1e-4)
    for top, chosen, lp in zip(c.top_logprobs, c.tokens, c.token_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp, abs=1e-5) and chosen in top


def test_sampling_is_seeded_per_row_and_filters_as_asked(engine):
    prompts = [TOK.encode(p) for p in PROMPTS[:2]]
    hot = dict(max_new_tokens=8, temperature=1.5)
    batch = engine.generate(prompts, [SamplingSettings(seed=1, **hot), SamplingSettings(seed=2, **hot)])
    alone = engine.generate(prompts[:1], SamplingSettings(seed=1, **hot))
    assert batch[0].tokens == alone[0].tokens  # a row's sample does not depend on its batch
    other_seed = engine.generate(prompts[:1], SamplingSettings(seed=3, **hot))
    assert other_seed[0].tokens != alone[0].tokens
    greedy = engine.generate(prompts[:1], SamplingSettings(max_new_tokens=8))[0].tokens
    assert engine.generate(prompts[:1], SamplingSettings(top_k=1, **hot))[0].tokens == greedy
    assert engine.generate(prompts[:1], SamplingSettings(top_p=1e-6, **hot))[0].tokens == greedy
    # top_k=5: every sampled token is among the 5 most likely at its step.
    (c,) = engine.generate(prompts[:1], SamplingSettings(top_k=5, seed=7, **hot), logprobs=5)
    assert all(t in top for t, top in zip(c.tokens, c.top_logprobs))


def test_stop_strings_cut_the_text_and_streaming_delivers_exactly_it(engine):
    prompt = TOK.encode(PROMPTS[1])
    full = engine.generate([prompt], SamplingSettings(max_new_tokens=12))[0]
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip(), full.text
    streamed = []
    (c,) = engine.generate(
        [prompt], SamplingSettings(max_new_tokens=12, stop=(stop,)), on_text=lambda r, d: streamed.append(d)
    )
    assert c.finish_reason == "stop"
    assert c.text == full.text[: full.text.find(stop)] and stop not in c.text
    assert "".join(streamed) == c.text
    assert TOK.decode(c.tokens).startswith(c.text) and len(c.tokens) <= len(full.tokens)


def test_end_of_text_ends_a_row_without_appearing(model):
    prompt = TOK.encode(PROMPTS[2])
    first = Engine(CFG, nnx.state(model, nnx.Param), TOK, max_len=256).generate([prompt], SamplingSettings(max_new_tokens=4))[0]
    # A tokenizer whose end-of-text id is the model's third greedy token.
    eos = first.tokens[2]
    engine = Engine(CFG, nnx.state(model, nnx.Param), Tokenizer(xgen_encoding(), eos), max_len=256)
    (c,) = engine.generate([prompt], SamplingSettings(max_new_tokens=4))
    assert c.finish_reason == "stop" and c.eos and c.tokens == first.tokens[:2]


def test_too_long_prompts_are_refused_with_the_numbers(engine):
    with pytest.raises(ValueError, match="exceeds the model's 256"):
        engine.generate([[1] * 250], SamplingSettings(max_new_tokens=10))


def test_generation_on_a_sharded_model_matches_one_device(model, engine):
    hw = compose_config("hardware=cpu_8", "hardware.mesh.data=1", "hardware.mesh.fsdp=4", "hardware.mesh.tensor=2").hardware
    mesh = make_mesh(hw)
    params = nnx.state(model, nnx.Param)
    sharded = jax.device_put(params, state_shardings(params, mesh, axis_rules(hw)))
    assert any(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(sharded))
    prompts = [TOK.encode(p) for p in PROMPTS]
    ours = Engine(CFG, sharded, TOK, max_len=256).generate(prompts, SamplingSettings(max_new_tokens=8))
    ref = engine.generate(prompts, SamplingSettings(max_new_tokens=8))
    assert [c.tokens for c in ours] == [c.tokens for c in ref]
