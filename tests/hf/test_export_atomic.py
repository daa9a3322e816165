"""A failed export leaves no partial model behind."""

from __future__ import annotations

import dataclasses

import pytest
from flax import nnx

from xgen import checkpoint
from xgen.config import ModelConfig
from xgen.hf import io
from xgen.model.transformer import XGenModel

CFG = ModelConfig(name="t", d_model=32, n_layers=2, n_heads=4, d_ff=64)


def test_an_export_that_fails_midway_leaves_nothing_that_looks_like_a_model(tmp_path, monkeypatch):
    params = nnx.state(XGenModel(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    checkpoint.save_params(tmp_path / "ckpt", params, {"config": {"model": dataclasses.asdict(CFG)}})
    real, calls = checkpoint.restore_params, []

    def failing(path, item):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, item)

    monkeypatch.setattr(checkpoint, "restore_params", failing)
    out = tmp_path / "hf"
    with pytest.raises(OSError, match="disk full"):
        io.export_checkpoint(tmp_path / "ckpt", out, max_shard_bytes=20_000)
    assert len(calls) == 2 and not (out / "config.json").exists() and not list(out.glob("*.safetensors"))
    monkeypatch.setattr(checkpoint, "restore_params", real)
    io.export_checkpoint(tmp_path / "ckpt", out, max_shard_bytes=20_000)  # a retry into the same out works
    assert (out / "config.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    assert not (tmp_path / ".hf.partial").exists()


def test_exported_files_are_ordinary_files_that_respect_the_umask(tmp_path):
    """safetensors writes its files 0600: a model exported for others (a shared directory, a
    server running as another user) was unreadable to them. Every file is 0666 less the umask."""
    import os
    import stat

    params = nnx.state(XGenModel(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    checkpoint.save_params(tmp_path / "ckpt", params, {"config": {"model": dataclasses.asdict(CFG)}})
    for umask, mode in ((0o022, 0o644), (0o007, 0o660)):
        previous = os.umask(umask)
        try:
            out = io.export_checkpoint(tmp_path / "ckpt", tmp_path / f"hf_{umask:o}", max_shard_bytes=20_000)
        finally:
            os.umask(previous)
        files = sorted(out.iterdir())
        assert len([f for f in files if f.suffix == ".safetensors"]) > 1 and (out / "tokenizer.json").exists()
        assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: oct(mode) for f in files}
