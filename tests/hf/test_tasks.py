"""task=export_hf and task=import_hf on real checkpoints, through `python -m xgen.run`."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import compose_config
from xgen import checkpoint
from xgen.config import ConfigError, ExecutionConfig
from xgen.model import XGenModel
from xgen.runtime import Runtime, model_config_from_meta
from xgen.tasks import run_task
from xgen.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
FAST = ("stage.seq_len=32", "stage.batch_tokens=128", "data_mix.sources.python_stdlib.max_documents=20")
# Salesforce/xgen-7b-8k-base's config.json, less the sizes that differ for the tiny model.
PUBLISHED = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 50256, "eos_token_id": 50256,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
    "torch_dtype": "float32", "vocab_size": 51200, "initializer_range": 0.02, "use_cache": True,
}  # fmt: skip


def xgen_run(*overrides: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xgen.run", *overrides], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def checkpoint_params(path: Path) -> tuple:
    """(ModelConfig, params as an nnx.State on the CPU) of a checkpoint's newest step."""
    cfg = model_config_from_meta(checkpoint.read_meta(path)["config"]["model"], str(path))
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = nnx.state(nnx.eval_shape(lambda: XGenModel(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), abstract)
    return cfg, checkpoint.restore_params(path, abstract)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(a 2-step training run, its export through the task in shards of at most 5 MB). The run
    holds its layers stacked (scan_layers), so parity below also covers the checkpoints'
    per-layer layout written from a scanned model."""
    run_dir, out = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("export") / "hf"
    run_task(compose_config("trainer.steps=2", "execution.scan_layers=true", *FAST), run_dir)
    proc = xgen_run(
        "task=export_hf", f"checkpoint={run_dir}", f"out={out}", "hf.max_shard_bytes=5000000",
        f"hydra.run.dir={run_dir}/export_log",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, out


def test_export_loads_as_llama_in_transformers_with_xgen_logits(exported):
    run_dir, out = exported
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in PUBLISHED} == PUBLISHED
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 4)
    assert (config["num_key_value_heads"], config["intermediate_size"], config["pretraining_tp"]) == (4, 176, 1)
    assert config["attention_bias"] is False and config["mlp_bias"] is False and config["rope_theta"] == 10000.0
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 50256, "eos_token_id": 50256}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) == 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(4 * 64 * n for n in (51200, 51200, 2 * (4 * 64 + 3 * 176 + 2), 1))

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and next(hf.parameters()).dtype == torch.float32
    cfg, params = checkpoint_params(run_dir)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: XGenModel(cfg, rngs=nnx.Rngs(0))))
    tokens = np.random.default_rng(0).integers(0, 51200, (2, 24))
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(nnx.merge(graphdef, params), jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    # The same checkpoint restored stacked, run by lax.scan: transformers' logits too.
    scanned = Runtime.local(cfg, ExecutionConfig(scan_layers=True))
    stacked = scanned.restore_params(run_dir)
    assert stacked["layers"]["attn"]["q_proj"]["kernel"].shape[0] == cfg.n_layers
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(nnx.merge(scanned.graphdef, stacked), jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_exported_tokenizer_gives_xgen_ids(exported):
    tok = AutoTokenizer.from_pretrained(exported[1])
    text = "def f(x):\n        return x\t\t# café 🤗<|endoftext|><fim_prefix>"
    assert tok.encode(text) == Tokenizer.xgen().encode(text)


def test_import_of_the_export_is_bitwise_and_trains(exported, tmp_path, caplog):
    run_dir, out = exported
    imported = tmp_path / "imported"
    with caplog.at_level(logging.INFO, logger="xgen.tasks.import_hf"):
        run_task(compose_config("task=import_hf", f"hf_path={out}", f"out={imported}"), tmp_path)
    # The tiny model's architecture: the suggestion names it rather than a dozen model.* keys.
    assert [r.getMessage() for r in caplog.records if "train from it" in r.getMessage()] == [
        f"train from it: python -m xgen.run trainer.init_from={imported} model=tiny"
    ]
    meta = checkpoint.read_meta(imported)
    assert meta["params_only"] and meta["source"] == str(out)
    cfg, want = checkpoint_params(run_dir)
    got_cfg, got = checkpoint_params(imported)
    assert got_cfg == dataclasses.replace(cfg, name="hf")  # named after the HF directory
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree_util.tree_flatten_with_path(got)[0]):
        assert np.array_equal(np.asarray(a), np.asarray(b)), path

    # Imported per-layer weights start a scanned run (stacked when restored).
    init = (f"trainer.init_from={imported}", "execution.scan_layers=true")
    summary = run_task(compose_config("trainer.steps=1", *init, *FAST), tmp_path / "train")
    assert summary["steps"] == 1 and np.isfinite(summary["final_loss"])

    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run_task(compose_config("task=import_hf", f"hf_path={out}", f"out={imported}"), tmp_path)


def test_the_suggested_overrides_start_from_the_closest_shipped_model():
    from xgen.hf.convert import model_overrides
    from xgen.tasks.import_hf import shipped_models

    shipped = shipped_models()
    assert set(shipped) >= {"tiny", "small", "xgen_7b", "llama_7b"}
    tiny = dataclasses.replace(shipped["tiny"], name="imported", init_std=0.5)  # name and init are no architecture
    assert model_overrides(tiny, shipped) == ["model=tiny"]
    open_llama_3b = dataclasses.replace(shipped["llama_7b"], name="open_llama_3b", d_model=3200, n_layers=26, d_ff=8640)
    assert model_overrides(open_llama_3b, shipped) == ["model=llama_7b", "model.d_model=3200", "model.n_layers=26", "model.d_ff=8640"]
    every_key = model_overrides(tiny)  # no shipped models: every key, as on top of any default
    assert len(every_key) == 11 and every_key[:2] == ["model.d_model=64", "model.n_layers=2"]


def test_export_refuses_missing_keys_and_an_occupied_out(exported, tmp_path):
    run_dir, out = exported
    with pytest.raises(ConfigError, match="task=export_hf needs checkpoint="):
        run_task(compose_config("task=export_hf", f"checkpoint={run_dir}"), tmp_path)
    with pytest.raises(ConfigError, match="already holds a model"):
        run_task(compose_config("task=export_hf", f"checkpoint={run_dir}", f"out={out}"), tmp_path)
    with pytest.raises(ConfigError, match="no complete checkpoint there"):
        run_task(compose_config("task=export_hf", f"checkpoint={tmp_path}", f"out={tmp_path}/x"), tmp_path)


def test_bad_import_is_one_line_and_exit_code_2(exported, tmp_path):
    bad = tmp_path / "scaled"
    bad.mkdir()
    config = json.loads((exported[1] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "longrope", "factor": 2.0}}))
    proc = xgen_run("task=import_hf", f"hf_path={bad}", f"out={tmp_path}/out", f"hydra.run.dir={tmp_path}/log")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xgen: config error: hf_path=") and "rope_type='longrope'" in lines[0]
