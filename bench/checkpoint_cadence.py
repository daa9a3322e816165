"""What time-based checkpoints cost the step loop, on `model=small`; figures go into
docs/performance.md.

    python bench/checkpoint_cadence.py

Three runs of `python -m xgen.run model=small` with the same shape and steps, in one
invocation, interleaved over `--rounds`: saving only at the end (`trainer.checkpoint_minutes=0`),
the default (every 30 minutes: no save inside a run this short, so it measures the per-step
decision), and saving every 12 seconds (to measure what one save blocks the loop for: orbax
saves asynchronously, so only the copy off the device and the bookkeeping stop the steps).
Each run's step time is its productive loop time per step from goodput.json (compile,
restore and the final save excluded); the default cadence's cost at its interval is the
measured blocking time of one save over 30 minutes of steps."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data import write_section  # noqa: E402

SHAPE = ("model=small", "stage.seq_len=256", "stage.batch_tokens=1024", "optimizer=adamw", "trainer.log_every=5")
VARIANTS = {
    "end only": ("trainer.checkpoint_minutes=0",),
    "default (30 min)": (),
    "every 0.2 min": ("trainer.checkpoint_minutes=0.2", "trainer.checkpoints_to_keep=2"),
}


def one_run(run_dir: Path, steps: int, overrides: tuple[str, ...]) -> dict:
    args = [sys.executable, "-m", "xgen.run", *SHAPE, f"trainer.steps={steps}", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"bench/checkpoint_cadence.py: {' '.join(overrides) or 'default'} failed:\n{proc.stderr[-2000:]}")
    record = json.loads((run_dir / "goodput.json").read_text())
    saves = sum(1 for e in (run_dir / "checkpoints").iterdir() if e.name.isdigit())  # at least the final one
    saves_in_loop = len([line for line in (run_dir / "run.log").read_text().splitlines() if "goodput " in line]) - 1
    s = record["seconds"]
    return {"step_s": (s["productive"] + s["data_wait"]) / steps, "checkpoint_s": s["checkpoint"], "saves_in_loop": saves_in_loop,
            "kept": saves}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown CPU")
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, overrides in VARIANTS.items():
                runs[name].append(one_run(Path(tmp) / f"{r}-{len(runs[name])}-{name.split()[0]}", args.steps, overrides))
    step = {name: statistics.median(x["step_s"] for x in rs) for name, rs in runs.items()}
    frequent = runs["every 0.2 min"]
    saves = statistics.median(x["saves_in_loop"] for x in frequent)
    # What one save costs the loop, all in: its blocking copy and the background write's share
    # of the CPU, from each round's loop time against the same round's end-only run.
    extra = [(f["step_s"] - e["step_s"]) * args.steps / max(f["saves_in_loop"], 1) for f, e in zip(frequent, runs["end only"])]
    per_save = statistics.median(extra)
    final = statistics.median(x["checkpoint_s"] for x in runs["end only"])
    blocking = max(statistics.median(x["checkpoint_s"] for x in frequent) - final, 0.0) / max(saves, 1)
    default_cost = per_save / (30 * 60)
    rows = "\n".join(
        f"| {name} | {step[name] * 1000:.0f} ms | {step[name] / step['end only']:.3f} | "
        + ", ".join(f"{x['step_s'] * 1000:.0f}" for x in runs[name]) + " |"
        for name in VARIANTS
    )
    day = time.strftime("%Y-%m-%d")
    body = f"""### Checkpoints by time: what the cadence costs the step loop ({day}, {os.cpu_count()} CPUs, {cpu})

`python bench/checkpoint_cadence.py --steps {args.steps} --rounds {args.rounds}`: `model=small` (77.7M parameters,
train state 0.93 GB), {args.steps} steps of 4 x 256 tokens, float32; each variant a fresh `python -m xgen.run`,
interleaved over {args.rounds} rounds; a step's time is the run's productive loop time per step
(goodput.json: compile, restore and the final save left out), median over rounds.

| cadence | step (median) | ratio to end-only | each round (ms) |
|---|---|---|---|
{rows}

The default cadence saves nothing inside a run this short, so its row differs from end-only
only by the per-step clock check (a `time.monotonic()` call; on several processes, one
key-value round trip): what separates the two rows is this machine's noise. Saving every
12 s ({saves:.0f} saves a run) measures a save: it blocks the loop for {blocking:.2f} s (orbax copies the
state off the device), and with the background write competing for the 2 cores it costs the
loop {per_save:.1f} s in all (median of each round's extra loop time over its saves). At the default
interval that is {per_save:.1f} s every 30 minutes: {default_cost:.2%} of step time (goal: at most 5%).
"""
    print(body)
    write_section("checkpoint_cadence", body)


if __name__ == "__main__":
    main()
