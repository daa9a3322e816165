"""The HTTP side: a standard-library ThreadingHTTPServer speaking OpenAI's API.

One thread per connection parses and validates its request (protocol.py), hands rows to
the batcher and waits, or streams Server-Sent Events as the batcher's worker reports text.
Every failure becomes a JSON error response on that connection only; the server and the
batcher keep running. The standard library is enough here (no web framework to install
next to JAX), and the model, not HTTP, is the bottleneck.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from xgen.config import ChatTemplateConfig, XGenConfig
from xgen.generate import Engine
from xgen.serve.jobs import Job, Row, ServerError
from xgen.serve.protocol import (
    CompletionRequest,
    Limits,
    RequestError,
    envelope,
    logprobs_block,
    new_id,
    parse_chat,
    parse_completion,
    parse_json,
    sse,
    usage,
)
from xgen.serve.scheduling import make_scheduler

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
DRAIN_BYTES = 64 * 2**20  # an unread body up to this size is read before an error reply (no TCP reset)
ROUTES = {
    ("GET", "/health"): "health",
    ("GET", "/v1/models"): "models",
    ("POST", "/v1/completions"): "completions",
    ("POST", "/v1/chat/completions"): "chat",
}


class XGenServer(ThreadingHTTPServer):
    """The server and what its handlers share: the engine's tokenizer and limits, the chat
    template, and the batcher (which alone calls the engine)."""

    daemon_threads = True

    def __init__(
        self,
        engine: Engine,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        model_name: str = "xgen",
        template: ChatTemplateConfig | None = None,
        max_batch: int = 8,
        batch_wait_ms: float = 5.0,
        default_max_tokens: int = 128,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.engine, self.model_name = engine, model_name
        self.template = template or ChatTemplateConfig()
        self.default_max_tokens, self.max_body_bytes = default_max_tokens, max_body_bytes
        self.limits = Limits(engine.max_len, getattr(engine, "vocab_limit", engine.tokenizer.n_tokens))
        self.batcher = make_scheduler(engine, "static", max_batch=max_batch, batch_wait_ms=batch_wait_ms)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> "XGenServer":
        """Serve from a background thread (tests, notebooks); `close()` stops it."""
        self._thread = threading.Thread(target=self.serve_forever, args=(0.1,), name="xgen-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, fail queued work with 503, release the port."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.batcher.close()
        self.server_close()


def make_server(engine: Engine, cfg: XGenConfig, **overrides) -> XGenServer:
    """An XGenServer configured from `serve.*`, `chat_template` and `generate.max_new_tokens`."""
    s = cfg.serve
    kw = dict(
        host=s.host,
        port=s.port,
        model_name=s.model_name,
        template=cfg.chat_template,
        max_batch=s.max_batch,
        batch_wait_ms=s.batch_wait_ms,
        default_max_tokens=cfg.generate.max_new_tokens,
    )
    return XGenServer(engine, **{**kw, **overrides})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON; event streams close their connection
    server_version = "xgen"
    timeout = 300  # seconds a socket read or write may block (idle keep-alive, stalled uploads)
    server: XGenServer
    _body_read = False

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    def log_request(self, code="-", size="-") -> None:
        log.info('%s "%s" %s', self.address_string(), self.requestline, code)

    # ---- dispatch ----------------------------------------------------------------------

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self._body_read = False
        try:
            name = ROUTES.get((self.command, path))
            if name is None:
                if any(p == path for _, p in ROUTES):
                    raise RequestError(f"{self.command} is not allowed on {path}", status=405)
                raise RequestError(f"unknown path {path}; try {', '.join(sorted({p for _, p in ROUTES}))}", status=404)
            getattr(self, name)()
        except RequestError as ex:
            self._error(ex.status, ex.body())
        except ServerError as ex:
            self._error(ex.status, RequestError(str(ex), kind="server_error").body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except TimeoutError:
            self._error(408, RequestError("timed out reading the request", kind="invalid_request_error").body())
        except Exception as ex:  # noqa: BLE001 - one request fails, the server keeps serving
            log.exception("request %r failed", self.requestline)
            self._error(500, RequestError(f"internal error: {type(ex).__name__}: {ex}", kind="server_error").body())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, payload: dict) -> None:
        """Reply and close; an unread body is read first, since closing a socket with unread
        data resets the connection before the client reads the reply."""
        self.close_connection = True
        try:
            length = 0 if self._body_read else int(self.headers.get("Content-Length") or 0)
            if 0 < length <= DRAIN_BYTES:
                while length > 0 and (chunk := self.rfile.read(min(length, 2**16))):
                    length -= len(chunk)
            self._json(status, payload)
        except (OSError, ValueError):
            pass

    def _body(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError("chunked request bodies are not supported; send Content-Length", status=411)
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError("a Content-Length header is required", status=411) from None
        if length > self.server.max_body_bytes:
            limit = self.server.max_body_bytes
            raise RequestError(f"request body of {length} bytes exceeds the limit of {limit}", status=413)
        self._body_read = True
        return parse_json(self.rfile.read(length))

    # ---- endpoints ---------------------------------------------------------------------

    def health(self) -> None:
        self._json(200, {"status": "ok", "model": self.server.model_name, **self.server.batcher.counters()})

    def models(self) -> None:
        srv = self.server
        model = {"id": srv.model_name, "object": "model", "created": 0, "owned_by": "xgen"}
        model["max_model_len"] = srv.engine.max_len
        self._json(200, {"object": "list", "data": [model]})

    def completions(self) -> None:
        srv = self.server
        req = parse_completion(self._body(), srv.engine.tokenizer, srv.limits)
        rows = [
            Row(p, req.settings, score=req.echo and req.logprobs is not None, top_logprobs=req.logprobs or 0)
            for p in req.prompts
        ]
        job = srv.batcher.submit(Job(rows, stream=req.stream))
        rid = new_id("cmpl")
        if req.stream:
            first = [(i, t) for i, t in enumerate(req.prompt_texts)] if req.echo else []
            return self._stream(job, rid, "text_completion", first, req.include_usage)
        choices = [self._choice(req, row, i) for i, row in enumerate(job.wait())]
        self._json(200, envelope("text_completion", rid, srv.model_name, choices=choices, usage=_usage(job)))

    def _choice(self, req: CompletionRequest, row: Row, index: int) -> dict:
        c, tok = row.completion, self.server.engine.tokenizer
        prompt_text = req.prompt_texts[index]
        text = (prompt_text if req.echo else "") + (c.text if c else "")
        lp = None
        if req.logprobs is not None:
            k = req.logprobs
            if req.echo:  # scored over prompt + completion (see Row.sequence)
                s = row.scored
                tops = s.top_logprobs if k else [None] + [{}] * (len(s.tokens) - 1)
                lp = logprobs_block(tok, s.tokens, s.token_logprobs, tops, k, 0)
            else:
                tops = c.top_logprobs if k else [{}] * len(c.tokens)
                lp = logprobs_block(tok, c.tokens, c.token_logprobs, tops, k, len(prompt_text))
        finish = c.finish_reason if c else "length"
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    def chat(self) -> None:
        srv = self.server
        req = parse_chat(self._body(), srv.engine.tokenizer, srv.template, srv.limits, srv.default_max_tokens)
        job = srv.batcher.submit(Job([Row(req.prompt, req.settings)], stream=req.stream))
        rid = new_id("chatcmpl")
        if req.stream:
            return self._stream(job, rid, "chat.completion.chunk", [], req.include_usage)
        c = job.wait()[0].completion
        content = c.text.removeprefix(" ")  # the space the template puts after assistant_prefix
        message = {"role": "assistant", "content": content}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": c.finish_reason}
        self._json(200, envelope("chat.completion", rid, srv.model_name, choices=[choice], usage=_usage(job)))

    # ---- streaming ---------------------------------------------------------------------

    def _stream(self, job: Job, rid: str, kind: str, first: list[tuple[int, str]], include_usage: bool) -> None:
        """Server-Sent Events: one chunk per text delta as the worker reports it, a chunk with
        each choice's finish_reason, optionally usage, then `data: [DONE]`."""
        chat = kind == "chat.completion.chunk"
        model, created = self.server.model_name, int(time.time())
        lead = chat  # a chat answer drops the space the template puts after assistant_prefix

        def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False) -> bytes:
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return sse(envelope(kind, rid, model, created, choices=[choice]))

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            if chat:
                self._send(chunk(0, None, role=True))
            for index, text in first:
                self._send(chunk(index, text))
            while True:
                event = job.events.get()
                if event[0] == "text":
                    text = event[2].removeprefix(" ") if lead else event[2]
                    lead = False
                    if text:
                        self._send(chunk(event[1], text))
                elif event[0] == "row":
                    c = job.rows[event[1]].completion
                    self._send(chunk(event[1], None, c.finish_reason if c else "length"))
                elif event[0] == "error":
                    self._send(sse(RequestError(str(event[1]), kind="server_error").body()))
                    break
                else:
                    if include_usage:
                        self._send(sse(envelope(kind, rid, model, created, choices=[], usage=_usage(job))))
                    break
            self._send(sse("[DONE]"))
        except OSError:  # the client went away (or stopped reading)
            job.cancelled = True  # its rows that have not started are skipped

    def _send(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()


def _usage(job: Job) -> dict:
    prompt = sum(len(r.prompt) for r in job.rows)
    completion = sum(len(r.completion.tokens) for r in job.rows if r.completion)
    return usage(prompt, completion)
