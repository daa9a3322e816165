"""Serving under load: the server's two schedulers side by side in one run; figures go into
docs/performance.md.

    python bench/serve.py                                   # static and continuous, 200 requests, 32 clients
    python bench/serve.py --schedulers static --requests 20 --clients 4 --model tiny
    python bench/serve.py --write                           # also the "Serving under load" section

A random-weight model (`--model`, default `small`) is saved once as a Hugging Face directory
in a temporary folder; for each scheduler, `python -m xgen.run task=serve` serves it on a
free loopback port (`serve.scheduler=<s> serve.max_batch=<B>`). A warm-up of `--warmup`
requests drawn like the workload (another seed, default `--clients` of them) compiles the
common shapes (the static scheduler's depend on which rows meet, so more compile later), then `--clients`
threads send the same fixed-seed `--requests` to each server: token-id prompts of 16-384
tokens, 8-128 `max_tokens`, greedy, streamed with usage, so time to first token is measured
(the first chunk with text or a finish reason). A row may end early on end-of-text: the
completion tokens are counted from each stream's usage. Throughput = completion tokens / wall
time from the first request sent to the last stream's end. XLA compilations that happen
during the timed window (the server runs with JAX_LOG_COMPILES=1) are counted: their time is
the server's, but it is not a steady state. Each server is stopped with SIGTERM and must
exit 0.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data import write_section  # noqa: E402

SCHEDULERS = ("static", "continuous")
MODEL_NAME = "bench"
START_TIMEOUT_S = 600  # loading and the first compilations of a large model on a CPU
REQUEST_TIMEOUT_S = 900  # one stream, queueing included
VOCAB = 50000  # prompt ids below the special tokens
COMPILED = re.compile(r"Finished XLA compilation of .* in ([\d.eE+-]+) sec")
# Counters that describe the moment /health was read, not the run.
VOLATILE = {"queued_rows", "queued_requests", "running_rows", "tokens_per_s", "max_batch", "status", "model"}


@dataclass
class Result:
    """One streamed request as the client saw it (times from time.perf_counter)."""

    sent: float
    first: float | None = None  # the first chunk with text or a finish reason
    last_text: float | None = None
    done: float | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Server:
    """A `task=serve` subprocess and its output lines (with the time each arrived)."""

    proc: subprocess.Popen
    lines: list[tuple[float, str]] = field(default_factory=list)
    url: str | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host.strip("[]"), int(port)

    def compilations(self, start: float, end: float) -> tuple[int, float]:
        """XLA compilations the server logged between `start` and `end`: count, seconds."""
        times = [float(m.group(1)) for t, line in list(self.lines) if start <= t <= end and (m := COMPILED.search(line))]
        return len(times), sum(times)

    def tail(self, n: int = 40) -> str:
        return "".join(line for _, line in self.lines[-n:])


def save_model(model: str, out: Path) -> Path:
    """A random-weight `model` as a Hugging Face directory (with the XGen tokenizer)."""
    from flax import nnx

    from bench.train import xgen_config
    from xgen.hf.io import save
    from xgen.model.transformer import XGenModel

    cfg = xgen_config(f"model={model}").model
    return save(out, cfg, nnx.state(XGenModel(cfg, rngs=nnx.Rngs(0)), nnx.Param))


def workload(n: int, seed: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int]) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        out.append({
            "model": MODEL_NAME, "prompt": rng.integers(0, VOCAB, length).tolist(),
            "max_tokens": int(rng.integers(max_tokens[0], max_tokens[1] + 1)), "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
        })  # fmt: skip
    return out


def start_server(hf_dir: Path, run_dir: Path, scheduler: str, max_batch: int, max_len: int) -> Server:
    cmd = [
        sys.executable, "-m", "xgen.run", "task=serve", f"checkpoint={hf_dir}", "serve.port=0",
        f"serve.scheduler={scheduler}", f"serve.max_batch={max_batch}", f"serve.model_name={MODEL_NAME}",
        f"generate.max_len={max_len}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "JAX_LOG_COMPILES": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(proc)
    arrived: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            server.lines.append((time.perf_counter(), line))
            arrived.put(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while server.url is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            line = arrived.get(timeout=1)
        except queue.Empty:
            continue
        if m := re.search(rf"serving {MODEL_NAME}\b.* at (http://[^\s/]+)", line):
            server.url = m.group(1)
    return server


def stop_server(server: Server, timeout: float = 120) -> int | None:
    """SIGTERM, then the exit status (None: it had to be killed)."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            return server.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
            return None
    return server.proc.returncode


