"""Partitioning on 8 virtual CPU devices (tests/conftest.py sets XLA_FLAGS before JAX starts)."""

import json

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import compose_config
from xgen.tasks import run_task
from xgen.train.trainer import Trainer

FAST = (
    "stage.seq_len=32", "stage.batch_tokens=256", "data_mix.sources.python_stdlib.max_documents=20",
    "trainer.steps=10", "trainer.log_every=1",
)  # fmt: skip
LAYOUTS = {
    "data": ("hardware.mesh.data=8", "hardware.mesh.fsdp=1", "hardware.mesh.tensor=1"),
    "fsdp": ("hardware.mesh.data=1", "hardware.mesh.fsdp=8", "hardware.mesh.tensor=1"),
    "tensor": ("hardware.num_devices=4", "hardware.mesh.data=1", "hardware.mesh.fsdp=1", "hardware.mesh.tensor=4"),
    "mixed": ("hardware.mesh.data=2", "hardware.mesh.fsdp=2", "hardware.mesh.tensor=2"),
    # Stacked layers (the `layers` axis unsplit) under the same FSDP x tensor split.
    "mixed_scanned": ("hardware.mesh.data=2", "hardware.mesh.fsdp=2", "hardware.mesh.tensor=2", "execution.scan_layers=true"),
    # Context parallelism: each 32-token sequence split over 4 devices (gathered keys, zigzag order).
    "context": ("hardware.mesh.data=1", "hardware.mesh.fsdp=2", "hardware.mesh.context=4", "hardware.mesh.tensor=1"),
}


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    run_task(compose_config(*FAST), run_dir)
    return losses(run_dir)


def test_eight_virtual_devices_are_there():
    assert jax.device_count() == 8


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ten_steps_match_one_device(layout, single_device_losses, tmp_path):
    run_task(compose_config("hardware=cpu_8", *LAYOUTS[layout], *FAST), tmp_path)
    got = losses(tmp_path)
    assert len(got) == 10
    np.testing.assert_allclose(got, single_device_losses, rtol=2e-5)


@pytest.mark.parametrize("scanned", [False, True])
def test_parameters_are_split_as_the_rules_say(tmp_path, scanned):
    trainer = Trainer(compose_config("hardware=cpu_8", *LAYOUTS["mixed"], *FAST, f"execution.scan_layers={scanned}"), tmp_path)
    state = trainer._init(jax.random.key(0))
    params = state.params
    layer = params["layers"] if scanned else params["layers"][0]
    lead = (None,) if scanned else ()  # the stacked `layers` axis is not split
    expect = {
        "embed_tokens": (params["embed_tokens"], P("tensor", "fsdp")),  # (vocab, embed)
        "lm_head": (params["lm_head"]["kernel"], P("fsdp", "tensor")),  # (embed, vocab)
        "q_proj": (layer["attn"]["q_proj"]["kernel"], P(*lead, "fsdp", "tensor")),  # (embed, heads)
        "o_proj": (layer["attn"]["o_proj"]["kernel"], P(*lead, "tensor", "fsdp")),  # (heads, embed)
        "up_proj": (layer["mlp"]["up_proj"]["kernel"], P(*lead, "fsdp", "tensor")),  # (embed, mlp)
        "down_proj": (layer["mlp"]["down_proj"]["kernel"], P(*lead, "tensor", "fsdp")),  # (mlp, embed)
        "norm": (layer["input_norm"]["scale"], P(*lead, "fsdp")),  # (embed,)
    }
    for name, (var, spec) in expect.items():
        array = var[...]
        assert array.sharding.spec == spec, name
        shard = array.addressable_shards[0].data.shape
        # Each device holds 1/2 of every split axis (fsdp=2, tensor=2).
        assert shard == tuple(d // 2 if ax is not None else d for d, ax in zip(array.shape, spec)), name
    # Adam's moments are placed like their parameters.
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
    mu = (adam.mu["layers"] if scanned else adam.mu["layers"][0])["mlp"]["up_proj"]["kernel"][...]
    assert mu.sharding.spec == P(*lead, "fsdp", "tensor")


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run_task(compose_config(*FAST[:-2], "trainer.steps=3", "trainer.log_every=1"), one)
    run_task(compose_config(*FAST[:-2], "trainer.steps=3", "trainer.log_every=1", "trainer.grad_accum_steps=4"), two)
    np.testing.assert_allclose(losses(two), losses(one), rtol=2e-5)
