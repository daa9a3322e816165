"""Choosing the next token from logits, with settings per row of the batch.

Each row has its own temperature (0: greedy), top-k (0: off), top-p (1: off) and seed, so
requests with different settings share one batch, and a row's sample depends only on its
own seed and step: the same request gives the same completion whether batched or not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

N_TOP_LOGPROBS = 5  # alternatives returned per token (OpenAI's API allows up to 5)


def _sample_row(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array):
    """One row: filter the sorted distribution by top-k then top-p, sample from what is left."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    sorted_logits = scaled[order]
    rank = jnp.arange(scaled.shape[-1])
    keep = (top_k <= 0) | (rank < top_k)
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf))
    keep &= (jnp.cumsum(probs) - probs) < top_p  # the smallest prefix whose mass reaches top_p
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf))
    return order[choice]


def next_tokens(
    logits: jax.Array,
    seeds: jax.Array,
    step: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    logprob_logits: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """logits [B, V] float32 -> (ids [B], their logprobs [B], top ids [B, 5], top logprobs [B, 5]).

    `step` (the index of the token being chosen) is one number or one per row: rows of a
    continuous batch are at different steps. Logprobs are the model's own distribution
    (before temperature and filtering), as OpenAI's API reports them. Sorting the
    vocabulary is skipped when every row is greedy. `logprob_logits` (default: `logits`) are
    the logits the reported logprobs normalize: the head's every row, where `logits` hide
    the padding rows from the sampler (`Engine.score_all_rows`)."""
    scored = logits if logprob_logits is None else logprob_logits
    logprobs = jax.nn.log_softmax(scored.astype(jnp.float32), axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        steps = jnp.broadcast_to(step, seeds.shape)
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
        return jax.vmap(_sample_row)(logits, keys, temperature, top_k, top_p).astype(jnp.int32)

    ids = jax.lax.cond(jnp.all(temperature <= 0), lambda: greedy, sampled)
    ids = jnp.where(temperature <= 0, greedy, ids)
    chosen = jnp.take_along_axis(logprobs, ids[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, N_TOP_LOGPROBS)
    return ids, chosen, top_ids, top_lp
