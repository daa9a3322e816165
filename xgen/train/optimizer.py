"""AdamW with LLaMA's settings and a warmup + cosine schedule, all from optax, on one clock.

The learning rate is a function of the train state's step, never of optax's own update
counter: it is computed in the step, written into the optimizer state as an injected
hyperparameter (`optax.inject_hyperparams`) and logged from the same value. A skipped or
non-finite step, a rollback or `trainer.reset_optimizer` therefore cannot make the rate
applied differ from the rate logged. After a reset the schedule continues; a fresh warmup
happens only with `trainer.rewarm_steps`, from the step recorded in the optimizer state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from xgen.config import OptimizerConfig

_NEVER = -(2**30)  # rewarm start of an optimizer that was never reset: no ramp


def lr_schedule(opt: OptimizerConfig, total_steps: int, extensions: tuple[tuple[int, int], ...] = ()) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `decay_steps`.

    `extensions`: (step, new total) for each resume that changed the run's length (see
    `extend_schedule`). From each such step on, the rate decays by the same cosine shape from
    the rate it had there to the final rate at the new total, so it never jumps."""
    base = _warmup_cosine(opt, total_steps)
    if not extensions:
        return base
    pieces, value_at = [], base
    for start, total in extensions:
        begin = float(value_at(start))
        pieces.append((start, _cosine_from(begin, opt.lr * opt.min_lr_ratio, start, total)))
        value_at = pieces[-1][1]

    def schedule(step):
        lr = base(step)
        for start, piece in pieces:
            lr = jnp.where(step >= start, piece(step), lr)
        return lr

    return schedule


def _warmup_cosine(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    decay_steps = opt.decay_steps or total_steps
    # A run shorter than its warmup (a smoke test) still gets at least one cosine step.
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.lr,
        warmup_steps=min(opt.warmup_steps, decay_steps - 1),
        decay_steps=decay_steps,
        end_value=opt.lr * opt.min_lr_ratio,
    )


def _cosine_from(begin: float, end: float, start: int, total: int) -> optax.Schedule:
    """`begin` at `start`, cosine down to `end` at `total`, `end` after (a constant tail when
    the run is extended after its schedule ended: begin == end)."""
    span = max(total - start, 1)

    def schedule(step):
        frac = jnp.clip((step - start) / span, 0.0, 1.0)
        return end + (begin - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def continue_schedule(opt: OptimizerConfig, recorded: list[tuple[int, int]], total_steps: int, step: int) -> list[tuple[int, int]]:
    """The schedule record for resuming at `step` with `total_steps`, given the checkpoint's
    `recorded` one (`[(0, first total), (step, total), ...]`, the `lr_schedule` arguments).

    The length matters only when the decay follows the run (`optimizer.decay_steps` unset); a
    resume inside the first warmup just takes the new length (the warmup does not depend on
    it); any other change of length adds `(step, total_steps)`: from there the rate decays
    from its value at `step`, so the first resumed step's rate is the one the run had."""
    recorded = [tuple(r) for r in recorded]
    if opt.decay_steps:
        return [(0, total_steps)]
    if recorded[-1][1] == total_steps:
        return recorded
    if len(recorded) == 1 and step <= min(opt.warmup_steps, recorded[0][1] - 1, total_steps - 1):
        return [(0, total_steps)]
    return [*recorded, (step, total_steps)]


def decay_mask(params):
    """Weight decay on matrices only (embeddings and projections), not on norm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


class RewarmState(NamedTuple):
    """The step at which the optimizer state was last reset (checkpointed with it)."""

    start: jax.Array


def _rewarm_marker() -> optax.GradientTransformation:
    """Holds `RewarmState` in the optimizer state; leaves updates alone."""
    return optax.GradientTransformation(
        lambda params: RewarmState(jnp.asarray(_NEVER, jnp.int32)), lambda updates, state, params=None: (updates, state)
    )


def make_optimizer(opt: OptimizerConfig) -> optax.GradientTransformation:
    """Clip the global gradient norm, then AdamW (every `optimizer/` file is a variant of it:
    `name` labels the settings; Adam is weight_decay=0). The learning rate is a hyperparameter
    in the state that `with_learning_rate` sets before each update."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask", "mu_dtype"))
    return optax.chain(
        _rewarm_marker(),
        optax.clip_by_global_norm(opt.grad_clip),
        adamw(
            learning_rate=0.0,
            b1=opt.beta1,
            b2=opt.beta2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
            mu_dtype=jnp.dtype(opt.mu_dtype),
        ),
    )


def _is_injected(x: Any) -> bool:
    return isinstance(x, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def _is_rewarm(x: Any) -> bool:
    return isinstance(x, RewarmState)


def with_learning_rate(opt_state: optax.OptState, lr: jax.Array) -> optax.OptState:
    """The state with the rate the next update applies."""

    def put(s):
        if not _is_injected(s):
            return s
        return s._replace(hyperparams={**s.hyperparams, "learning_rate": jnp.asarray(lr, s.hyperparams["learning_rate"].dtype)})

    return jax.tree.map(put, opt_state, is_leaf=_is_injected)


def applied_learning_rate(opt_state: optax.OptState) -> jax.Array:
    """The rate the last update applied, read from the optimizer state."""
    (state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_injected) if _is_injected(s)]
    return state.hyperparams["learning_rate"]


def mark_reset(opt_state: optax.OptState, step: int | jax.Array) -> optax.OptState:
    """A freshly initialized state, recorded as reset at `step` (for `trainer.rewarm_steps`)."""
    return jax.tree.map(
        lambda s: RewarmState(jnp.asarray(step, jnp.int32)) if _is_rewarm(s) else s, opt_state, is_leaf=_is_rewarm
    )


def learning_rate_at(schedule: optax.Schedule, opt_state: optax.OptState, step: jax.Array, rewarm_steps: int) -> jax.Array:
    """The schedule at the train step, ramped linearly over `rewarm_steps` after a reset."""
    lr = schedule(step)
    if rewarm_steps <= 0:
        return lr
    (marker,) = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_rewarm) if _is_rewarm(s)]
    ramp = jnp.clip((step - marker.start + 1) / rewarm_steps, 0.0, 1.0)
    return lr * ramp
