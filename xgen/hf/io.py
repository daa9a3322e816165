"""Hugging Face model directories ↔ xgen checkpoints: sharded safetensors written, any
released weights read (`xgen.hf.weights`: safetensors or PyTorch .bin).

Export holds about one shard in host memory: the shard plan is made from shapes alone,
then each shard's tensors are fetched (restored from the checkpoint), converted, written
and dropped. Import reads one tensor at a time (bfloat16 widened exactly to float32).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import safetensors.numpy

from xgen.config import ConfigError, ModelConfig
from xgen.hf.convert import TensorSpec, XPath, from_hf, get_path, hf_config, model_config, set_path, tensor_specs, to_hf
from xgen.hf.tokenizer_files import write_tokenizer
from xgen.hf.weights import INDEX_FILE, SINGLE_FILE, open_weights
from xgen.tokenizer.xgen import EOT_ID, XGEN_N_TOKENS

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2_000_000_000  # "2GB" in transformers' units
# Buffers that older transformers releases saved with LLaMA weights; recomputed, never needed.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


# --- writing ----------------------------------------------------------------------------


def ordinary_file_mode() -> int:
    """The mode `open()` gives a new file here (0666 less the umask: 0644 by default), for
    files a library writes privately (safetensors: 0600), which other users of a shared model
    directory, or a server running as another user, could not read."""
    umask = os.umask(0o022)  # reading the umask means setting it; put back at once
    os.umask(umask)
    return 0o666 & ~umask


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
        os.chmod(out_dir / name, ordinary_file_mode())  # safetensors (0.8) writes 0600
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
    """The model's parameters as checkpoints store them (per layer), as an `nnx.State` of
    shapes, with no memory allocated."""
    from xgen.runtime import Runtime

    return Runtime.local(cfg).disk_param_shapes


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

    from xgen import checkpoint as ckpt
    from xgen.runtime import model_config_from_meta

    meta = ckpt.read_meta(checkpoint)
    try:
        cfg = model_config_from_meta(meta["config"]["model"], f"checkpoint={checkpoint}")
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

    from xgen import checkpoint as ckpt

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
