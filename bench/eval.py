"""Evaluation scoring benchmarks, side by side in one run; figures go into docs/performance.md.

    python bench/eval.py

1. MMLU letters: reading " A".." D" at each prompt's last position with
   `Engine.next_token_logprobs` (one sequence per question) against scoring `prompt + letter`
   for the four letters with `Engine.score` (four sequences per question, the way a
   log-likelihood harness asks), on the same 5-shot prompts; also the largest difference
   between the two methods' log-probs (they must agree).
2. Log-likelihood requests (`xgen.eval.loglik`, what `eval=zeroshot` sends): requests per
   second at `batch_size` 1 against 16, and against scoring whole sequences with
   `Engine.score`, on the zero-shot fixtures' requests.
Both on the `small` model (random weights, float32); medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data import write_section  # noqa: E402
from bench.generate import xgen_engine  # noqa: E402
from bench.train import xgen_config  # noqa: E402


def mmlu_items(engine, questions: int) -> list:
    from xgen.eval.fixtures.mmlu import write_mmlu
    from xgen.eval.mmlu import build_item, read_split

    with tempfile.TemporaryDirectory() as tmp:
        root = write_mmlu(tmp, subjects=["astronomy"], n_dev=5, n_test=questions)
        dev, test = read_split(root, "dev", "astronomy"), read_split(root, "test", "astronomy")
    return [build_item(engine.tokenizer, engine.max_len, "astronomy", dev, q, 5) for q in test]


def zeroshot_requests(copies: int) -> list[tuple[str, str]]:
    from xgen.eval.common import read_records
    from xgen.eval.fixtures.zeroshot import write
    from xgen.eval.zeroshot_tasks import TASKS

    requests = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write(tmp)
        for task in TASKS.values():
            path = next((root / task.name).glob(f"{task.split}.*"))
            for row in read_records(path, task.name):
                requests += task.render(row).requests
    return requests * copies


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turns after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_mmlu(engine, questions: int, batch: int, repeats: int) -> dict:
    from xgen.eval.mmlu import EnginePredictor

    items = mmlu_items(engine, questions)
    letters = EnginePredictor(engine, batch).letter_ids

    def by_score():
        sequences = [it.ids + [t] for it in items for t in letters]
        flat = []
        for i in range(0, len(sequences), batch):
            flat += [s.token_logprobs[-1] for s in engine.score(sequences[i : i + batch])]
        return np.array(flat).reshape(len(items), 4)

    def by_next():
        return np.concatenate(
            [engine.next_token_logprobs([it.ids for it in items[i : i + batch]], letters) for i in range(0, len(items), batch)]
        )

    diff = float(np.abs(by_score() - by_next()).max())
    t = interleaved({"score": by_score, "next": by_next}, repeats)
    tokens = statistics.mean(len(it.ids) for it in items)
    return {"questions": questions, "prompt_tokens": tokens, "batch": batch, "diff": diff, **t}


def full_score_loglik(engine, requests: list[tuple[str, str]], batch: int) -> list[float]:
    """The same requests through `Engine.score` (the output head at every position)."""
    from xgen.eval.loglik import encode_pair

    pairs = [encode_pair(engine.tokenizer, c, x) for c, x in requests]
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        scored = engine.score([c + x for c, x in chunk])
        out += [sum(s.token_logprobs[len(s.tokens) - len(x) :]) for s, (_, x) in zip(scored, chunk)]
    return out


def bench_loglik(engine, copies: int, batches: tuple[int, int], repeats: int) -> dict:
    from xgen.eval.loglik import loglikelihood

    requests = zeroshot_requests(copies)
    fns = {b: (lambda b=b: loglikelihood(engine, requests, b)) for b in batches}
    fns["full"] = lambda: full_score_loglik(engine, requests, batches[-1])
    tails = [a.logprob for a in loglikelihood(engine, requests, batches[-1])]
    diff = float(np.abs(np.array(tails) - np.array(full_score_loglik(engine, requests, batches[-1]))).max())
    return {"requests": len(requests), "diff": diff, **interleaved(fns, repeats)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    command = " ".join(["python bench/eval.py", *sys.argv[1:]])
    engine = xgen_engine(xgen_config("model=small"))
    mmlu = bench_mmlu(engine, args.questions, args.batch, args.repeats)
    print(mmlu, flush=True)
    ll = bench_loglik(engine, args.copies, (1, 16), args.repeats)
    print(ll, flush=True)
    date = time.strftime("%Y-%m-%d")
    q = mmlu["questions"]
    write_section("eval", f"""
### Evaluation scoring on `small` ({date}, 2 CPUs)

`{command}` — `model=small` (random weights), float32, medians of {args.repeats} interleaved runs after a warm-up.

MMLU letters, {q} five-shot questions (prompts of {mmlu['prompt_tokens']:.0f} tokens on average), {args.batch} sequences per forward pass:

| method | sequences | time | questions/s |
|---|---|---|---|
| `Engine.score` of `prompt + letter`, 4 letters | {4 * q} | {mmlu['score']:.2f} s | {q / mmlu['score']:.2f} |
| `Engine.next_token_logprobs` at the prompt's end | {q} | {mmlu['next']:.2f} s | {q / mmlu['next']:.2f} |
| **speed-up** | | | **{mmlu['score'] / mmlu['next']:.2f}x** |

The two methods' letter log-probs differ by at most {mmlu['diff']:.1e}. The gain is more than the 4x fewer sequences: `Engine.score` also runs the output head and a softmax over 51,200 tokens at every position, `next_token_logprobs` at one.

Log-likelihood requests (`xgen.eval.loglik`, `eval=zeroshot`'s), {ll['requests']} requests from the zero-shot fixtures:

| method | batch_size | time | requests/s |
|---|---|---|---|
| `loglikelihood` (`Engine.score_tails`: the head on the continuation only) | 1 | {ll[1]:.2f} s | {ll['requests'] / ll[1]:.1f} |
| `loglikelihood` (`Engine.score_tails`) | 16 | {ll[16]:.2f} s | {ll['requests'] / ll[16]:.1f} |
| `Engine.score` of the whole sequence (the head at every position) | 16 | {ll['full']:.2f} s | {ll['requests'] / ll['full']:.1f} |

Batching 16 against 1: **{ll[1] / ll[16]:.2f}x**; the continuation-only head against the whole sequence's: **{ll['full'] / ll[16]:.2f}x**; the two methods' log-likelihoods differ by at most {ll['diff']:.1e}. On 2 CPU cores a forward pass of 64 tokens already keeps the matmuls busy, so batching gains little here; on an accelerator a batch of 1 leaves it idle.
""")


if __name__ == "__main__":
    main()
