"""Training-step benchmarks, side by side in one run; figures go into docs/performance.md.

    pip install -e ".[bench]"             # torch 2.13.0 (CPU) and transformers
    python bench/train.py                 # xgen vs PyTorch on `small`, and MFU
    python bench/train.py --scaling       # also step time vs sequence length and model size

1. xgen's jit-compiled step of the `small` model against transformers' `LlamaForCausalLM`
   with the same shapes, batch and sequence length, float32, one AdamW step with gradient
   clipping; medians of interleaved rounds, reported as a ratio. MFU is against the peak of
   a float32 matmul measured in the same run.
2. With --scaling: xgen's step time at 2K, 4K and 8K tokens per sequence with equal tokens
   per batch (chunked attention), for `tiny` and `small`.
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


def xgen_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from xgen.config import register_configs, to_object

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_object(compose("config", overrides=["optimizer=adamw", "optimizer.warmup_steps=0", *overrides]))


class XGenStep:
    """The trainer's own compiled step, fed a fixed random batch."""

    def __init__(self, *overrides: str):
        import jax
        import jax.numpy as jnp

        from xgen.train.trainer import Trainer

        self.cfg = xgen_config(*overrides)
        self.trainer = Trainer(self.cfg, Path(tempfile.mkdtemp()))
        self.state = self.trainer._init(jax.random.key(0))
        self.compiled = self.trainer.compile_step()
        b, t = self.trainer.batch_size, self.cfg.stage.seq_len
        tokens = np.random.default_rng(0).integers(0, 50000, (b, t + 1)).astype(np.int32)
        self.batch = self.trainer._global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
        self._jnp = jnp

    def step(self) -> float:
        t0 = time.perf_counter()
        self.state, out = self.compiled(self.state, self.batch)
        out["loss"].block_until_ready()
        return time.perf_counter() - t0


class TorchStep:
    """transformers' LlamaForCausalLM of the same shape, AdamW with LLaMA's settings."""

    def __init__(self, cfg, autocast_bf16: bool = False):
        import contextlib

        import torch

        torch.manual_seed(0)
        # PyTorch's mixed precision on the CPU: float32 parameters, bfloat16 matmuls.
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast_bf16 else contextlib.nullcontext
        self.torch = torch
        self.model = self.hf_model(cfg).train()
        o = cfg.optimizer
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        )
        b, t = cfg.stage.batch_tokens // cfg.stage.seq_len, cfg.stage.seq_len
        tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 50000, (b, t + 1)).astype(np.int64))
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]

    @staticmethod
    def hf_model(cfg):
        """A float32 `LlamaForCausalLM` with the shapes of `cfg.model` (random weights)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        m = cfg.model
        hf = LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads or m.n_heads,
            max_position_embeddings=m.max_positions, rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta,
            tie_word_embeddings=False, attn_implementation="sdpa",
        )  # fmt: skip
        return LlamaForCausalLM(hf).float()

    def step(self) -> float:
        torch = self.torch
        t0 = time.perf_counter()
        with self.autocast():
            logits = self.model(input_ids=self.inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def torch_matmul_peak(size: int = 2048) -> float:
    """The same square float32 matmul as `measure_matmul_peak`, in PyTorch: the libraries'
    own ceilings differ on this CPU, which bounds the achievable ratio."""
    from bench.matmul_peak import torch_matmul

    return torch_matmul(size, size, size)


def compare(batch: int, seq: int, rounds: int, steps: int) -> dict:
    from xgen.train.throughput import flops_per_token, measure_matmul_peak

    overrides = ("model=small", f"stage.seq_len={seq}", f"stage.batch_tokens={batch * seq}")
    ours = XGenStep(*overrides)
    theirs = TorchStep(ours.cfg)
    ours.step(), theirs.step()  # warm up both (compilation, allocator)
    t_ours, t_theirs = [], []
    for _ in range(rounds):
        t_ours += [ours.step() for _ in range(steps)]
        t_theirs += [theirs.step() for _ in range(steps)]
    peak = measure_matmul_peak("float32")
    torch_peak = torch_matmul_peak()
    tokens = batch * seq
    xgen_s, torch_s = statistics.median(t_ours), statistics.median(t_theirs)
    mfu = tokens * flops_per_token(ours.cfg.model, seq) / xgen_s / peak
    return {
        "shape": f"{batch} x {seq}",
        "xgen_step_s": round(xgen_s, 3),
        "torch_step_s": round(torch_s, 3),
        "xgen_tokens_per_s": round(tokens / xgen_s),
        "torch_tokens_per_s": round(tokens / torch_s),
        "ratio": round(torch_s / xgen_s, 3),
        "peak_gflops": round(peak / 1e9, 1),
        "torch_peak_gflops": round(torch_peak / 1e9, 1),
        "xgen_mfu": round(mfu, 3),
        "torch_mfu": round(tokens * flops_per_token(ours.cfg.model, seq) / torch_s / peak, 3),
        "steps": rounds * steps,
    }


def scaling(tokens: int, steps: int) -> list[dict]:
    rows = []
    for model in ("tiny", "small"):
        for seq in (2048, 4096, 8192):
            s = XGenStep(
                f"model={model}", "execution.attention=chunked", f"stage.seq_len={seq}", f"stage.batch_tokens={tokens}"
            )
            s.step()
            times = [s.step() for _ in range(steps)]
            rows.append({"model": model, "seq": seq, "batch": tokens // seq, "step_s": round(statistics.median(times), 2)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--scaling-tokens", type=int, default=8192)
    args = ap.parse_args()
    command = "python bench/train.py " + " ".join(sys.argv[1:])
    date = time.strftime("%Y-%m-%d")
    r = compare(args.batch, args.seq, args.rounds, args.steps)
    print(r, flush=True)
    write_section("train-torch", f"""
### Training step: xgen against PyTorch on `small` ({date}, 2 CPUs)

`{command}` — `model=small` (77.7M parameters), batch {r['shape']} tokens, float32, one AdamW step with clipping at 1.0; median of {r['steps']} steps each, in {args.rounds} interleaved rounds. PyTorch is transformers' `LlamaForCausalLM` (SDPA attention) with `torch.optim.AdamW`, eager. MFU counts 6 x matmul parameters + attention FLOPs per token against a float32 matmul peak of {r['peak_gflops']} GFLOP/s measured in the same run by a 2048² `jnp` matmul (the same matmul in PyTorch: {r['torch_peak_gflops']} GFLOP/s).

| | step | tokens/s | MFU |
|---|---|---|---|
| xgen (jit) | {r['xgen_step_s']} s | {r['xgen_tokens_per_s']:,} | {r['xgen_mfu']:.1%} |
| PyTorch {__import__('torch').__version__} | {r['torch_step_s']} s | {r['torch_tokens_per_s']:,} | {r['torch_mfu']:.1%} |
| **xgen / PyTorch tokens/s** (goal ≥ 1) | | **{r['ratio']}** | |
""")
    if args.scaling:
        rows = scaling(args.scaling_tokens, 2)
        table = "\n".join(f"| {x['model']} | {x['batch']} x {x['seq']} | {x['step_s']} s |" for x in rows)
        write_section("train-scaling", f"""
### Training step time by sequence length and model size ({date}, 2 CPUs)

`{command}` — {args.scaling_tokens:,} tokens per step at every length, `execution.attention=chunked` (the dense kernel's 8K step does not fit this machine), median of 2 steps.

| model | batch | step |
|---|---|---|
{table}
""")


if __name__ == "__main__":
    main()
