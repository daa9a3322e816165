"""This model, placed on this mesh: what training, generation, evaluation, SFT's held-out loss,
HF export and `task=plan` all build from, so that none of them re-derives placement.

A Runtime is built once from the architecture (`model`: what a checkpoint stores), the
execution settings (`execution`: kernels, recomputation, dtypes; never stored) and the
`hardware` (mesh and rules). It owns the sharding hook the model calls, the abstract
parameters with their shardings, and everything that allocates parameters or caches: a
random init, a restore or save over `xgen.checkpoint`, host arrays placed (HF import), and
KV caches sharded by the same rules table, in the cache dtype.

With scanned layers (`execution.scan_layers`) the model holds its blocks stacked, but
checkpoints keep the per-layer layout (what the model is, not how it ran): `to_disk`,
`on_disk` and `from_disk` convert at the save and restore boundary, so any checkpoint
restores into either layout and HF conversion reads one layout only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding

from xgen import checkpoint
from xgen.config import ConfigError, ExecutionConfig, HardwareConfig, ModelConfig, RopeScalingConfig, RopeType, XGenConfig
from xgen.config.validate import check_rope_scaling
from xgen.model.scan import stack_layers, unstack_layers
from xgen.model.transformer import XGenModel, scans_layers
from xgen.parallel.mesh import MESH_AXES, Rules, activation_constraint, axis_rules, logical_sharding, make_mesh, state_shardings

# Logical names of a layer's KV cache: keys transposed [batch, kv_heads, head_dim, slots],
# values [batch, kv_heads, slots, head_dim] (see xgen.model.transformer.KVCache).
KEY_CACHE_AXES = ("batch", "kv_heads", "head_dim", "length")
VALUE_CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


def model_config_from_meta(fields: dict, where: str) -> ModelConfig:
    """The architecture a checkpoint's metadata records. Execution keys that checkpoints of
    earlier versions stored with it (remat, attention, attention_chunk) are dropped: the
    command's `execution` decides them."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    legacy = {"remat", "attention", "attention_chunk"}
    unknown = sorted(set(fields) - known - legacy)
    if unknown:
        raise ConfigError(f"{where}: its model config has keys this xgen does not know: {', '.join(unknown)}")
    kept = {k: v for k, v in fields.items() if k in known}
    if isinstance(kept.get("rope_scaling"), dict):
        scaling = kept["rope_scaling"]
        unknown = sorted(set(scaling) - {f.name for f in dataclasses.fields(RopeScalingConfig)})
        if unknown:
            raise ConfigError(f"{where}: its model.rope_scaling has keys this xgen does not know: {', '.join(unknown)}")
        kind = scaling.get("type", "default")
        if kind not in RopeType.__members__:
            raise ConfigError(f"{where}: its model.rope_scaling.type={kind!r} is not one of {', '.join(RopeType)}")
        kept["rope_scaling"] = RopeScalingConfig(**{**scaling, "type": RopeType(kind)})
        check_rope_scaling(kept["rope_scaling"], f"{where}: its model.rope_scaling")
    return ModelConfig(**kept)


def compute_dtype_name(execution: ExecutionConfig, hardware: HardwareConfig) -> str:
    """The matmul dtype a command runs with: its `execution.compute_dtype`, else the hardware's."""
    return str(execution.compute_dtype or hardware.compute_dtype)