def get_json(server: Server, path: str) -> dict:
    conn = http.client.HTTPConnection(*server.host_port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return json.loads(resp.read())
    finally:
        conn.close()


def stream(server: Server, body: dict) -> Result:
    """One streamed completion: when its first chunk and its end arrived, its usage."""
    result = Result(sent=time.perf_counter())
    conn = http.client.HTTPConnection(*server.host_port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            result.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return result
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            now = time.perf_counter()
            if data == "[DONE]":
                result.done = now
                break
            event = json.loads(data)
            if "error" in event:
                result.error = str(event["error"].get("message", event["error"]))[:200]
                continue
            choices = event.get("choices") or []
            if any(c.get("text") or c.get("finish_reason") for c in choices):
                result.first = result.first or now
            if any(c.get("text") for c in choices):
                result.last_text = now
            if event.get("usage"):
                result.completion_tokens = event["usage"]["completion_tokens"]
        if result.done is None and result.error is None:
            result.error = "the stream ended without [DONE]"
    except (OSError, http.client.HTTPException, ValueError) as ex:
        result.error = f"{type(ex).__name__}: {ex}"
    finally:
        conn.close()
    return result


def load(server: Server, bodies: list[dict], clients: int) -> tuple[list[Result], float, float]:
    """Send `bodies` from `clients` threads (each takes the next one when it is free);
    the results in order, and when the first was sent and the last ended."""
    todo: queue.Queue = queue.Queue()
    for i, body in enumerate(bodies):
        todo.put((i, body))
    results: list[Result | None] = [None] * len(bodies)

    def client() -> None:
        while True:
            try:
                i, body = todo.get_nowait()
            except queue.Empty:
                return
            results[i] = stream(server, body)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(min(clients, len(bodies)))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, start, time.perf_counter()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(scheduler: str, results: list[Result], start: float, end: float, server: Server, health: dict) -> dict:
    ok = [r for r in results if r.error is None and r.done is not None]
    tokens = sum(r.completion_tokens for r in ok)
    latency = [r.done - r.sent for r in ok]
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    longest = max(ok, key=lambda r: (r.completion_tokens, r.done - r.sent), default=None)
    decode = (longest.done - longest.first) if longest and longest.first is not None else float("nan")
    compiles, compile_s = server.compilations(start, end)
    return {
        "scheduler": scheduler, "requests": len(results), "completed": len(ok), "wall_s": end - start,
        "tokens": tokens, "tps": tokens / (end - start),
        "warm_tps": tokens / max(end - start - compile_s, 1e-9), "lat_p50": pct(latency, 50), "lat_p99": pct(latency, 99),
        "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
        "longest_tokens": longest.completion_tokens if longest else 0, "longest_decode_s": decode,
        "compiles": compiles, "compile_s": compile_s,
        "errors": sorted({r.error for r in results if r.error})[:3],
        "health": {k: v for k, v in health.items() if k not in VOLATILE},
    }  # fmt: skip


def run_one(scheduler: str, hf_dir: Path, tmp: Path, args, bodies: list[dict], warmup: list[dict], max_len: int) -> dict:
    print(f"[{scheduler}] starting the server", flush=True)
    t0 = time.perf_counter()
    server = start_server(hf_dir, tmp / f"run-{scheduler}", scheduler, args.max_batch, max_len)
    try:
        if server.url is None:
            raise RuntimeError(f"the {scheduler} server did not start (exit {server.proc.poll()}):\n{server.tail()}")
        print(f"[{scheduler}] serving at {server.url} after {time.perf_counter() - t0:.0f} s; warming up", flush=True)
        t0 = time.perf_counter()
        warm, _, _ = load(server, warmup, args.clients)
        if failed := [r.error for r in warm if r.error]:
            raise RuntimeError(f"the {scheduler} server failed {len(failed)} warm-up requests: {failed[0]}")
        print(f"[{scheduler}] warm-up of {len(warmup)} requests: {time.perf_counter() - t0:.0f} s; timing", flush=True)
        results, start, end = load(server, bodies, args.clients)
        health = get_json(server, "/health")
        if health.get("scheduler", scheduler) != scheduler:  # a server that reports its scheduler must run this one
            raise RuntimeError(f"asked for serve.scheduler={scheduler}, /health says {health['scheduler']}")
        row = summarize(scheduler, results, start, end, server, health)
        row["reported"] = "scheduler" in health
    finally:
        rc = stop_server(server)
    row["exit"] = rc
    if rc != 0:
        print(f"[{scheduler}] the server exited {rc} on SIGTERM; its last lines:\n{server.tail(25)}", flush=True)
    if not row["reported"]:
        print(f"[{scheduler}] warning: /health does not name its scheduler; cannot check it ran {scheduler}", flush=True)
    print(f"[{scheduler}] {row['completed']}/{row['requests']} requests in {row['wall_s']:.1f} s, server exit {rc}", flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| scheduler | completed | wall | completion tokens/s | latency p50 / p99 | TTFT p50 / p99 |"
        " compilations in the timed window | tokens/s, compilations taken out |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['scheduler']} | {r['completed']}/{r['requests']} | {r['wall_s']:.1f} s | {r['tps']:.1f} |"
            f" {r['lat_p50']:.2f} / {r['lat_p99']:.2f} s | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} s |"
            f" {r['compiles']} ({r['compile_s']:.1f} s) | {r['warm_tps']:.1f} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    by = {r["scheduler"]: r for r in rows}
    out = []
    if "static" in by and "continuous" in by:
        s, c = by["static"], by["continuous"]
        tput, warm, ttft = c["tps"] / s["tps"], c["warm_tps"] / s["warm_tps"], c["ttft_p99"] / s["ttft_p99"]
        out.append(f"continuous / static: throughput **{tput:.2f}x** (goal ≥ 2: {'met' if tput >= 2 else 'not met'};"
                   f" {warm:.2f}x with compilations taken out), p99 TTFT **{ttft:.2f}x**")  # fmt: skip
    if "continuous" in by:
        c = by["continuous"]
        met = c["ttft_p99"] < c["longest_decode_s"]
        out.append(
            f"continuous: p99 TTFT **{c['ttft_p99']:.2f} s** against the longest request's decode"
            f" ({c['longest_tokens']} tokens, first token to end) **{c['longest_decode_s']:.2f} s**"
            f" (goal: below it: {'met' if met else 'not met'})"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--model", default="small")
    ap.add_argument("--schedulers", nargs="+", choices=SCHEDULERS, default=list(SCHEDULERS))
    ap.add_argument("--warmup", type=int, default=None, help="warm-up requests before timing (default: --clients)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[16, 384], metavar=("MIN", "MAX"))
    ap.add_argument("--max-tokens", type=int, nargs=2, default=[8, 128], metavar=("MIN", "MAX"))
    ap.add_argument("--write", action="store_true", help="write the section into docs/performance.md")
    args = ap.parse_args()
    command = "python bench/serve.py " + " ".join(sys.argv[1:])
    max_len = args.prompt_len[1] + args.max_tokens[1]
    bodies = workload(args.requests, 0, tuple(args.prompt_len), tuple(args.max_tokens))
    warmup = workload(args.clients if args.warmup is None else args.warmup, 1, tuple(args.prompt_len), tuple(args.max_tokens))
    rows, exits = [], {}
    with tempfile.TemporaryDirectory(prefix="xgen-bench-serve-") as tmp:
        t0 = time.perf_counter()
        hf_dir = save_model(args.model, Path(tmp) / "hf")
        print(f"saved a random {args.model} model in {time.perf_counter() - t0:.0f} s", flush=True)
        for scheduler in args.schedulers:
            try:
                row = run_one(scheduler, hf_dir, Path(tmp), args, bodies, warmup, max_len)
            except RuntimeError as ex:  # the other scheduler's figures still get reported
                print(f"[{scheduler}] failed: {ex}", flush=True)
                exits[scheduler] = "did not run"
                continue
            rows.append(row)
            exits[scheduler] = row["exit"]
    print()
    print(table(rows))
    for r in rows:
        print(f"{r['scheduler']} /health: {json.dumps(r['health'])}")
        if r["errors"]:
            print(f"{r['scheduler']} errors: {r['errors']}")
    goals = verdict(rows)
    for line in goals:
        print(line.replace("**", ""))
    bad = {s: rc for s, rc in exits.items() if rc != 0}
    incomplete = [(r["scheduler"], r["completed"]) for r in rows if r["completed"] < r["requests"]]
    if args.write and (incomplete or len(rows) < len(args.schedulers)):
        print("not writing docs/performance.md: a scheduler did not run or requests failed")
    elif args.write:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown CPU")
        counters = "\n".join(f"- `{r['scheduler']}`: " + ", ".join(f"{k} {v}" for k, v in r["health"].items()) for r in rows)
        goal_lines = "\n".join(f"- {line}" for line in goals)
        write_section(f"serve-max-batch-{args.max_batch}", f"""
### Serving under load: the {" and ".join(r["scheduler"] for r in rows)} scheduler{"s" * (len(rows) > 1)} on `{args.model}` ({date.today()}, {os.cpu_count()} CPUs, {cpu})

`{command}` — `python -m xgen.run task=serve` on loopback, `serve.max_batch={args.max_batch}`,
`generate.max_len={max_len}`, a random-weight `{args.model}` model; {args.requests} streamed
`/v1/completions` requests from {args.clients} concurrent clients after a warm-up of {len(warmup)}:
token-id prompts of {args.prompt_len[0]}-{args.prompt_len[1]} tokens, `max_tokens`
{args.max_tokens[0]}-{args.max_tokens[1]} (fixed seed, the same for each scheduler), greedy; rows may end
early on end-of-text, so tokens are the streams' `usage.completion_tokens`. Throughput =
completion tokens / wall time (and / the wall time less the XLA compilations the server
logged in the window: one worker compiles, so nothing decodes meanwhile); TTFT = until the
first chunk with text (or a finish reason); latency = until `data: [DONE]`.

{table(rows)}

{goal_lines}

`/health` at the end (totals since start, warm-up included):

{counters}
""")  # noqa: E501
    if bad or incomplete:  # after the report, so the figures are not lost
        sys.exit(f"failed: server exits {bad or 'all 0'}; incomplete runs {incomplete or 'none'}")


if __name__ == "__main__":
    main()
