"""Scanned layers: the blocks' parameters stacked on a leading `layers` axis, run by `lax.scan`.

A 32-layer model unrolled compiles 32 copies of the block; scanned, XLA compiles the block
once and loops over it (MaxText's `scan_layers`, Levanter's `Stacked`), so compile time and
program size stop growing with depth. Stacking is only how parameters are held in memory:
the per-layer layout (`layers/0/attn/...`) is the one checkpoints and Hugging Face
conversion use, and `stack_layers` / `unstack_layers` convert between the two, for any tree
that holds nnx States (a train state's parameters and the optimizer moments beside them).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

LAYERS = "layers"  # the module attribute, state key and logical axis name of the stack


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _stack_values(values: list[Any]) -> Any:
    if isinstance(values[0], np.ndarray):
        return np.stack(values)
    return jnp.stack(values)


def _stack_leaf(*leaves: Any) -> Any:
    """Layer-wise leaves as one leaf with a leading `layers` axis (and that logical name)."""
    if _is_variable(leaves[0]):
        first = leaves[0]
        names = first.get_metadata().get("out_sharding")
        updates = {"out_sharding": (LAYERS, *names)} if names else {}
        return first.copy(_stack_values([v.get_value() for v in leaves]), **updates)
    return _stack_values(list(leaves))


def _slice_value(value: Any, i: int) -> Any:
    if isinstance(value, jax.ShapeDtypeStruct):
        sharding = value.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(value.shape[1:], value.dtype, sharding=sharding)
    return value[i]


def _check_layers(stacked: Any, n_layers: int) -> None:
    """A stack of another depth is an error: indexing past its end would clamp, not fail."""
    for leaf in jax.tree.leaves(stacked):
        if leaf.shape[:1] != (n_layers,):
            raise ValueError(f"a stacked layer array of shape {leaf.shape} does not hold {n_layers} layers")


def _slice_leaf(leaf: Any, i: int) -> Any:
    """Layer `i` of a stacked leaf (for abstract leaves: the shape and sharding one layer has)."""
    if _is_variable(leaf):
        names = leaf.get_metadata().get("out_sharding")
        updates = {"out_sharding": tuple(names[1:])} if names else {}
        return leaf.copy(_slice_value(leaf.get_value(), i), **updates)
    return _slice_value(leaf, i)


def _rebuild(like: Mapping, items: dict) -> Any:
    return nnx.State(items) if isinstance(like, nnx.State) else type(like)(items)


def is_per_layer(layers: Any) -> bool:
    """Whether a `layers` entry is keyed by layer number (0, 1, ...) rather than stacked."""
    return isinstance(layers, Mapping) and len(layers) > 0 and all(isinstance(k, int) for k in layers)


def stack(per_layer: Mapping[int, Any]) -> Any:
    """{0: layer state, 1: ...} -> one state whose arrays have a leading layers axis."""
    layers = [per_layer[i] for i in range(len(per_layer))]
    return jax.tree.map(_stack_leaf, *layers, is_leaf=_is_variable)


def unstack(stacked: Any, n_layers: int) -> dict[int, Any]:
    """One stacked state -> {0: layer state, 1: ...}."""
    _check_layers(stacked, n_layers)
    return {i: jax.tree.map(lambda leaf: _slice_leaf(leaf, i), stacked, is_leaf=_is_variable) for i in range(n_layers)}


def _convert_layers(tree: Any, convert: Callable[[Any], Any | None]) -> Any:
    """`tree` with the `layers` entry of every mapping that has one replaced by
    `convert(entry)` (None: leave it), for the parameters and each optimizer moment alike."""

    def visit(node: Any) -> Any:
        if isinstance(node, Mapping) and LAYERS in node:
            # A State holds nested plain dicts (its raw mapping): convert those, rewrap the top.
            raw = node.raw_mapping if isinstance(node, nnx.State) else node
            new = convert(raw[LAYERS])
            if new is not None:
                return _rebuild(node, {**dict(raw), LAYERS: new})
        return node

    is_state = lambda x: isinstance(x, Mapping) and LAYERS in x  # noqa: E731
    return jax.tree.map(visit, tree, is_leaf=is_state)


def stack_layers(tree: Any) -> Any:
    """Every per-layer `layers` entry of `tree` stacked (nnx States, or plain dicts of arrays)."""
    return _convert_layers(tree, lambda layers: stack(layers) if is_per_layer(layers) else None)


def unstack_layers(tree: Any, n_layers: int) -> Any:
    """Every stacked `layers` entry of `tree` split into {0: ..., n_layers - 1: ...}; for
    abstract trees (ShapeDtypeStructs with shardings) each layer's shape and sharding."""
    return _convert_layers(tree, lambda layers: None if is_per_layer(layers) else unstack(layers, n_layers))


def stack_blocks(blocks: list[nnx.Module]) -> nnx.Module:
    """Identical modules as one whose parameters are stacked: the same random init as the
    unrolled model (the blocks are built one by one from the same keys), so a seed gives
    one model whichever way it runs."""
    graphdef, _ = nnx.split(blocks[0])
    states = {i: nnx.state(block) for i, block in enumerate(blocks)}
    return nnx.merge(graphdef, stack(states))


def scan_blocks(
    stacked: nnx.Module, run_block: Callable[..., jax.Array], x: jax.Array, *args: Any, policy: Any = None, remat: bool = False
) -> jax.Array:
    """x through every layer of `stacked` in order, one compiled body; with `remat`, each
    layer's activations are recomputed in the backward pass as `policy` says."""
    graphdef, state = nnx.split(stacked)

    def body(h: jax.Array, layer_state: Any) -> tuple[jax.Array, None]:
        return run_block(nnx.merge(graphdef, layer_state), h, *args), None

    if remat:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, state)
    return x


def layer_of(stacked: nnx.Module, i: int) -> nnx.Module:
    """Layer `i` of a stacked module, as an ordinary block (decoding steps through layers)."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: _slice_leaf(leaf, i), state, is_leaf=_is_variable))
