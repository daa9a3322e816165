"""HumanEval (Chen et al., 2021) as openai/human-eval scores it: the report's Table 7.

Each problem's prompt (a signature and docstring) is completed `eval.n_samples` times
(the report: n=200 at temperature 0.2, top-p 0.95) and cut at the Codex stop strings; the
program `prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"` runs in
`xgen.eval.sandbox` (never in this process), and pass@k is the unbiased estimator
1 - C(n-c, k) / C(n, k) averaged over problems. Every sample's seed derives from
(seed, problem index, sample index), so results do not depend on eval.batch_size.

Programs of one generation batch run in the sandbox while the next batch generates. Finished
problems go to `<name>_partial.jsonl` (resume), all samples to `<name>_samples.jsonl` with
human-eval's fields (task_id, completion, passed, result).
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from xgen.config import ConfigError
from xgen.eval.common import (
    ItemStore,
    Progress,
    batched,
    check_truncation,
    data_fingerprint,
    input_budget,
    markdown,
    model_identity,
    model_label,
    read_records,
    score_settings,
    truncate_tokens,
    write_result,
)
from xgen.eval.sandbox import ExecResult, Sandbox

log = logging.getLogger(__name__)

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


# ---- problems and programs --------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def read_problems(path: str | Path) -> list[Problem]:
    """HumanEval.jsonl(.gz) rows as Problems; a row without one of FIELDS (as a string) or a
    repeated task_id is one error naming the file and row."""
    problems, seen = [], set()
    for n, row in enumerate(read_records(path, "HumanEval"), 1):
        missing = [f for f in FIELDS if not isinstance(row.get(f), str)]
        if missing:
            raise ConfigError(f"HumanEval: {path} record {n} lacks string field(s) {', '.join(missing)}")
        if row["task_id"] in seen:
            raise ConfigError(f"HumanEval: {path} record {n} repeats task_id {row['task_id']!r}")
        seen.add(row["task_id"])
        problems.append(Problem(*(row[f] for f in FIELDS)))
    if not problems:
        raise ConfigError(f"HumanEval: {path} holds no problems")
    return problems


def program_for(problem: Problem, completion: str) -> str:
    """What human-eval's check_correctness executes."""
    return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})"


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n passes | c of n pass):
    1 - C(n-c, k) / C(n, k), as a product that neither overflows nor cancels (human-eval's)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def sample_seed(seed: int, problem_index: int, sample_index: int) -> int:
    """A 32-bit seed for one sample, a function of these three numbers only."""
    digest = hashlib.blake2b(f"humaneval:{seed}:{problem_index}:{sample_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


# ---- sampling ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """Sample `sample_index` of problem `problem_index` (its position in the file)."""

    problem_index: int
    sample_index: int
    problem: Problem


Completer = Callable[[Sequence[Request]], list[str]]


class EngineCompleter:
    """Completes requests with `engine.generate`, one row each; a prompt longer than the
    engine leaves after `max_new_tokens` (or than `max_input_tokens`) is truncated."""

    def __init__(self, engine, *, max_new_tokens: int, temperature: float, top_p: float, stop: Sequence[str],
                 seed: int, max_input_tokens: int | None = None, truncation: str = "left"):  # fmt: skip
        self.engine, self.seed, self.truncation = engine, seed, truncation
        self.budget = input_budget(engine.max_len, max_new_tokens, max_input_tokens)
        self.max_new_tokens, self.temperature, self.top_p, self.stop = max_new_tokens, temperature, top_p, tuple(stop)
        self._prompt_ids: dict[str, list[int]] = {}

    def prompt_ids(self, problem: Problem) -> list[int]:
        ids = self._prompt_ids.get(problem.task_id)
        if ids is None:
            full = self.engine.tokenizer.encode(problem.prompt)
            ids = truncate_tokens(full, self.budget, self.truncation)
            if len(ids) < len(full):
                log.warning("%s: prompt of %d tokens truncated to %d (%s)", problem.task_id, len(full), len(ids), self.truncation)
            self._prompt_ids[problem.task_id] = ids
        return ids

    def settings_for(self, request: Request):
        from xgen.generate.engine import SamplingConfig

        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop,
            seed=sample_seed(self.seed, request.problem_index, request.sample_index),
        )

    def __call__(self, requests: Sequence[Request]) -> list[str]:
        prompts = [self.prompt_ids(r.problem) for r in requests]
        return [c.text for c in self.engine.generate(prompts, [self.settings_for(r) for r in requests])]


# ---- the run ----------------------------------------------------------------------------


def problem_record(problem: Problem, completions: Sequence[str], results: Sequence[ExecResult]) -> dict:
    """What resume keeps of a finished problem: its samples and how each fared."""
    samples = [{"completion": t, "passed": r.passed, "result": r.result} for t, r in zip(completions, results)]
    return {"n": len(samples), "c": sum(r.passed for r in results), "samples": samples}


def summarize(problems: Sequence[Problem], records: dict[str, dict], ks: Sequence[int]) -> dict:
    """pass@k per problem and averaged over problems (human-eval's mean)."""
    per_problem = {}
    for p in problems:
        r = records[p.task_id]
        per_problem[p.task_id] = {
            "n": r["n"],
            "c": r["c"],
            "pass@k": {f"pass@{k}": estimate_pass_at_k(r["n"], r["c"], k) for k in ks},
        }
    means = {f"pass@{k}": float(np.mean([v["pass@k"][f"pass@{k}"] for v in per_problem.values()])) for k in ks}
    return {"problems": len(problems), "pass@k": means, "per_problem": per_problem}


def evaluate(
    problems: Sequence[Problem],
    complete: Completer | None,
    sandbox: Sandbox,
    *,
    n: int,
    pass_k: Sequence[int],
    batch_size: int,
    store: ItemStore,
) -> dict:
    """Sample and run every problem not already in `store` (`complete` may be None when all
    are), `batch_size` requests per `complete` call; pass@k for the k in `pass_k` (all <= n)."""
    todo = [(i, p) for i, p in enumerate(problems) if p.task_id not in store]
    if todo and complete is None:
        raise ValueError("problems remain but no completer was given")
    texts: dict[int, list[str | None]] = {i: [None] * n for i, _ in todo}
    runs: dict[int, list[Future | None]] = {i: [None] * n for i, _ in todo}
    unscored = dict(todo)
    progress = Progress("humaneval samples", len(todo) * n)

    def settle(wait: bool) -> None:
        for i, problem in list(unscored.items()):
            futures = runs[i]
            if all(f is not None for f in futures) and (wait or all(f.done() for f in futures)):
                store.add(problem.task_id, problem_record(problem, texts[i], [f.result() for f in futures]))
                del unscored[i], texts[i], runs[i]

    requests = (Request(i, j, p) for i, p in todo for j in range(n))
    for batch in batched(requests, max(1, batch_size)):
        for request, text in zip(batch, complete(batch), strict=True):
            texts[request.problem_index][request.sample_index] = text
            runs[request.problem_index][request.sample_index] = sandbox.submit(program_for(request.problem, text))
        settle(wait=False)
        progress.advance(len(batch), note=f"{len(problems) - len(unscored)} of {len(problems)} problems scored so far")
    settle(wait=True)
    return summarize(problems, {p.task_id: store.get(p.task_id) for p in problems}, pass_k)


def write_samples(path: Path, problems: Sequence[Problem], store: ItemStore) -> None:
    """Every sample, one JSON line each, in problem order (human-eval's results file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in problems:
            for s in store.get(p.task_id)["samples"]:
                f.write(json.dumps({"task_id": p.task_id, **s}) + "\n")
    tmp.replace(path)


def markdown_table(result: dict, model: str = "model") -> str:
    """Laid out like the report's Table 7 (pass@k in %)."""
    keys = list(result["pass@k"])
    return markdown([["Models", *keys], [model, *(f"{100 * result['pass@k'][k]:.2f}" for k in keys)]])


def check_settings(ev) -> list[int]:
    """The k to report (those <= n); one error per impossible setting."""
    if ev.n_samples < 1:
        raise ConfigError(f"HumanEval: eval.n_samples={ev.n_samples} must be at least 1")
    if not ev.pass_k or any(k < 1 for k in ev.pass_k):
        raise ConfigError(f"HumanEval: eval.pass_k={list(ev.pass_k)} must be positive integers")
    check_truncation(ev.truncation)  # before the model loads
    if ev.sandbox.timeout_s <= 0 or ev.sandbox.memory_mb < 64 or ev.sandbox.workers < 1:
        raise ConfigError("HumanEval: eval.sandbox needs timeout_s > 0, memory_mb >= 64 and workers >= 1")
    ks = sorted({k for k in ev.pass_k if k <= ev.n_samples})
    if not ks:
        raise ConfigError(f"HumanEval: no k in eval.pass_k={list(ev.pass_k)} is <= eval.n_samples={ev.n_samples}")
    if len(ks) < len(set(ev.pass_k)):
        log.warning("HumanEval: pass@k needs k <= n=%d; reporting k in %s only", ev.n_samples, ks)
    if ev.temperature <= 0 and ev.n_samples > 1:
        log.warning("HumanEval: temperature 0 is greedy: all %d samples of a problem are the same", ev.n_samples)
    return ks


def run_benchmark(cfg, run_dir: Path) -> dict:
    """`task=eval eval=humaneval`: <name>.json/.md and <name>_samples.jsonl in `run_dir`."""

    ev = cfg.eval
    problems = read_problems(ev.data_path)[: ev.limit]  # before loading the model: fail fast
    if not problems:
        raise ConfigError(f"HumanEval: eval.limit={ev.limit} leaves no problems")
    ks = check_settings(ev)
    settings = {
        "n_samples": ev.n_samples,
        "temperature": ev.temperature,
        "top_p": ev.top_p,
        "max_new_tokens": ev.max_new_tokens,
        "stop": list(ev.stop),
        "seed": cfg.seed,
        "max_input_tokens": ev.max_input_tokens,
        "truncation": ev.truncation,
        "sandbox": {"timeout_s": ev.sandbox.timeout_s, "cpu_s": ev.sandbox.cpu_s, "memory_mb": ev.sandbox.memory_mb,
                    "disk_mb": ev.sandbox.disk_mb},
    }
    store = ItemStore(
        run_dir / f"{ev.name}_partial.jsonl", {**settings, **score_settings(cfg)},
        model=model_identity(cfg.checkpoint), data=data_fingerprint(ev.data_path),
    )  # fmt: skip
    with Sandbox(ev.sandbox) as sandbox:  # before the model: a jail that cannot be built fails fast
        complete = None
        if any(p.task_id not in store for p in problems):
            from xgen.generate.load import load_engine

            complete = EngineCompleter(
                load_engine(cfg),
                max_new_tokens=ev.max_new_tokens,
                temperature=ev.temperature,
                top_p=ev.top_p,
                stop=ev.stop,
                seed=cfg.seed,
                max_input_tokens=ev.max_input_tokens,
                truncation=ev.truncation,
            )
        result = evaluate(problems, complete, sandbox, n=ev.n_samples, pass_k=ks, batch_size=ev.batch_size, store=store)
        network_isolated, isolation = sandbox.network_isolated, sandbox.isolation
    samples_path = run_dir / f"{ev.name}_samples.jsonl"
    write_samples(samples_path, problems, store)
    result = {
        **settings,
        "samples_file": samples_path.name,
        "network_isolated": network_isolated,  # None: every problem was resumed
        "sandbox_isolation": isolation,  # "namespaces" (the jail), "process" (limits only), None: resumed
        **result,
        "identity": store.identity,
    }
    result = write_result(run_dir, cfg, result, markdown_table(result, model_label(cfg)))
    log.info("HumanEval: %s over %d problems; written to %s", result["pass@k"], result["problems"], run_dir)
    return result