@dataclass(frozen=True, eq=False)
class Runtime:
    model: ModelConfig
    execution: ExecutionConfig
    mesh: Mesh
    rules: Rules
    dtype: Any  # matmul inputs
    kv_dtype: Any  # generation's KV caches

    @classmethod
    def build(
        cls,
        model: ModelConfig,
        execution: ExecutionConfig,
        hardware: HardwareConfig,
        devices: Sequence[Any] | None = None,
    ) -> Runtime:
        """`devices`: a TPU topology's (ahead-of-time compilation) instead of this host's."""
        dtype = jnp.dtype(compute_dtype_name(execution, hardware))
        kv_dtype = jnp.dtype(str(execution.kv_cache_dtype)) if execution.kv_cache_dtype else dtype
        return cls(model, execution, make_mesh(hardware, devices), axis_rules(hardware), dtype, kv_dtype)

    @classmethod
    def of(cls, cfg: XGenConfig, model: ModelConfig | None = None, devices: Sequence[Any] | None = None) -> Runtime:
        """The run's runtime; `model` replaces `cfg.model` (a checkpoint's own architecture)."""
        return cls.build(model or cfg.model, cfg.execution, cfg.hardware, devices)

    @classmethod
    def local(cls, model: ModelConfig, execution: ExecutionConfig | None = None, dtype=jnp.float32) -> Runtime:
        """One device, no sharding: tests, benchmarks and small tools."""
        mesh = jax.make_mesh((1,) * len(MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=jax.devices()[:1])
        return cls(model, execution or ExecutionConfig(), mesh, (), jnp.dtype(dtype), jnp.dtype(dtype))

    # ---- the model and its placement ----------------------------------------------------

    @property
    def constrain(self):
        """The sharding hook the model calls on its activations (a no-op on one device)."""
        return activation_constraint(self.mesh, self.rules)

    def make_model(self, rngs: nnx.Rngs) -> XGenModel:
        return XGenModel(self.model, self.execution, dtype=self.dtype, constrain=self.constrain, rngs=rngs)

    @cached_property
    def graphdef(self):
        return nnx.graphdef(nnx.eval_shape(lambda: self.make_model(nnx.Rngs(0))))

    @cached_property
    def param_shapes(self) -> nnx.State:
        """The parameters as shapes, no memory allocated."""
        return nnx.state(nnx.eval_shape(lambda: self.make_model(nnx.Rngs(0))), nnx.Param)

    @property
    def scanned(self) -> bool:
        """Whether the model holds its blocks stacked (`execution.scan_layers`)."""
        return scans_layers(self.model, self.execution)

    @cached_property
    def disk_param_shapes(self) -> nnx.State:
        """The parameters as checkpoints store them (per layer), as shapes."""
        return self.on_disk(self.param_shapes)

    # ---- the layout checkpoints store -----------------------------------------------------

    def on_disk(self, tree: Any) -> Any:
        """An abstract tree (parameters, or a train state) in the checkpoints' per-layer layout,
        each layer's arrays placed as that layer's slice of the stack is."""
        return unstack_layers(tree, self.model.n_layers) if self.scanned else tree

    def to_disk(self, tree: Any) -> Any:
        """Arrays in the checkpoints' per-layer layout (a copy of each layer's slice when scanned)."""
        return self._unstack(tree) if self.scanned else tree

    def from_disk(self, tree: Any, shardings: Any) -> Any:
        """Arrays restored in the per-layer layout as the model holds them, on `shardings`."""
        return jax.jit(stack_layers, out_shardings=shardings)(tree) if self.scanned else tree

    @cached_property
    def _unstack(self):
        """Compiled once per train-state structure, not at every save."""
        return jax.jit(partial(unstack_layers, n_layers=self.model.n_layers))

    def shardings_of(self, abstract: Any) -> Any:
        """Shardings for any pytree of nnx Variables with logical names (a train state too)."""
        return state_shardings(abstract, self.mesh, self.rules)

    def placed(self, abstract: Any) -> Any:
        """`abstract` as ShapeDtypeStructs that carry their shardings (what restores and AOT take)."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.shardings_of(abstract)
        )

    @cached_property
    def abstract_params(self) -> nnx.State:
        return self.placed(self.param_shapes)

    def sharding(self, names: Sequence[str | None]) -> NamedSharding:
        return logical_sharding(self.mesh, self.rules, names)

    @property
    def batch_shards(self) -> int:
        """Devices the batch axis splits over: a batch's rows are a multiple of this."""
        axes = self.sharding(("batch",)).spec[0]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        return math.prod(self.mesh.shape[a] for a in axes)

    def param_count(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.param_shapes))

    # ---- parameters ---------------------------------------------------------------------

    def init_params(self, key: jax.Array) -> nnx.State:
        """Random parameters, created in place on their shards."""
        init = lambda k: nnx.state(self.make_model(nnx.Rngs(k)), nnx.Param)  # noqa: E731
        return jax.jit(init, out_shardings=self.shardings_of(self.param_shapes))(key)

    def restore_params(self, path: str | Path) -> nnx.State:
        """The newest checkpoint's parameters under `path`, each read onto its own shards."""
        params = checkpoint.restore_params(path, self.on_disk(self.abstract_params))
        return self.from_disk(params, self.shardings_of(self.param_shapes))

    def place_params(self, pure: dict) -> nnx.State:
        """Host arrays (a Hugging Face model's, as xgen's nested dict) onto their shards."""
        state = nnx.state(nnx.eval_shape(lambda: self.make_model(nnx.Rngs(0))), nnx.Param)
        nnx.replace_by_pure_dict(state, stack_layers(pure) if self.scanned else pure)
        return jax.device_put(state, self.shardings_of(self.param_shapes))

    def save_params(self, path: str | Path, params: nnx.State, meta: dict) -> Path:
        """A parameters-only checkpoint whose metadata records this architecture."""
        config = {**meta.get("config", {}), "model": dataclasses.asdict(self.model)}
        return checkpoint.save_params(path, self.to_disk(params), {**meta, "config": config})

    # ---- KV caches ----------------------------------------------------------------------

    def kv_cache_shapes(self, batch: int, slots: int) -> list[tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]]:
        """Every layer's (keys, values) cache as shapes with their shardings: batch split as
        activations are, kv_heads as the attention projections."""
        m = self.model
        n_kv, head_dim = m.n_kv_heads or m.n_heads, m.d_model // m.n_heads
        tensor = self.mesh.shape.get("tensor", 1)
        if n_kv % tensor:
            raise ConfigError(f"model {m.name}: {n_kv} key/value heads do not split over hardware.mesh.tensor={tensor}")
        k = jax.ShapeDtypeStruct((batch, n_kv, head_dim, slots), self.kv_dtype, sharding=self.sharding(KEY_CACHE_AXES))
        v = jax.ShapeDtypeStruct((batch, n_kv, slots, head_dim), self.kv_dtype, sharding=self.sharding(VALUE_CACHE_AXES))
        return [(k, v) for _ in range(m.n_layers)]

    def kv_caches(self, batch: int, slots: int) -> list[tuple[jax.Array, jax.Array]]:
        """Zeroed caches, allocated on their shards (never whole on one device)."""
        shapes = self.kv_cache_shapes(batch, slots)
        shardings = [(k.sharding, v.sharding) for k, v in shapes]
        zeros = lambda: [(jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype)) for k, v in shapes]  # noqa: E731
        return jax.jit(zeros, out_shardings=shardings)()
