"""Parity with transformers' LlamaForCausalLM, exact round trips, and refusals of non-LLaMA input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

import xgen.hf
from xgen.config import ConfigError, ModelConfig
from xgen.hf.convert import get_path, iter_paths
from xgen.model import XGenModel


def hf_llama(tmp: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A random small LLaMA saved under `tmp`; initializer_range 0.1 makes attention far from
    uniform, so a rotary or head-layout mistake shows in the logits."""
    kw = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
              max_position_embeddings=64, initializer_range=0.1)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**kw, **overrides})).eval()
    model.to(dtype).save_pretrained(tmp)
    return model


def xgen_logits(cfg: ModelConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    """float32 logits of an XGenModel holding `params` (built from shapes, then filled, and
    jit-compiled: faster on CPU than random init plus op-by-op execution)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: XGenModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    forward = nnx.jit(lambda model, x: model(x))
    return np.asarray(forward(nnx.merge(graphdef, state), jnp.asarray(tokens)))


SHAPES = {
    "head_dim_16": dict(hidden_size=48, num_attention_heads=3),
    "gqa_2_of_4_theta_500k": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0),
    "mqa_tied_eps_1e-5": dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "three_layers_head_dim_8": dict(hidden_size=40, num_attention_heads=5, num_hidden_layers=3, intermediate_size=112),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_imported_llama_gives_transformers_logits(tmp_path, shape):
    hf = hf_llama(tmp_path, **SHAPES[shape])
    cfg, params = xgen.hf.load(tmp_path)
    c = hf.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.vocab_size) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size
    )
    assert (cfg.n_kv_heads or cfg.n_heads) == c.num_key_value_heads
    assert cfg.tie_embeddings == c.tie_word_embeddings and cfg.name == tmp_path.name
    assert cfg.rope_theta == SHAPES[shape].get("rope_theta", 10000.0)
    tokens = np.random.default_rng(1).integers(0, c.vocab_size, (2, 23))
    ours = xgen_logits(cfg, params, tokens)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(theirs).max() > 1.0  # not a degenerate comparison
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_widen_exactly(tmp_path, dtype):
    hf = hf_llama(tmp_path, dtype=dtype, num_key_value_heads=1)
    _, params = xgen.hf.load(tmp_path)
    want = hf.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T
    got = params["layers"][1]["attn"]["k_proj"]["kernel"]
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert np.array_equal(params["embed_tokens"], hf.model.embed_tokens.weight.detach().float().numpy())


@pytest.mark.parametrize("tied", [False, True])
def test_xgen_to_hf_to_xgen_is_bitwise(tmp_path, tied):
    cfg = ModelConfig(name="rt", d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=512,
                      max_positions=128, rope_theta=20000.0, tie_embeddings=tied)  # fmt: skip
    shapes = nnx.state(nnx.eval_shape(lambda: XGenModel(cfg, rngs=nnx.Rngs(0))), nnx.Param).to_pure_dict()
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), shapes)
    out = tmp_path / "rt"
    xgen.hf.save(out, cfg, params, max_shard_bytes=40_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == 4 * sum(np.size(get_path(params, p)) for p in iter_paths(params))
    assert not (out / "tokenizer.json").exists()  # a 512-token vocabulary cannot hold XGen's
    back_cfg, back = xgen.hf.load(out)
    assert back_cfg == cfg
    assert sorted(iter_paths(back)) == sorted(iter_paths(params))
    for path in iter_paths(params):
        want, got = np.asarray(get_path(params, path)), get_path(back, path)
        assert got.dtype == want.dtype and np.array_equal(got, want), path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("llama")
    hf_llama(d, num_key_value_heads=1)
    return d


def broken_copy(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of `src` with config.json keys changed and/or its tensors edited."""
    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**data, **config}))
    if tensors is not None:
        with safetensors.safe_open(dst / "model.safetensors", framework="numpy") as f:
            all_tensors = {k: f.get_tensor(k) for k in f.keys()}
        safetensors.numpy.save_file(tensors(all_tensors), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def _add(name, value):
    return lambda t: {**t, name: value}


def _config(**keys):
    return dict(config=keys)


Q_BIAS = "model.layers.0.self_attn.q_proj.bias"
BAD = {
    "rope_longrope": (_config(rope_parameters={"rope_type": "longrope", "factor": 2.0}), "rope_type='longrope'; xgen computes"),
    "rope_dialects_disagree": (_config(rope_scaling={"type": "linear", "factor": 2.0}), "disagree; which one applies is ambiguous"),
    "rope_partial": (_config(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    "rope_unused_key": (
        _config(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "low_freq_factor": 1.0}),
        "rope_parameters keys low_freq_factor are not used by rope_type='linear'",
    ),
    "rope_llama3_bands": (
        _config(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
                                 "high_freq_factor": 1.0}),
        "low_freq_factor=4.0 and high_freq_factor=1.0 must satisfy 0 < low < high",
    ),
    "attention_bias": (_config(attention_bias=True), "attention_bias=true"),
    "gelu": (_config(hidden_act="gelu"), "hidden_act='gelu'"),
    "mistral": (_config(model_type="mistral"), "model_type='mistral'"),
    "head_dim": (_config(head_dim=32), "head_dim=32"),
    "missing": (
        dict(tensors=_drop("model.layers.1.mlp.up_proj.weight")),
        "tensor model.layers.1.mlp.up_proj.weight is missing from model.safetensors",
    ),
    "unexpected": (dict(tensors=_add(Q_BIAS, np.zeros(48, np.float32))), f"unexpected tensor {Q_BIAS} in model.safetensors"),
    "shape": (
        _config(intermediate_size=64),
        "tensor model.layers.0.mlp.gate_proj.weight in model.safetensors has shape [80, 48], config.json implies [64, 48]",
    ),
    "int8": (dict(tensors=_add("model.norm.weight", np.ones(48, np.int8))), "dtype I8"),
}


@pytest.mark.parametrize("case", BAD)
def test_non_llama_input_is_refused_in_one_line(llama_dir, tmp_path, case):
    edits, message = BAD[case]
    bad = broken_copy(llama_dir, tmp_path / case, **edits)
    with pytest.raises(ConfigError) as info:
        xgen.hf.load(bad)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_directories_without_a_model_are_refused(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="no config.json there"):
        xgen.hf.load(tmp_path)
    misnamed = broken_copy(llama_dir, tmp_path / "bin")
    (misnamed / "model.safetensors").rename(misnamed / "pytorch_model.bin")  # .bin import: test_import_bin.py
    with pytest.raises(ConfigError, match=r"pytorch_model.bin is not a PyTorch weights file"):
        xgen.hf.load(misnamed)
    inv_freq = _add("model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(8, np.float32))
    old_buffers = broken_copy(llama_dir, tmp_path / "inv_freq", tensors=inv_freq)
    assert xgen.hf.load(old_buffers)[0].n_layers == 2  # older transformers' saved buffers are skipped
