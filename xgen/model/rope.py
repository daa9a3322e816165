"""Rotary position embeddings and the rules that stretch them past the trained length.

The rules are transformers' (`modeling_rope_utils.py`, the `_compute_*_parameters`
functions), computed the same way in float32, so a checkpoint trained or imported with one
gives the same logits here as in `LlamaForCausalLM`:

- `default`: plain RoPE, inv_freq = 1 / theta^(2i/d).
- `linear` (position interpolation): every frequency divided by `factor`.
- `dynamic` (dynamic NTK): theta grows with the current length L = max(position) + 1 once it
  passes `max_positions`: theta * (factor * L / max_positions - (factor - 1))^(d / (d - 2));
  below `max_positions` it is plain RoPE. L is read off the positions of the call, as
  transformers reads it off `position_ids` (for decoding: the length so far).
- `yarn`: interpolation for low frequencies, extrapolation for high ones, a linear ramp
  between the dimensions that turn `beta_slow` and `beta_fast` times over the original
  length, and cos/sin scaled by an attention factor (0.1 ln(factor) + 1 by default).
- `llama3`: LLaMA 3.1's rule: wavelengths longer than original / low_freq_factor divided by
  `factor`, shorter than original / high_freq_factor kept, smoothed in between.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from xgen.config import RopeScalingConfig, RopeType


def _plain(theta, head_dim: int) -> jax.Array:
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def _yarn(theta: float, head_dim: int, s: RopeScalingConfig) -> tuple[jax.Array, float]:
    factor, original = s.factor, s.original_max_positions
    mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0  # noqa: E731
    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = float(mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim))
        else:
            attention_factor = mscale(factor)
    correction = lambda rotations: (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))  # noqa: E731
    low, high = correction(s.beta_fast or 32), correction(s.beta_slow or 1)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, attention_factor


def _llama3(theta: float, head_dim: int, s: RopeScalingConfig) -> jax.Array:
    inv_freq = _plain(theta, head_dim)
    original = s.original_max_positions
    low_wavelen, high_wavelen = original / s.low_freq_factor, original / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def inv_frequencies(
    positions: jax.Array, head_dim: int, theta: float, scaling: RopeScalingConfig | None, max_positions: int
) -> tuple[jax.Array, float]:
    """(inverse frequencies [head_dim / 2] float32, factor on cos and sin) for `scaling`'s rule."""
    kind = RopeType.default if scaling is None else scaling.type
    if kind == RopeType.default:
        return _plain(theta, head_dim), 1.0
    if kind == RopeType.linear:
        return _plain(theta, head_dim) / scaling.factor, 1.0
    if kind == RopeType.dynamic:
        length = jnp.maximum(jnp.max(positions).astype(jnp.int32) + 1, max_positions).astype(jnp.float32)
        base = theta * ((scaling.factor * length / max_positions) - (scaling.factor - 1)) ** (head_dim / (head_dim - 2))
        return _plain(base, head_dim), 1.0
    if kind == RopeType.yarn:
        return _yarn(theta, head_dim, scaling)
    if kind == RopeType.llama3:
        return _llama3(theta, head_dim, scaling), 1.0
    raise ValueError(f"unknown RoPE rule {kind!r}")


def rope_angles(
    positions: jax.Array,
    head_dim: int,
    theta: float,
    scaling: RopeScalingConfig | None = None,
    max_positions: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape [batch, length, 1, head_dim] for the rotate-half layout."""
    inv_freq, attention_factor = inv_frequencies(positions, head_dim, theta, scaling, max_positions)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    if attention_factor == 1.0:
        return jnp.cos(emb), jnp.sin(emb)
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding in LLaMA checkpoints' rotate-half layout: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
