"""Building blocks of the LLaMA/XGen transformer: linear maps and RMSNorm (rotary embeddings: rope.py).

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `vocab`, ...) as
metadata; `xgen.parallel` maps them to mesh axes with a rules table, so the model never
names a device. Parameters are float32; matmul inputs are cast to the compute dtype and
accumulate in float32 (the report: float32 everywhere but bf16 matmuls).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Applies a sharding constraint to an activation given its logical axis names.
Constrain = Callable[[jax.Array, Sequence[str | None]], jax.Array]


def no_constraint(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """The default Constrain: leave placement to XLA (one device, or tests)."""
    del names
    return x


def run_local(constrain: Constrain, fn: Callable, in_names: Sequence[Sequence[str | None]], out_names: Sequence[str | None]) -> Callable:
    """`fn` run on each device's shard of its inputs (a shard_map over the mesh the sharding
    hook knows, axes named logically), for kernels XLA cannot split itself (Pallas); `fn`
    unchanged when the hook knows no mesh."""
    local = getattr(constrain, "local", None)
    return fn if local is None else local(fn, in_names, out_names)


def kernel_platform(constrain: Constrain) -> str:
    """The platform the model compiles for: the hook's mesh's (a TPU topology's, for
    ahead-of-time compilation on a CPU host), else JAX's default backend."""
    return getattr(constrain, "platform", None) or jax.default_backend()


def logical_param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
    """A float32 parameter annotated with logical axis names (read by `nnx.get_partition_spec`)."""
    assert value.ndim == len(names), (value.shape, names)
    return nnx.Param(value, eager_sharding=False, out_sharding=tuple(names))


class Linear(nnx.Module):
    """y = x @ W without bias; W is [d_in, d_out], the transpose of a PyTorch Linear weight."""

    def __init__(self, d_in: int, d_out: int, names: tuple[str, str], *, std: float, dtype, rngs: nnx.Rngs):
        self.kernel = logical_param(std * jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32), names)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # As one 2-D matmul: XLA's CPU backend runs the weight gradient of a [B, T, D] x [D, F]
        # product 1.5x slower than the same [B*T, D] x [D, F] one (measured).
        flat = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = jnp.matmul(flat, self.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class RMSNorm(nnx.Module):
    """LLaMA's RMSNorm, computed in float32."""

    def __init__(self, dim: int, *, eps: float):
        self.scale = logical_param(jnp.ones((dim,), jnp.float32), ("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * self.scale[...]
