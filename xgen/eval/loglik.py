"""Log-likelihood requests as lm-evaluation-harness's `loglikelihood` answers them: for each
(context, continuation), the sum of the continuation tokens' log-probabilities given
everything before them, and whether every continuation token is the model's argmax.

Multiple-choice benchmarks (the report's Table 6) are all built from such requests. Here they
are tokenized as lm-eval's `_encode_pair` does, truncated on the left to the engine's length,
sorted by length and sent to `Engine.score` `batch_size` sequences at a time, and returned in
the order they came.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

MIN_WIDTH = 64  # sequences are right-padded to one of a few widths: fewer compiled shapes
DOUBLING_UNTIL = 256  # widths 64, 128, 256, then multiples of 256


@dataclass(frozen=True)
class LogLik:
    """One request's answer: sum of the continuation's token log-probs, and whether greedy
    decoding from the context would have produced exactly the continuation."""

    logprob: float
    greedy: bool


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation, the
    whole text is tokenized once and the continuation is what follows the context's tokens
    (so a BPE merge across the boundary is tokenized as the model would see it). An empty
    context is the end-of-text token, as lm-eval's `loglikelihood` makes it."""
    if context == "":
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def padded_width(n: int, max_len: int) -> int:
    """The width a batch whose longest sequence has `n` tokens is padded to."""
    width = MIN_WIDTH
    while width < n and width < DOUBLING_UNTIL:
        width *= 2
    if width < n:
        width = -(-n // DOUBLING_UNTIL) * DOUBLING_UNTIL
    return min(width, max_len)


def truncate(context: Sequence[int], continuation: Sequence[int], max_len: int) -> tuple[list[int], int]:
    """(the sequence to score, how many of its last tokens are the continuation's): the last
    `max_len + 1` tokens of context + continuation, as lm-eval's `_loglikelihood_tokens`
    keeps them (`[-(max_length + 1):][:-1]` is what the model reads; the last token is only
    predicted). The first token has no prediction, so at most `max_len` are scored."""
    sequence = (list(context) + list(continuation))[-(max_len + 1) :]
    return sequence, min(len(continuation), len(sequence) - 1)


def loglikelihood_tokens(engine, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8) -> list[LogLik]:
    """Answers to token-level requests, in their order. Longest first (as lm-eval sorts), so
    neighbours in a batch have similar lengths; each batch is right-padded to `padded_width`
    (padding after a token cannot change its log-prob in a causal model) and, if short, filled
    up with copies of its last row, so the engine sees few distinct shapes. Only the
    continuation's positions go through the output head (`Engine.score_tails`)."""
    if not requests:
        return []
    batch_size = max(1, batch_size)
    prepared = []
    for context, continuation in requests:
        if not continuation:
            raise ValueError("a log-likelihood request needs at least one continuation token")
        prepared.append(truncate(context, continuation, engine.max_len))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    answers: list[LogLik | None] = [None] * len(prepared)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = padded_width(max(len(prepared[i][0]) - 1 for i in rows), engine.max_len)  # the inputs' width
        filler = [rows[-1]] * (batch_size - len(rows))
        sequences = [prepared[i][0] for i in rows + filler]
        counts = [prepared[i][1] for i in rows + filler]
        for i, (logprobs, greedy) in zip(rows, engine.score_tails(sequences, counts, width)):
            tokens, n = prepared[i]
            answers[i] = LogLik(float(sum(logprobs)), greedy == tokens[len(tokens) - n :])
    return answers  # type: ignore[return-value]


def loglikelihood(engine, requests: Sequence[tuple[str, str]], batch_size: int = 8) -> list[LogLik]:
    """Answers to text requests (context, continuation), in their order."""
    pairs = [encode_pair(engine.tokenizer, context, continuation) for context, continuation in requests]
    return loglikelihood_tokens(engine, pairs, batch_size)
