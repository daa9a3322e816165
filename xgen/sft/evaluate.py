"""The loss on held-out response tokens: how much of the instruction data a model learned
beyond what the base model already knew."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xgen.model.loss import loss_fn
from xgen.runtime import Runtime
from xgen.sft.packing import Rows, to_model_batch


def response_loss(runtime: Runtime, params: nnx.State, rows: Rows, batch_size: int = 8) -> float:
    """Mean cross-entropy over every trained target token of `rows` (all rows weigh by
    their trained tokens, not equally), on the runtime's mesh."""
    graphdef = runtime.graphdef
    batch_size = -(-batch_size // runtime.batch_shards) * runtime.batch_shards
    batch_sharding = runtime.sharding(("batch", "length"))

    @jax.jit
    def summed(params, batch):
        n = batch["loss_mask"].sum()
        return loss_fn(params, graphdef, batch) * n, n

    total, count = 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        idx = np.arange(start, min(start + batch_size, len(rows)))
        idx = np.pad(idx, (0, batch_size - len(idx)), constant_values=idx[-1])  # one shape
        batch = to_model_batch(rows[idx])
        weight = np.zeros(batch_size, np.int32)
        weight[: min(batch_size, len(rows) - start)] = 1
        batch["loss_mask"] = batch["loss_mask"] * weight[:, None]
        s, n = summed(params, {k: jax.device_put(jnp.asarray(v), batch_sharding) for k, v in batch.items()})
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)
