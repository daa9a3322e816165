"""Names, layouts and configs: xgen parameters <-> Hugging Face `LlamaForCausalLM` tensors.

xgen is LLaMA numerically (docs/design.md), so conversion is only renaming plus one
transpose: xgen's `Linear` kernel is [d_in, d_out], a PyTorch `nn.Linear` weight is
[d_out, d_in]. Rotary embeddings use the rotate-half layout on both sides, so q and k
need no permutation. Everything here is pure Python and numpy, shared by export and import.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np

from xgen.config import ConfigError, ModelConfig, RopeScalingConfig, RopeType
from xgen.config.schema import ROPE_RULE_KEYS
from xgen.config.validate import check_rope_scaling

# An xgen parameter's place in the nested pure dict: ("layers", 0, "attn", "q_proj", "kernel").
XPath = tuple[str | int, ...]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


class TensorSpec(NamedTuple):
    """One Hugging Face tensor: its name, the xgen parameter it holds and its HF shape."""

    hf_name: str
    path: XPath
    shape: tuple[int, ...]
    transpose: bool  # HF weight == xgen kernel.T

    @property
    def xgen_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transpose else self.shape


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the model, in the order the shards are written (embedding, layer by
    layer, final norm, output head): the same order a forward pass reads them."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    head_dim = cfg.d_model // cfg.n_heads
    q_out, kv_out = cfg.n_heads * head_dim, (cfg.n_kv_heads or cfg.n_heads) * head_dim
    attn_shapes = {"q_proj": (q_out, d), "k_proj": (kv_out, d), "v_proj": (kv_out, d), "o_proj": (d, q_out)}
    mlp_shapes = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens",), (v, d), False)]
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}"
        specs.append(TensorSpec(f"{pre}.input_layernorm.weight", ("layers", i, "input_norm", "scale"), (d,), False))
        for p in _ATTN:
            path = ("layers", i, "attn", p, "kernel")
            specs.append(TensorSpec(f"{pre}.self_attn.{p}.weight", path, attn_shapes[p], True))
        path = ("layers", i, "post_attn_norm", "scale")
        specs.append(TensorSpec(f"{pre}.post_attention_layernorm.weight", path, (d,), False))
        for p in _MLP:
            specs.append(TensorSpec(f"{pre}.mlp.{p}.weight", ("layers", i, "mlp", p, "kernel"), mlp_shapes[p], True))
    specs.append(TensorSpec("model.norm.weight", ("norm", "scale"), (d,), False))
    if not cfg.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), (v, d), True))
    return specs


def to_hf(spec: TensorSpec, value: Any) -> np.ndarray:
    """An xgen parameter as the contiguous float32 HF tensor `spec` names."""
    x = np.asarray(value, dtype=np.float32)
    return np.ascontiguousarray(x.T if spec.transpose else x)


def from_hf(spec: TensorSpec, value: np.ndarray) -> np.ndarray:
    """An HF tensor as the float32 xgen parameter `spec` names."""
    x = np.asarray(value, dtype=np.float32)
    return np.ascontiguousarray(x.T) if spec.transpose else x


def get_path(tree: dict, path: XPath) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: XPath, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def iter_paths(tree: dict, prefix: XPath = ()) -> Iterator[XPath]:
    """Leaf paths of a nested dict (the xgen pure-dict layout)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from iter_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


# --- config.json ---------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, *, bos_token_id: int | None, eos_token_id: int | None) -> dict:
    """config.json for `LlamaForCausalLM`, with the fields of Salesforce/xgen-7b-8k-base's,
    plus those newer transformers releases read (GQA heads, rope theta, biases)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "hidden_size": cfg.d_model,
        "initializer_range": cfg.init_std,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_positions,
        "mlp_bias": False,
        "num_attention_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": cfg.rms_norm_eps,
        # Both dialects: transformers 5 reads rope_parameters, earlier releases rope_scaling.
        "rope_parameters": rope_parameters(cfg),
        "rope_scaling": None if cfg.rope_scaling.type == "default" else _legacy(rope_parameters(cfg)),
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


# xgen's RopeScalingConfig keys <-> transformers' rope_parameters keys, per rule.
_ROPE_KEYS = {
    "factor": "factor", "original_max_positions": "original_max_position_embeddings",
    "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
    "beta_fast": "beta_fast", "beta_slow": "beta_slow", "attention_factor": "attention_factor",
    "mscale": "mscale", "mscale_all_dim": "mscale_all_dim", "truncate": "truncate",
}  # fmt: skip
def rope_parameters(cfg: ModelConfig) -> dict:
    """transformers' `rope_parameters` for `cfg` (rope_theta included)."""
    s = cfg.rope_scaling
    out: dict[str, Any] = {"rope_type": str(s.type), "rope_theta": cfg.rope_theta}
    for key in ROPE_RULE_KEYS[s.type]:
        if getattr(s, key) is not None:
            out[_ROPE_KEYS[key]] = getattr(s, key)
    return out


def _legacy(params: dict) -> dict:
    """`rope_parameters` in the earlier dialect: theta lives beside it, as `rope_theta`."""
    return {k: v for k, v in params.items() if k != "rope_theta"}


