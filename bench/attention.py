"""8K attention on the CPU: the `chunked` and `block_causal` kernels side by side in one run.

    python bench/attention.py                 # tiny's attention shape, 1 x 8192 tokens
    python bench/attention.py --write         # also the section in docs/performance.md

One layer's attention of the `tiny` model (4 heads of 16) over 1 x `--length` tokens,
forward and backward (the gradient of a weighted sum of the output with respect to q, k
and v), jit-compiled, timed as the median of `--rounds` after a warm-up; both kernels use
blocks of `--block`. Peak memory is the compiled program's temporary bytes
(`memory_analysis()`), what XLA allocates beyond the inputs and outputs. Also with four
packed documents (segment ids), which the block-causal kernel skips across.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data import write_section  # noqa: E402
from xgen.model.attention import causal_attention  # noqa: E402


def measure(kernel: str, length: int, block: int, rounds: int, documents: int) -> dict:
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=(1, length, 4, 16)), jnp.float32) for _ in range(4))
    seg = None
    if documents > 1:
        seg = jnp.asarray(np.repeat(np.arange(documents), -(-length // documents))[None, :length], jnp.int32)

    def loss(q, k, v):
        return (causal_attention(q, k, v, segment_ids=seg, kernel=kernel, chunk=block) * w).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    started = time.perf_counter()
    compiled = step.lower(q, k, v).compile()
    compile_s = time.perf_counter() - started
    grads = jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - started)
    temp = compiled.memory_analysis().temp_size_in_bytes
    return {"kernel": kernel, "documents": documents, "median_s": statistics.median(times), "temp_bytes": temp,
            "compile_s": compile_s, "grads": grads}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rows = [measure(kernel, args.length, args.block, args.rounds, docs) for docs in (1, 4) for kernel in ("chunked", "block_causal")]
    lines = ["| documents | kernel | forward + backward (median) | temporary memory | compile |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['documents']} | `{r['kernel']}` | {r['median_s'] * 1e3:.0f} ms | {r['temp_bytes'] / 2**20:.1f} MiB | "
                     f"{r['compile_s']:.1f} s |")  # fmt: skip
    ratios = []
    for docs in (1, 4):
        a, b = [r for r in rows if r["documents"] == docs]
        diff = max(float(jnp.abs(x - y).max()) for x, y in zip(a["grads"], b["grads"]))
        ratios.append(f"- {docs} document{'s' * (docs > 1)}: block_causal is **{a['median_s'] / b['median_s']:.2f}x** faster than "
                      f"chunked, with **{b['temp_bytes'] / a['temp_bytes']:.2f}x** its temporary memory; the gradients "
                      f"differ by at most {diff:.1e}")  # fmt: skip
    table = "\n".join(lines + [""] + ratios)
    print(table)
    if args.write:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "CPU")
        command = "python bench/attention.py " + " ".join(sys.argv[1:])
        write_section("attention-8k", f"""
### 8K attention on the CPU: `chunked` against `block_causal` ({date.today()}, {os.cpu_count()} CPUs, {cpu})

`{command.strip()}` — one layer of `tiny`'s attention (4 heads of 16) over 1 x {args.length} tokens, forward and
backward, blocks of {args.block}, median of {args.rounds} after a warm-up; memory is the compiled program's
temporary bytes. With 4 documents, each of {args.length // 4} tokens is packed with segment ids.

{table}
""")


if __name__ == "__main__":
    main()
