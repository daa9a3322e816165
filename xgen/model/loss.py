"""The pre-training objective: mean next-token cross-entropy over the targets a mask keeps.

A pure function of (parameters, graph, batch), so training, SFT's held-out loss and any
evaluation compute the same number from the same code without importing the trainer.
With `execution.loss_chunk`, the output head and the cross-entropy run over chunks of the
length under `jax.checkpoint`: the backward pass recomputes each chunk's logits instead of
keeping them, so the largest activation of a long-context step, [batch, length, vocab]
float32, never exists; the loss and its gradients are the same up to float rounding.
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


def chunked_cross_entropy(model, hidden: jax.Array, targets: jax.Array, mask: jax.Array | None, chunk: int) -> jax.Array:
    """`cross_entropy(model.logits(hidden), targets, mask)` over `chunk` positions at a time."""
    b, t, _ = hidden.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    weights = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, -1).swapaxes(0, 1)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    w = jnp.pad(weights, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)  # padding weighs 0

    @jax.checkpoint
    def piece(total, hyw):
        h_i, y_i, w_i = hyw
        losses = optax.softmax_cross_entropy_with_integer_labels(model.logits(h_i).astype(jnp.float32), y_i)
        return total + (losses * w_i).sum(), None

    total, _ = jax.lax.scan(piece, jnp.zeros((), jnp.float32), (h, y, w))
    return total / (b * t if mask is None else jnp.maximum(weights.sum(), 1.0))


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(graphdef, params)
    inputs, positions, segments = batch["inputs"], batch.get("positions"), batch.get("segment_ids")
    if model.loss_chunk:
        hidden = model.hidden(inputs, positions, segments)
        return chunked_cross_entropy(model, hidden, batch["targets"], batch.get("loss_mask"), model.loss_chunk)
    return cross_entropy(model(inputs, positions, segments), batch["targets"], batch.get("loss_mask"))
