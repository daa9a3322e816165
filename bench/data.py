"""Data pipeline benchmarks, side by side in one run; figures go into docs/performance.md.

    python bench/data.py                 # all of them, ~15 minutes on 2 cores
    python bench/data.py --only tokenize  # or engines, loader, memory, long

1. tokenize: `task=prepare`'s throughput (units of the JSON Lines file read, parsed and
   tokenized in worker processes, shards, manifest and index written) against tiktoken's
   `encode_ordinary_batch` on the same texts, already in memory, with as many threads as
   prepare has workers: the ratio is per core. Medians of interleaved repeats.
1b. engines: `prepare.engine=ray` with 2 workers against 1 on the same corpus, on one Ray
   started before the clock (a cluster is up before a prepare joins it).
2. loader: time to deliver one packed batch of 8,192-token sequences against one training
   step of the `small` model on that batch, on this CPU.
3. memory: peak resident memory of `prepare` (main process plus workers, sampled) on a
   corpus of about 1 GB.
4. long: time to read one packed 8,192-token window from a prepared 10M-token document
   against a 10K-token one (windows read only the tokens they cover), and what reading
   the whole document per window, as the loader once did, costs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xgen.config import PrepareConfig, RawInputConfig  # noqa: E402
from xgen.data.prepare import prepare_source  # noqa: E402
from xgen.data.sources import python_docs  # noqa: E402
from xgen.tokenizer import Tokenizer  # noqa: E402

PERF = ROOT / "docs" / "performance.md"


def write_corpus(path: Path, target_bytes: int, seed: int = 0) -> int:
    """JSON Lines of ~4 KB documents cut from the Python docs, numbered so none repeats exactly."""
    text = "\n\n".join(python_docs())
    rng = np.random.default_rng(seed)
    written = n = 0
    with open(path, "w") as fh:
        while written < target_bytes:
            start = int(rng.integers(0, len(text) - 4096))
            line = json.dumps({"text": f"Document {n}.\n" + text[start : start + 4096]}) + "\n"
            fh.write(line)
            written += len(line)
            n += 1
    return n


def bench_tokenize(workdir: Path, mb: int, workers: int, repeats: int, split_mb: int) -> dict:
    corpus = workdir / "tok.jsonl"
    write_corpus(corpus, mb * 2**20)
    texts = [json.loads(line)["text"] for line in open(corpus)]
    nbytes = sum(len(t.encode()) for t in texts)
    tok = Tokenizer.xgen()
    spec = RawInputConfig(paths=[str(corpus)])
    opts = PrepareConfig(workers=workers, batch_documents=256, split_bytes=split_mb * 2**20)
    ours, theirs, tokens = [], [], 0
    for r in range(repeats):
        t0 = time.perf_counter()
        ids = tok.encoding.encode_ordinary_batch(texts, num_threads=workers)
        theirs.append(time.perf_counter() - t0)
        tokens = sum(map(len, ids))
        del ids
        out = workdir / f"prep{r}"
        t0 = time.perf_counter()
        totals = prepare_source("bench", out, spec, tok, 0, opts)
        ours.append(time.perf_counter() - t0)
        assert totals["tokens"] == tokens, (totals["tokens"], tokens)
        shutil.rmtree(out)
    mb_s = lambda s: nbytes / s / 2**20  # noqa: E731
    return {
        "corpus_mb": round(nbytes / 2**20, 1),
        "tokens": tokens,
        "workers": workers,
        "tiktoken_mb_s": round(mb_s(statistics.median(theirs)), 2),
        "prepare_mb_s": round(mb_s(statistics.median(ours)), 2),
        "ratio": round(statistics.median(theirs) / statistics.median(ours), 3),
        "repeats": repeats,
        "split_mb": split_mb,
    }


def bench_engines(workdir: Path, mb: int, repeats: int, split_mb: int) -> dict:
    import ray

    corpus = workdir / "engines.jsonl"
    write_corpus(corpus, mb * 2**20, seed=2)
    nbytes = corpus.stat().st_size
    tok = Tokenizer.xgen()
    spec = RawInputConfig(paths=[str(corpus)])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    times: dict[int, list[float]] = {1: [], 2: []}
    try:
        warm = PrepareConfig(engine="ray", workers=2, split_bytes=split_mb * 2**20)
        prepare_source("warm", workdir / "warm", spec, tok, 0, warm)  # Ray's worker processes up
        shutil.rmtree(workdir / "warm")
        for r in range(repeats):
            for workers in (1, 2):  # interleaved
                out = workdir / f"ray{workers}-{r}"
                t0 = time.perf_counter()
                prepare_source("bench", out, spec, tok, 0, PrepareConfig(engine="ray", workers=workers, split_bytes=split_mb * 2**20))
                times[workers].append(time.perf_counter() - t0)
                shutil.rmtree(out)
    finally:
        ray.shutdown()
    one, two = statistics.median(times[1]), statistics.median(times[2])
    return {
        "corpus_mb": round(nbytes / 2**20, 1),
        "units": -(-nbytes // (split_mb * 2**20)),
        "one_worker_mb_s": round(nbytes / one / 2**20, 2),
        "two_workers_mb_s": round(nbytes / two / 2**20, 2),
        "speedup": round(one / two, 3),
        "repeats": repeats,
    }


def bench_loader(workdir: Path, steps: int) -> dict:
    from hydra import compose, initialize_config_dir

    from xgen.config import register_configs, to_object
    from xgen.data import build_pipeline
    from xgen.data.prepare import prepare_mix
    from xgen.data.synthetic import write_corpus as write_synthetic
    from xgen.train.trainer import Trainer

    register_configs()
    overrides = [
        "data_mix=synthetic", f"data_dir={workdir}", "model=small", "execution.attention=chunked", "stage=s3_8k", "stage.batch_tokens=8192",
        "prepare.workers=0", f"trainer.steps={steps}",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_object(compose("config", overrides=overrides))
    write_synthetic(workdir / "synthetic" / "raw")
    tok = Tokenizer.xgen()
    prepare_mix(cfg.data_mix, tok, cfg.prepare)
    pipe = build_pipeline(cfg.data_mix, cfg.stage, tok)
    load_times = []
    for i in range(50):
        t0 = time.perf_counter()
        pipe.dataset[i]
        load_times.append(time.perf_counter() - t0)
    run_dir = workdir / "run"
    run_dir.mkdir()
    summary = Trainer(cfg, run_dir).fit(pipe)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Step time from the logged throughput of the steps after the first (which warms up).
    step_s = statistics.median(cfg.stage.batch_tokens / r["tokens_per_s"] for r in records[1:])
    load_s = statistics.median(load_times)
    return {
        "batch": "1 x 8192 tokens",
        "loader_ms_per_batch": round(load_s * 1e3, 2),
        "small_train_step_s": round(step_s, 2),
        "ratio": round(step_s / load_s, 1),
        "train_steps": summary["steps"],
    }


def bench_memory(workdir: Path, mb: int, workers: int) -> dict:
    import psutil

    corpus = workdir / "mem.jsonl"
    write_corpus(corpus, mb * 2**20, seed=1)
    peak = {"rss": 0}
    done = threading.Event()
    me = psutil.Process()

    def sample() -> None:
        while not done.is_set():
            procs = [me, *me.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak["rss"] = max(peak["rss"], total)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    base = me.memory_info().rss
    sampler.start()
    t0 = time.perf_counter()
    totals = prepare_source(
        "mem", workdir / "mem_out", RawInputConfig(paths=[str(corpus)]), Tokenizer.xgen(), 100, PrepareConfig(workers=workers)
    )
    elapsed = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {
        "corpus_mb": round(corpus.stat().st_size / 2**20),
        "tokens": totals["tokens"],
        "workers": workers,
        "peak_rss_mb_all_processes": round(peak["rss"] / 2**20),
        "rss_before_mb": round(base / 2**20),
        "seconds": round(elapsed, 1),
    }


def bench_long_document(workdir: Path, repeats: int) -> dict:
    from xgen.data.packing import PackedWindows
    from xgen.data.shards import write_token_documents
    from xgen.data.store import ShardStore

    tok = Tokenizer.xgen()
    seq_len, sizes = 8192, {"10M": 10_000_000, "10K": 10_000}
    stores = {}
    for label, n in sizes.items():
        out = workdir / f"long{label}"
        # Documents of this size back to back, about 10M tokens in all, so both read from
        # files of the same size and only the document length differs.
        count = max(10_000_000 // n, 1)
        write_token_documents(out, label, ((np.arange(n) + k) % 50_000 for k in range(count)), tok)
        store = ShardStore(out, tok)
        stores[label] = (store, PackedWindows(store, np.arange(len(store)), seq_len=seq_len, eot_id=tok.eos_id))
    rng = np.random.default_rng(0)
    picks = {label: rng.integers(0, len(w), 200) for label, (_, w) in stores.items()}
    times: dict[str, list[float]] = {"10M": [], "10K": [], "whole": []}
    for _ in range(repeats):  # interleaved
        for label, (_, windows) in stores.items():
            t0 = time.perf_counter()
            for i in picks[label]:
                windows[int(i)]
            times[label].append((time.perf_counter() - t0) / len(picks[label]))
        store = stores["10M"][0]
        t0 = time.perf_counter()
        for _ in range(5):
            store.tokens(0)  # the whole 10M-token document, as each window once read it
        times["whole"].append((time.perf_counter() - t0) / 5)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "seq_len": seq_len,
        "window_10M_us": round(med["10M"] * 1e6, 1),
        "window_10K_us": round(med["10K"] * 1e6, 1),
        "ratio_10M_over_10K": round(med["10M"] / med["10K"], 2),
        "whole_10M_doc_ms": round(med["whole"] * 1e3, 2),
        "repeats": repeats,
    }


def write_section(name: str, body: str) -> None:
    """Replace the section between `<!-- bench:NAME -->` markers in docs/performance.md."""
    text = PERF.read_text() if PERF.exists() else "# Performance\n\nFigures measured on this project's own machines.\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    PERF.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["tokenize", "engines", "loader", "memory", "long"])
    ap.add_argument("--tokenize-mb", type=int, default=64)
    ap.add_argument("--split-mb", type=int, default=4)
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=3)
    args = ap.parse_args()
    command = "python bench/data.py " + " ".join(sys.argv[1:])
    machine = f"{os.cpu_count()} CPUs"
    cpu_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown CPU")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in (None, "tokenize"):
            results["tokenize"] = bench_tokenize(work, args.tokenize_mb, args.workers, args.repeats, args.split_mb)
        if args.only in (None, "engines"):
            results["engines"] = bench_engines(work, args.tokenize_mb, args.repeats, args.split_mb)
        if args.only in (None, "loader"):
            results["loader"] = bench_loader(work / "loader", args.train_steps)
        if args.only in (None, "memory"):
            results["memory"] = bench_memory(work, args.memory_mb, args.workers)
        if args.only in (None, "long"):
            results["long"] = bench_long_document(work, max(args.repeats, 5))
    print(json.dumps(results, indent=1))
    date = time.strftime("%Y-%m-%d")
    if "tokenize" in results:
        r = results["tokenize"]
        write_section("data-tokenize", f"""