def _standard(params: dict, config: dict) -> dict:
    """Either dialect's dict as transformers 5 holds it: `rope_type`, with `rope_theta`."""
    out = {k: v for k, v in params.items() if k != "type"}
    out.setdefault("rope_type", params.get("type", "default"))
    out.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return out


def _rope(config: dict, where: str) -> tuple[float, RopeScalingConfig]:
    """Theta and scaling from either config.json dialect (`rope_theta` and `rope_scaling`
    before transformers 5, `rope_parameters` since), read as transformers reads them
    (`standardize_rope_params`); a rule xgen does not compute, or a key it would ignore, is
    refused, because the weights would load and compute something else."""
    legacy, current = config.get("rope_scaling"), config.get("rope_parameters")
    for key, value in (("rope_scaling", legacy), ("rope_parameters", current)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}={value!r} is not a mapping")
    if legacy and current and _standard(legacy, config) != _standard(current, config):
        raise ConfigError(f"{where}: rope_scaling={legacy} and rope_parameters={current} disagree; which one applies is ambiguous")
    params = dict(current or legacy or {})
    kind = params.pop("rope_type", params.pop("type", "default"))
    params.pop("type", None)
    theta = float(params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0)
    if kind not in ROPE_RULE_KEYS:
        raise ConfigError(f"{where}: rope_type={kind!r}; xgen computes {', '.join(ROPE_RULE_KEYS)}")
    partial = params.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{where}: partial_rotary_factor={partial}; xgen rotates the whole head")
    if kind in ("yarn", "llama3"):  # transformers: the top-level key wins, else max_position_embeddings
        top = config.get("original_max_position_embeddings")
        if top is not None:
            params["original_max_position_embeddings"] = top
        params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings", 2048))
    if kind == "yarn" and params.get("factor") is None:
        params["factor"] = config.get("max_position_embeddings", 2048) / params["original_max_position_embeddings"]
    by_hf = {hf: ours for ours, hf in _ROPE_KEYS.items()}
    extra = sorted(k for k in params if k not in by_hf or by_hf[k] not in ROPE_RULE_KEYS[kind])
    if extra:
        raise ConfigError(f"{where}: rope_parameters keys {', '.join(extra)} are not used by rope_type={kind!r} in xgen")
    values = {by_hf[k]: v for k, v in params.items() if v is not None}
    for key in ("beta_fast", "beta_slow"):  # transformers: `or 32`, `or 1`
        if key in values and not values[key]:
            del values[key]
    scaling = RopeScalingConfig(type=RopeType(kind), **values)
    check_rope_scaling(scaling, f"{where}: rope_parameters")
    return theta, scaling


def model_config(config: dict, name: str, where: str) -> ModelConfig:
    """ModelConfig of a config.json; ConfigError (naming `where` and the key) for anything
    that is not a plain LLaMA, because the weights would load but compute something else."""

    def need(key: str) -> Any:
        if config.get(key) is None:
            raise ConfigError(f"{where}: {key} is missing")
        return config[key]

    if config.get("model_type") != "llama":
        raise ConfigError(f"{where}: model_type={config.get('model_type')!r}; only 'llama' models convert")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={config['hidden_act']!r}; LLaMA's MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ConfigError(f"{where}: {key}=true; xgen's layers have no biases")
    theta, scaling = _rope(config, where)
    d, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    kv = int(config.get("num_key_value_heads") or heads)
    if d % heads or heads % kv:
        raise ConfigError(
            f"{where}: hidden_size={d}, num_attention_heads={heads}, num_key_value_heads={kv} do not divide"
        )
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) != d // heads:
        raise ConfigError(f"{where}: head_dim={head_dim} is not hidden_size / num_attention_heads = {d // heads}")
    return ModelConfig(
        name=name,
        d_model=d,
        n_layers=int(need("num_hidden_layers")),
        n_heads=heads,
        n_kv_heads=None if kv == heads else kv,
        d_ff=int(need("intermediate_size")),
        vocab_size=int(need("vocab_size")),
        max_positions=int(config.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
    )


def _architecture(cfg: ModelConfig) -> dict[str, str]:
    """`model.<key>` -> its value as a command line writes it, for every key that shapes the
    model's numbers (not its name or initialization)."""
    keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_positions",
            "rms_norm_eps", "rope_theta", "tie_embeddings")  # fmt: skip
    values = {k: getattr(cfg, k) for k in keys}
    values.update({f"rope_scaling.{k}": getattr(cfg.rope_scaling, k) for k in ("type", *ROPE_RULE_KEYS[cfg.rope_scaling.type])})
    return {f"model.{k}": "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()}


def model_overrides(cfg: ModelConfig, shipped: dict[str, ModelConfig] | None = None) -> list[str]:
    """Command-line overrides that make `model` this config (to train from an import): the
    shipped model (`conf/model/<name>.yaml`, given as `shipped`) that differs in the fewest
    keys, `model=<name>`, then those keys (none when the architecture is that model's);
    without one closer than the command's default, every key."""
    ours = _architecture(cfg)
    best: tuple[str | None, list[str]] = (None, list(ours))
    for name, other in sorted((shipped or {}).items()):
        theirs = _architecture(other)
        differ = [k for k, v in ours.items() if theirs.get(k) != v]
        if len(differ) < len(best[1]):
            best = (name, differ)
    name, keys = best
    return ([f"model={name}"] if name else []) + [f"{k}={ours[k]}" for k in keys]
