"""Hugging Face model directories: sharded safetensors written, safetensors or PyTorch .bin read.

Export holds about one shard in host memory: the shard plan is made from shapes alone,
then each shard's tensors are fetched (restored from the checkpoint), converted, written
and dropped. Import reads one tensor at a time: through `safe_open` (bfloat16 tensors, which
numpy cannot hold, are read as raw bytes and widened exactly to float32), or, for
`pytorch_model*.bin` directories, from one memory-mapped `torch.load(weights_only=True)`
shard at a time (torch comes with the `hf` extra).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from xgen.config import ConfigError, ModelConfig
from xgen.hf.convert import TensorSpec, XPath, from_hf, get_path, hf_config, model_config, set_path, tensor_specs, to_hf
from xgen.hf.tokenizer_files import write_tokenizer
from xgen.tokenizer.xgen import EOT_ID, XGEN_N_TOKENS

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2_000_000_000  # "2GB" in transformers' units
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
BIN_SINGLE_FILE = "pytorch_model.bin"
# Buffers that older transformers releases saved with LLaMA weights; recomputed, never needed.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


# --- writing ----------------------------------------------------------------------------


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors, greedily, into shards of at most `max_shard_bytes` (float32);
    a tensor larger than that gets a shard of its own, as transformers does."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = 4 * int(np.prod(spec.shape))
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_weights(
    out_dir: Path,
    specs: list[TensorSpec],
    fetch: Callable[[list[TensorSpec]], dict[str, np.ndarray]],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """Write `specs` as `model.safetensors`, or as `model-0000N-of-0000M.safetensors` plus
    the index when they exceed one shard. `fetch(shard)` returns that shard's float32 tensors
    by HF name, so only one shard is ever in memory."""
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes={max_shard_bytes} must be positive")
    shards = plan_shards(specs, max_shard_bytes)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    paths = []
    for name, shard in zip(names, shards):
        tensors = fetch(shard)
        for spec in shard:
            got = tensors[spec.hf_name]
            assert got.shape == spec.shape and got.dtype == np.float32, (spec, got.shape, got.dtype)
            weight_map[spec.hf_name] = name
        safetensors.numpy.save_file(tensors, out_dir / name, metadata={"format": "pt"})
        del tensors
        paths.append(out_dir / name)
        log.info("wrote %s (%d tensors)", out_dir / name, len(shard))
    if n > 1:
        index = {
            "metadata": {
                "total_size": sum(4 * int(np.prod(s.shape)) for s in specs),
                "total_parameters": sum(int(np.prod(s.shape)) for s in specs),
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def write_model_files(
    out_dir: Path, cfg: ModelConfig, *, tokenizer: bool | None = None, token_ids: dict | None = None
) -> None:
    """config.json, generation_config.json and (for XGen-vocabulary models) the tokenizer.

    `tokenizer=None` writes the XGen tokenizer when the vocabulary can hold it; `token_ids`
    (bos/eos of an imported model) override the XGen end-of-text id."""
    if tokenizer is None:
        tokenizer = cfg.vocab_size >= XGEN_N_TOKENS
    ids = {"bos_token_id": EOT_ID if tokenizer else None, "eos_token_id": EOT_ID if tokenizer else None}
    ids.update({k: v for k, v in (token_ids or {}).items() if k in ids and v is not None})
    config = hf_config(cfg, **ids)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: v for k, v in ids.items() if v is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer:
        write_tokenizer(out_dir, model_max_length=cfg.max_positions)
    else:
        log.warning(
            "vocabulary of %d < the XGen tokenizer's %d tokens: no tokenizer files written", cfg.vocab_size, XGEN_N_TOKENS
        )


def prepare_out_dir(out_dir: str | Path, key: str = "out") -> Path:
    """`out_dir`, created; refused if it already holds a model (stale shards would mix in)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{key}={out_dir} is a file, not a directory")
    if out.is_dir() and (any(out.glob("model*.safetensors")) or (out / "config.json").exists()):
        raise ConfigError(f"{key}={out_dir} already holds a model; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save(
    out_dir: str | Path,
    model_cfg: ModelConfig,
    params: Any,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: bool | None = None,
) -> Path:
    """Write xgen parameters (a nested pure dict or an `nnx.State`, numpy or jax arrays) as
    a Hugging Face `LlamaForCausalLM` directory; `tokenizer=None` adds the XGen tokenizer
    when the vocabulary holds it."""
    if hasattr(params, "to_pure_dict"):
        params = params.to_pure_dict()
    specs = tensor_specs(model_cfg)
    for spec in specs:
        name = ".".join(map(str, spec.path))
        try:
            value = get_path(params, spec.path)
        except (KeyError, IndexError, TypeError):
            raise ConfigError(f"params: {name} is missing (needed for {spec.hf_name})") from None
        if tuple(np.shape(value)) != spec.xgen_shape:
            raise ConfigError(f"params: {name} has shape {np.shape(value)}, the config needs {spec.xgen_shape}")
    out = prepare_out_dir(out_dir, "out_dir")
    fetch = lambda shard: {s.hf_name: to_hf(s, get_path(params, s.path)) for s in shard}  # noqa: E731
    write_weights(out, specs, fetch, max_shard_bytes)
    write_model_files(out, model_cfg, tokenizer=tokenizer)
    return out


