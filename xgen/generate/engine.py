"""Batched, KV-cached generation and scoring with a jit-compiled model.

Prompts of different lengths are left-padded into one batch; every row writes its next
token into the same cache slot, and per-row positions (rotary) and a mask over padding keep
each row's numbers those of an unpadded run. Buffers are sized once per call (prompt +
new tokens, rounded up), so each decoding step costs the same wherever it is in the text
apart from attention over the slots. The host loop between steps checks end-of-text and
stop strings and streams text; everything else runs on the device.

Long inputs: scoring computes the output head over `SCORE_CHUNK` positions at a time, so a
32K-token document never holds [length, vocab] float32 logits (6.7 GB for XGen's head). A
prompt is prefilled in one pass, whose attention scores are [rows, heads, prompt, slots];
under a memory-saving kernel (`execution.attention` chunked, block_causal or splash) a
prompt longer than `execution.attention_chunk` is prefilled that many tokens at a time
against the cache instead, each piece's scores [rows, heads, chunk, slots].
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xgen.config import RopeType, SamplingConfig
from xgen.console import heartbeat
from xgen.generate.sampling import N_TOP_LOGPROBS, next_tokens
from xgen.generate.stops import StopMatcher
from xgen.model.transformer import KVCache, XGenModel, write_cache
from xgen.runtime import Runtime
from xgen.tokenizer import Tokenizer

PROMPT_BUCKET = 16  # prompts pad to a multiple of this (fewer compilations)
SLOT_BUCKET = 128  # cache lengths round up to a multiple of this
SCORE_CHUNK = 1024  # positions whose logits `score` holds at once ([rows, chunk, vocab] float32)
# Kernels chosen to save memory: with them a long prompt is prefilled in pieces.
CHUNKED_PREFILL_KERNELS = ("chunked", "block_causal", "splash")


@dataclass
class Completion:
    """What one prompt produced. `tokens` are the completion's ids up to (not including) a
    stop string's first token or end-of-text; `text` is cut exactly at the stop string."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (end-of-text or a stop string) | "length"
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    eos: bool = False  # ended by end-of-text (which is not in `tokens`)


@dataclass
class Scored:
    """Log-probabilities of each token given the ones before it, and the token greedy
    decoding would have chosen there (None for the first token)."""

    tokens: list[int]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]
    greedy_tokens: list[int | None] = field(default_factory=list)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class RowText:
    """Incremental detokenization of one row: streams text once its UTF-8 is complete and it
    cannot be the start of a stop string; finds the earliest stop string. Work per token is
    the new bytes times the number of stop strings (a streaming KMP matcher, see
    `xgen.generate.stops`), whatever the stop strings' lengths."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]):
        self.tokenizer, self.matcher = tokenizer, StopMatcher(stops)
        self.ids: list[int] = []
        self.ends: list[int] = []  # byte length of the text after each token
        self.raw = bytearray()
        self.done_chars, self.done_bytes = "", 0  # decoded prefix that ends on a character boundary
        self.emitted = 0  # characters of text already streamed
        self.text = ""
        self.stopped = False

    def _text(self, final: bool = False) -> str:
        """Text so far; unless `final`, without a trailing incomplete UTF-8 character."""
        end = len(self.raw) if final else len(self.raw) - _incomplete_tail(self.raw)
        if end > self.done_bytes:
            self.done_chars += self.raw[self.done_bytes : end].decode("utf-8", errors="replace")
            self.done_bytes = end
        return self.done_chars

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; returns (new text safe to stream, whether a stop string appeared)."""
        self.ids.append(token)
        self.raw += self.tokenizer.encoding.decode_single_token_bytes(token)
        self.ends.append(len(self.raw))
        previous = len(self.text)
        text = self._text()
        cut = self.matcher.feed(text[previous:])
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self.flush(), True
        self.text = text
        hold = self.matcher.hold
        delta = text[self.emitted : max(len(text) - hold, self.emitted)]
        self.emitted += len(delta)
        return delta, False

    def flush(self) -> str:
        """The rest of the text, at the end of generation."""
        if not self.stopped:
            self.text = self._text(final=True)
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def tokens_before_stop(self) -> list[int]:
        """The shortest prefix of ids whose bytes cover `self.text`."""
        need = len(self.text.encode("utf-8"))
        for n, end in enumerate(self.ends):
            if end >= need:
                return self.ids[: n + 1] if need else []
        return self.ids


def _incomplete_tail(raw: bytes) -> int:
    """Bytes at the end of `raw` that begin a UTF-8 character without finishing it."""
    for k in range(1, min(4, len(raw) + 1)):
        byte = raw[-k]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return k if need > k else 0
    return 0


