"""AdamW with LLaMA's settings and a warmup + cosine schedule, all from optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from xgen.config import OptimizerConfig


def lr_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `decay_steps`."""
    decay_steps = opt.decay_steps or total_steps
    # A run shorter than its warmup (a smoke test) still gets at least one cosine step.
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.lr,
        warmup_steps=min(opt.warmup_steps, decay_steps - 1),
        decay_steps=decay_steps,
        end_value=opt.lr * opt.min_lr_ratio,
    )


def decay_mask(params):
    """Weight decay on matrices only (embeddings and projections), not on norm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Clip the global gradient norm, then AdamW (every `optimizer/` file is a variant of it:
    `name` labels the settings; Adam is weight_decay=0)."""
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip),
        optax.adamw(
            schedule,
            b1=opt.beta1,
            b2=opt.beta2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
            mu_dtype=jnp.dtype(opt.mu_dtype),
        ),
    )
