"""OpenAI's wire format: request JSON → typed requests (every check names its field), results → JSON.

Validation happens here, in the request's handler, before anything reaches the scheduler:
a request the engine would refuse (a prompt too long for the cache, a token id outside the
vocabulary) is answered with a 400 naming the field, so a bad request never fails a batch
that other requests share.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from xgen.config import ChatTemplateConfig
from xgen.generate import SamplingConfig
from xgen.generate.chat import prompt_ids, stop_strings
from xgen.tokenizer import Tokenizer

MAX_LOGPROBS = 5  # OpenAI's limit, and what the engine returns per token
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; lm-eval tasks may send more)
MAX_STOP_CHARS = 2**20  # characters over all of a request's stop strings
MAX_N = 16  # choices per prompt (`n`)

_SAMPLING = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "stream_options"}
_SAMPLING |= {"user"}  # accepted and ignored, as an end-user id
# Fields OpenAI clients send with their neutral value; anything else is refused, not ignored.
_NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": (None, {})}
COMPLETION_FIELDS = _SAMPLING | set(_NEUTRAL) | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = _SAMPLING | set(_NEUTRAL) | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


class RequestError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        message = " ".join(message.split())  # one line, whatever an exception's text held
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What a request must fit: the engine's cache length and vocabulary."""

    max_len: int
    vocab: int


@dataclass
class CompletionRequest:
    prompts: list[list[int]]
    prompt_texts: list[str]
    settings: SamplingConfig  # max_new_tokens == max_tokens (0: echo only)
    logprobs: int | None
    echo: bool
    stream: bool
    include_usage: bool
    n: int = 1  # choices per prompt: choice i * n + j is prompt i's j-th


@dataclass
class ChatRequest:
    prompt: list[int]
    settings: SamplingConfig
    stream: bool
    include_usage: bool
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0


def choice_settings(settings: SamplingConfig, n: int) -> list[SamplingConfig]:
    """The settings of a prompt's n choices: choice j samples with seed + j (mod 2**32), so a
    seeded request is reproducible and its choices differ."""
    return [dataclasses.replace(settings, seed=(settings.seed + j) % 2**32) for j in range(n)]


def parse_json(raw: bytes) -> dict:
    """A request body: a JSON object, or a 400 (never a 500) for whatever else a client sends:
    bytes that are not UTF-8 JSON, nesting deeper than the parser's recursion limit, an integer
    beyond Python's digit limit for int conversion."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise RequestError("request body is not valid JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as ex:  # JSONDecodeError, and int conversion limits
        raise RequestError(f"request body is not valid JSON: {ex}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {_kind(body)}")
    return body


def check_model(body: dict, served: str) -> None:
    """`model` may be absent (lm-evaluation-harness and older clients omit it) or the served
    name; any other is OpenAI's 404 model_not_found."""
    model = _get(body, "model", (str,), None)
    if model is not None and model != served:
        raise RequestError(
            f"the model '{_short(model)}' does not exist; this server serves '{served}'",
            "model", status=404, code="model_not_found",
        )  # fmt: skip


# ---- field checks ----------------------------------------------------------------------


