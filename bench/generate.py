"""Generation benchmarks, side by side in one run; figures go into docs/performance.md.

    pip install -e ".[bench]"
    python bench/generate.py

1. Decoding throughput: xgen's KV-cached `Engine.generate` against transformers'
   `LlamaForCausalLM.generate` (its KV cache, greedy) on the same random `small` model,
   float32, the same batch, prompt length and new tokens; medians of interleaved repeats,
   reported as a ratio of tokens/s (generated tokens / wall time of the call, prefill included).
2. Cost by position: xgen's time per generated token after a 100-token and a 2,000-token
   prompt (the difference of a 65- and a 1-token generation, over 64 tokens).
Neither side stops early: end-of-text is disabled on both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data import write_section  # noqa: E402
from bench.train import xgen_config  # noqa: E402


def xgen_engine(cfg):
    import jax

    from xgen.generate import Engine
    from xgen.runtime import Runtime
    from xgen.tokenizer import Tokenizer
    from xgen.tokenizer.xgen import xgen_encoding

    runtime = Runtime.local(cfg.model, cfg.execution)
    params = runtime.init_params(jax.random.key(0))
    return Engine(runtime, params, Tokenizer(xgen_encoding(), eos_id=-1), max_len=cfg.model.max_positions)


def torch_model(cfg):
    import torch

    from bench.train import TorchStep

    torch.manual_seed(0)
    model = TorchStep.hf_model(cfg)
    return model.eval()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def throughput(cfg, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    import torch

    from xgen.generate import SamplingConfig

    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 50000, (batch, prompt_len))
    engine, model = xgen_engine(cfg), torch_model(cfg)
    settings = SamplingConfig(max_new_tokens=new)
    ours = lambda: engine.generate([list(p) for p in prompts], settings)  # noqa: E731
    ids = torch.from_numpy(prompts)

    def theirs():
        with torch.no_grad():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, use_cache=True, pad_token_id=0,
            )  # fmt: skip

    assert all(len(c.tokens) == new for c in ours()) and theirs().shape[1] == prompt_len + new  # warm up
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours.append(timed(ours, 1))
        t_theirs.append(timed(theirs, 1))
    xgen_s, torch_s = statistics.median(t_ours), statistics.median(t_theirs)
    return {
        "batch": batch, "prompt": prompt_len, "new": new,
        "xgen_s": round(xgen_s, 3), "torch_s": round(torch_s, 3),
        "xgen_tps": round(batch * new / xgen_s, 1), "torch_tps": round(batch * new / torch_s, 1),
        "ratio": round(torch_s / xgen_s, 2),
    }  # fmt: skip


def per_token_by_position(cfg, positions: tuple[int, ...], repeats: int) -> dict[int, float]:
    from xgen.generate import SamplingConfig

    engine = xgen_engine(cfg)
    rng = np.random.default_rng(1)
    out = {}
    for pos in positions:
        prompt = [list(rng.integers(0, 50000, pos))]
        runs = {n: (lambda n=n: engine.generate(prompt, SamplingConfig(max_new_tokens=n))) for n in (1, 65)}
        for run in runs.values():
            run()  # compile
        # Same cache size for both: 1 + 64 new tokens round up to the same slots as 65.
        t1, t65 = timed(runs[1], repeats), timed(runs[65], repeats)
        out[pos] = (t65 - t1) / 64
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    command = "python bench/generate.py " + " ".join(sys.argv[1:])
    cfg = xgen_config("model=small")
    rows = [throughput(cfg, b, args.prompt, args.new, args.repeats) for b in args.batches]
    for r in rows:
        print(r, flush=True)
    by_pos = per_token_by_position(cfg, (100, 2000), args.repeats)
    print(by_pos, flush=True)
    import torch

    table = "\n".join(
        f"| {r['batch']} | {r['xgen_s']} s | {r['xgen_tps']} | {r['torch_s']} s | {r['torch_tps']} | **{r['ratio']}** |"
        for r in rows
    )
    date = time.strftime("%Y-%m-%d")
    write_section("generate", f"""
### Generation: xgen's KV-cached sampler against transformers on `small` ({date}, 2 CPUs)

`{command}` — `model=small` (77.7M parameters, random weights), float32, greedy, prompts of {args.prompt} random tokens, {args.new} new tokens per row (end-of-text disabled on both sides), median of {args.repeats} interleaved calls; tokens/s = generated tokens / wall time of the call, prefill included. transformers {__import__('transformers').__version__} `LlamaForCausalLM.generate` (its dynamic KV cache, SDPA attention), PyTorch {torch.__version__}.

| batch | xgen call | xgen tokens/s | transformers call | transformers tokens/s | **xgen / transformers** (goal ≥ 2) |
|---|---|---|---|---|---|
{table}

Time per generated token by position (xgen, batch 1, 64 tokens after a prompt of the given length, median of {args.repeats}): **{by_pos[100] * 1e3:.1f} ms** at position 100, **{by_pos[2000] * 1e3:.1f} ms** at position 2,000: ratio **{by_pos[2000] / by_pos[100]:.2f}** (goal ≤ 1.5).
""")  # noqa: E501


if __name__ == "__main__":
    main()
