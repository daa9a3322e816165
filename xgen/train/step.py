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


def _target_count(batch: dict[str, jax.Array]) -> jax.Array:
    mask = batch.get("loss_mask")
    return jnp.float32(batch["targets"].size) if mask is None else mask.sum().astype(jnp.float32)


def accumulated_grads(
    params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], micro_batches: int
) -> tuple[jax.Array, nnx.State]:
    """Loss and gradients of the whole batch, computed `micro_batches` rows at a time.

    Each micro-batch's mean loss is weighted by its share of the target tokens, so the
    result equals one pass over the whole batch (up to float rounding) with a fraction of
    the activation memory."""
    grad_fn = jax.value_and_grad(loss_fn)
    if micro_batches == 1:
        return grad_fn(params, graphdef, batch)
    split = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch)
    total = _target_count(batch)

    def one(carry, micro):
        loss, grads = grad_fn(params, graphdef, micro)
        w = _target_count(micro) / total
        acc_loss, acc_grads = carry
        return (acc_loss + w * loss, jax.tree.map(lambda a, g: a + w * g, acc_grads, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(one, (jnp.zeros((), jnp.float32), zeros), split)
    return loss, grads


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    micro_batches: int = 1,
) -> tuple[TrainState, dict[str, Any]]:
    """One AdamW update; returns the new state and this step's metrics (before clipping)."""
    loss, grads = accumulated_grads(state.params, graphdef, batch, micro_batches)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
        "learning_rate": schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
