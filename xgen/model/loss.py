"""The pre-training objective: mean next-token cross-entropy over the targets a mask keeps.

A pure function of (parameters, graph, batch), so training, SFT's held-out loss and any
evaluation compute the same number from the same code without importing the trainer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy over the target tokens where `mask` is 1 (all if None)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return losses.mean()
    mask = mask.astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
    return cross_entropy(logits, batch["targets"], batch.get("loss_mask"))
