"""The device mesh from `hardware`, and logical-axis names -> shardings through the rules table.

Code names logical axes (`embed`, `mlp`, `batch`...); the hardware config's
`logical_axis_rules` decides which mesh axes they split over, so switching from data
parallelism to FSDP to FSDP + tensor parallelism is a config override. The mesh uses
`AxisType.Auto` (GSPMD propagation, as MaxText), not this JAX's default explicit axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from xgen.config import ConfigError, HardwareConfig
from xgen.config.validate import mesh_shape
from xgen.model.layers import Constrain

MESH_AXES = ("data", "fsdp", "context", "tensor")
Rules = tuple[tuple[str, Any], ...]


def make_mesh(hw: HardwareConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over the first `hardware.num_devices` devices (of `devices`,
    e.g. a TPU topology description's for ahead-of-time compilation; default: this host's)."""
    sizes = mesh_shape(hw)
    if devices is None:
        devices = jax.devices()
        if devices[0].platform != hw.platform:
            raise ConfigError(
                f"hardware={hw.name} is for {hw.platform} devices but JAX sees {len(devices)} {devices[0].platform} "
                f"device(s) here; choose the hardware this machine has (hardware=cpu), or task=plan to compile for it"
            )
    devices = list(devices)
    if len(devices) < hw.num_devices:
        raise ConfigError(
            f"hardware={hw.name} wants {hw.num_devices} devices but JAX sees {len(devices)} "
            f"{devices[0].platform} device(s)"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices[: hw.num_devices])
    except NotImplementedError:
        # An axis that is no product of whole physical axes (fsdp 128 x context 4 on a v4's
        # 8x8x8 torus) takes part of one: JAX's device order, with a physical axis split.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices[: hw.num_devices], allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=types)


def topology_devices(hw: HardwareConfig) -> list[Any]:
    """The devices of `hardware.tpu_topology`, described by libtpu without any TPU attached."""
    if not hw.tpu_topology:
        raise ConfigError(f"hardware={hw.name} has no tpu_topology to compile for")
    try:
        from jax.experimental import topologies

        topology = topologies.get_topology_desc(
            topology_name=hw.tpu_topology,
            platform="tpu",
            chip_config_name=hw.tpu_chip_config,
            chips_per_host_bounds=tuple(hw.tpu_chips_per_host),
            num_slices=1,
            wrap=tuple(hw.tpu_wrap),
        )
    except Exception as ex:  # noqa: BLE001 - libtpu missing or refusing: one line, with the fix
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise ConfigError(
            f"compiling for {hw.tpu_topology} needs libtpu (pip install 'xgen[tpu]'): {first}"
        ) from None
    return list(topology.devices)


def axis_rules(hw: HardwareConfig) -> Rules:
    """The config's [[name, axes], ...] as the tuple of pairs flax's rule functions take."""
    rules = []
    for entry in hw.logical_axis_rules:
        name, axes = entry
        rules.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(rules)


def logical_sharding(mesh: Mesh, rules: Rules, names: Sequence[str | None]) -> NamedSharding:
    """The NamedSharding for an array whose axes have these logical names."""
    return nn.logical_to_mesh_sharding(PartitionSpec(*names), mesh, rules)


@dataclass(frozen=True)
class LogicalConstraint:
    """The sharding hook the model is given: it names logical axes, this maps them to the
    mesh. Called on an activation, flax's logical constraint (nothing on one device);
    `local(fn, ...)` runs a kernel XLA cannot split (Pallas) on each device's shard."""

    mesh: Mesh
    rules: Rules

    def __call__(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        if self.mesh.size == 1:
            return x
        return nn.with_logical_constraint(x, names, rules=self.rules, mesh=self.mesh)

    def mesh_axes(self, name: str) -> list[tuple[str, int]]:
        """The mesh axes the logical axis `name` splits over, with their sizes."""
        axes = nn.logical_to_mesh_axes((name,), self.rules)[0]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        return [(a, self.mesh.shape[a]) for a in axes]

    @property
    def platform(self) -> str:
        return self.mesh.devices.flat[0].platform

    def local(self, fn: Callable, in_names: Sequence[Sequence[str | None]], out_names: Sequence[str | None]) -> Callable:
        if self.mesh.size == 1:
            return fn
        spec = lambda names: nn.logical_to_mesh_axes(tuple(names), self.rules)  # noqa: E731
        in_specs = tuple(spec(names) for names in in_names)
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=spec(out_names), check_vma=False)


def activation_constraint(mesh: Mesh, rules: Rules) -> Constrain:
    """What the model calls on its main activations (see LogicalConstraint)."""
    return LogicalConstraint(mesh, rules)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for a pytree whose nnx Variables carry logical names; other leaves replicate."""
    return nn.logical_to_mesh_sharding(nnx.get_partition_spec(abstract_state), mesh, rules)
