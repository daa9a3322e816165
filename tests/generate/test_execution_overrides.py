"""Execution settings come from the command, never from the checkpoint: a model trained with
dense float32 attention generates and evaluates with whatever `execution.*` says."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen import checkpoint
from xgen.eval.fixtures.__main__ import main as write_fixtures
from xgen.model import transformer
from xgen.tasks import run_task


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("dense_f32")
    run_task(compose_config("debug=fast", "trainer.steps=2", "execution=default"), run_dir)
    return run_dir


def run_in(run_dir: Path, *overrides: str) -> dict:
    run_dir.mkdir(parents=True)
    return run_task(compose_config(*overrides), run_dir)


@pytest.fixture
def kernels(monkeypatch) -> dict[str, list]:
    """What every attention call of the model was traced with."""
    seen: dict[str, list] = {"causal": [], "cached": []}
    causal, cached = transformer.causal_attention, transformer.cached_attention

    def spy_causal(q, k, v, **kw):
        seen["causal"].append((str(kw["kernel"]), kw["chunk"], str(q.dtype)))
        return causal(q, k, v, **kw)

    def spy_cached(q, k, v, cache_k, *rest):
        seen["cached"].append((str(q.dtype), str(cache_k.dtype)))
        return cached(q, k, v, cache_k, *rest)

    monkeypatch.setattr(transformer, "causal_attention", spy_causal)
    monkeypatch.setattr(transformer, "cached_attention", spy_cached)
    return seen


def test_the_checkpoint_stores_the_architecture_without_execution_settings(trained):
    model = checkpoint.read_meta(trained)["config"]["model"]
    assert model["d_model"] > 0 and not {"remat", "attention", "attention_chunk", "compute_dtype"} & set(model)


def test_generate_runs_in_the_commands_dtypes(trained, tmp_path, kernels):
    prompt = ("task=generate", f"checkpoint={trained}", "prompt=def", "generate.max_new_tokens=2")
    run_in(tmp_path / "default", *prompt)
    assert kernels["cached"] and set(kernels["cached"]) == {("float32", "float32")}
    kernels["cached"].clear()
    overrides = ("execution.compute_dtype=bfloat16", "execution.kv_cache_dtype=float16")
    run_in(tmp_path / "bf16", *prompt, *overrides)
    assert kernels["cached"] and set(kernels["cached"]) == {("bfloat16", "float16")}


def test_eval_runs_the_commands_attention_kernel(trained, tmp_path, kernels):
    data_dir = tmp_path / "data"
    write_fixtures([str(data_dir)])
    common = ("task=eval", "eval=zeroshot", "eval.tasks=[hellaswag]", "eval.limit=2", f"checkpoint={trained}", f"data_dir={data_dir}")
    dense = run_in(tmp_path / "dense", *common)
    assert kernels["causal"] and {k for k, _, _ in kernels["causal"]} == {"dense"}
    kernels["causal"].clear()
    chunked = run_in(tmp_path / "chunked", *common, "execution.attention=chunked", "execution.attention_chunk=8")
    assert kernels["causal"] and set(kernels["causal"]) == {("chunked", 8, "float32")}
    assert chunked["execution"]["attention"] == "chunked" and dense["execution"]["attention"] == "dense"
    # The same model, computed another way: the same scores to float32 rounding.
    assert chunked["tasks"]["hellaswag"]["acc"] == pytest.approx(dense["tasks"]["hellaswag"]["acc"])