### Data: `prepare` tokenization against tiktoken, per core ({date}, {machine}, {cpu_name})

`{command}` — {r['corpus_mb']} MB of JSON Lines in units of {r['split_mb']} MB, {r['tokens']:,} tokens, {r['workers']} worker processes vs {r['workers']} tiktoken threads, median of {r['repeats']} interleaved repeats.

| | MB/s |
|---|---|
| tiktoken `encode_ordinary_batch` (texts already in memory) | {r['tiktoken_mb_s']} |
| `task=prepare` (read, parse, tokenize, write shards, manifest and index) | {r['prepare_mb_s']} |
| **ratio** (goal ≥ 0.9) | **{r['ratio']}** |
""")
    if "engines" in results:
        r = results["engines"]
        write_section("data-engines", f"""
### Data: `prepare.engine=ray`, 2 workers against 1 ({date}, {machine}, {cpu_name})

`{command}` — {r['corpus_mb']} MB of JSON Lines in {r['units']} units, on a local Ray of 2 CPUs started before the clock; median of {r['repeats']} interleaved repeats.

| | MB/s |
|---|---|
| 1 worker | {r['one_worker_mb_s']} |
| 2 workers | {r['two_workers_mb_s']} |
| **speed-up** (goal ≥ 1.8) | **{r['speedup']}x** |
""")
    if "loader" in results:
        r = results["loader"]
        write_section("data-loader", f"""
