"""Shared fixtures: composing configs through Hydra's compose API, as `python -m xgen.run` does."""

from __future__ import annotations

import os
from pathlib import Path

# 8 virtual CPU devices for the sharding tests, set before anything starts JAX; runs on
# `hardware=cpu` still use one device (the mesh takes the first hardware.num_devices).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# One persistent compilation cache for both xdist workers and the `python -m xgen.run`
# processes the tests start: the same tiny model's init and step then compile once per
# suite, not once per test. JAX keys an entry by the program, its flags and its devices, so
# a hit is the executable a fresh compile would give; the size bound turns on its file lock.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pytest
from hydra import compose, initialize_config_dir

from xgen.config import XGenConfig, register_configs, to_object

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
register_configs()


def compose_config(*overrides: str) -> XGenConfig:
    """The typed config that `python -m xgen.run <overrides>` would run."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_object(compose("config", overrides=list(overrides)))


def pytest_collection_modifyitems(session, config, items):
    """Tests marked `slow` (a minute or more each) run first: with `-n 2` (pytest-xdist) the
    two workers then start on the long ones and fill in with short ones, instead of one
    worker finishing a long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def make_config():
    return compose_config


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """`data_dir` holding the synthetic raw corpus and its prepared shards (done once)."""
    from xgen.data.prepare import prepare_mix
    from xgen.data.synthetic import write_corpus
    from xgen.tokenizer import Tokenizer

    data_dir = tmp_path_factory.mktemp("data")
    write_corpus(data_dir / "synthetic" / "raw")
    cfg = compose_config("data_mix=synthetic_stage2", f"data_dir={data_dir}", "prepare.workers=0")
    prepare_mix(cfg.data_mix, Tokenizer.xgen(), cfg.prepare)
    return data_dir
