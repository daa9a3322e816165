"""The `small` training step on the CPU under XLA's CPU options, against PyTorch, in one run.

    python bench/cpu_step.py --rounds 3 --steps 3

XLA's flags are read once, when the backend starts, so each variant is its own process
(a child of this script): all of them build their step first, then take turns, one round
at a time, so the variants and PyTorch see the same machine state. The shapes and the
optimizer are bench/train.py's (`model=small`, batch 4 x 512, float32, AdamW with clipping).
Figures go into docs/performance.md (`bench:cpu-step`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data import write_section  # noqa: E402

# (name, extra XLA_FLAGS, config overrides); names starting "torch" run transformers' model.
# Rows are compared with the PyTorch row of the same dtype: float32 with "torch", bfloat16
# (xgen's compute dtype against PyTorch's CPU autocast) with "torch, bf16 autocast".
BF16 = "execution.compute_dtype=bfloat16"
VARIANTS = (
    ("xgen", "", ()),
    ("xgen, loss_chunk=512", "", ("execution.loss_chunk=512",)),
    ("xgen, --xla_cpu_use_onednn", "--xla_cpu_use_onednn=true", ()),
    ("xgen, oneDNN dot fusion", "--xla_cpu_experimental_onednn_fusion_type=dot", ()),
    ("xgen, XNNPACK dot fusion", "--xla_cpu_experimental_xnn_fusion_type=dot", ()),
    ("xgen, YNNPACK dot fusion", "--xla_cpu_experimental_ynn_fusion_type=dot", ()),
    ("xgen, memory-optimized scheduler", "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED", ()),
    ("torch", "", ()),
    ("xgen, bf16", "", (BF16,)),
    ("torch, bf16 autocast", "", (BF16,)),
)


def child(name: str, overrides: list[str], batch: int, seq: int) -> None:
    """Build one variant's step, say so, then time `n` steps per line read from stdin."""
    from bench.train import TorchStep, XGenStep, xgen_config

    shape = ("model=small", f"stage.seq_len={seq}", f"stage.batch_tokens={batch * seq}")
    if name.startswith("torch"):
        step = TorchStep(xgen_config(*shape), autocast_bf16=BF16 in overrides)
    else:
        step = XGenStep(*shape, *overrides)
    step.step()  # compile / warm the allocator
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps({"times": [step.step() for _ in range(int(line))]}), flush=True)


def spawn(name: str, flags: str, overrides: tuple[str, ...], batch: int, seq: int) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    args = [sys.executable, __file__, "--child", name, "--batch", str(batch), "--seq", str(seq), *overrides]
    return subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def ask(name: str, proc: subprocess.Popen, steps: int) -> list[float]:
    proc.stdin.write(f"{steps}\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"bench/cpu_step.py: variant {name!r} exited mid-run (code {proc.wait()})")
    return json.loads(line)["times"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.overrides, args.batch, args.seq)
    command = "python bench/cpu_step.py " + " ".join(sys.argv[1:])
    procs = {}
    for name, flags, overrides in VARIANTS:  # one at a time: compiles do not overlap
        procs[name] = spawn(name, flags, overrides, args.batch, args.seq)
        line = procs[name].stdout.readline()
        if not line:
            raise SystemExit(f"bench/cpu_step.py: variant {name!r} failed to start (flags {flags!r})")
    times = {name: [] for name in procs}
    for _ in range(args.rounds):
        for name, proc in procs.items():
            times[name] += ask(name, proc, args.steps)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    tokens = args.batch * args.seq
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, _, overrides in VARIANTS:
        pair = "torch, bf16 autocast" if BF16 in overrides else "torch"
        base = "xgen, bf16" if BF16 in overrides else "xgen"
        m = med[name]
        rows.append(f"| {name} | {m:.3f} s | {tokens / m:,.0f} | {med[base] / m:.3f} | {med[pair] / m:.3f} |")
        print(rows[-1], flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "CPU")
    table = "\n".join(rows)
    write_section("cpu-step", f"""
### The CPU step under XLA's CPU options ({time.strftime("%Y-%m-%d")}, {os.cpu_count()} CPUs, {cpu})

`{command}` — `model=small`, batch {args.batch} x {args.seq}, AdamW with clipping, float32 parameters; each variant in its own process (XLA reads its flags once), all built first, then timed in {args.rounds} interleaved rounds of {args.steps} steps; medians. The bf16 rows compute matmuls in bfloat16 (`{BF16}`; PyTorch: `torch.autocast("cpu", torch.bfloat16)`) and are compared with each other.

| variant | step | tokens/s | vs xgen (same dtype) | vs PyTorch (same dtype) |
|---|---|---|---|---|
{table}
""")


if __name__ == "__main__":
    main()