# --- reading ----------------------------------------------------------------------------


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


def read_config(hf_dir: str | Path, key: str = "hf_path") -> dict:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise ConfigError(f"{key}={hf_dir} is not a directory")
    if not path.exists():
        raise ConfigError(f"{key}={hf_dir}: no config.json there (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as ex:
        raise ConfigError(f"{key}={hf_dir}: config.json is not valid JSON: {ex}") from None


def iter_tensors(hf_dir: str | Path, key: str = "hf_path") -> tuple[ModelConfig, Iterator[tuple[XPath, np.ndarray]]]:
    """The model's config and an iterator of (xgen path, float32 xgen-layout array), after
    checking names, shapes and dtypes of every tensor against config.json (before any read)."""
    hf_dir = Path(hf_dir)
    where = f"{key}={hf_dir}"
    cfg = model_config(read_config(hf_dir, key), name=hf_dir.resolve().name, where=f"{where}/config.json")
    files = open_weights(hf_dir, where)
    specs = tensor_specs(cfg)
    expected = {s.hf_name for s in specs}
    for name in sorted(files.info):
        tolerated = name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_embeddings)
        if name not in expected and not tolerated:
            file = files.file_of[name].name
            raise ConfigError(f"{where}: unexpected tensor {name} in {file} (not in a LLaMA of this config.json)")
    for spec in specs:
        if spec.hf_name not in files.info:
            names = ", ".join(sorted({p.name for p in files.file_of.values()}))
            raise ConfigError(f"{where}: tensor {spec.hf_name} is missing from {names}")
        dtype, shape = files.info[spec.hf_name]
        file = files.file_of[spec.hf_name].name
        if shape != spec.shape:
            raise ConfigError(
                f"{where}: tensor {spec.hf_name} in {file} has shape {list(shape)}, config.json implies {list(spec.shape)}"
            )
        if dtype not in _FLOAT_DTYPES:
            raise ConfigError(f"{where}: tensor {spec.hf_name} in {file} has dtype {dtype}; only float weights import")

    def tensors() -> Iterator[tuple[XPath, np.ndarray]]:
        # Shard by shard (transformers' shards cut layers apart), so each is opened once.
        for spec in sorted(specs, key=lambda s: files.file_of[s.hf_name]):
            yield spec.path, from_hf(spec, files.read(spec.hf_name))

    return cfg, tensors()