def _first_call_heartbeat(what: str):
    """The first call of each kind compiles the model's programs (minutes for a large model
    on a pod): it logs a heartbeat until it returns (`xgen.console.heartbeat`)."""

    def wrap(method):
        @functools.wraps(method)
        def inner(self, *args, **kwargs):
            if what in self._called:
                return method(self, *args, **kwargs)
            self._called.add(what)
            with heartbeat(f"{what} (the first call compiles the model)"):
                return method(self, *args, **kwargs)

        return inner

    return wrap


class Engine:
    """A loaded model that completes and scores token sequences (thread-compatible: callers
    serialize calls, as the server's batcher does)."""

    def __init__(
        self, runtime: Runtime, params: nnx.State, tokenizer: Tokenizer, *, max_len: int | None = None,
        score_all_rows: bool = False, score_chunk: int = SCORE_CHUNK,
    ):  # fmt: skip
        """`params` placed as `runtime.abstract_params` says (sharded on its mesh, or not).

        Sampling never draws an id the tokenizer cannot decode (the output head's padding
        rows). Scores, and the log-probs reported with generated tokens, are normalized over
        the same ids, unless `score_all_rows`: then over every row of the head, as
        lm-evaluation-harness's `hf` backend and the training loss compute them (evaluation's
        and the server's default, so their log-likelihoods are the reference's).

        `max_len` is capped at the model's `max_positions` under plain RoPE; a model with a
        RoPE scaling rule may be run past it (measuring the rule there is the point)."""
        model_cfg = runtime.model
        self._called: set[str] = set()  # kinds of call made once already (_first_call_heartbeat)
        self.score_all_rows = score_all_rows
        self.score_chunk = score_chunk
        self.runtime = runtime
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        positions = model_cfg.max_positions
        scaled = model_cfg.rope_scaling.type != RopeType.default
        self.max_len = (max_len or positions) if scaled else min(max_len or positions, positions)
        execution = runtime.execution
        self.prefill_chunk = execution.attention_chunk if execution.attention in CHUNKED_PREFILL_KERNELS else None
        self.graphdef = runtime.graphdef
        self.params = params
        self.vocab_limit = min(tokenizer.n_tokens, model_cfg.vocab_size)
        self.row_multiple = runtime.batch_shards  # batches pad to whole rows per batch shard
        caches = [(k.sharding, v.sharding) for k, v in runtime.kv_cache_shapes(1, 1)]
        # One function, two compiled programs: the prompt's shape, and one token's (which
        # serves every position, since the cache never changes shape).
        self._prefill = jax.jit(self._step_fn)
        self._decode = jax.jit(self._step_fn)
        self._write = jax.jit(write_cache, donate_argnums=0, out_shardings=caches)
        self._score = jax.jit(self._score_fn, static_argnames="top")
        self._next = jax.jit(self._next_fn)
        self._tail = jax.jit(self._tail_fn)

    # ---- device functions -------------------------------------------------------------

    def _model(self, params) -> XGenModel:
        return nnx.merge(self.graphdef, params)

    def _logits(self, model: XGenModel, hidden: jax.Array) -> jax.Array:
        """Logits with the ids the tokenizer cannot produce (the embedding's padding rows) at -inf."""
        logits = model.logits(hidden)
        return jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_limit, logits, -jnp.inf)

    def _sample(self, logits: jax.Array, sampling) -> tuple[jax.Array, ...]:
        """`next_tokens` over the head's raw `logits`: drawn from the tokenizer's ids only,
        their log-probs normalized as `score`'s are (so a token's log-prob is the same number
        whether it was generated or echoed and scored)."""
        masked = jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_limit, logits, -jnp.inf)
        return next_tokens(masked, *sampling, logprob_logits=logits if self.score_all_rows else None)

    def _score_logprobs(self, model: XGenModel, hidden: jax.Array) -> jax.Array:
        """Log-probs for scoring: over the tokenizer's ids, or every row (`score_all_rows`)."""
        logits = model.logits(hidden) if self.score_all_rows else self._logits(model, hidden)
        return jax.nn.log_softmax(logits, axis=-1)

    def _run(self, params, tokens, positions, index, caches, pad_start):
        """New tokens (at slots index..index+t-1) see earlier slots and each other back to
        their row's first real token (`pad_start`). Returns the last position's logits over
        every row of the head (`_sample` hides the padding rows) and the new keys and values."""
        (b, t), slots = tokens.shape, caches[0][1].shape[2]
        query = index + jnp.arange(t)
        first = pad_start[:, None, None]
        cached = jnp.arange(slots)[None, None, :]
        allowed_cached = jnp.broadcast_to((cached < index) & (cached >= first), (b, t, slots))
        allowed_new = (query[None, None, :] <= query[None, :, None]) & (query[None, None, :] >= first)
        layer_caches = [KVCache(k, v, allowed_cached, allowed_new) for k, v in caches]
        model = self._model(params)
        h, new_kv = model.decode(tokens, positions, layer_caches)
        return model.logits(h[:, -1:])[:, 0], new_kv

    def _step_fn(self, params, tokens, positions, pad_start, caches, sampling, index):
        """Prefill (index 0, the whole prompt) or one decoding step: sampled next tokens and
        the new tokens' keys and values for `write_cache`."""
        logits, new_kv = self._run(params, tokens, positions, index, caches, pad_start)
        return self._sample(logits, sampling), new_kv

    def _score_fn(self, params, tokens, top: int):
        """Each next token's log-prob, the argmax (greedy) token, and with `top` > 0 the `top`
        best alternatives (a top-k over the vocabulary at every position costs more than
        the argmax: only requests that ask for alternatives pay for it). Over `score_chunk`
        positions at a time: the same numbers without [rows, length, vocab] logits."""
        model = self._model(params)
        hidden, targets = model.hidden(tokens)[:, :-1], tokens[:, 1:]
        b, t, _ = hidden.shape
        c = self.score_chunk
        if t <= c:
            return self._score_positions(model, hidden, targets, top)
        n = -(-t // c)

        def pieces(x):  # [b, t, ...] -> [n, b, c, ...], the last piece padded
            x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
            return x.reshape(b, n, c, *x.shape[2:]).swapaxes(0, 1)

        out = jax.lax.map(lambda hy: self._score_positions(model, *hy, top), (pieces(hidden), pieces(targets)))
        return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(b, n * c, *x.shape[3:])[:, :t], out)

    def _score_positions(self, model: XGenModel, hidden: jax.Array, targets: jax.Array, top: int):
        """(log-prob of each target, argmax, top ids, top log-probs) at the states `hidden`."""
        logprobs = self._score_logprobs(model, hidden)
        chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
        greedy = jnp.argmax(logprobs, axis=-1)
        top_lp, top_ids = jax.lax.top_k(logprobs, top) if top else (None, None)
        return chosen, greedy, top_ids, top_lp

    def _next_fn(self, params, tokens, last, token_ids):
        """log P(token_ids | each row's tokens up to `last`): the output head runs on one
        position per row, not the whole sequence."""
        model = self._model(params)
        h = jnp.take_along_axis(model.hidden(tokens), last[:, None, None], axis=1)
        return self._score_logprobs(model, h)[:, 0][:, token_ids]

    def _tail_fn(self, params, inputs, hidden_at, targets):
        """Log-prob and argmax of each row's `k` target tokens, each predicted by the state at
        `hidden_at` (k = their second dimension): the output head and softmax run on those
        positions only, which is most of the cost of scoring short continuations."""
        model = self._model(params)
        h = jnp.take_along_axis(model.hidden(inputs), hidden_at[..., None], axis=1)
        logprobs = self._score_logprobs(model, h)
        return jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0], jnp.argmax(logprobs, axis=-1)

    def compile_decode(self, batch: int, slots: int):
        """One decoding step for `batch` rows and `slots` cache slots, compiled ahead of time
        against the runtime's abstract parameters and caches (nothing is allocated): what
        `task=plan` measures for a slice that is not here."""
        rows = _round_up(batch, self.row_multiple)
        i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
        sampling = (
            jax.ShapeDtypeStruct((rows,), jnp.uint32), i32(), jax.ShapeDtypeStruct((rows,), jnp.float32),
            i32(rows), jax.ShapeDtypeStruct((rows,), jnp.float32),
        )  # fmt: skip
        caches = self.runtime.kv_cache_shapes(rows, slots)
        return self._decode.lower(self.params, i32(rows, 1), i32(rows, 1), i32(rows), caches, sampling, i32()).compile()

    def _prefill_pieces(self, p_len: int) -> list[tuple[int, int]]:
        """[start, end) slots of each prefill call: the whole prompt, or under a memory-saving
        kernel pieces of `prefill_chunk` tokens, the first one shorter (two compiled shapes)."""
        c = self.prefill_chunk
        if c is None or p_len <= c:
            return [(0, p_len)]
        first = p_len - (-(-p_len // c) - 1) * c
        return [(0, first)] + [(s, s + c) for s in range(first, p_len, c)]

    def _pad_rows(self, rows: list) -> list:
        """`rows` repeated at the end up to a multiple of the batch shards (results dropped)."""
        return list(rows) + [rows[-1]] * (_round_up(len(rows), self.row_multiple) - len(rows))

    # ---- host API ---------------------------------------------------------------------

    @_first_call_heartbeat("generating")
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        settings: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(),
        on_text: Callable[[int, str], None] | None = None,
        logprobs: int = 0,
    ) -> list[Completion]:
        """Complete every prompt (token ids). `on_text(row, text)` streams each row's text as
        it becomes final; `logprobs` > 0 also returns that many alternatives per token."""
        if isinstance(settings, SamplingConfig):
            settings = [settings] * len(prompts)
        if len(settings) != len(prompts) or not prompts:
            raise ValueError("generate needs one SamplingConfig per prompt and at least one prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt is empty: give at least one token (e.g. <|endoftext|>)")
        longest = max(len(p) for p in prompts)
        max_new = max(s.max_new_tokens for s in settings)
        if longest + max_new > self.max_len:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens={max_new} exceeds the model's {self.max_len}"
            )
        n_real = len(prompts)
        prompts, settings = self._pad_rows(list(prompts)), self._pad_rows(list(settings))
        b = len(prompts)
        p_len = min(_round_up(longest, PROMPT_BUCKET), self.max_len - max_new)
        slots = min(_round_up(p_len + max_new, SLOT_BUCKET), self.max_len)
        tokens = np.zeros((b, p_len), np.int32)
        pad_start = np.array([p_len - len(p) for p in prompts], np.int32)
        for i, p in enumerate(prompts):
            tokens[i, pad_start[i] :] = p
        positions = np.maximum(np.arange(p_len)[None, :] - pad_start[:, None], 0).astype(np.int32)
        seeds = np.array([s.seed for s in settings], np.uint32)
        temp = np.array([s.temperature for s in settings], np.float32)
        top_k = np.array([s.top_k for s in settings], np.int32)
        top_p = np.array([s.top_p for s in settings], np.float32)
        sampling = lambda step: (seeds, np.int32(step), temp, top_k, top_p)  # noqa: E731

        out = [Completion(prompt_tokens=list(p)) for p in prompts]
        rows = [RowText(self.tokenizer, s.stop) for s in settings]
        done = np.zeros(b, bool)
        caches = self.runtime.kv_caches(b, slots)
        for start, end in self._prefill_pieces(p_len):  # the last piece's sample is the first token
            (ids, lp, top_ids, top_lp), new_kv = self._prefill(
                self.params, tokens[:, start:end], positions[:, start:end], pad_start, caches, sampling(0), np.int32(start)
            )
            caches = self._write(caches, new_kv, np.int32(start))
        for step in range(max_new):
            ids_h, lp_h, top_ids_h, top_lp_h = jax.device_get((ids, lp, top_ids, top_lp))
            for r in range(b):
                if done[r]:
                    continue
                token = int(ids_h[r])
                if token == self.tokenizer.eos_id:
                    done[r], out[r].finish_reason, out[r].eos = True, "stop", True
                    continue
                delta, stopped = rows[r].add(token)
                out[r].token_logprobs.append(float(lp_h[r]))
                if logprobs:
                    out[r].top_logprobs.append(
                        {int(t): float(v) for t, v in zip(top_ids_h[r][:logprobs], top_lp_h[r][:logprobs])}
                    )
                if stopped:
                    done[r], out[r].finish_reason = True, "stop"
                elif len(rows[r].ids) >= settings[r].max_new_tokens:
                    done[r] = True
                if on_text and delta and r < n_real:
                    on_text(r, delta)
            if done.all() or step == max_new - 1:
                break
            index = p_len + step
            (ids, lp, top_ids, top_lp), new_kv = self._decode(
                self.params,
                np.asarray(ids_h, np.int32)[:, None],
                (index - pad_start)[:, None].astype(np.int32),
                pad_start,
                caches,
                sampling(step + 1),
                np.int32(index),
            )
            caches = self._write(caches, new_kv, np.int32(index))
        out = out[:n_real]
        for r, c in enumerate(out):
            rest = rows[r].flush()
            if on_text and rest:
                on_text(r, rest)
            c.text = rows[r].text
            c.tokens = rows[r].tokens_before_stop() if c.finish_reason == "stop" else list(rows[r].ids)
            n = len(c.tokens)
            c.token_logprobs, c.top_logprobs = c.token_logprobs[:n], c.top_logprobs[:n]
        return out

    @_first_call_heartbeat("scoring")
    def score(self, sequences: Sequence[Sequence[int]], top_logprobs: int = 0) -> list[Scored]:
        """log P(token_i | tokens_<i) for every token of every sequence (one forward pass;
        what lm-evaluation-harness's log-likelihood requests need)."""
        top = N_TOP_LOGPROBS if top_logprobs else 0  # one compiled program for any 1..5
        chosen, greedy, top_ids, top_lp = jax.device_get(self._score(self.params, self._right_padded(sequences), top=top))
        result = []
        for i, s in enumerate(sequences):
            n = len(s)
            lps = [None] + [float(x) for x in chosen[i, : n - 1]]
            argmax = [None] + [int(x) for x in greedy[i, : n - 1]]
            tops = [None] + [
                {int(t): float(v) for t, v in zip(top_ids[i, j, :top_logprobs], top_lp[i, j, :top_logprobs])}
                for j in range(n - 1)
            ] if top_logprobs else [None] * n
            result.append(Scored(tokens=list(s), token_logprobs=lps, top_logprobs=tops, greedy_tokens=argmax))
        return result

    @_first_call_heartbeat("scoring")
    def next_token_logprobs(self, prompts: Sequence[Sequence[int]], token_ids: Sequence[int]) -> np.ndarray:
        """[prompts, token_ids] log-probabilities of each candidate next token after each
        prompt, in one forward pass (multiple choice with one-token answers, like MMLU's
        letters: one sequence per question instead of one per choice)."""
        tokens = self._right_padded(prompts)
        last = np.array([len(p) - 1 for p in self._pad_rows(list(prompts))], np.int32)
        out = self._next(self.params, tokens, last, np.asarray(token_ids, np.int32))
        return np.asarray(jax.device_get(out))[: len(prompts)]

    @_first_call_heartbeat("scoring")
    def score_tails(
        self, sequences: Sequence[Sequence[int]], counts: Sequence[int], width: int | None = None
    ) -> list[tuple[list[float], list[int]]]:
        """For each sequence, (log-probs, greedy tokens) of its last `counts[i]` tokens (each
        given everything before it), in one forward pass: what a log-likelihood request of a
        short continuation needs, without the full sequence's output head. A sequence may be
        `max_len + 1` long: its last token is only predicted, never read (lm-eval's window).
        `width` pads the batch's inputs to at least that many tokens (callers that bucket
        shapes themselves)."""
        if len(counts) != len(sequences) or any(not 0 < n < len(s) for s, n in zip(sequences, counts)):
            raise ValueError("score_tails needs, per sequence, a count from 1 to its length - 1")
        rows = self._pad_rows(list(sequences))
        inputs = self._right_padded([s[:-1] for s in sequences], width)
        k = _round_up(max(counts), 8)  # few distinct shapes
        ends = np.array([len(s) - 1 for s in rows], np.int32)  # each row's last token: a target
        last = np.maximum(ends[:, None] - np.arange(k - 1, -1, -1)[None, :], 1)
        hidden_at = (last - 1).astype(np.int32)  # the state that predicts each target
        targets = np.array([[s[j] for j in row] for s, row in zip(rows, last)], np.int32)
        chosen, greedy = jax.device_get(self._tail(self.params, inputs, hidden_at, targets))
        return [([float(x) for x in chosen[i, k - n :]], [int(x) for x in greedy[i, k - n :]]) for i, n in enumerate(counts)]

    def _right_padded(self, sequences: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
        """One batch, padded on the right (later pads cannot change earlier tokens' numbers)
        to a multiple of PROMPT_BUCKET (fewer compilations), or to `width` if wider."""
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("cannot score an empty sequence (or an empty batch)")
        longest = max(len(s) for s in sequences)
        if longest > self.max_len:
            raise ValueError(f"a sequence of {longest} tokens exceeds the model's {self.max_len}")
        width = max(width or 0, min(_round_up(longest, PROMPT_BUCKET), self.max_len))
        tokens = np.zeros((_round_up(len(sequences), self.row_multiple), min(width, self.max_len)), np.int32)
        for i, s in enumerate(sequences):
            tokens[i, : len(s)] = s
        return tokens


def settings_from_config(gen: SamplingConfig, **overrides) -> SamplingConfig:
    """The sampler fields of `generate.*` (without the cache size), with `overrides`."""
    fields = {f.name: getattr(gen, f.name) for f in dataclasses.fields(SamplingConfig)}
    return dataclasses.replace(SamplingConfig(**fields), **overrides)
