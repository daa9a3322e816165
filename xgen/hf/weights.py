"""A Hugging Face model directory's weight files, read one tensor at a time.

Safetensors (`model.safetensors`, or shards with `model.safetensors.index.json`) are read
from their headers and byte ranges; PyTorch `.bin` shards (`pytorch_model-0000N-of-0000M.bin`
with `pytorch_model.bin.index.json`, how the 2023 XGen-7B checkpoints ship) go through
`torch.load(weights_only=True, mmap=True)` when torch is installed: a pickle from the
internet must not run code, and a 10 GB shard is mapped, not read whole. Every damaged file
is one line naming it.
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from xgen.config import ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
BIN_SINGLE_FILE = "pytorch_model.bin"


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the byte offset where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def _read_index(path: Path, where: str) -> dict[str, str]:
    """An index's `weight_map` (tensor name -> shard file); a damaged index is one line."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as ex:
        raise ConfigError(f"{where}: {path.name} is not a weight index ({type(ex).__name__}: {ex})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConfigError(f"{where}: {path.name}: weight_map is not a map of tensor names to files")
    return weight_map


class _WeightFiles:
    """The tensors of a Hugging Face model directory, sharded with an index or one file:
    names, dtypes (safetensors' names: F32, BF16, ...) and shapes up front, from every
    shard, then values read one at a time as float32. Subclasses say how to scan and read."""

    index_name: str
    single_name: str

    def __init__(self, hf_dir: Path, where: str):
        self.where = where
        index = hf_dir / self.index_name
        weight_map = _read_index(index, where) if index.exists() else None
        files = sorted(set(weight_map.values())) if weight_map is not None else [self.single_name]
        self.file_of: dict[str, Path] = {}
        self.info: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                what = f"{self.index_name} names {name}, which is missing" if weight_map else f"{name} is not a file"
                raise ConfigError(f"{where}: {what}")
            for key, info in self._scan(path).items():
                self.file_of[key] = path
                self.info[key] = info
        for key, name in (weight_map or {}).items():
            if self.file_of.get(key) != hf_dir / name:
                raise ConfigError(f"{where}: {self.index_name} puts {key} in {name}, which does not hold it")

    @classmethod
    def present(cls, hf_dir: Path) -> bool:
        return (hf_dir / cls.index_name).exists() or (hf_dir / cls.single_name).exists()

    def _scan(self, path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError


class TensorFiles(_WeightFiles):
    """Safetensors weights, read through headers alone until a tensor is asked for."""

    index_name, single_name = INDEX_FILE, SINGLE_FILE

    def _scan(self, path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
        try:
            with safe_open(path, framework="numpy") as f:
                pieces = {key: f.get_slice(key) for key in f.keys()}
                return {key: (piece.get_dtype(), tuple(piece.get_shape())) for key, piece in pieces.items()}
        except SafetensorError as ex:
            raise ConfigError(f"{self.where}: {path.name} is not a readable safetensors file: {ex}") from None

    def read(self, name: str) -> np.ndarray:
        """One tensor as float32 (bfloat16 widened exactly: its bits are float32's top half)."""
        path, (dtype, shape) = self.file_of[name], self.info[name]
        if dtype == "BF16":
            header, start = _header(path)
            begin, end = header[name]["data_offsets"]
            raw = np.fromfile(path, dtype="<u2", count=(end - begin) // 2, offset=start + begin)
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(name).astype(np.float32, copy=False)


# torch's dtype names -> safetensors' (what the dtype check and its messages speak).
_TORCH_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                 "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}  # fmt: skip


def _import_torch(where: str) -> Any:
    """torch, which only .bin weights need; without it, the one line that says how to get it."""
    try:
        import torch
    except ImportError:
        raise ConfigError(
            f"{where}: its weights are PyTorch .bin files, which need torch: pip install 'xgen[hf]'"
        ) from None
    return torch


# What torch.load's weights_only refusals name: the global a pickle would call, or the opcode.
_REFUSED = re.compile(r"GLOBAL [\w.]+|Unsupported operand \d+")


def _load_failure(ex: Exception) -> str:
    """Why torch.load refused a file, in a few words (its own messages run to paragraphs)."""
    text = str(ex).strip()
    if text.startswith("Weights only load failed"):
        found = _REFUSED.search(text)
        what = f", {found.group()}" if found else ""
        return f"torch.load(weights_only=True) refused it: it holds more than tensors{what}"
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(ex).__name__}: {first}" if first else type(ex).__name__


def _torch_save_format(path: Path) -> str | None:
    """The file's torch.save format from its first bytes: "zip" (since torch 1.6), "legacy"
    (a bare pickle, protocol 2+), or None (an HTML error page, a safetensors file, empty...)."""
    with open(path, "rb") as f:
        start = f.read(4)
    return "zip" if start == b"PK\x03\x04" else "legacy" if start[:1] == b"\x80" else None


class BinFiles(_WeightFiles):
    """PyTorch `.bin` weights (`torch.save` pickles of a state dict), loaded one shard at a
    time with `weights_only=True` (a pickle from the internet must not run code) and
    memory-mapped (a 10 GB shard is not read whole; only the tensors asked for are)."""

    index_name, single_name = BIN_INDEX_FILE, BIN_SINGLE_FILE

    def __init__(self, hf_dir: Path, where: str):
        self._torch = _import_torch(where)
        self._shard: tuple[Path, dict] | None = None
        super().__init__(hf_dir, where)

    def _load(self, path: Path) -> dict:
        """A shard's state dict, its tensors mapped from the file. Files in torch's legacy
        (pre-zip) format cannot be mapped and are read whole, as transformers does."""
        if self._shard is not None and self._shard[0] == path:
            return self._shard[1]
        self._shard = None  # the previous shard's mapping goes before the next one's comes
        kind = _torch_save_format(path)
        if kind is None:
            raise ConfigError(
                f"{self.where}: {path.name} is not a PyTorch weights file (neither a zip archive nor a pickle)"
            )
        try:
            with warnings.catch_warnings():  # e.g. "pickle protocol 4": noise beside the verdict
                warnings.simplefilter("ignore")
                state = self._torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
        except Exception as ex:  # noqa: BLE001 - the file is untrusted input: any failure means a bad file
            why = _load_failure(ex)
            raise ConfigError(f"{self.where}: {path.name} is not a readable PyTorch weights file ({why})") from None
        if not isinstance(state, dict):
            raise ConfigError(f"{self.where}: {path.name} holds a {type(state).__name__}, not a state dict of tensors")
        for key, value in state.items():
            if not isinstance(value, self._torch.Tensor):
                raise ConfigError(f"{self.where}: {path.name} holds {key!r}, a {type(value).__name__}, not a tensor")
        self._shard = (path, state)
        return state

    def _scan(self, path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {
            key: (_TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."), str(t.dtype)), tuple(t.shape))
            for key, t in self._load(path).items()
        }

    def read(self, name: str) -> np.ndarray:
        """One tensor as float32 in memory of its own (bfloat16 and float16 widen exactly,
        as from safetensors); a float32 tensor is copied off the file's mapping."""
        tensor = self._load(self.file_of[name])[name].detach()
        wide = tensor.float()
        return wide.numpy().copy() if wide.data_ptr() == tensor.data_ptr() else wide.numpy()


def open_weights(hf_dir: Path, where: str) -> _WeightFiles:
    """The directory's weights: safetensors when present (transformers prefers them too),
    else PyTorch .bin shards (how Salesforce/xgen-7b-8k-base and other 2023 models ship)."""
    for kind in (TensorFiles, BinFiles):
        if kind.present(hf_dir):
            return kind(hf_dir, where)
    names = (SINGLE_FILE, INDEX_FILE, BIN_SINGLE_FILE, BIN_INDEX_FILE)
    raise ConfigError(f"{where}: no weights there (none of {', '.join(names)})")
