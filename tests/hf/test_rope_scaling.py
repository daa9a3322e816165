"""RoPE scaling rules against transformers (issue 18): every rule's logits equal
`LlamaForCausalLM`'s past the trained length, and config.json maps both ways in both dialects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

import xgen.hf
from tests.hf.test_convert import hf_llama, xgen_logits
from xgen.config import ConfigError, ModelConfig, RopeScalingConfig, RopeType
from xgen.hf.convert import hf_config, model_config

# Trained length 32 (yarn and llama3: pre-trained at 16); the tokens below run to 80, so
# every rule is exercised where it differs from plain RoPE (dynamic only changes past 32).
RULES = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale_beta": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16,
                              "attention_factor": 0.8},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}  # fmt: skip


@pytest.mark.parametrize("dialect", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rule", RULES)
def test_each_rule_gives_transformers_logits_past_the_trained_length(tmp_path, rule, dialect):
    theta = 500000.0 if rule == "llama3" else 10000.0
    if dialect == "rope_parameters":  # transformers 5's config.json
        hf = hf_llama(tmp_path, max_position_embeddings=32, rope_parameters={**RULES[rule], "rope_theta": theta})
    else:  # the dialect of earlier releases, as checkpoints on the Hub still carry it
        hf = hf_llama(tmp_path, max_position_embeddings=32, rope_theta=theta, rope_scaling=dict(RULES[rule]))
        config = json.loads((tmp_path / "config.json").read_text())
        legacy = {k: v for k, v in config.pop("rope_parameters").items() if k != "rope_theta"}
        (tmp_path / "config.json").write_text(json.dumps({**config, "rope_theta": theta, "rope_scaling": legacy}))
    cfg, params = xgen.hf.load(tmp_path)
    assert cfg.rope_scaling.type == RULES[rule]["rope_type"] and cfg.rope_theta == theta
    tokens = np.random.default_rng(2).integers(0, 96, (2, 80))
    ours = xgen_logits(cfg, params, tokens)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()
    plain = xgen_logits(
        ModelConfig(**{**vars(cfg), "rope_scaling": RopeScalingConfig()}), params, tokens
    )  # the same weights without the rule: the comparison must see the rule
    assert np.abs(plain - theirs).max() > 1e-2
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("rule", RULES)
def test_export_then_import_keeps_the_rule_and_transformers_reads_it(rule):
    params = {k: v for k, v in RULES[rule].items() if k != "rope_type"}
    original = params.pop("original_max_position_embeddings", None)
    ours = {"original_max_positions": original} if original else {}
    names = {"factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"}  # fmt: skip
    ours.update({k: v for k, v in params.items() if k in names})
    scaling = RopeScalingConfig(type=RopeType(RULES[rule]["rope_type"]), **ours)
    cfg = ModelConfig(name="m", d_model=48, n_layers=2, n_heads=3, d_ff=80, vocab_size=96, max_positions=64,
                      rope_theta=20000.0, rope_scaling=scaling)  # fmt: skip
    config = hf_config(cfg, bos_token_id=0, eos_token_id=1)
    assert model_config(json.loads(json.dumps(config)), "m", "config.json") == cfg
    theirs = LlamaConfig.from_dict(config).rope_parameters
    # xgen writes yarn's defaults out (transformers' `or 32`, `or 1`, truncate True)
    defaults = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True} if "yarn" in rule else {}
    assert theirs == {**defaults, "rope_theta": 20000.0, **RULES[rule]}


def test_plain_rope_exports_as_before():
    cfg = ModelConfig(name="m", d_model=48, n_layers=2, n_heads=3, d_ff=80)
    config = hf_config(cfg, bos_token_id=0, eos_token_id=1)
    assert config["rope_scaling"] is None and config["rope_theta"] == 10000.0
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}


def test_yarn_without_a_factor_takes_transformers_implicit_one():
    config = hf_config(ModelConfig(name="m", d_model=48, n_layers=2, n_heads=3, d_ff=80, max_positions=64), bos_token_id=0, eos_token_id=1)
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": None,
                                 "original_max_position_embeddings": 16}  # fmt: skip
    assert model_config(config, "m", "config.json").rope_scaling.factor == 4.0


def test_a_rule_set_on_a_field_it_ignores_is_refused():
    config = hf_config(ModelConfig(name="m", d_model=48, n_layers=2, n_heads=3, d_ff=80), bos_token_id=0, eos_token_id=1)
    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0, "beta_fast": 8}
    with pytest.raises(ConfigError, match="rope_parameters keys beta_fast are not used by rope_type='dynamic'"):
        model_config(config, "m", "config.json")


def test_a_checkpoint_records_the_rule_and_a_damaged_record_is_refused():
    from xgen.runtime import model_config_from_meta

    fields = {"name": "m", "d_model": 48, "n_layers": 2, "n_heads": 3, "d_ff": 80}
    cfg = model_config_from_meta({**fields, "rope_scaling": {"type": "linear", "factor": 2.0}}, "ckpt")
    assert cfg.rope_scaling == RopeScalingConfig(type=RopeType.linear, factor=2.0)
    assert model_config_from_meta(fields, "ckpt").rope_scaling == RopeScalingConfig()  # written before the rules
    with pytest.raises(ConfigError, match="ckpt: its model.rope_scaling.type='ntk' is not one of"):
        model_config_from_meta({**fields, "rope_scaling": {"type": "ntk"}}, "ckpt")
    with pytest.raises(ConfigError, match=r"ckpt: its model.rope_scaling.factor=2.0 has no effect with type=default"):
        model_config_from_meta({**fields, "rope_scaling": {"type": "default", "factor": 2.0}}, "ckpt")