### Data: loader against the `small` model's training step ({date}, {machine})

`{command}` — packed batches of {r['batch']} from prepared shards (median of 50, one thread, no prefetch) against the median step time of {r["train_steps"]} training steps of `model=small execution.attention=chunked` on the same batches (with the dense attention kernel its 8K-token step needs 55.7 GiB, over this machine's 23.5).

| | time |
|---|---|
| loader, one batch | {r['loader_ms_per_batch']} ms |
| `small` train step, one batch | {r['small_train_step_s']} s |
| **ratio** (goal ≥ 20) | **{r['ratio']}x** |
""")
    if "memory" in results:
        r = results["memory"]
        write_section("data-memory", f"""
### Data: `prepare`'s peak memory on a {r['corpus_mb']} MB corpus ({date}, {machine})

`{command}` — {r['tokens']:,} tokens in {r['seconds']} s with {r['workers']} workers. Resident memory of the main process and its workers, summed, sampled every 0.1 s: peak **{r['peak_rss_mb_all_processes']} MB** (goal < 2,048 MB; {r['rss_before_mb']} MB before prepare started).
""")

    if "long" in results:
        r = results["long"]
        write_section("data-long-document", f"""
### Data: a window of a 10M-token document against a 10K-token one ({date}, {machine}, {cpu})

`{command}` — one packed window of {r['seq_len']:,} tokens from a prepared source (a slice of the shard's memory map), median over {r['repeats']} interleaved repeats of 200 random windows each; both sources hold about 10M tokens.

| | time per window |
|---|---|
| documents of 10K tokens | {r['window_10K_us']} µs |
| one document of 10M tokens | {r['window_10M_us']} µs |
| **ratio** 10M / 10K | **{r['ratio_10M_over_10K']}** |
| reading the whole 10M-token document (what each window once cost) | {r['whole_10M_doc_ms']} ms |

The window's cost does not grow with its document: a window over 10K-token documents
usually covers two of them (two reads and a join), one inside a 10M-token document is one
slice.
""")


if __name__ == "__main__":
    main()
