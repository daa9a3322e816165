"""The XGen (LLaMA) decoder: pre-norm blocks of causal attention then a SwiGLU MLP.

Numerically LLaMA's, so checkpoints move to and from third-party LLaMA code unchanged:
RMSNorm before each sub-layer, sequential (not parallel) attention and MLP, rotary
embeddings in the rotate-half layout, no biases, separate input and output embeddings.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from xgen.config import ExecutionConfig, ModelConfig, RopeScalingConfig
from xgen.model.attention import cached_attention, causal_attention
from xgen.model.context_parallel import balanced_order, context_shards, gathered_attention
from xgen.model.layers import Constrain, Linear, RMSNorm, logical_param, no_constraint
from xgen.model.rope import apply_rope, rope_angles
from xgen.model.scan import layer_of, scan_blocks, stack_blocks


@struct.dataclass
class KVCache:
    """One layer's keys and values for decoding, allocated once at full length, so a
    decoding step's cost does not depend on how many tokens came before, apart from
    attention over the slots. Keys are stored transposed, [batch, kv_heads, head_dim,
    slots], values [batch, kv_heads, slots, head_dim]: the layouts the two attention
    products read without copying (see `cached_attention`).

    A step's new tokens attend to the cached slots that `allowed_cached` [batch, t, slots]
    allows and to each other as `allowed_new` [batch, t, t] allows (causality, and the left
    padding of short prompts). The step returns their keys and values; `write_cache` stores
    them in a separate, donated update, so XLA never copies a cache it reads."""

    k: jax.Array
    v: jax.Array
    allowed_cached: jax.Array  # bool [batch, t, slots]
    allowed_new: jax.Array  # bool [batch, t, t]


NewKV = tuple[jax.Array, jax.Array]  # a step's keys [B, KV, D, t] and values [B, KV, t, D]


def write_cache(caches: list[tuple[jax.Array, jax.Array]], new: list[NewKV], index: jax.Array):
    """Every layer's cache with a step's keys and values stored at slots `index`..."""
    return [
        (jax.lax.dynamic_update_slice(k, nk, (0, 0, 0, index)), jax.lax.dynamic_update_slice(v, nv, (0, 0, index, 0)))
        for (k, v), (nk, nv) in zip(caches, new)
    ]


class Attention(nnx.Module):
    """Causal multi-head (or grouped-query) self-attention with rotary positions."""

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig, *, dtype, constrain: Constrain, rngs: nnx.Rngs):
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.theta, self.max_positions = cfg.rope_theta, cfg.max_positions
        # As items: a module's static attributes are hashed (nnx GraphDef), the dataclass is not hashable.
        self.rope_scaling = tuple(sorted(vars(cfg.rope_scaling).items()))
        self.kernel, self.chunk = execution.attention, execution.attention_chunk
        self.context_strategy = str(execution.context_strategy)
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
    ) -> jax.Array | tuple[jax.Array, NewKV]:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        scaling = RopeScalingConfig(**dict(self.rope_scaling))
        cos, sin = rope_angles(positions, self.head_dim, self.theta, scaling, self.max_positions)
        q = self.constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = self.constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        q, k, v = q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype)
        context_axes, shards = context_shards(self.constrain)
        if cache is None and context_axes and t % shards == 0:
            out = gathered_attention(
                q, k, v, positions, segment_ids, constrain=self.constrain, axes=context_axes, parts=shards, kernel=self.kernel,
                block=self.chunk, strategy=self.context_strategy,
            )
        elif cache is None:
            out = causal_attention(
                q, k, v, segment_ids=segment_ids, kernel=self.kernel, chunk=self.chunk, constrain=self.constrain
            )
        else:
            out = cached_attention(q, k, v, cache.k, cache.v, cache.allowed_cached, cache.allowed_new)
        out = self.constrain(out, ("batch", "length", "heads", "head_dim"))
        y = self.o_proj(out.reshape(b, t, self.n_heads * self.head_dim))
        if cache is None:
            return y
        return y, (k.astype(cache.k.dtype).transpose(0, 2, 3, 1), v.astype(cache.v.dtype).swapaxes(1, 2))


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

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig, *, dtype, constrain: Constrain, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
        self.attn = Attention(cfg, execution, dtype=dtype, constrain=constrain, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg, dtype=dtype, constrain=constrain, rngs=rngs)
        self.constrain = constrain

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, NewKV]:
        attended = self.attn(self.input_norm(x), positions, segment_ids, cache)
        h, new = attended if cache is not None else (attended, None)
        x = x + h
        x = x + self.mlp(self.post_attn_norm(x))
        x = self.constrain(x, ("batch", "length", "embed"))
        return x if cache is None else (x, new)


# Named rematerialization policies (MaxText style): what a block keeps for the backward pass.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _run_block(block: Block, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    return block(x, positions, segment_ids)


# Layers from which `execution.scan_layers: null` scans: the 1B and 7B models, not tiny or small.
SCAN_FROM_LAYERS = 16


def scans_layers(cfg: ModelConfig, execution: ExecutionConfig) -> bool:
    """Whether the model holds its blocks stacked and runs them with `lax.scan`."""
    if execution.scan_layers is None:
        return cfg.n_layers >= SCAN_FROM_LAYERS
    return bool(execution.scan_layers)


class XGenModel(nnx.Module):
    """tokens [batch, length] -> float32 logits [batch, length, vocab].

    `cfg` is what the model is (what checkpoints store); `execution` how it runs (kernels and
    recomputation, never stored), and `dtype` the matmul inputs' dtype."""

    def __init__(
        self,
        cfg: ModelConfig,
        execution: ExecutionConfig = ExecutionConfig(),
        *,
        dtype=jnp.float32,
        constrain: Constrain = no_constraint,
        rngs: nnx.Rngs,
    ):
        self.constrain = constrain
        embed = cfg.init_std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32)
        self.embed_tokens = logical_param(embed, ("vocab", "embed"))
        blocks = [Block(cfg, execution, dtype=dtype, constrain=constrain, rngs=rngs) for _ in range(cfg.n_layers)]
        self.n_layers = cfg.n_layers
        self.scanned = scans_layers(cfg, execution)
        # Scanned: one Block whose parameters are [n_layers, ...] (logical axis `layers`).
        self.layers = stack_blocks(blocks) if self.scanned else nnx.List(blocks)
        self.norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), std=cfg.init_std, dtype=dtype, rngs=rngs)
        )
        self.dtype = dtype
        self.loss_chunk = execution.loss_chunk
        remat = execution.remat
        if remat != "none" and remat not in REMAT_POLICIES:
            raise ValueError(f"execution.remat={remat!r} is not one of none, {', '.join(REMAT_POLICIES)}")
        self.remat = str(remat)
        self.run_block = _run_block if remat == "none" else nnx.remat(_run_block, policy=REMAT_POLICIES[remat])

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
        # Context parallelism: each device gets an equal share of the causal work.
        order = balanced_order(tokens.shape[1], context_shards(self.constrain)[1])
        if order is not None:
            tokens, positions = tokens[:, order], positions[:, order]
            segment_ids = None if segment_ids is None else segment_ids[:, order]
        x = self.embed(tokens)
        x = self._blocks(x, positions, segment_ids)
        if order is not None:
            x = self.constrain(x[:, np.argsort(order)], ("batch", "length", "embed"))
        return self.norm(x)

    def _blocks(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        if self.scanned:
            remat = self.remat != "none"
            policy = REMAT_POLICIES[self.remat] if remat else None
            x = scan_blocks(self.layers, _run_block, x, positions, segment_ids, policy=policy, remat=remat)
        else:
            for layer in self.layers:
                x = self.run_block(layer, x, positions, segment_ids)
        return x

    def blocks(self) -> list[Block]:
        """The blocks in order, as ordinary modules (layer i of the stack when scanned)."""
        if self.scanned:
            return [layer_of(self.layers, i) for i in range(self.n_layers)]
        return list(self.layers)

    def decode(
        self, tokens: jax.Array, positions: jax.Array, caches: list[KVCache]
    ) -> tuple[jax.Array, list[NewKV]]:
        """Hidden states of new tokens [batch, t] that attend to the cached ones and to each
        other as each layer's KVCache allows; also their keys and values, for `write_cache`."""
        x = self.embed(tokens)
        new_kv = []
        for layer, cache in zip(self.blocks(), caches):
            x, new = layer(x, positions, cache=cache)
            new_kv.append(new)
        return self.norm(x), new_kv

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

