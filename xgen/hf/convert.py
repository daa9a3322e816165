"""Names, layouts and configs: xgen parameters <-> Hugging Face `LlamaForCausalLM` tensors.

xgen is LLaMA numerically (docs/design.md), so conversion is only renaming plus one
transpose: xgen's `Linear` kernel is [d_in, d_out], a PyTorch `nn.Linear` weight is
[d_out, d_in]. Rotary embeddings use the rotate-half layout on both sides, so q and k
need no permutation. Everything here is pure Python and numpy, shared by export and import.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np

from xgen.config import ConfigError, ModelConfig

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
        "rope_scaling": None,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


def _rope_theta(config: dict, where: str) -> float:
    """Rope theta from either config.json dialect (`rope_theta` and `rope_scaling` before
    transformers 5, `rope_parameters` since); any scaling is refused: xgen has none."""
    if config.get("rope_scaling"):
        raise ConfigError(f"{where}: rope_scaling={config['rope_scaling']} is set; xgen supports plain RoPE only")
    params = config.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
    if kind != "default" or extra:
        raise ConfigError(f"{where}: rope_parameters={params} is not plain RoPE; xgen supports plain RoPE only")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


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
    theta = _rope_theta(config, where)
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
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
    )


def model_overrides(cfg: ModelConfig) -> list[str]:
    """Command-line overrides that make `model` this config (to train from an import)."""
    keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_positions",
            "rms_norm_eps", "rope_theta", "tie_embeddings")  # fmt: skip
    values = {k: getattr(cfg, k) for k in keys}
    text = {k: "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()}
    return [f"model.{k}={v}" for k, v in text.items()]
