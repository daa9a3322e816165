"""Import of PyTorch `.bin` weights (how Salesforce/xgen-7b-8k-base ships): the same model as
from safetensors, and every damaged or hostile file refused in one line naming it."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards

import xgen.hf
from tests.conftest import compose_config
from tests.hf.test_convert import hf_llama, xgen_logits
from tests.hf.test_tasks import checkpoint_params, xgen_run
from xgen.config import ConfigError
from xgen.hf.convert import get_path, iter_paths
from xgen.tasks import run_task

INDEX = "pytorch_model.bin.index.json"
SHARDS = [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
# About 40% of the tiny model's 204 kB of float32: the greedy split gives 3 shards, as published.
SHARD_BYTES = 85_000


def save_bin(model, out: Path, config_from: Path, max_shard_size: int | str = "50GB", inv_freq: bool = False) -> Path:
    """`model` as transformers 4.x's `save_pretrained(safe_serialization=False)` wrote it (5.x
    ignores that flag and writes safetensors): split by huggingface_hub's splitter, as 4.x
    did, into `pytorch_model.bin` or `pytorch_model-0000N-of-0000M.bin` + the index.
    `inv_freq` adds the rotary buffers that releases of mid-2023 (XGen-7B's) still saved."""
    out.mkdir()
    shutil.copy(config_from / "config.json", out / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if inv_freq:
        c = model.config
        head = c.hidden_size // c.num_attention_heads
        freq = 1.0 / (10000.0 ** (torch.arange(0, head, 2).float() / head))
        state.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": freq for i in range(c.num_hidden_layers)})
    pattern = "pytorch_model{suffix}.bin"
    split = split_torch_state_dict_into_shards(state, filename_pattern=pattern, max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        torch.save({name: state[name] for name in names}, out / file)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple:
    """(transformers model, its safetensors directory, the same model as 3 .bin shards)."""
    root = tmp_path_factory.mktemp("released")
    model = hf_llama(root / "st")
    return model, root / "st", save_bin(model, root / "bin", root / "st", SHARD_BYTES, inv_freq=True)


def assert_same_params(got: dict, want: dict) -> None:
    assert sorted(iter_paths(got)) == sorted(iter_paths(want))
    for path in iter_paths(want):
        a, b = np.asarray(get_path(got, path)), get_path(want, path)
        assert a.dtype == np.float32 and np.array_equal(a, b), path


def one_line_error(hf_dir: Path) -> str:
    with pytest.raises(ConfigError) as info:
        xgen.hf.load(hf_dir)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_released_shard_layout_imports_as_the_safetensors_model(released, tmp_path):
    model, st_dir, bin_dir = released
    assert sorted(p.name for p in bin_dir.glob("*.bin")) == SHARDS
    index = json.loads((bin_dir / INDEX).read_text())
    assert set(index) == {"metadata", "weight_map"} and set(index["metadata"]) == {"total_size"}
    assert set(index["weight_map"].values()) == set(SHARDS)
    assert any(k.endswith("inv_freq") for k in index["weight_map"])  # old buffers, skipped on import

    run_task(compose_config("task=import_hf", f"hf_path={bin_dir}", f"out={tmp_path / 'x'}"), tmp_path)
    cfg, state = checkpoint_params(tmp_path / "x")
    st_cfg, want = xgen.hf.load(st_dir)
    assert cfg == dataclasses.replace(st_cfg, name="bin")  # named after the directory
    got = state.to_pure_dict()
    assert_same_params(got, want)

    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(xgen_logits(cfg, got, tokens), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bin_widens_as_safetensors_does(tmp_path, dtype):
    model = hf_llama(tmp_path / "st", seed=2, dtype=dtype)
    bin_dir = save_bin(model, tmp_path / "bin", tmp_path / "st", SHARD_BYTES // 2)
    assert len(list(bin_dir.glob("pytorch_model-*.bin"))) >= 2
    assert_same_params(xgen.hf.load(bin_dir)[1], xgen.hf.load(tmp_path / "st")[1])


def test_single_pytorch_model_bin(released, tmp_path):
    model, st_dir, _ = released
    bin_dir = save_bin(model, tmp_path / "single", st_dir)
    assert sorted(p.name for p in bin_dir.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert_same_params(xgen.hf.load(bin_dir)[1], xgen.hf.load(st_dir)[1])


def test_shards_load_one_at_a_time_mapped_and_weights_only(released, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(path, **kwargs):
        calls.append((Path(path).name, kwargs))
        return real_load(path, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    xgen.hf.load(released[2])
    assert all(kw == dict(map_location="cpu", weights_only=True, mmap=True) for _, kw in calls), calls
    assert [name for name, _ in calls] == SHARDS + SHARDS  # names and shapes from each, then values from each


def test_legacy_torch_save_format_is_read_whole(released, tmp_path):
    """torch < 1.6 wrote bare pickles, which cannot be memory-mapped; still weights_only."""
    model, st_dir, _ = released
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(st_dir / "config.json", legacy / "config.json")
    torch.save(model.state_dict(), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_same_params(xgen.hf.load(legacy)[1], xgen.hf.load(st_dir)[1])


def test_safetensors_are_preferred_when_both_exist(released, tmp_path):
    model, st_dir, _ = released
    both = shutil.copytree(st_dir, tmp_path / "both")
    zeros = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    torch.save(zeros, both / "pytorch_model.bin")
    assert_same_params(xgen.hf.load(both)[1], xgen.hf.load(st_dir)[1])


def test_truncated_shard_is_one_line_naming_it_through_the_task(released, tmp_path):
    bad = shutil.copytree(released[2], tmp_path / "bad")
    data = (bad / SHARDS[1]).read_bytes()
    (bad / SHARDS[1]).write_bytes(data[: len(data) // 2])
    proc = xgen_run("task=import_hf", f"hf_path={bad}", f"out={tmp_path}/out", f"hydra.run.dir={tmp_path}/log")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xgen: config error: hf_path="), lines
    assert f"{SHARDS[1]} is not a readable PyTorch weights file" in lines[0]
    assert not (tmp_path / "out" / "checkpoints").exists()


UP_1, EMBED = "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"


def _not_torch(d: Path) -> None:
    (d / SHARDS[0]).write_bytes(b"<html>404: not a checkpoint</html>\n")


def _missing_shard(d: Path) -> None:
    (d / SHARDS[2]).unlink()


def _missing_tensor(d: Path) -> None:
    """Drop a tensor from its shard and from the index, as a botched re-shard would."""
    index = json.loads((d / INDEX).read_text())
    shard = d / index["weight_map"].pop(UP_1)
    torch.save({k: v for k, v in torch.load(shard, weights_only=True).items() if k != UP_1}, shard)
    (d / INDEX).write_text(json.dumps(index))


def _not_a_tensor(d: Path) -> None:
    state = torch.load(d / SHARDS[2], weights_only=True)
    torch.save({**state, "model.norm.weight": 1.0}, d / SHARDS[2])


def _index_elsewhere(d: Path) -> None:
    index = json.loads((d / INDEX).read_text())
    index["weight_map"][EMBED] = SHARDS[2]
    (d / INDEX).write_text(json.dumps(index))


DAMAGED = {
    "not_torch": (_not_torch, f"{SHARDS[0]} is not a PyTorch weights file (neither a zip archive nor a pickle)"),
    "missing_shard": (_missing_shard, f"{INDEX} names {SHARDS[2]}, which is missing"),
    "missing_tensor": (_missing_tensor, f"tensor {UP_1} is missing from {', '.join(SHARDS)}"),
    "not_a_tensor": (_not_a_tensor, f"{SHARDS[2]} holds 'model.norm.weight', a float, not a tensor"),
    "index_elsewhere": (_index_elsewhere, f"{INDEX} puts {EMBED} in {SHARDS[2]}, which does not hold it"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_bin_directories_are_one_line(released, tmp_path, case):
    damage, message = DAMAGED[case]
    bad = shutil.copytree(released[2], tmp_path / case)
    damage(bad)
    assert message in one_line_error(bad)


class CreatesAFile:
    """A pickle payload: unpickling it calls open(marker, "w"), i.e. runs the sender's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle"])
def test_a_pickle_that_runs_code_is_refused_and_does_not_run(released, tmp_path, container):
    bad = shutil.copytree(released[2], tmp_path / "evil")
    marker = tmp_path / "pwned"
    state = torch.load(bad / SHARDS[1], weights_only=True)
    payload = {**state, "model.norm.weight": CreatesAFile(marker)}
    if container == "torch_zip":
        torch.save(payload, bad / SHARDS[1])
    else:
        (bad / SHARDS[1]).write_bytes(pickle.dumps(payload))
    message = one_line_error(bad)
    assert f"{SHARDS[1]} is not a readable PyTorch weights file" in message
    assert "weights_only=True) refused it" in message and ("GLOBAL io.open" in message or container == "plain_pickle")
    assert not marker.exists()
    if container == "torch_zip":  # not vacuous: an unguarded torch.load does run it
        torch.load(bad / SHARDS[1], weights_only=False)
        assert marker.exists()


def test_without_torch_bin_needs_the_hf_extra_and_safetensors_do_not(released, monkeypatch):
    _, st_dir, bin_dir = released
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError):
        import torch as _  # noqa: F401
    message = one_line_error(bin_dir)
    assert message.startswith(f"path={bin_dir}:") and "pip install 'xgen[hf]'" in message
    assert xgen.hf.load(st_dir)[0].n_layers == 2


def test_a_directory_without_weights_names_what_it_looked_for(released, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(released[1] / "config.json", empty / "config.json")
    message = one_line_error(empty)
    assert "no weights there" in message and all(name in message for name in ("model.safetensors", "pytorch_model.bin"))
