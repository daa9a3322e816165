"""The training step on an accelerator: tokens/s, MFU and peak memory; figures go into docs/performance.md.

    bash bench/gpu.sh                                  # on a machine with one NVIDIA GPU
    python bench/accelerator.py --hardware gpu_h200 --model 1b --seq 8192 --rows 8

xgen's own compiled step (the trainer's, AOT) of `--model` at `--seq` tokens per row, with
the overrides that make it fast there (bfloat16 matmuls, the hardware's fused attention,
scanned layers, the chunked loss); median step time of `--steps` after one warm-up. MFU
counts the model's FLOPs (6N + causal attention, xgen.train.throughput) against the
hardware config's peak; peak memory is the device allocator's high-water mark.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data import write_section  # noqa: E402
from bench.train import XGenStep  # noqa: E402

KERNEL = {"gpu": "cudnn", "tpu": "splash", "cpu": "block_causal"}


def measure(hardware: str, model: str, seq: int, rows: int, steps: int, remat: str, extra: list[str]) -> dict:
    import jax

    from xgen.train.throughput import flops_per_token

    overrides = [
        f"hardware={hardware}", f"model={model}", f"stage.seq_len={seq}", f"stage.batch_tokens={rows * seq}",
        f"model.max_positions={max(seq, 2048)}", "execution.scan_layers=true", "execution.loss_chunk=1024",
        f"execution.remat={remat}", *extra,
    ]  # fmt: skip
    platform = jax.devices()[0].platform
    if not any(o.startswith("execution.attention=") for o in extra):
        overrides.append(f"execution.attention={KERNEL.get(platform, 'block_causal')}")
    t0 = time.perf_counter()
    step = XGenStep(*overrides)
    compile_s = time.perf_counter() - t0
    step.step()
    times = [step.step() for _ in range(steps)]
    cfg = step.cfg
    step_s = statistics.median(times)
    tokens = rows * seq
    peak = cfg.hardware.peak_flops_per_chip
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "device": jax.devices()[0].device_kind,
        "overrides": " ".join(overrides),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s),
        "mfu": round(tokens * flops_per_token(cfg.model, seq) / step_s / peak, 3) if peak else None,
        "peak_memory_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
        "compile_s": round(compile_s, 1),
        "steps": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hardware", default="gpu_h200")
    ap.add_argument("--model", default="1b")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--remat", default="save_dots")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("extra", nargs="*", help="more overrides, e.g. execution.attention=block_causal")
    args = ap.parse_args()
    r = measure(args.hardware, args.model, args.seq, args.rows, args.steps, args.remat, args.extra)
    print(r, flush=True)
    if args.write:
        command = "python bench/accelerator.py " + " ".join(sys.argv[1:])
        write_section(f"accelerator-{args.hardware}-{args.model}-{args.seq}-{args.remat}", f"""
### Training step on {r['device']}: `model={args.model}` at {args.seq:,} tokens per row ({time.strftime('%Y-%m-%d')})

`{command}` — `{r['overrides']}`; median of {r['steps']} steps after a warm-up; MFU counts 6N + causal attention FLOPs per token against the hardware config's peak.

| step | tokens/s | MFU (goal ≥ 50%) | peak memory | compile |
|---|---|---|---|---|
| {r['step_s']} s | {r['tokens_per_s']:,} | {r['mfu']:.1%} | {r['peak_memory_gib']} GiB | {r['compile_s']} s |
""")


if __name__ == "__main__":
    main()
