"""task=plan: the training step of a run, compiled for a TPU slice that is not here.

For `hardware` with a `tpu_topology`, libtpu describes the slice's devices and XLA compiles
the real step for them (ahead of time, on this CPU): per-chip memory comes from the
compiled program and FLOPs are counted in its program. For other hardware the figures are the
analytic estimates (parameters and optimizer state per shard; 6N + attention FLOPs).
Writes plan.json and prints a table. FLOPs are counted in the step's program
(`xgen.train.counted_flops`: XLA's own cost analysis, kept as `flops_per_step_xla`, counts a
loop's body once, so it undercounts scanned layers and chunked attention). A step that does
not fit is compiled again with the execution presets of `plan.presets` until one fits, which
the plan names as an override to paste (xgen/tasks/plan_advice.py). Each compile logs a line
after 10 s, then at doubling intervals up to a minute (a 7B step for a pod compiles for minutes); libtpu's start-up lines go to run.log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from xgen.config import XGenConfig

log = logging.getLogger(__name__)


def _compile_train(cfg: XGenConfig, run_dir: Path, devices: list, label: str = "") -> dict:
    """The train step of `cfg` compiled for the slice's devices: its per-chip memory, or, when
    XLA refuses it for HBM, the temporaries its refusal states (`compiled` is then None)."""
    from xgen.console import heartbeat
    from xgen.runtime import Runtime
    from xgen.train.trainer import Trainer, step_memory_bytes

    runtime = Runtime.of(cfg, devices=devices)
    trainer = Trainer(cfg, run_dir, runtime)
    out = {"runtime": runtime, "trainer": trainer, "compiled": None, "compile_s": None}
    with heartbeat(f"compiling the train step for {cfg.hardware.name}{label}"):
        started = time.perf_counter()
        try:
            out["compiled"] = trainer.compile_step()
        except Exception as ex:  # noqa: BLE001 - XLA refuses programs that cannot fit in HBM
            needed = re.search(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)G\)", str(ex))
            if needed is None:
                raise
            out["hbm"] = int(float(needed.group(1)) * 2**30)
            return out
    out["compile_s"] = time.perf_counter() - started
    out["hbm"] = step_memory_bytes(out["compiled"])
    return out


def _try_presets(cfg: XGenConfig, run_dir: Path, devices: list) -> list[dict]:
    """Compile the step with each preset `plan_advice.presets_to_try` names, in order, until
    one fits. A preset that does not compile for this slice is reported with its error's
    first line (its traceback in run.log), and the next is tried."""
    from xgen.console import FILE_ONLY
    from xgen.tasks.plan_advice import command_overrides, presets_to_try, with_preset

    capacity, overrides, tried = cfg.hardware.memory_per_chip_bytes, command_overrides(), []
    for preset in presets_to_try(cfg):
        entry: dict = {"execution": preset, "hbm_per_chip_bytes": None, "compile_s": None, "fits": False, "error": None}
        tried.append(entry)
        try:
            result = _compile_train(with_preset(cfg, preset, overrides), run_dir, devices, f" with execution={preset}")
        except Exception as ex:  # noqa: BLE001 - one preset's failure is reported in its row, not fatal
            logging.getLogger(FILE_ONLY).warning("execution=%s did not compile", preset, exc_info=True)
            entry["error"] = (str(ex).strip().splitlines() or [type(ex).__name__])[0]
            continue
        entry["hbm_per_chip_bytes"], entry["compile_s"] = result["hbm"], result["compile_s"]
        entry["fits"] = result["compiled"] is not None and (capacity is None or result["hbm"] <= capacity)
        if entry["fits"]:
            break
    return tried


def _generate_plan(cfg: XGenConfig, runtime) -> dict:
    """One decoding step of `serve.max_batch` rows over a full KV cache (`generate.max_len`, or
    the model's positions), compiled for the slice by the same Engine that serves: per-chip
    memory of the sharded parameters, caches and temporaries."""
    from xgen.console import heartbeat
    from xgen.generate.engine import Engine
    from xgen.tokenizer import Tokenizer
    from xgen.train.trainer import step_memory_bytes

    engine = Engine(runtime, runtime.abstract_params, Tokenizer.from_name(cfg.tokenizer.name), max_len=cfg.generate.max_len)
    batch, slots = cfg.serve.max_batch, engine.max_len
    with heartbeat(f"compiling the decode step for {cfg.hardware.name} (plan.generate=false skips it)"):
        compiled = engine.compile_decode(batch, slots)
    return {
        "batch": -(-batch // engine.row_multiple) * engine.row_multiple,
        "slots": slots,
        "kv_cache_dtype": str(runtime.kv_dtype),
        "hbm_per_chip_bytes": step_memory_bytes(compiled),
    }


def run(cfg: XGenConfig, run_dir: Path) -> dict:
    from xgen.tasks.plan_advice import advise, check_presets, command_overrides, tried_row

    check_presets(cfg)
    # Planning only compiles: the slice's devices come from libtpu's topology API, which needs
    # no TPU backend. Starting one would look for chips: off a TPU VM, "No jellyfish device
    # found" on the console; on one, chips that a training run may hold (and libtpu's lock,
    # which ALLOW_MULTIPLE_LIBTPU_LOAD lets the topology API load beside).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if cfg.hardware.tpu_topology:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from xgen.model import count_params
    from xgen.parallel import topology_devices
    from xgen.train.throughput import attention_square_flops, flops_per_token
    from xgen.xla_logs import native_stderr_to_run_log

    hw, stage = cfg.hardware, cfg.stage
    params = count_params(cfg.model)
    n_chips = hw.num_devices
    flops_6n = 6.0 * params * stage.batch_tokens
    flops_model = flops_per_token(cfg.model, stage.seq_len) * stage.batch_tokens  # what MFU counts
    attention_full, attention_masked = attention_square_flops(
        cfg.model, stage.seq_len, stage.batch_tokens, remat=cfg.execution.remat != "none"
    )
    # XLA's cost analysis cannot see into a Pallas kernel: splash's work is added analytically.
    opaque_attention = attention_full - attention_masked if cfg.execution.attention == "splash" else 0.0
    compiled_ok, compile_s, bytes_per_chip, xla_flops, tried = False, None, None, None, []
    capacity = hw.memory_per_chip_bytes
    if hw.tpu_topology:
        # libtpu's start-up complaints off a TPU VM (xgen/xla_logs.py) go to run.log.
        with native_stderr_to_run_log("libtpu", run_dir / "libtpu.stderr"):
            devices = topology_devices(hw)
        step = _compile_train(cfg, run_dir, devices)  # one runtime: train and generate steps
        runtime, trainer, compiled = step["runtime"], step["trainer"], step["compiled"]
        hbm, compile_s = step["hbm"], step["compile_s"]
        method = f"compiled for {hw.tpu_topology} ({hw.device_kind}) by XLA"
        if compiled is None:
            flops = flops_model
            method += ", which refused it: the HBM figure is its temporaries alone, FLOPs analytic"
        else:
            compiled_ok = True
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            xla_flops = float(cost["flops"]) * n_chips  # the cost analysis is of one device's program
            bytes_per_chip = float(cost.get("bytes accessed", 0.0))
            # XLA counts a loop's body once (scanned layers, chunked attention): count the program.
            flops = trainer.step_flops() + opaque_attention
            if opaque_attention:
                method += " (splash's Pallas kernels, opaque to FLOP counting, added analytically)"
        if not (compiled_ok and (capacity is None or hbm <= capacity)):
            tried = _try_presets(cfg, run_dir, devices)
    else:
        shards = n_chips  # parameters, gradients and Adam moments, fully sharded (fsdp)
        hbm = int(params * 4 * 4 / shards)
        flops = flops_model
        method = "analytic estimate (no compiler target for this hardware)"
    peak = hw.peak_flops_per_chip
    step_s = flops / (peak * n_chips * cfg.plan.mfu) if peak else None
    plan = {
        "model": cfg.model.name,
        "stage": stage.name,
        "hardware": hw.name,
        "method": method,
        "params": params,
        "chips": n_chips,
        "batch_tokens": stage.batch_tokens,
        "hbm_per_chip_bytes": hbm,
        "hbm_capacity_bytes": capacity,
        "fits": (compiled_ok or not hw.tpu_topology) and (capacity is None or hbm <= capacity),
        "flops_per_step": flops,
        "flops_per_step_6n": flops_6n,
        "flops_per_step_model": flops_model,
        "flops_per_step_xla": xla_flops,
        "attention_flops_square": attention_full,
        "attention_flops_masked": attention_masked,
        "attention_masked_share": attention_masked / flops,
        "mfu_assumed": cfg.plan.mfu,
        "step_time_s": step_s,
        "tokens_per_s": stage.batch_tokens / step_s if step_s else None,
        "compile_s": compile_s,
        **_roofline(flops / n_chips, bytes_per_chip, peak, hw.memory_bandwidth_per_chip),
    }
    state = jax.tree.leaves(trainer.abstract_state) if hw.tpu_topology else None
    plan["recovery"] = _recovery(cfg, params, state, step_s, compile_s)
    plan["presets_tried"] = tried
    advice = advise(cfg, plan["fits"], tried, command_overrides())
    plan["verdict"], plan["advice"] = advice.pop("verdict"), advice
    if hw.tpu_topology and cfg.plan.generate:
        plan["generate"] = _generate_plan(cfg, runtime)
    (run_dir / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b is not None else "unknown"  # noqa: E731
    rows = [
        ("model", f"{cfg.model.name}: {params:,} parameters"),
        ("stage", f"{stage.name}: {stage.batch_tokens // stage.seq_len} x {stage.seq_len} tokens per step"),
        ("hardware", f"{hw.name}: {n_chips} x {hw.device_kind}, mesh {dict(hw.mesh.__dict__)}"),
        ("method", method),
        ("HBM per chip", f"{gib(hbm)} of {gib(capacity)}: {'fits' if plan['fits'] else 'does not fit'}"),
        *(("preset tried", f"execution={t['execution']}: {tried_row(t, capacity)}") for t in tried),
        *((("advice", plan["verdict"].removeprefix("does not fit: ")),) if not plan["fits"] else ()),
        *((("command", advice["command"]),) if advice["command"] else ()),
        ("FLOPs per step", f"{flops:.3e} ({'counted in the step' if compiled_ok else '6N + attention'}) vs {flops_6n:.3e} (6N)"),
        ("masked attention", f"{attention_masked:.3e} FLOPs above the diagonal ({attention_masked / flops:.1%} of this step, "
                             f"remat {'included' if cfg.execution.remat != 'none' else 'none'}): what causal kernels skip"),  # fmt: skip
        ("step time", f"{step_s:.2f} s at {cfg.plan.mfu:.0%} MFU" if step_s else "unknown (no peak FLOP/s)"),
        ("tokens/s", f"{plan['tokens_per_s']:,.0f}" if step_s else "unknown"),
    ]
    if plan["roofline_step_time_s"] is not None:
        rows.append(("roofline", f"{plan['roofline_step_time_s']:.2f} s per step ({plan['roofline_bound']}-bound: "
                                 f"{flops / n_chips:.3e} FLOPs and {bytes_per_chip:.3e} bytes per chip; XLA's byte "
                                 "count takes loop bodies once, a lower bound when layers are scanned)"))  # fmt: skip
    if compile_s is not None:
        rows.append(("compile time", f"{compile_s:.1f} s"))
    r = plan["recovery"]
    lost = f"{r['lost_work_s_mean'] / 60:.0f} min of steps on average (half the checkpoint interval)" if r["lost_work_s_mean"] else "unknown"
    rows.append(("recovery", f"restore {gib(r['checkpoint_bytes_per_host'])} per host ({gib(r['checkpoint_bytes'])} in all, "
                             f"{r['hosts']} hosts) in {r['restore_s']:.0f} s at {r['storage_bytes_per_s'] / 1e9:g} GB/s "
                             f"(plan.storage_bytes_per_s){f', plus {compile_s:.0f} s to compile' if compile_s else ''}; "
                             f"a failure loses {lost}"))  # fmt: skip
    if "generate" in plan:
        g = plan["generate"]
        rows.append(
            ("generate step", f"{g['batch']} rows x {g['slots']} cache slots ({g['kv_cache_dtype']}): {gib(g['hbm_per_chip_bytes'])} per chip")
        )
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    log.info("plan written to %s", run_dir / "plan.json")
    return plan


def _recovery(cfg: XGenConfig, params: int, state: list | None, step_s: float | None, compile_s: float | None) -> dict:
    """What a failure costs (docs/launching.md): the checkpoint every host reads back, at the
    stated storage bandwidth, and the steps lost since the last save, half an interval on
    average. The state's bytes come from the compiled trainer's abstract state when there is
    one, else parameters + Adam's two moments in float32."""
    hw, t = cfg.hardware, cfg.trainer
    total = sum(x.size * x.dtype.itemsize for x in state) if state else params * 4 * 3
    per_host_chips = int(np.prod(hw.tpu_chips_per_host)) if hw.platform == "tpu" else 1
    hosts = hw.num_processes or max(hw.num_devices // per_host_chips, 1)
    intervals = [t.checkpoint_minutes * 60] if t.checkpoint_minutes else []
    if t.checkpoint_every and step_s:
        intervals.append(t.checkpoint_every * step_s)
    interval = min(intervals) if intervals else None
    return {
        "checkpoint_bytes": total,
        "hosts": hosts,
        "checkpoint_bytes_per_host": total / hosts,
        "storage_bytes_per_s": cfg.plan.storage_bytes_per_s,
        "restore_s": total / hosts / cfg.plan.storage_bytes_per_s,
        "compile_s": compile_s,
        "checkpoint_interval_s": interval,
        "lost_work_s_mean": interval / 2 if interval else None,
    }


def _roofline(flops_per_chip: float, bytes_per_chip: float | None, peak: float | None, bandwidth: float | None) -> dict:
    """The step's time if each chip ran at its peak FLOP/s or moved its bytes at full HBM
    bandwidth, whichever takes longer: a lower bound that needs no MFU assumption, from the
    compiled program's own counts."""
    if not (bytes_per_chip and peak and bandwidth):
        return {"roofline_step_time_s": None, "roofline_bound": None, "bytes_accessed_per_chip": bytes_per_chip}
    compute, memory = flops_per_chip / peak, bytes_per_chip / bandwidth
    return {
        "roofline_step_time_s": max(compute, memory),
        "roofline_bound": "compute" if compute >= memory else "memory",
        "bytes_accessed_per_chip": bytes_per_chip,
    }
