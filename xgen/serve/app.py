"""The ASGI application: OpenAI's endpoints on Starlette, in front of a scheduler.

Each request is a coroutine on uvicorn's event loop: it reads and validates its body
(protocol.py), submits a Job to the scheduler and awaits the job's events, which the
scheduler's worker thread hands over with `loop.call_soon_threadsafe` (a hundred open
streams are a hundred coroutines, not a hundred threads). Every failure is OpenAI's JSON
error object on that request only; nothing a client sends reaches the log as a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from xgen.serve.jobs import Job, Row, ServerError
from xgen.serve.limits import TIMED_OUT
from xgen.serve.metrics import prometheus
from xgen.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    chat_logprobs,
    check_model,
    choice_settings,
    envelope,
    logprobs_block,
    new_id,
    parse_chat,
    parse_completion,
    parse_json,
    sse,
    usage,
)

if TYPE_CHECKING:
    from xgen.serve.server import XGenServer

log = logging.getLogger(__name__)

INLINE_PARSE_BYTES = 64 * 2**10  # larger bodies are parsed off the event loop
DRAIN_BYTES = 64 * 2**20  # an unread body up to this size is read (and dropped) after a 413, keeping the connection
USAGE = "xgen.usage"  # the scope key where a handler leaves (prompt, completion) tokens for the request log


class JSON(Response):
    """A JSON response as the standard library writes it (OpenAI's clients parse -Infinity, a
    log-probability Starlette's JSONResponse would refuse to write)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content).encode()


def error_response(ex: RequestError, close: bool = False) -> JSON:
    headers = {"Retry-After": "1"} if ex.status in (429, 503) else {}
    if close:
        headers["Connection"] = "close"
    return JSON(ex.body(), status_code=ex.status, headers=headers)


class BodyTooLarge(RequestError):
    """A 413 before reading: uvicorn reads and drops an unread body to keep the connection,
    unless it is larger than DRAIN_BYTES (then the connection closes)."""

    def __init__(self, message: str, declared: int):
        super().__init__(message, status=413)
        self.close = declared > DRAIN_BYTES


def server_error(ex: ServerError) -> RequestError:
    """A scheduler's ServerError in OpenAI's error shape."""
    if ex.status == 429:
        return RequestError(str(ex), status=429, kind="rate_limit_error", code="rate_limit_exceeded")
    return RequestError(str(ex), status=ex.status, kind="server_error")


def guarded(endpoint):
    """Every exception of a handler as a JSON error: the client's (RequestError, 4xx), the
    scheduler's (ServerError: 429, 500, 503), or a bug here (500, logged with its traceback)."""

    @functools.wraps(endpoint)
    async def handle(self, request: Request) -> Response:
        try:
            return await endpoint(self, request)
        except RequestError as ex:
            return error_response(ex, close=getattr(ex, "close", False))
        except ClientDisconnect:  # gone while sending its body, or too slow to (limits.py): nobody reads an answer
            return Response(status_code=408 if request.scope.get(TIMED_OUT) else 499)
        except ServerError as ex:
            return error_response(server_error(ex))
        except Exception as ex:  # noqa: BLE001 - one request fails, the server keeps serving
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(RequestError(f"internal error: {type(ex).__name__}: {ex}", status=500, kind="server_error"))

    return handle


def _hand_over(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Run fn(*args) on the event loop (from the scheduler's thread)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop has closed: nobody waits for this event any more
        pass


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


class StreamBuffer:
    """A stream's events not yet sent. While its client reads, this stays near empty; when it
    stops, the socket's buffers fill, sending waits, and text chunks pile up here: past
    `limit` of them the job is paused (its rows stop and give their slots to waiting
    requests; counted as paused_streams and logged), and it resumes once the client has
    taken half of them. A client that takes nothing for serve.stall_timeout_s is
    disconnected (limits.py), which cancels the job."""

    def __init__(self, batcher, limit: int, request: Request):
        self.batcher, self.limit, self.request = batcher, limit, request
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job: Job | None = None
        self.chunks = 0  # text events waiting

    def put(self, event) -> None:
        """On the event loop: an event from the scheduler."""
        self.queue.put_nowait(event)
        if event[0] != "text":
            return
        self.chunks += 1
        job = self.job
        if self.chunks > self.limit and job is not None and not (job.paused or job.finished or job.cancelled):
            client = self.request.client
            log.warning("paused a stream to %s: its client has not read %d chunks (serve.stream_buffer_chunks); its rows wait",
                        f"{client.host}:{client.port}" if client else "a client", self.chunks)  # fmt: skip
            self.batcher.pause(job)

    async def get(self):
        event = await self.queue.get()
        if event[0] == "text":
            self.chunks -= 1
            if self.job is not None and self.job.paused and self.chunks <= self.limit // 2:
                self.batcher.resume(self.job)
        return event


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class OpenAIApp:
    """The routes and handlers; `srv` (an XGenServer) holds the engine, limits and scheduler."""

    def __init__(self, srv: "XGenServer"):
        self.srv = srv
        self.closing = False  # set by XGenServer.close: /health answers 503
        self.responses: collections.Counter[tuple[str, int]] = collections.Counter()
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]
        self.paths = sorted(r.path for r in routes)
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_exception})
        self.app.router.redirect_slashes = False  # paths are normalised in __call__ instead

    async def __call__(self, scope, receive, send) -> None:
        """The ASGI entry: a trailing slash is ignored, and each request logs one line.

        The line and the response counter are written before the last byte of the body is
        sent, so a client that has read its whole answer finds its request in /metrics and
        in the log (afterwards, it would race the client's next request)."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope["path"] = scope["path"].rstrip("/") or "/"
        started, status, logged = time.perf_counter(), [500], [False]

        def record() -> None:
            if logged[0]:
                return
            logged[0] = True
            path = scope["path"]
            self.responses[(path if path in self.paths else "other", status[0])] += 1
            tokens = scope.get(USAGE)
            tokens = f" prompt_tokens={tokens[0]} completion_tokens={tokens[1]}" if tokens else ""
            ms = (time.perf_counter() - started) * 1000
            log.info("%s %s %d %.1f ms%s", scope["method"], path[:200], status[0], ms, tokens)

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            record()  # a request that ended without a last body (an error, a disconnect)

    async def _http_exception(self, request: Request, ex: HTTPException) -> Response:
        path = request.url.path
        if ex.status_code == 404:
            message = f"unknown path {path[:200]}; try {', '.join(self.paths)}"
        elif ex.status_code == 405:
            message = f"{request.method} is not allowed on {path}"
        else:
            message = str(ex.detail)
        response = error_response(RequestError(message, status=ex.status_code))
        response.headers.update(ex.headers or {})
        return response

    # ---- requests ----------------------------------------------------------------------

    async def _parse(self, request: Request, parse, *args):
        """parse(body, *args) of the request's JSON object: application/json only (a browser
        may POST text/plain across sites), at most max_body_bytes (checked from
        Content-Length, then while reading), naming the served model or none. A large body is
        parsed and tokenized on a worker thread, so the event loop keeps streaming meanwhile."""
        limit = self.srv.max_body_bytes
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            got = f"'{media[:100]}'" if media else "none"
            raise RequestError(f"Content-Type must be application/json, got {got}", status=415)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:  # h11 refused any other value
            raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}", int(declared))
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise RequestError(f"request body exceeds the limit of {limit} bytes", status=413)
        if len(raw) <= INLINE_PARSE_BYTES:
            return self._parsed(bytes(raw), parse, *args)
        return await run_in_threadpool(self._parsed, bytes(raw), parse, *args)

    def _parsed(self, raw: bytes, parse, *args):
        body = parse_json(raw)
        check_model(body, self.srv.model_name)
        return parse(body, *args)

    def _submit(self, rows: list[Row], n: int, stream: bool, on_event) -> Job:
        """Queue the rows (429 when the queue is full, 503 while shutting down); a request
        larger than the whole queue is a 400, which no retry would pass."""
        queue_limit = self.srv.batcher.max_queued_rows
        if len(rows) > queue_limit:
            param = "n" if n > 1 else "prompt"
            raise RequestError(f"the request has {len(rows)} rows (prompts x n); the server queues at most {queue_limit}", param)
        return self.srv.batcher.submit(Job(rows, stream=stream, on_event=on_event))

    async def _run(self, request: Request, rows: list[Row], n: int) -> Job | None:
        """Submit and await the rows; None if the client went away first (its rows are
        dropped, or retired once they run)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        job = self._submit(rows, n, False, lambda e: e[0] in ("end", "error") and _hand_over(loop, _settle, done, e))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not done.done():
                self.srv.batcher.cancel(job)
        if not done.done():
            return None
        if done.result()[0] == "error":
            raise done.result()[1]
        return job

    def _usage(self, request: Request, job: Job, prompt_tokens: int) -> dict:
        completion = sum(len(r.completion.tokens) for r in job.rows if r.completion)
        request.scope[USAGE] = (prompt_tokens, completion)
        return usage(prompt_tokens, completion)

    # ---- endpoints ---------------------------------------------------------------------

    @guarded
    async def health(self, request: Request) -> Response:
        status = "shutting_down" if self.closing else "ok"
        body = {"status": status, "model": self.srv.model_name, **self.srv.counters()}
        return JSON(body, status_code=503 if self.closing else 200)

    @guarded
    async def metrics(self, request: Request) -> Response:
        text = prometheus(self.srv.counters(), self.responses)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @guarded
    async def models(self, request: Request) -> Response:
        srv = self.srv
        model = {"id": srv.model_name, "object": "model", "created": 0, "owned_by": "xgen", "max_model_len": srv.engine.max_len,
                 "logprobs_normalized_over": srv.normalized_over, "logprobs_normalized_ids": srv.normalized_ids}  # fmt: skip
        return JSON({"object": "list", "data": [model]})

    @guarded
    async def completions(self, request: Request) -> Response:
        srv = self.srv
        req = await self._parse(request, parse_completion, srv.engine.tokenizer, srv.limits)
        score, k = req.echo and req.logprobs is not None, req.logprobs or 0
        rows = [Row(p, s, score=score, top_logprobs=k) for p in req.prompts for s in choice_settings(req.settings, req.n)]
        rid, prompt_tokens = new_id("cmpl"), sum(map(len, req.prompts))
        if req.stream:
            first = [(i * req.n + j, t) for i, t in enumerate(req.prompt_texts) for j in range(req.n)] if req.echo else []
            return self._stream(request, rows, req.n, rid, "text_completion", first, req.include_usage, prompt_tokens)
        job = await self._run(request, rows, req.n)
        if job is None:
            return Response(status_code=499)  # nginx's "client closed request", for the log; nobody reads it
        choices = [self._choice(req, row) for row in job.rows]
        return JSON(envelope("text_completion", rid, srv.model_name, choices=choices, usage=self._usage(request, job, prompt_tokens)))

    def _choice(self, req: CompletionRequest, row: Row) -> dict:
        c, tok = row.completion, self.srv.engine.tokenizer
        prompt_text = req.prompt_texts[row.index // req.n]
        text = (prompt_text if req.echo else "") + (c.text if c else "")
        lp = None
        if req.logprobs is not None:
            k = req.logprobs
            if req.echo:  # scored over prompt + completion (see Row.sequence)
                s = row.scored
                tops = s.top_logprobs if k else [None] + [{}] * (len(s.tokens) - 1)
                lp = logprobs_block(tok, s.tokens, s.token_logprobs, tops, k, 0, self.srv.normalized_over)
            else:
                tops = c.top_logprobs if k else [{}] * len(c.tokens)
                lp = logprobs_block(tok, c.tokens, c.token_logprobs, tops, k, len(prompt_text), self.srv.normalized_over)
        finish = c.finish_reason if c else "length"
        return {"index": row.index, "text": text, "logprobs": lp, "finish_reason": finish}

    @guarded
    async def chat(self, request: Request) -> Response:
        srv = self.srv
        req = await self._parse(request, parse_chat, srv.engine.tokenizer, srv.template, srv.limits, srv.default_max_tokens)
        rows = [Row(req.prompt, s, top_logprobs=req.top_logprobs) for s in choice_settings(req.settings, req.n)]
        rid = new_id("chatcmpl")
        if req.stream:
            return self._stream(request, rows, req.n, rid, "chat.completion.chunk", [], req.include_usage, len(req.prompt))
        job = await self._run(request, rows, req.n)
        if job is None:
            return Response(status_code=499)
        choices = [self._chat_choice(req, row) for row in job.rows]
        return JSON(envelope("chat.completion", rid, srv.model_name, choices=choices, usage=self._usage(request, job, len(req.prompt))))

    def _chat_choice(self, req: ChatRequest, row: Row) -> dict:
        c = row.completion
        message = {"role": "assistant", "content": c.text.removeprefix(" ")}  # the space after assistant_prefix
        srv = self.srv
        lp = chat_logprobs(srv.engine.tokenizer, c.tokens, c.token_logprobs, c.top_logprobs, req.top_logprobs, srv.normalized_over)
        return {"index": row.index, "message": message, "logprobs": lp if req.logprobs else None, "finish_reason": c.finish_reason}

    # ---- streaming ---------------------------------------------------------------------

    def _stream(self, request: Request, rows: list[Row], n: int, rid: str, kind: str, first: list[tuple[int, str]],
                include_usage: bool, prompt_tokens: int) -> StreamingResponse:  # fmt: skip
        """Submit (a refusal is still a JSON error) and answer with Server-Sent Events."""
        loop = asyncio.get_running_loop()
        events = StreamBuffer(self.srv.batcher, self.srv.stream_buffer_chunks, request)
        events.job = job = self._submit(rows, n, True, lambda e: _hand_over(loop, events.put, e))
        body = self._events(request, job, events, rid, kind, first, include_usage, prompt_tokens)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffers the stream
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)

    async def _events(self, request: Request, job: Job, events: "StreamBuffer", rid: str, kind: str,
                      first: list[tuple[int, str]], include_usage: bool, prompt_tokens: int) -> AsyncIterator[bytes]:  # fmt: skip
        """One chunk per text delta as the scheduler reports it, a chunk with each choice's
        finish_reason, optionally usage, then `data: [DONE]`; a failure (the model's, or the
        server shutting down) is an error event, then `data: [DONE]` all the same."""
        chat = kind == "chat.completion.chunk"
        model, created = self.srv.model_name, int(time.time())
        leading = set(range(len(job.rows))) if chat else set()  # chat choices whose first text is still to come

        def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False) -> bytes:
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return sse(envelope(kind, rid, model, created, choices=[choice]))

        try:
            if chat:
                for index in range(len(job.rows)):
                    yield chunk(index, None, role=True)
            for index, text in first:
                yield chunk(index, text)
            while True:
                event = await events.get()
                if event[0] == "text":
                    _, index, text = event
                    if index in leading:  # a chat answer drops the space the template puts after assistant_prefix
                        leading.discard(index)
                        text = text.removeprefix(" ")
                    if text:
                        yield chunk(index, text)
                elif event[0] == "row":
                    c = job.rows[event[1]].completion
                    yield chunk(event[1], None, c.finish_reason if c else "length")
                elif event[0] == "error":
                    yield sse(server_error(event[1]).body())
                    break
                else:
                    if include_usage:
                        yield sse(envelope(kind, rid, model, created, choices=[], usage=self._usage(request, job, prompt_tokens)))
                    break
            yield sse("[DONE]")
        finally:
            if not job.finished:  # the client went away: drop its rows
                self.srv.batcher.cancel(job)
            self._usage(request, job, prompt_tokens)