def load(hf_dir: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a Hugging Face LLaMA directory; params is xgen's nested pure
    dict of float32 numpy arrays (layers keyed by int), ready for `nnx.replace_by_pure_dict`."""
    cfg, tensors = iter_tensors(hf_dir, key="path")
    params: dict = {}
    for path, value in tensors:
        set_path(params, path, value)
    return cfg, params


# --- xgen checkpoints -------------------------------------------------------------------


def _abstract_params(cfg: ModelConfig) -> Any:
    """The model's parameters as an `nnx.State` of shapes, with no memory allocated."""
    from flax import nnx

    from xgen.model import XGenModel

    return nnx.state(nnx.eval_shape(lambda: XGenModel(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _storage_keys(abstract: Any) -> dict[XPath, tuple]:
    """xgen path -> the key path under which a checkpoint stores that parameter (an
    `nnx.State` flattens each Param to a `value` leaf), read off the pytree itself."""
    import jax

    keys = {}
    for key_path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        full = tuple(getattr(k, "key", getattr(k, "name", None)) for k in key_path)
        n = next((i for i, k in enumerate(key_path) if not isinstance(k, jax.tree_util.DictKey)), len(full))
        keys[full[:n]] = full
    return keys


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """An xgen checkpoint (run dir, its checkpoints/ folder, or a params-only one) as a
    Hugging Face directory, restoring only one shard's parameters at a time onto the CPU."""
    import jax

    from xgen.hf.convert import model_config_from_dict
    from xgen.train import checkpoint as ckpt

    meta = ckpt.read_meta(checkpoint)
    try:
        cfg = model_config_from_dict(meta["config"]["model"])
    except (KeyError, TypeError) as ex:
        raise ConfigError(f"checkpoint={checkpoint}: its metadata has no model config ({ex})") from None
    out = prepare_out_dir(out_dir)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = _abstract_params(cfg)
    keys = _storage_keys(abstract)

    def fetch(shard: list[TensorSpec]) -> dict[str, np.ndarray]:
        item: dict = {}
        for spec in shard:
            set_path(item, keys[spec.path], jax.ShapeDtypeStruct(spec.xgen_shape, np.float32, sharding=cpu))
        restored = ckpt.restore_params(checkpoint, item)
        return {s.hf_name: to_hf(s, get_path(restored, keys[s.path])) for s in shard}

    # Written beside `out` and moved in when complete, config.json last: a failed export
    # leaves no half a model that would load (or be refused as "already holds a model").
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write_weights(staging, tensor_specs(cfg), fetch, max_shard_bytes)
    tokenizer_name = (meta["config"].get("tokenizer") or {}).get("name", "xgen")
    tokenizer = tokenizer_name == "xgen" and cfg.vocab_size >= XGEN_N_TOKENS
    write_model_files(staging, cfg, tokenizer=tokenizer, token_ids=meta.get("hf_token_ids"))
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(path, out / path.name)
    staging.rmdir()
    return out


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """A Hugging Face LLaMA directory as a parameters-only xgen checkpoint under `out_dir`
    (what `trainer.init_from` and inference read). Tensors go into the state as they are
    read; the whole model is in host memory once, in float32, while orbax writes it."""
    from dataclasses import asdict

    from flax import nnx

    from xgen.train import checkpoint as ckpt

    out = Path(out_dir)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ConfigError(f"out={out_dir} already holds checkpoints; choose a new directory")
    cfg, tensors = iter_tensors(hf_dir)
    params: dict = {}
    for path, value in tensors:
        set_path(params, path, value)
    state = _abstract_params(cfg)
    nnx.replace_by_pure_dict(state, params)
    config = read_config(hf_dir)
    token_ids = {k: config.get(k) for k in ("bos_token_id", "eos_token_id")}
    meta = {"config": {"model": asdict(cfg)}, "source": str(Path(hf_dir).absolute()), "hf_token_ids": token_ids}
    ckpt.save_params(out, state, meta)
    log.info("imported %s (%s) into %s", hf_dir, cfg.name, out / "checkpoints")
    return out
