"""The loss and the training step: pure functions of (params, batch), jit-compiled once."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """Everything a checkpoint must hold to continue a run bit for bit (with the data state)."""

    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: nnx.State
    opt_state: optax.OptState


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


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, Any]]:
    """One AdamW update; returns the new state and this step's metrics (before clipping)."""
    loss, grads = jax.value_and_grad(loss_fn)(state.params, graphdef, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