def _short(value: Any, limit: int = 40) -> str:
    """A client's value in an error message, cut to `limit` characters."""
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, (list, dict)) else _kind(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _get(body: dict, name: str, types: tuple[type, ...], default: Any) -> Any:
    """body[name] if present and not null, type-checked (a boolean is never a number)."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = {int: "an integer", bool: "a boolean", str: "a string", dict: "an object"}
        want = "a number" if float in types else names[types[0]]
        raise RequestError(f"'{name}' must be {want}, got {_kind(value)}", name)
    return value


def _check_range(name: str, value, lo, hi, what: str) -> None:
    if not (lo <= value <= hi):
        raise RequestError(f"'{name}' must be {what}, got {_short(value)}", name)


def _check_fields(body: dict, allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise RequestError(f"unknown field '{_short(name)}' (supported: {', '.join(sorted(allowed))})", _short(name))
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise RequestError(f"'{name}' is not supported (only {neutral[-1]!r})", name)


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or an array of non-empty strings", "stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(f"'stop' has {len(stops)} strings; at most {MAX_STOPS}", "stop")
    if (chars := sum(map(len, stops))) > MAX_STOP_CHARS:
        raise RequestError(f"'stop' strings have {chars} characters in all; at most {MAX_STOP_CHARS}", "stop")
    return tuple(stops)


def _n(body: dict) -> int:
    n = _get(body, "n", (int,), 1)
    _check_range("n", n, 1, MAX_N, f"an integer from 1 to {MAX_N}")
    return n


def _sampling(body: dict, longest: int, limits: Limits, default_max: int, min_max: int, prompt_param: str):
    """Settings shared by both endpoints; max_tokens is checked against the longest prompt."""
    _get(body, "model", (str,), None)
    _get(body, "user", (str,), None)
    room = limits.max_len - longest
    if room < min_max:
        need = ", which with one new token" if min_max else ", which"
        raise RequestError(
            f"'{prompt_param}' has {longest} tokens{need} exceeds the model's context of {limits.max_len}", prompt_param
        )
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, name, (int,), None)
    if max_tokens is None:
        max_tokens = min(default_max, room)
    elif max_tokens < min_max:
        raise RequestError(f"'{name}' must be an integer >= 1 (0 only with echo=true), got {_short(max_tokens)}", name)
    elif max_tokens > room:
        raise RequestError(
            f"'{name}'={_short(max_tokens)} plus the prompt's {longest} token(s) exceeds the model's context of "
            f"{limits.max_len} tokens (at most {room})",
            name,
        )
    temperature = float(_get(body, "temperature", (int, float), 1.0))
    _check_range("temperature", temperature, 0.0, 2.0, "between 0 and 2")
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"'top_p' must be in (0, 1], got {_short(top_p)}", "top_p")
    top_k = _get(body, "top_k", (int,), 0)
    _check_range("top_k", top_k, 0, limits.vocab, "an integer >= 0 (0: off)")
    seed = _get(body, "seed", (int,), None)
    seed = random.getrandbits(32) if seed is None else seed % 2**32
    settings = SamplingConfig(max_tokens, temperature, top_k, top_p, _stops(body), seed)
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    if options and (not stream or set(options) - {"include_usage"}):
        raise RequestError("'stream_options' takes only include_usage, with stream=true", "stream_options")
    return settings, stream, _get(options, "include_usage", (bool,), False)


def _token_prompt(ids: list, limits: Limits, param: str) -> list[int]:
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < limits.vocab:
            raise RequestError(f"'{param}' holds {_short(t)}, not a token id in [0, {limits.vocab})", param)
    return ids


# ---- requests --------------------------------------------------------------------------


def parse_completion(body: dict, tokenizer: Tokenizer, limits: Limits) -> CompletionRequest:
    """POST /v1/completions. A prompt is a string, strings, token ids, or lists of token ids;
    each becomes one choice."""
    _check_fields(body, COMPLETION_FIELDS)
    n = _n(body)
    if "prompt" not in body:
        raise RequestError("'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, (str, list)) for p in prompt):
        raise RequestError(
            "'prompt' must be a string, an array of strings, an array of token ids or an array of arrays of token ids",
            "prompt",
        )
    prompts, texts = [], []
    for p in prompt:
        ids = tokenizer.encode(p) if isinstance(p, str) else _token_prompt(p, limits, "prompt")
        if not ids:
            raise RequestError("'prompt' is empty; give at least one token (e.g. '<|endoftext|>')", "prompt")
        prompts.append(ids)
        texts.append(p if isinstance(p, str) else tokenizer.decode(ids))
    echo = _get(body, "echo", (bool,), False)
    settings, stream, usage = _sampling(body, max(map(len, prompts)), limits, 16, 0 if echo else 1, "prompt")
    logprobs = _get(body, "logprobs", (int,), None)
    if logprobs is not None:
        _check_range("logprobs", logprobs, 0, MAX_LOGPROBS, f"null or an integer from 0 to {MAX_LOGPROBS}")
        if stream:
            raise RequestError("'logprobs' is not supported with stream=true", "logprobs")
    return CompletionRequest(prompts, texts, settings, logprobs, echo, stream, usage, n)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m:
            raise RequestError(f"'{where}' must be an object with 'role' and 'content'", where)
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts; only text here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise RequestError(f"'{where}.content' parts must be {{type: text, text}}", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"'{where}.content' must be a string, got {_kind(content)}", f"{where}.content")
        # The current OpenAI SDK sends the instructions as "developer" (the new name of "system").
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant") or (role == "system" and i > 0):
            raise RequestError(
                f"'{where}.role' is {_short(m['role'])!r}; roles are user and assistant, with an optional system "
                "(or developer) message first",
                f"{where}.role",
            )
        out.append({"role": role, "content": content})
    return out


def parse_chat(
    body: dict, tokenizer: Tokenizer, template: ChatTemplateConfig, limits: Limits, default_max_tokens: int
) -> ChatRequest:
    """POST /v1/chat/completions: the conversation is rendered with the config's chat template,
    and its end-of-turn strings stop generation besides the request's own."""
    _check_fields(body, CHAT_FIELDS)
    n = _n(body)
    logprobs = _get(body, "logprobs", (bool,), False)
    top = _get(body, "top_logprobs", (int,), None)
    if top is not None:
        _check_range("top_logprobs", top, 0, MAX_LOGPROBS, f"an integer from 0 to {MAX_LOGPROBS}")
        if not logprobs:
            raise RequestError("'top_logprobs' needs logprobs=true", "top_logprobs")
    prompt = prompt_ids(template, _messages(body), tokenizer)
    settings, stream, usage = _sampling(body, len(prompt), limits, default_max_tokens, 1, "messages")
    if logprobs and stream:
        raise RequestError("'logprobs' is not supported with stream=true", "logprobs")
    stops = tuple(dict.fromkeys([*stop_strings(template), *settings.stop]))
    return ChatRequest(prompt, dataclasses.replace(settings, stop=stops), stream, usage, n, logprobs, top or 0)


# ---- responses -------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def envelope(kind: str, rid: str, model: str, created: int | None = None, **fields) -> dict:
    created = int(time.time()) if created is None else created
    return {"id": rid, "object": kind, "created": created, "model": model, **fields}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    try:
        return tokenizer.encoding.decode_single_token_bytes(token)
    except KeyError:
        return b""


def token_string(tokenizer: Tokenizer, token: int) -> str:
    """One token's text as OpenAI shows it: its bytes, invalid UTF-8 replaced. A row of the
    output head past the tokenizer's ids (padding: never sampled, but a top alternative when
    log-probs are normalized over every row) is `<|pad:ID|>`, so two of them stay apart."""
    if not 0 <= token < tokenizer.n_tokens:
        return f"<|pad:{token}|>"
    return token_bytes(tokenizer, token).decode("utf-8", errors="replace")


def logprobs_block(
    tokenizer: Tokenizer,
    tokens: Sequence[int],
    token_logprobs: Sequence[float | None],
    top: Sequence[dict[int, float] | None],
    k: int,
    offset: int,
    normalized_over: str,
) -> dict:
    """OpenAI's legacy `logprobs` object. `text_offset[i]` is where token i starts in the
    choice's text (counting `offset` characters before the first token); a token that ends
    inside a multi-byte character starts the next one at the same offset. `normalized_over`
    (an extension: `output_rows` or `tokenizer_ids`) says which softmax the numbers are."""
    offsets, decoder = [], codecs.getincrementaldecoder("utf-8")(errors="ignore")
    for t in tokens:
        offsets.append(offset)
        try:
            offset += len(decoder.decode(tokenizer.encoding.decode_single_token_bytes(t)))
        except KeyError:
            pass
    tops = [None if d is None else {token_string(tokenizer, t): lp for t, lp in list(d.items())[:k]} for d in top]
    return {
        "tokens": [token_string(tokenizer, t) for t in tokens],
        "token_logprobs": list(token_logprobs),
        "top_logprobs": tops,
        "text_offset": offsets,
        "normalized_over": normalized_over,
    }


def chat_logprobs(
    tokenizer: Tokenizer, tokens: Sequence[int], token_logprobs: Sequence[float], top: Sequence[dict[int, float]], k: int,
    normalized_over: str,
) -> dict:  # fmt: skip
    """OpenAI's chat `logprobs` object: per token its text, log-probability and UTF-8 bytes,
    with the k most likely alternatives in the same shape; `normalized_over` as in
    `logprobs_block`."""

    def entry(token: int, logprob: float) -> dict:
        return {"token": token_string(tokenizer, token), "logprob": logprob, "bytes": list(token_bytes(tokenizer, token))}

    content = []
    for i, (t, lp) in enumerate(zip(tokens, token_logprobs)):
        alternatives = list(top[i].items())[:k] if k and i < len(top) else []
        content.append(entry(t, lp) | {"top_logprobs": [entry(a, alp) for a, alp in alternatives]})
    return {"content": content, "normalized_over": normalized_over}


def sse(data: dict | str) -> bytes:
    """One Server-Sent Event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
