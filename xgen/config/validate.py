"""Cross-field checks that types alone cannot express; each failure names its keys."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from xgen.config.errors import ConfigError
from xgen.config.schema import ROPE_RULE_KEYS, HardwareConfig, RopeScalingConfig, RopeType, XGenConfig

# Benchmarks `trainer.eval_tasks` runs on the parameters in memory (log-likelihood scoring
# only: generation benchmarks need a sandbox or a judge, and belong to task=eval).
IN_LOOP_BENCHMARKS = ("zeroshot", "mmlu_0shot", "mmlu_5shot")

# Tasks that train, and so need a batch that splits over the mesh.
TRAINING_TASKS = ("pretrain", "pretrain_all", "sft", "plan")


def _range_checks(cfg: XGenConfig) -> list[tuple[bool, str]]:
    """Each value against its meaning: finite, and in its range (before any relation between
    values is computed: a zero head count must not reach a division)."""
    m, s, o, t, hw = cfg.model, cfg.stage, cfg.optimizer, cfg.trainer, cfg.hardware
    rules: list[tuple[str, Any, str]] = [
        ("model.d_model", m.d_model, ">0"), ("model.n_layers", m.n_layers, ">0"), ("model.n_heads", m.n_heads, ">0"),
        ("model.n_kv_heads", m.n_kv_heads, ">0?"), ("model.d_ff", m.d_ff, ">0"), ("model.vocab_size", m.vocab_size, ">0"),
        ("model.max_positions", m.max_positions, ">0"), ("model.rms_norm_eps", m.rms_norm_eps, ">0"),
        ("model.rope_theta", m.rope_theta, ">0"), ("model.init_std", m.init_std, ">0"),
        ("execution.attention_chunk", cfg.execution.attention_chunk, ">0"), ("execution.loss_chunk", cfg.execution.loss_chunk, ">=0"),
        ("stage.seq_len", s.seq_len, ">0"), ("stage.batch_tokens", s.batch_tokens, ">0"),
        ("stage.token_budget", s.token_budget, ">=0"),
        ("optimizer.lr", o.lr, ">0"), ("optimizer.beta1", o.beta1, "[0,1)"), ("optimizer.beta2", o.beta2, "[0,1)"),
        ("optimizer.eps", o.eps, ">0"), ("optimizer.weight_decay", o.weight_decay, ">=0"),
        ("optimizer.grad_clip", o.grad_clip, ">0"), ("optimizer.warmup_steps", o.warmup_steps, ">=0"),
        ("optimizer.decay_steps", o.decay_steps, ">0?"), ("optimizer.min_lr_ratio", o.min_lr_ratio, "[0,1]"),
        ("trainer.steps", t.steps, ">0?"), ("trainer.log_every", t.log_every, ">0"),
        ("trainer.checkpoint_every", t.checkpoint_every, ">=0"), ("trainer.checkpoints_to_keep", t.checkpoints_to_keep, ">0"),
        ("trainer.checkpoints_keep_every", t.checkpoints_keep_every, ">0?"),
        ("trainer.checkpoint_minutes", t.checkpoint_minutes, ">=0"), ("trainer.step_timeout_minutes", t.step_timeout_minutes, ">=0"),
        ("trainer.grad_accum_steps", t.grad_accum_steps, ">0"), ("trainer.rewarm_steps", t.rewarm_steps, ">=0"),
        ("trainer.spike.threshold", t.spike.threshold, ">0"), ("trainer.spike.decay", t.spike.decay, "(0,1)"),
        ("trainer.spike.warmup_steps", t.spike.warmup_steps, ">=0"), ("trainer.spike.max_rollbacks", t.spike.max_rollbacks, ">0"),
        ("loader.read_threads", cfg.loader.read_threads, ">0"), ("loader.prefetch_batches", cfg.loader.prefetch_batches, ">=0"),
        ("prepare.workers", cfg.prepare.workers, ">=0"), ("prepare.batch_documents", cfg.prepare.batch_documents, ">0"),
        ("prepare.shard_tokens", cfg.prepare.shard_tokens, ">0"), ("prepare.retries", cfg.prepare.retries, ">=0"),
        ("prepare.split_bytes", cfg.prepare.split_bytes, ">0"), ("prepare.sample_bytes", cfg.prepare.sample_bytes, ">0"),
        ("data_mix.min_doc_tokens", cfg.data_mix.min_doc_tokens, ">=0"),
        ("data_mix.weight_tolerance", cfg.data_mix.weight_tolerance, ">=0"),
        ("data_mix.heldout_share", cfg.data_mix.heldout_share, "[0,0.5]"),
        ("trainer.eval_every", t.eval_every, ">=0"), ("trainer.eval_batches", t.eval_batches, ">0"),
        ("trainer.eval_tasks_every", t.eval_tasks_every, ">=0"), ("trainer.eval_tasks_limit", t.eval_tasks_limit, ">0?"),
        ("hardware.num_devices", hw.num_devices, ">0"), ("hardware.host_device_count", hw.host_device_count, ">0?"),
        ("hardware.peak_flops_per_chip", hw.peak_flops_per_chip, ">0?"),
        ("hardware.memory_per_chip_bytes", hw.memory_per_chip_bytes, ">0?"),
        ("hardware.memory_bandwidth_per_chip", hw.memory_bandwidth_per_chip, ">0?"),
        ("hardware.chip_power_w", hw.chip_power_w, ">0?"), ("hardware.pue", hw.pue, ">0"),
        ("generate.max_new_tokens", cfg.generate.max_new_tokens, ">0"), ("generate.temperature", cfg.generate.temperature, ">=0"),
        ("generate.top_k", cfg.generate.top_k, ">=0"), ("generate.top_p", cfg.generate.top_p, "(0,1]"),
        ("generate.max_len", cfg.generate.max_len, ">0?"),
        ("serve.max_batch", cfg.serve.max_batch, ">0"), ("serve.batch_wait_ms", cfg.serve.batch_wait_ms, ">=0"),
        ("serve.prefill_chunk", cfg.serve.prefill_chunk, ">0"), ("serve.max_queued_rows", cfg.serve.max_queued_rows, ">0"),
        ("serve.max_body_bytes", cfg.serve.max_body_bytes, ">0"), ("serve.shutdown_grace_s", cfg.serve.shutdown_grace_s, ">=0"),
        ("serve.max_request_share", cfg.serve.max_request_share, "(0,1]"),
        ("serve.stream_buffer_chunks", cfg.serve.stream_buffer_chunks, ">0"),
        ("serve.idle_timeout_s", cfg.serve.idle_timeout_s, ">0"), ("serve.read_timeout_s", cfg.serve.read_timeout_s, ">0"),
        ("serve.stall_timeout_s", cfg.serve.stall_timeout_s, ">0"), ("serve.max_connections", cfg.serve.max_connections, ">=0"),
        ("serve.log_repeat_s", cfg.serve.log_repeat_s, ">=0"),
        ("plan.mfu", cfg.plan.mfu, "(0,1]"), ("plan.storage_bytes_per_s", cfg.plan.storage_bytes_per_s, ">0"),
        ("seed", cfg.seed, "seed"), ("data_mix.seed", cfg.data_mix.seed, "seed"),
    ]  # fmt: skip
    for name, src in cfg.data_mix.sources.items():
        rules.append((f"data_mix.sources.{name}.weight", src.weight, ">0"))
        rules.append((f"data_mix.sources.{name}.max_documents", src.max_documents, ">0?"))
    for name, share in cfg.data_mix.stage_split.items():
        rules.append((f"data_mix.stage_split.{name}", share, ">0"))
    if cfg.eval is not None:
        ev = cfg.eval
        rules += [("eval.limit", ev.limit, ">0?"), ("eval.batch_size", ev.batch_size, ">0"), ("eval.shots", ev.shots, ">=0"),
                  ("eval.n_samples", ev.n_samples, ">0"), ("eval.max_new_tokens", ev.max_new_tokens, ">0"),
                  ("eval.temperature", ev.temperature, ">=0"), ("eval.top_p", ev.top_p, "(0,1]"),
                  ("eval.max_input_tokens", ev.max_input_tokens, ">0?"), ("eval.min_tokens", ev.min_tokens, ">0"),
                  ("eval.passkey_trials", ev.passkey_trials, ">0"),
                  *((f"eval.passkey_lengths[{i}]", n, ">0") for i, n in enumerate(ev.passkey_lengths)),
                  *((f"eval.passkey_depths[{i}]", d, "[0,1]") for i, d in enumerate(ev.passkey_depths))]  # fmt: skip
    if cfg.sft is not None:
        rules += [("sft.epochs", cfg.sft.epochs, ">0"), ("sft.heldout", cfg.sft.heldout, ">=0"), ("sft.seed", cfg.sft.seed, "seed")]
    return [_in_range(key, value, rule) for key, value, rule in rules]


_RULES = {
    ">0": (lambda v: v > 0, "> 0"), ">=0": (lambda v: v >= 0, ">= 0"), "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"), "(0,1)": (lambda v: 0 < v < 1, "in (0, 1)"),
    "(0,1]": (lambda v: 0 < v <= 1, "in (0, 1]"), "[0,0.5]": (lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
    "seed": (lambda v: isinstance(v, int) and 0 <= v < 2**63, "in [0, 2**63) (JAX's keys take 64 bits, numpy's generators a seed >= 0)"),
}  # fmt: skip


def _in_range(key: str, value: Any, rule: str) -> tuple[bool, str]:
    """`rule` ending in `?`: null is allowed too."""
    optional, rule = rule.endswith("?"), rule.rstrip("?")
    test, words = _RULES[rule]
    if value is None:
        return optional, f"{key} must be set (a number {words})"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and test(value)
    return ok, f"{key}={value} must be a finite number {words}" + (" (or null)" if optional else "")


def check_rope_scaling(s: RopeScalingConfig, where: str) -> None:
    """ConfigError naming `where` (`model.rope_scaling`, or an HF config.json) for a rule
    missing what it needs, or settings that the chosen rule would silently ignore."""
    default, kind = RopeScalingConfig(), s.type
    used = ROPE_RULE_KEYS[kind]
    for key in vars(default):
        if key != "type" and key not in used and getattr(s, key) != getattr(default, key):
            raise ConfigError(f"{where}.{key}={getattr(s, key)} has no effect with type={kind}")
    if kind == RopeType.default:
        return
    for key, value, rule in [("factor", s.factor, ">0"), ("attention_factor", s.attention_factor, ">0?")]:
        ok, message = _in_range(f"{where}.{key}", value, rule)
        if not ok:
            raise ConfigError(message)
    if s.factor < 1:
        raise ConfigError(f"{where}.factor={s.factor} must be >= 1 (it stretches the context)")
    if kind in (RopeType.yarn, RopeType.llama3):
        ok, message = _in_range(f"{where}.original_max_positions", s.original_max_positions, ">0")
        if not ok:
            raise ConfigError(f"{message}: type={kind} needs the length the model was pre-trained at")
    if kind == RopeType.llama3 and not 0 < s.low_freq_factor < s.high_freq_factor:
        raise ConfigError(
            f"{where}: low_freq_factor={s.low_freq_factor} and high_freq_factor={s.high_freq_factor} "
            "must satisfy 0 < low < high"
        )
    if kind == RopeType.yarn and not 0 < s.beta_slow <= s.beta_fast:
        raise ConfigError(f"{where}: beta_slow={s.beta_slow} and beta_fast={s.beta_fast} must satisfy 0 < slow <= fast")


def validate(cfg: XGenConfig) -> None:
    """Raise ConfigError (one line, naming the key, its value and the rule) for a config that
    cannot run or would run wrong; only the config is read (no data, no devices)."""
    from xgen.tokenizer import n_tokens_of

    for ok, message in _range_checks(cfg):
        if not ok:
            raise ConfigError(message)
    check_rope_scaling(cfg.model.rope_scaling, "model.rope_scaling")
    m, s, hw, t = cfg.model, cfg.stage, cfg.hardware, cfg.trainer
    n_kv = m.n_kv_heads or m.n_heads
    checks = [
        (m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}"),
        ((m.d_model // m.n_heads) % 2 == 0, f"model head size {m.d_model // m.n_heads} must be even for rotary embeddings"),
        (m.n_heads % n_kv == 0, f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={n_kv}"),
        (s.seq_len <= m.max_positions, f"stage.seq_len={s.seq_len} exceeds model.max_positions={m.max_positions}"),
        (s.batch_tokens % s.seq_len == 0, f"stage.batch_tokens={s.batch_tokens} is not a multiple of stage.seq_len={s.seq_len}"),
        (s.batch_tokens >= s.seq_len, f"stage.batch_tokens={s.batch_tokens} is less than one sequence of {s.seq_len}"),
        (bool(cfg.data_mix.sources), f"data_mix {cfg.data_mix.name!r} has no sources"),
        (
            not (cfg.execution.attention == "splash" and hw.platform == "gpu"),
            f"execution.attention=splash is a TPU (Pallas Mosaic) kernel and hardware={hw.name} is a GPU; use cudnn",
        ),
        (
            cfg.execution.attention != "cudnn" or hw.platform == "gpu",
            f"execution.attention=cudnn is cuDNN's GPU kernel and hardware={hw.name} is {hw.platform}; "
            "use block_causal (or splash on a TPU)",
        ),
    ]
    split = cfg.data_mix.stage_split
    # task=pretrain_all validates each stage's own config (as task=pretrain), not its top-level stage.
    if split and s.name not in split and cfg.task.name == "pretrain":
        checks.append((False, (
            f"stage={s.name} has no chunk in data_mix={cfg.data_mix.name}'s stage_split ({', '.join(split)}): it would "
            f"train on the other stages' documents; add data_mix.stage_split.{s.name}=<share> (the other chunks are "
            "then re-cut) or choose a mix without a split"
        )))
    for name, src in cfg.data_mix.sources.items():
        checks.append((src.kind != "prepared" or bool(src.path), f"data_mix.sources.{name}: kind 'prepared' needs a path"))
        local = src.kind == "prepared" and src.path and "://" not in src.path
        on_use = cfg.data_mix.prepare_on_use and src.raw is not None  # prepared by the run (xgen.data.prepare.ensure_prepared)
        if local and cfg.task.name == "pretrain" and not on_use and not (Path(src.path) / "manifest.json").exists():
            checks.append((False, f"data_mix.sources.{name}.path={src.path}: not prepared (no manifest.json); run task=prepare first"))
    if t.profile_steps:
        a, b = (list(t.profile_steps) + [None, None])[:2]
        checks.append((
            len(t.profile_steps) == 2 and isinstance(a, int) and isinstance(b, int) and 1 <= a <= b,
            f"trainer.profile_steps={list(t.profile_steps)} must be [first, last] steps with 1 <= first <= last",
        ))  # fmt: skip
    unknown = [n for n in t.eval_tasks if n not in IN_LOOP_BENCHMARKS]
    checks.append((not unknown, f"trainer.eval_tasks: {', '.join(map(str, unknown))} cannot run in the loop; "
                                f"the log-likelihood benchmarks can: {', '.join(IN_LOOP_BENCHMARKS)}"))  # fmt: skip
    checks.append((not t.eval_tasks_every or bool(t.eval_tasks), "trainer.eval_tasks_every is set but trainer.eval_tasks is empty"))
    if cfg.task.name == "sft":  # SFT evaluates its own held-out conversations (sft.heldout)
        for key, value in (("trainer.eval_every", t.eval_every), ("trainer.eval_tasks_every", t.eval_tasks_every)):
            checks.append((not value, f"{key}={value}: evaluation in the loop is pre-training's (task=pretrain); "
                                      f"task={cfg.task.name} does not run it"))  # fmt: skip
    checks += _own_data_checks(cfg)
    if t.init_from is not None and cfg.task.name in TRAINING_TASKS:
        checks.append((Path(t.init_from).exists(), f"trainer.init_from={t.init_from}: no such directory"))
    try:
        vocab_needed = n_tokens_of(cfg.tokenizer.name)
    except ValueError as ex:
        raise ConfigError(str(ex)) from None
    checks.append(
        (
            m.vocab_size >= vocab_needed,
            f"model.vocab_size={m.vocab_size} is smaller than tokenizer {cfg.tokenizer.name!r}'s {vocab_needed} tokens",
        )
    )
    if cfg.task.name in ("pretrain", "pretrain_all", "sft"):
        check_trackers(cfg)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    sizes = mesh_shape(hw)  # raises on a mesh that cannot cover the devices
    if sizes["context"] > 1:
        context = sizes["context"]
        length_axes = [axes for name, axes in hw.logical_axis_rules if name == "length"]
        if not any("context" in ([axes] if isinstance(axes, str) else list(axes or [])) for axes in length_axes):
            raise ConfigError(
                f"hardware.mesh.context={context} but hardware.logical_axis_rules maps `length` to {length_axes or 'nothing'}: "
                "every device of the context axis would compute the same thing; add [length, context]"
            )
        if cfg.execution.context_strategy == "ring" and cfg.execution.attention == "splash":
            raise ConfigError(
                "execution.context_strategy=ring runs the tiled kernel on each passing part; splash needs "
                "execution.context_strategy=all_gather (or execution.attention=block_causal)"
            )
        if cfg.execution.attention == "cudnn":
            raise ConfigError(
                f"execution.attention=cudnn does not run with hardware.mesh.context={context} "
                "(context parallelism gathers keys per device); use block_causal"
            )
        if cfg.task.name in TRAINING_TASKS and s.seq_len % (2 * context):
            raise ConfigError(
                f"stage.seq_len={s.seq_len} does not split into 2 x hardware.mesh.context={context} equal chunks "
                "(context parallelism balances the causal work by giving each device two of them)"
            )
        local, lane = s.seq_len // context, 128  # splash tiles queries in multiples of 128 (xgen/model/splash.py)
        block = max(lane, min(cfg.execution.attention_chunk, -(-local // lane) * lane) // lane * lane)
        if cfg.task.name in TRAINING_TASKS and cfg.execution.attention == "splash" and local % block:
            raise ConfigError(
                f"stage.seq_len={s.seq_len} gives {local} queries per device over hardware.mesh.context={context}, "
                f"not a multiple of splash's {block}-token block (execution.attention_chunk={cfg.execution.attention_chunk})"
            )
    if cfg.task.name in TRAINING_TASKS:
        batch, accum, shards = s.batch_tokens // s.seq_len, t.grad_accum_steps, sizes["data"] * sizes["fsdp"]
        if batch % accum or (batch // accum) % shards:
            raise ConfigError(
                f"batch of {batch} sequences (stage.batch_tokens / stage.seq_len) in trainer.grad_accum_steps={accum} "
                f"micro-batches does not split over the mesh's data x fsdp = {shards} devices"
            )


def check_trackers(cfg: XGenConfig) -> None:
    """A tracker whose package is missing or broken fails here, in one line, before any data
    is read or anything compiled (xgen/train/trackers.py opens them after the first compile)."""
    import importlib

    for name, module in (("tensorboard", "tensorboardX"), ("wandb", "wandb")):
        if getattr(cfg.tracker, name) is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as ex:
            raise ConfigError(f"tracker={name} needs {module} ({ex}): pip install 'xgen[{name}]'") from None


def _own_data_checks(cfg: XGenConfig) -> list[tuple[bool, str]]:
    """`data_mix.paths` and `data_mix.text_field` are read only by a mix whose source
    interpolates them (data_mix=files): set for another mix they would be ignored, and the
    run would train on something else than the files named. A raw source needs files."""
    mix, checks = cfg.data_mix, []
    raws = {name: src.raw for name, src in mix.sources.items() if src.kind == "prepared" and src.raw is not None}
    if mix.paths:
        checks.append((any(list(r.paths) == list(mix.paths) for r in raws.values()), (
            f"data_mix.paths is set but no source of data_mix={mix.name} reads it (data_mix=files does: "
            f"python -m xgen.run data_mix=files data_mix.paths='[...]')"
        )))  # fmt: skip
    if mix.text_field is not None:
        checks.append((any(r.text_field == mix.text_field for r in raws.values()), (
            f"data_mix.text_field={mix.text_field} is set but no source of data_mix={mix.name} reads it; "
            "a source names its own: data_mix.sources.<name>.raw.text_field"
        )))  # fmt: skip
    if cfg.task.name in ("prepare", "pretrain", "pretrain_all"):
        for name, raw in raws.items():
            key = "data_mix.paths" if mix.name == "files" else f"data_mix.sources.{name}.raw.paths"
            example = f"{key}='[my/*.jsonl.gz]'"
            checks.append((bool(raw.paths), f"data_mix={mix.name}: no files to read (data_mix.sources.{name}.raw.paths is empty); name them: {example}"))
    return checks


def mesh_shape(hw: HardwareConfig) -> dict[str, int]:
    """Axis sizes of the mesh with -1 filled in from hardware.num_devices."""
    sizes = {"data": hw.mesh.data, "fsdp": hw.mesh.fsdp, "context": hw.mesh.context, "tensor": hw.mesh.tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"hardware.mesh: only one axis may be -1, got {free}")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ConfigError(f"hardware.mesh: sizes must be positive or -1, got {sizes}")
    fixed = 1
    for v in sizes.values():
        fixed *= v if v > 0 else 1
    if free:
        if hw.num_devices % fixed:
            raise ConfigError(f"hardware.mesh {sizes} cannot divide hardware.num_devices={hw.num_devices}")
        sizes[free[0]] = hw.num_devices // fixed
    elif fixed != hw.num_devices:
        raise ConfigError(f"hardware.mesh {sizes} has {fixed} devices but hardware.num_devices={hw.num_devices}")
    return sizes
