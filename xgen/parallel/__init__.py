"""Partitioning: the device mesh and the logical-axis rules table."""

from xgen.parallel.mesh import (
    activation_constraint,
    axis_rules,
    logical_sharding,
    make_mesh,
    state_shardings,
    topology_devices,
)

__all__ = ["activation_constraint", "axis_rules", "logical_sharding", "make_mesh", "state_shardings", "topology_devices"]
