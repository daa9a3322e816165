"""Fixtures shared by the benchmark tests: a tiny random model, as an Engine and as a
checkpoint that `task=eval checkpoint=...` loads, and a way to run `task=eval` in-process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.conftest import compose_config


@pytest.fixture(scope="session")
def tiny_model():
    """(ModelConfig, XGenModel, params) of a 2-layer random model (weights large enough that
    its choices are not near ties)."""
    from flax import nnx

    from xgen.config import ModelConfig
    from xgen.model.transformer import XGenModel

    cfg = ModelConfig(name="t", d_model=64, n_layers=2, n_heads=4, d_ff=128, init_std=0.5)
    model = XGenModel(cfg, rngs=nnx.Rngs(0))
    return cfg, model, nnx.state(model, nnx.Param)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model):
    from xgen.generate.engine import Engine
    from xgen.tokenizer import Tokenizer

    cfg, _, params = tiny_model
    from xgen.runtime import Runtime

    return Engine(Runtime.local(cfg), params, Tokenizer.xgen(), max_len=1024)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory) -> Path:
    """A parameters-only checkpoint of `tiny_model` (what `checkpoint=` accepts)."""
    from xgen.checkpoint import save_params

    cfg, _, params = tiny_model
    path = tmp_path_factory.mktemp("tiny_ckpt")
    save_params(path, params, {"config": {"model": dataclasses.asdict(cfg)}})
    return path


@pytest.fixture
def run_eval():
    """run_eval(run_dir, "eval=...", ...) -> result: `python -m xgen.run task=eval ...` in-process."""
    from xgen.tasks import run_task

    def run(run_dir: Path, *overrides: str) -> dict:
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_task(compose_config("task=eval", *overrides), run_dir)

    return run
