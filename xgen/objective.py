"""The one number a Hydra sweeper optimizes, read from what a task returned.

`python -m xgen.run -m hydra/sweeper=optuna ...` hands each job's return value to the
sweeper; `xgen.run` returns `objective(task, result)`:

- pretrain, pretrain_all (its last stage), sft: the final loss, summary.json's `final_loss`
  (the mean over the last logged window); sft prefers the held-out response loss of the
  final checkpoint when `sft.heldout` is set. Lower is better: `direction: minimize`.
- eval: the benchmark's headline, higher is better (`direction: maximize`): MMLU's average
  accuracy, Table 6's cells averaged, HumanEval's pass@1, passkey accuracy, ROUGE-L averaged
  over the summarization tasks, the judge's average (MT-Bench, long-form QA), AlpacaEval's win
  rate; except ppl_by_position, whose perplexity is lower-better (one checkpoint only).
- Other tasks: None (a sweep over them fails its trials, as it should).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional


def _mean(values: Iterable[Any]) -> Optional[float]:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _only_curve(result: dict) -> Optional[float]:
    curves = list(result["curves"].values())
    return curves[0]["ppl"] if len(curves) == 1 else None


def _pass_at_1(result: dict) -> Optional[float]:
    scores = result["pass@k"]
    return scores.get("pass@1", next(iter(scores.values()), None))


# eval.kind -> its headline number, from the result task=eval returns (and writes as <name>.json).
HEADLINES: dict[str, Callable[[dict], Optional[float]]] = {
    "mmlu": lambda r: r["average"],
    "zeroshot": lambda r: _mean(r["table"].values()),
    "humaneval": _pass_at_1,
    "passkey": lambda r: r["accuracy"],
    "ppl_by_position": _only_curve,
    "summarization": lambda r: _mean(task["rougeL"] for task in r["tasks"].values()),
    "mt_bench": lambda r: r["average"],
    "longform_qa": lambda r: r["average"],
    "alpaca_eval": lambda r: r["win_rate"],
}


def _training_loss(summary: dict) -> Optional[float]:
    heldout = summary.get("heldout_response_loss")
    return heldout["final"] if heldout else summary.get("final_loss")


def objective(task: str, result: Any) -> Optional[float]:
    """The task's objective as a float, or None when it has none (or the run trained nothing)."""
    if task in ("pretrain", "sft") and isinstance(result, dict):
        value = _training_loss(result)
    elif task == "pretrain_all" and isinstance(result, list) and result:
        value = _training_loss(result[-1])
    elif task == "eval" and isinstance(result, dict) and result.get("kind") in HEADLINES:
        value = HEADLINES[result["kind"]](result)
    else:
        return None
    return None if value is None else float(value)
