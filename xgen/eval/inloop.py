"""Benchmarks during training: the log-likelihood benchmarks on the parameters in memory.

`trainer.eval_tasks` names `eval/` configs (zeroshot, mmlu_0shot, mmlu_5shot). Their data
is read and checked once, before the first step (a missing file fails at start-up, not
hours in); every `trainer.eval_tasks_every` steps each is scored by an `Engine` over the
Trainer's own runtime and the train state's parameters, on every host, without a checkpoint
written or read. The scoring is `task=eval`'s own (`zeroshot.evaluate`, `mmlu.evaluate`
with `EnginePredictor`, the same normalization, `eval.normalize_over_all_rows`), so a number logged
at step N equals `task=eval` on the checkpoint of step N (tests/train/test_in_loop_eval.py).
Nothing is resumed between evaluations: each scores every item afresh.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from xgen.config import ConfigError, EvalConfig
from xgen.eval import mmlu, zeroshot
from xgen.eval.common import ItemStore
from xgen.eval.loglik import loglikelihood

log = logging.getLogger(__name__)


@dataclass
class _Benchmark:
    cfg: EvalConfig
    data: object  # zeroshot: {task: items}; mmlu: (subjects, splits)


class BenchmarkEval:
    """`__call__(params, step)` -> {"<benchmark>/<task>/<metric>": value, ...}."""

    name = "benchmarks"

    def __init__(self, evals: list[EvalConfig], every: int, runtime, tokenizer, max_len: int | None):
        self.every = every
        self.runtime, self.tokenizer, self.max_len = runtime, tokenizer, max_len
        self.benchmarks = [_Benchmark(ev, _read(ev)) for ev in evals]
        self._engines: dict[bool, object] = {}

    def _engine_for(self, params, all_rows: bool):
        """One Engine per normalization (`eval.normalize_over_all_rows`, as task=eval's): its
        compiled programs take the parameters as an argument, so each evaluation reuses them."""
        from xgen.generate.engine import Engine

        if all_rows not in self._engines:
            self._engines[all_rows] = Engine(self.runtime, params, self.tokenizer, max_len=self.max_len, score_all_rows=all_rows)
        engine = self._engines[all_rows]
        engine.params = params
        return engine

    def __call__(self, params, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for bench in self.benchmarks:
            ev = bench.cfg
            engine = self._engine_for(params, ev.normalize_over_all_rows)
            if ev.kind == "zeroshot":
                store = ItemStore(None, {})
                summary = zeroshot.evaluate(
                    bench.data, lambda reqs: loglikelihood(engine, reqs, ev.batch_size), store, chunk=ev.batch_size
                )
                for task, entry in summary.items():
                    out.update({f"{ev.name}/{task}/{m}": float(entry[m]) for m in zeroshot.TASKS[task].metrics if m in entry})
            else:
                subjects, splits = bench.data
                result = mmlu.evaluate(
                    ev.data_path, engine.tokenizer, engine.max_len, mmlu.EnginePredictor(engine, ev.batch_size),
                    shots=ev.shots, max_questions=ev.limit, chunk=ev.batch_size, subjects=subjects, splits=splits,
                )  # fmt: skip
                out[f"{ev.name}/average"] = float(result["average"])
                out.update({f"{ev.name}/{c}": float(v["accuracy"]) for c, v in result["categories"].items()})
        return out


def _read(ev: EvalConfig):
    """A benchmark's items, read and checked now (before any step), as task=eval reads them."""
    if ev.kind == "zeroshot":
        return zeroshot.read_items(ev)
    if ev.kind == "mmlu":
        return mmlu.read_all(ev)
    raise ConfigError(f"trainer.eval_tasks: {ev.name} (kind {ev.kind}) is not a log-likelihood benchmark")
