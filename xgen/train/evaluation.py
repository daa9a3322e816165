"""Evaluation inside the training loop: what runs, when, and where its numbers go.

An evaluator is any object with `name`, `every` (steps; 0: never) and `__call__(params,
step) -> {key: value}`. The Trainer runs each one every `every` steps and at the last step,
on the parameters in memory (every host calls it: they are global arrays), and writes the
results to eval.jsonl and the trackers (`MetricsLog.write_eval`). Two kinds exist:

- `HeldoutLoss` (here): the loss on `data_mix.heldout_share`'s documents, per source and
  over all of them, computed by the training loss (`xgen.model.loss`) on batches of the
  train step's shape and sharding, compiled once;
- `xgen.eval.inloop.BenchmarkEval`: log-likelihood benchmarks, built by the task (the
  trainer never imports xgen.eval).
"""

from __future__ import annotations

import logging
from functools import partial

import jax
import jax.numpy as jnp

from xgen.model.loss import loss_fn

log = logging.getLogger(__name__)


def _sums(params, batch, graphdef):
    """(sum of the masked next-token losses, tokens counted) of one batch."""
    count = batch["loss_mask"].astype(jnp.float32).sum()
    return loss_fn(params, graphdef, batch) * count, count


class HeldoutLoss:
    """Held-out loss per source (`heldout/<source>/loss`) and over every held-out token
    evaluated (`heldout/loss`); the batches are fixed at start-up, so every evaluation of
    a run reads the same tokens and successive values are comparable."""

    name = "heldout"

    def __init__(self, every: int, batches: dict[str, list[dict]], trainer):
        self.every, self.batches = every, batches
        self._global = trainer._global_batch
        self._fn = jax.jit(partial(_sums, graphdef=trainer.graphdef), in_shardings=(trainer.state_sharding.params, None))
        first = next(iter(batches.values()))[0]
        rows = first["inputs"].shape[0] * jax.process_count()  # hosts' rows stack along the batch axis
        abstract = {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), jnp.int32, sharding=trainer.tokens_sharding) for k, v in first.items()}
        self._compiled = self._fn.lower(trainer.abstract_state.params, abstract).compile()
        self.tokens = {name: int(sum(b["loss_mask"].sum() for b in source)) for name, source in batches.items()}

    def __call__(self, params, step: int) -> dict[str, float]:
        out, total, count = {}, 0.0, 0.0
        for name, source in self.batches.items():
            sums = [self._compiled(params, self._global(b)) for b in source]
            s, n = (float(sum(x[i] for x in sums)) for i in (0, 1))
            out[f"heldout/{name}/loss"] = s / n
            total, count = total + s, count + n
        out["heldout/loss"] = total / count
        return out
