"""The training step: a pure function of (state, batch), jit-compiled once (the loss is `xgen.model.loss`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from xgen.config import SpikeConfig
from xgen.model.loss import loss_fn
from xgen.train.optimizer import learning_rate_at, with_learning_rate


@struct.dataclass
class RunningStats:
    """Exponential running mean and variance of the loss and the gradient norm."""

    count: jax.Array  # int32: steps folded in (spikes and non-finite steps are not)
    mean: jax.Array  # [2]: loss, grad norm
    var: jax.Array  # [2]

    @classmethod
    def zeros(cls) -> "RunningStats":
        return cls(jnp.zeros((), jnp.int32), jnp.zeros((2,), jnp.float32), jnp.zeros((2,), jnp.float32))

    def update(self, x: jax.Array, decay: float) -> "RunningStats":
        first = self.count == 0
        d = jnp.where(first, 0.0, decay)
        delta = x - self.mean
        mean = self.mean + (1 - d) * delta
        var = jnp.where(first, 0.0, d * (self.var + (1 - d) * delta**2))
        return RunningStats(self.count + 1, mean, var)


@struct.dataclass
class TrainState:
    """Everything a checkpoint must hold to continue a run bit for bit (with the data state)."""

    step: jax.Array  # int32 scalar: batches consumed (optimizer updates, plus skipped steps)
    params: nnx.State
    opt_state: optax.OptState
    stats: RunningStats


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
    spike: SpikeConfig = SpikeConfig(),
    micro_batches: int = 1,
    rewarm_steps: int = 0,
) -> tuple[TrainState, dict[str, Any]]:
    """One AdamW update, unless the loss or gradients are non-finite (never applied) or the
    step is a spike under a skip/rollback policy; returns the new state and the metrics."""
    loss, grads = accumulated_grads(state.params, graphdef, batch, micro_batches)
    grad_norm = optax.global_norm(grads)
    observed = jnp.stack([loss, grad_norm])
    finite = jnp.all(jnp.isfinite(observed))
    limit = state.stats.mean + spike.threshold * jnp.sqrt(state.stats.var)
    is_spike = finite & (state.stats.count >= spike.warmup_steps) & jnp.any(observed > limit)
    apply = finite & ~(is_spike & (spike.policy != "log"))

    # One clock: the rate applied is the schedule at the train step, and it is what is logged.
    lr = learning_rate_at(schedule, state.opt_state, state.step, rewarm_steps)

    def update(state: TrainState) -> tuple[nnx.State, optax.OptState]:
        updates, opt_state = tx.update(grads, with_learning_rate(state.opt_state, lr), state.params)
        return optax.apply_updates(state.params, updates), opt_state

    # A branch, not a select: the skipped path reads no optimizer state, and the taken one
    # updates the donated buffers in place (a select would read both copies of everything).
    params, opt_state = jax.lax.cond(apply, update, lambda s: (s.params, s.opt_state), state)
    healthy = finite & ~is_spike
    stats = jax.tree.map(
        lambda a, b: jnp.where(healthy, a, b), state.stats.update(observed, spike.decay), state.stats
    )
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, stats=stats)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(new_state.params),
        "learning_rate": lr,
        "spike": is_spike,
        "nonfinite": ~finite,
        "skipped": ~apply,
    }
    return new_state, metrics
