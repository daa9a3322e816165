"""The XGen (LLaMA) decoder: pre-norm blocks of causal attention then a SwiGLU MLP.

Numerically LLaMA's, so checkpoints move to and from third-party LLaMA code unchanged:
RMSNorm before each sub-layer, sequential (not parallel) attention and MLP, rotary
embeddings in the rotate-half layout, no biases, separate input and output embeddings.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from xgen.config import ModelConfig
from xgen.model.attention import causal_attention, masked_attention
from xgen.model.layers import Constrain, Linear, RMSNorm, apply_rope, logical_param, no_constraint, rope_angles


@struct.dataclass
class KVCache:
    """One layer's keys and values for decoding: [batch, slots, kv_heads, head_dim] buffers
    allocated once at full length, so a decoding step's cost does not depend on how many
    tokens came before, apart from attention over the slots.

    New tokens are written at slots `index`..; `allowed` [batch, new tokens, slots] says
    which slots each new token attends to (causality, and left padding of short prompts)."""

    k: jax.Array
    v: jax.Array
    index: jax.Array  # int32 scalar: the slot of the first new token
    allowed: jax.Array  # bool [batch, t, slots]

    def write(self, k: jax.Array, v: jax.Array) -> "KVCache":
        at = (0, self.index, 0, 0)
        return self.replace(
            k=jax.lax.dynamic_update_slice(self.k, k, at), v=jax.lax.dynamic_update_slice(self.v, v, at)
        )


class Attention(nnx.Module):
    """Causal multi-head (or grouped-query) self-attention with rotary positions."""

    def __init__(self, cfg: ModelConfig, *, dtype, constrain: Constrain, rngs: nnx.Rngs):
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.theta = cfg.rope_theta
        self.kernel, self.chunk = cfg.attention, cfg.attention_chunk
        self.dtype = dtype
        self.constrain = constrain
        kw = dict(std=cfg.init_std, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(cfg.d_model, self.n_heads * self.head_dim, ("embed", "heads"), **kw)
        self.k_proj = Linear(cfg.d_model, self.n_kv_heads * self.head_dim, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(cfg.d_model, self.n_kv_heads * self.head_dim, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.d_model, ("heads", "embed"), **kw)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        cos, sin = rope_angles(positions, self.head_dim, self.theta)
        q = self.constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = self.constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        if cache is not None:
            cache = cache.write(k.astype(cache.k.dtype), v.astype(cache.v.dtype))
            out = masked_attention(q.astype(self.dtype), cache.k.astype(self.dtype), cache.v.astype(self.dtype), cache.allowed)
            out = self.constrain(out, ("batch", "length", "heads", "head_dim"))
            return self.o_proj(out.reshape(b, t, self.n_heads * self.head_dim)), cache
        out = causal_attention(
            q.astype(self.dtype),
            k.astype(self.dtype),
            v.astype(self.dtype),
            segment_ids=segment_ids,
            kernel=self.kernel,
            chunk=self.chunk,
        )
        out = self.constrain(out, ("batch", "length", "heads", "head_dim"))
        return self.o_proj(out.reshape(b, t, self.n_heads * self.head_dim))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, constrain: Constrain, rngs: nnx.Rngs):
        kw = dict(std=cfg.init_std, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), **kw)
        self.constrain = constrain

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(self.constrain(h, ("batch", "length", "mlp")))


class Block(nnx.Module):
    """x + attn(norm(x)), then + mlp(norm(x)): sequential, pre-norm."""

    def __init__(self, cfg: ModelConfig, *, dtype, constrain: Constrain, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
        self.attn = Attention(cfg, dtype=dtype, constrain=constrain, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg, dtype=dtype, constrain=constrain, rngs=rngs)
        self.constrain = constrain

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        if cache is not None:
            h, cache = self.attn(self.input_norm(x), positions, cache=cache)
            x = x + h
            x = x + self.mlp(self.post_attn_norm(x))
            return self.constrain(x, ("batch", "length", "embed")), cache
        x = x + self.attn(self.input_norm(x), positions, segment_ids)
        x = x + self.mlp(self.post_attn_norm(x))
        return self.constrain(x, ("batch", "length", "embed"))


# Named rematerialization policies (MaxText style): what a block keeps for the backward pass.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _run_block(block: Block, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    return block(x, positions, segment_ids)


class XGenModel(nnx.Module):
    """tokens [batch, length] -> float32 logits [batch, length, vocab]."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        constrain: Constrain = no_constraint,
        rngs: nnx.Rngs,
    ):
        self.constrain = constrain
        embed = cfg.init_std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32)
        self.embed_tokens = logical_param(embed, ("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, dtype=dtype, constrain=constrain, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), std=cfg.init_std, dtype=dtype, rngs=rngs)
        )
        self.dtype = dtype
        if cfg.remat != "none" and cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={cfg.remat!r} is not one of none, {', '.join(REMAT_POLICIES)}")
        self.run_block = (
            _run_block if cfg.remat == "none" else nnx.remat(_run_block, policy=REMAT_POLICIES[cfg.remat])
        )

    def __call__(
        self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """`segment_ids` (document-masked packing) keep attention inside each document;
        `positions` then restart at 0 in each document."""
        return self.logits(self.hidden(tokens, positions, segment_ids))

    def hidden(
        self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """The final normed hidden states [batch, length, d_model], before the output head."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed(tokens)
        for layer in self.layers:
            x = self.run_block(layer, x, positions, segment_ids)
        return self.norm(x)

    def decode(
        self, tokens: jax.Array, positions: jax.Array, caches: list[KVCache]
    ) -> tuple[jax.Array, list[KVCache]]:
        """Hidden states of new tokens [batch, t] that attend to the cached ones and to each
        other as each layer's `KVCache.allowed` says; returns the caches with them written."""
        x = self.embed(tokens)
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, positions, cache=cache)
            new_caches.append(cache)
        return self.norm(x), new_caches

    def embed(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        return self.constrain(x, ("batch", "length", "embed"))

    def logits(self, x: jax.Array) -> jax.Array:
        """float32 logits [..., vocab] of hidden states."""
        if self.lm_head is None:
            w = self.embed_tokens[...].T
            flat = x.reshape(-1, x.shape[-1]).astype(self.dtype)
            logits = jnp.matmul(flat, w.astype(self.dtype), preferred_element_type=jnp.float32)
            logits = logits.reshape(*x.shape[:-1], -1)
        else:
            logits = self.lm_head(x)
        return self.constrain(logits, ("batch", "length", "vocab"))


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from shapes alone (`nnx.eval_shape`): no memory for a 7B model."""
    abstract = nnx.eval_shape(lambda: XGenModel(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

