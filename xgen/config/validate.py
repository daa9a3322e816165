"""Cross-field checks that types alone cannot express; each failure names its keys."""

from __future__ import annotations

from xgen.config.errors import ConfigError
from xgen.config.schema import HardwareConfig, XGenConfig


def validate(cfg: XGenConfig) -> None:
    """Raise ConfigError (one line, naming the keys) for a config that cannot run."""
    from xgen.tokenizer import n_tokens_of

    m, s, hw, t = cfg.model, cfg.stage, cfg.hardware, cfg.trainer
    n_kv = m.n_kv_heads or m.n_heads
    checks = [
        (m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}"),
        ((m.d_model // m.n_heads) % 2 == 0, f"model head size {m.d_model // m.n_heads} must be even for rotary embeddings"),
        (m.n_heads % n_kv == 0, f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={n_kv}"),
        (cfg.execution.attention_chunk > 0, f"execution.attention_chunk={cfg.execution.attention_chunk} must be positive"),
        (s.seq_len <= m.max_positions, f"stage.seq_len={s.seq_len} exceeds model.max_positions={m.max_positions}"),
        (s.batch_tokens % s.seq_len == 0, f"stage.batch_tokens={s.batch_tokens} is not a multiple of stage.seq_len={s.seq_len}"),
        (s.batch_tokens >= s.seq_len, f"stage.batch_tokens={s.batch_tokens} is less than one sequence of {s.seq_len}"),
        (t.grad_accum_steps > 0, f"trainer.grad_accum_steps={t.grad_accum_steps} must be positive"),
        (t.rewarm_steps >= 0, f"trainer.rewarm_steps={t.rewarm_steps} must not be negative"),
        (0 < t.spike.decay < 1, f"trainer.spike.decay={t.spike.decay} must be in (0, 1)"),
        (t.log_every > 0, f"trainer.log_every={t.log_every} must be positive"),
        (t.steps is None or t.steps > 0, f"trainer.steps={t.steps} must be positive"),
        (cfg.optimizer.lr > 0, f"optimizer.lr={cfg.optimizer.lr} must be positive"),
        (bool(cfg.data_mix.sources), f"data_mix {cfg.data_mix.name!r} has no sources"),
    ]
    for name, src in cfg.data_mix.sources.items():
        checks.append((src.weight > 0, f"data_mix.sources.{name}.weight={src.weight} must be positive"))
        checks.append((src.kind != "prepared" or bool(src.path), f"data_mix.sources.{name}: kind 'prepared' needs a path"))
    checks.append((cfg.loader.read_threads > 0, f"loader.read_threads={cfg.loader.read_threads} must be positive"))
    checks.append((cfg.prepare.workers >= 0, f"prepare.workers={cfg.prepare.workers} must be 0 (in-process) or more"))
    if cfg.eval is not None:
        checks.append((cfg.eval.limit is None or cfg.eval.limit > 0, f"eval.limit={cfg.eval.limit} must be positive"))
        checks.append((cfg.eval.batch_size > 0, f"eval.batch_size={cfg.eval.batch_size} must be positive"))
    vocab_needed = n_tokens_of(cfg.tokenizer.name)
    checks.append(
        (
            m.vocab_size >= vocab_needed,
            f"model.vocab_size={m.vocab_size} is smaller than tokenizer {cfg.tokenizer.name!r}'s {vocab_needed} tokens",
        )
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    mesh_shape(hw)  # raises on a mesh that cannot cover the devices


def mesh_shape(hw: HardwareConfig) -> dict[str, int]:
    """Axis sizes of the mesh with -1 filled in from hardware.num_devices."""
    sizes = {"data": hw.mesh.data, "fsdp": hw.mesh.fsdp, "tensor": hw.mesh.tensor}
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
