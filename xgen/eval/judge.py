"""A judge for the judged benchmarks (longform_qa, mt_bench, alpaca_eval): any OpenAI-compatible
`/v1/chat/completions` endpoint (`eval.judge`), with every verdict cached on disk.

Judging costs money and time, and the judge is the one part of an evaluation that is not
reproducible by rerunning, so each verdict is written once under `judge.cache_dir` as
`<sha256>.json`, keyed by what determines it (judge model, messages, temperature,
max_tokens; not the URL, so a proxy or a mirror shares the cache). A cached request is never
sent again. Standard library only: urllib and json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterator, Sequence

from xgen.config import ConfigError, JudgeConfig

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


def cache_key(model: str, messages: Messages, temperature: float, max_tokens: int) -> str:
    """sha256 of the request's content in canonical JSON."""
    blob = json.dumps(
        {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeClient:
    """`complete(messages) -> text` against `judge.base_url`, through the disk cache.

    Retries 408/409/429/5xx and connection errors `judge.retries` times with exponential
    backoff (`backoff_s`, doubling, honouring Retry-After); any other HTTP error, or the
    retries running out, is one ConfigError naming the URL and what came back. Thread-safe:
    `complete_many` sends `workers` requests at once."""

    def __init__(self, judge, *, backoff_s: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        self.model, self.temperature, self.max_tokens = judge.model, float(judge.temperature), int(judge.max_tokens)
        self.url = judge.base_url.rstrip("/") + "/chat/completions"
        self.timeout_s, self.retries = float(judge.timeout_s), max(0, int(judge.retries))
        self.api_key_env = judge.api_key_env
        self.cache_dir = Path(judge.cache_dir)
        self.backoff_s, self.workers, self.sleep = backoff_s, max(1, int(judge.workers)), sleep
        self.sent = 0  # requests that reached the endpoint (including retried ones)
        self.cache_hits = 0
        # The model names the endpoint says answered (its replies' `model` field): what the
        # tables print, since `judge.model` is only what was asked for (a local server may
        # serve anything under the name "gpt-4").
        self.served: set[str] = set()
        self._lock = threading.Lock()

    # ---- cache ------------------------------------------------------------------------

    def _cache_path(self, messages: Messages) -> Path:
        return self.cache_dir / f"{cache_key(self.model, messages, self.temperature, self.max_tokens)}.json"

    def cached(self, messages: Messages) -> str | None:
        path = self._cache_path(messages)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            content = record["content"]
        except (OSError, ValueError, KeyError, TypeError):  # absent, or cut short by a crash: ask again
            return None
        self._served(record.get("served_model"))
        return content

    def _served(self, name) -> None:
        if isinstance(name, str) and name:
            with self._lock:
                self.served.add(name)

    def _store(self, messages: Messages, content: str, served: str | None) -> None:
        path = self._cache_path(messages)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": self.model, "served_model": served, "temperature": self.temperature,
                  "max_tokens": self.max_tokens, "messages": messages, "content": content}  # fmt: skip
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a reader sees the whole verdict or none

    # ---- requests ---------------------------------------------------------------------

    def complete(self, messages: Messages) -> str:
        """The judge's reply to `messages` (from the cache when it holds it)."""
        content = self.cached(messages)
        if content is not None:
            with self._lock:
                self.cache_hits += 1
            return content
        content, served = self._post(messages)
        self._served(served)
        self._store(messages, content, served)
        return content

    def complete_many(self, requests: Sequence[Messages]) -> Iterator[tuple[int, str]]:
        """(index, reply) for every request, in completion order, `workers` at a time."""
        with ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(self.complete, m): i for i, m in enumerate(requests)}
            for future in as_completed(futures):
                yield futures[future], future.result()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, messages: Messages) -> tuple[str, str | None]:
        """(reply text, the model name the reply gives)."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")  # fmt: skip
        last, wait = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(wait)
            wait = self.backoff_s * 2**attempt  # before the next attempt, unless Retry-After says
            request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
            with self._lock:
                self.sent += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:200].replace("\n", " ")
                last = f"HTTP {e.code} {e.reason}: {detail}".rstrip(": ")
                if e.code not in RETRY_STATUS:
                    hint = f" (is ${self.api_key_env} set?)" if e.code in (401, 403) else ""
                    raise ConfigError(f"judge {self.url} answered {last}{hint} (eval.judge)") from None
                wait = _retry_after(e.headers.get("Retry-After"), wait)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = f"unreachable ({getattr(e, 'reason', e)})"
            else:
                return self._content(payload)
            if attempt < self.retries:  # a retry follows: count it as such (never "retry 4/3")
                log.warning("judge %s: %s; retry %d/%d", self.url, last, attempt + 1, self.retries)
        raise ConfigError(
            f"judge {self.url}: {last} after {self.retries + 1} attempt(s) (eval.judge.base_url; its default, "
            f"{JudgeConfig.base_url}, is where task=serve listens: start one there, or point it at a hosted judge)"
        )

    def _content(self, payload: bytes) -> tuple[str, str | None]:
        try:
            reply = json.loads(payload)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ConfigError(f"judge {self.url}: the reply is not a chat completion: {payload[:200]!r}") from None
        if not isinstance(content, str):
            raise ConfigError(f"judge {self.url}: the reply's message content is not text: {content!r}"[:300])
        served = reply.get("model") if isinstance(reply, dict) else None
        return content, served if isinstance(served, str) else None


def _retry_after(value: str | None, default: float) -> float:
    try:
        return min(max(float(value), 0.0), 60.0) if value is not None else default
    except ValueError:
        return default
