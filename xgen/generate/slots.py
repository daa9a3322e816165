"""A KV cache of fixed slots that rows join and leave between decoding steps.

`Engine.generate` runs one batch from its first token to its longest row's last; a server
under load needs rows at different points in one batch (continuous batching,
xgen/serve/continuous.py). Here each of `rows` slots holds one sequence from cache
position 0, and a row's length is where its next token goes. Three compiled programs serve
any traffic, so nothing recompiles while serving:

- `decode`: one token for every slot, each at its own position (rows that are not
  decoding compute a throwaway token; a fixed shape costs less than a recompilation);
- `prefill`: up to `chunk` prompt tokens per call, either one piece of `chunk` tokens for
  one row or `pieces` pieces of `chunk / pieces` tokens for as many rows. A newcomer's
  prompt enters over several steps, and the running rows wait at most one prefill of
  `chunk` tokens per step (chunked prefill).

Keys and values are written by separate donated updates after the step that read them,
as in `Engine`, so XLA updates the cache in place instead of copying it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xgen.generate.engine import Engine
from xgen.model.transformer import KVCache

Sampled = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # ids, logprobs, top ids, top logprobs


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class SlotCache:
    """`rows` cache slots of `length` positions over an Engine's model and parameters.

    `sampling` arguments are per-row arrays (seeds uint32, steps int32, temperature
    float32, top_k int32, top_p float32), as `next_tokens` takes them."""

    def __init__(self, engine: Engine, rows: int, chunk: int = 128, pieces: int = 4):
        self.engine = engine
        self.rows = _round_up(max(1, rows), engine.row_multiple)
        self.pieces = max(1, min(pieces, self.rows))
        self.piece = _round_up(max(1, chunk // self.pieces), 16)  # tokens of one of several pieces
        self.chunk = self.piece * self.pieces  # prefill tokens per call, whichever shape
        self.length = _round_up(engine.max_len, self.chunk)
        self.caches = engine.runtime.kv_caches(self.rows, self.length)
        self._decode = jax.jit(self._decode_fn)
        self._write_tokens = jax.jit(self._write_tokens_fn, donate_argnums=0)
        self._prefill = jax.jit(self._prefill_fn)
        self._write_pieces = jax.jit(self._write_pieces_fn, donate_argnums=0)

    def reset(self) -> None:
        """Fresh zeroed caches (after a failed step, whose donated buffers may be gone)."""
        self.caches = self.engine.runtime.kv_caches(self.rows, self.length)

    # ---- device functions ---------------------------------------------------------------

    def _decode_fn(self, params, caches, tokens, lengths, sampling):
        """tokens [rows] at positions `lengths` [rows], each attending to its own slots < length."""
        engine = self.engine
        allowed_cached = jnp.arange(self.length)[None, None, :] < lengths[:, None, None]
        allowed_new = jnp.ones((self.rows, 1, 1), bool)
        model = engine._model(params)
        layer_caches = [KVCache(k, v, allowed_cached, allowed_new) for k, v in caches]
        h, new_kv = model.decode(tokens[:, None], lengths[:, None], layer_caches)
        return engine._sample(model.logits(h[:, 0]), sampling), new_kv

    def _write_tokens_fn(self, caches, new_kv, lengths):
        rows = jnp.arange(self.rows)
        return [
            (k.at[rows, :, :, lengths].set(nk[..., 0]), v.at[rows, :, lengths, :].set(nv[:, :, 0, :]))
            for (k, v), (nk, nv) in zip(caches, new_kv)
        ]

    def _prefill_fn(self, params, caches, rows, tokens, starts, n_valid, sampling):
        """Pieces tokens [p, chunk] of rows `rows` [p] at positions starts + 0..chunk-1; each
        attends to its row's slots before `starts` and causally within the piece. Samples
        after each piece's last real token (what the last piece of a prompt needs)."""
        engine = self.engine
        p, c = tokens.shape
        allowed_cached = jnp.broadcast_to(jnp.arange(self.length)[None, None, :] < starts[:, None, None], (p, c, self.length))
        allowed_new = jnp.broadcast_to(jnp.tril(jnp.ones((c, c), bool)), (p, c, c))
        model = engine._model(params)
        layer_caches = [KVCache(k[rows], v[rows], allowed_cached, allowed_new) for k, v in caches]
        positions = starts[:, None] + jnp.arange(c)[None, :]
        h, new_kv = model.decode(tokens, positions, layer_caches)
        last = jnp.take_along_axis(h, (n_valid - 1)[:, None, None], axis=1)[:, 0]
        return engine._sample(model.logits(last), sampling), new_kv

    def _write_pieces_fn(self, caches, new_kv, rows, starts, valid):
        """Store each valid piece at (its row, its start); an unused entry writes back what
        was there (entries have distinct rows, so no two writes overlap)."""
        out = []
        for (k, v), (nk, nv) in zip(caches, new_kv):
            for i in range(nk.shape[0]):
                at_k, at_v = (rows[i], 0, 0, starts[i]), (rows[i], 0, starts[i], 0)
                piece_k, piece_v = nk[i : i + 1], nv[i : i + 1]
                piece_k = jnp.where(valid[i], piece_k, jax.lax.dynamic_slice(k, at_k, piece_k.shape))
                piece_v = jnp.where(valid[i], piece_v, jax.lax.dynamic_slice(v, at_v, piece_v.shape))
                k = jax.lax.dynamic_update_slice(k, piece_k, at_k)
                v = jax.lax.dynamic_update_slice(v, piece_v, at_v)
            out.append((k, v))
        return out

    # ---- host API ---------------------------------------------------------------------

    def decode(self, tokens: np.ndarray, lengths: np.ndarray, sampling: tuple) -> Sampled:
        """One step of every slot; returns the sampled next tokens (host arrays, [rows])."""
        tokens, lengths = np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)
        sampled, new_kv = self._decode(self.engine.params, self.caches, tokens, lengths, sampling)
        self.caches = self._write_tokens(self.caches, new_kv, lengths)
        return jax.device_get(sampled)

    def piece_length(self, starts: Sequence[int]) -> int:
        """How many prompt tokens each of rows at offsets `starts` may enter in one call: the
        whole chunk for a single row at a chunk boundary, else a piece each."""
        return self.chunk if len(starts) == 1 and starts[0] % self.chunk == 0 else self.piece

    def prefill(self, pieces: Sequence[tuple[int, int, Sequence[int]]], sampling: tuple) -> Sampled:
        """Prefill pieces (row, start, tokens): at most `pieces` of them, rows distinct, each
        of at most `piece_length` tokens at a multiple of it. `sampling` holds arrays of the
        pieces' length. Returns the token sampled after each piece ([len(pieces)])."""
        n = len(pieces)
        if not 0 < n <= self.pieces or len({r for r, _, _ in pieces}) != n:
            raise ValueError(f"prefill takes 1 to {self.pieces} pieces of distinct rows, got {n}")
        width = self.piece_length([start for _, start, _ in pieces])
        p = 1 if width == self.chunk else self.pieces  # two compiled shapes: [1, chunk], [pieces, piece]
        spare = [r for r in range(self.rows) if r not in {row for row, _, _ in pieces}]
        rows = np.array([r for r, _, _ in pieces] + spare[: p - n], np.int32)
        tokens = np.zeros((p, width), np.int32)
        starts, n_valid = np.zeros(p, np.int32), np.ones(p, np.int32)
        for i, (_, start, piece) in enumerate(pieces):
            if start % width or not 0 < len(piece) <= width or start + len(piece) > self.engine.max_len:
                raise ValueError(f"a prefill piece of {len(piece)} tokens at {start} does not fit pieces of {width}")
            tokens[i, : len(piece)], starts[i], n_valid[i] = piece, start, len(piece)
        valid = np.arange(p) < n
        padded = tuple(np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[:1], p - n)]) for a in sampling)
        sampled, new_kv = self._prefill(self.engine.params, self.caches, rows, tokens, starts, n_valid, padded)
        self.caches = self._write_pieces(self.caches, new_kv, rows, starts, valid)
        return tuple(x[:n] for x in jax.device_get(sampled))
