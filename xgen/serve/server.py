"""task=serve's HTTP front: uvicorn (h11) serving the ASGI app of app.py (Starlette), the
stack vLLM serves from, on an event loop of its own thread.

`XGenServer(engine, port=0).start()` listens at once (so `url` is known before it starts),
serves from a background thread, and `close(grace_s)` stops the way a deployment expects:
the listening socket closes and idle connections with it, new requests get 503, queued and
running rows get `grace_s` seconds to finish, and whatever still runs then ends with 503
(a stream with an error event and `data: [DONE]`, never a cut stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from xgen.config import ChatTemplateConfig, XGenConfig
from xgen.generate import Engine
from xgen.serve.app import OpenAIApp
from xgen.serve.protocol import Limits, RequestError
from xgen.serve.scheduling import make_scheduler

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
BACKLOG = 2048  # connections the kernel queues before they are accepted (capped by net.core.somaxconn)
STOP_TIMEOUT_S = 60.0  # after the grace: how long the scheduler's last batch may take before streams are cancelled


class _H11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with the one reply it writes itself, the 400 for a request h11
    cannot parse (a bad Content-Length, a malformed request line or header), as OpenAI's
    JSON error object like every other answer."""

    def send_400_response(self, msg: str) -> None:
        error = RequestError("invalid HTTP request (malformed request line, header or Content-Length)")
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response had already started
            pass
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: it runs off the main thread, and
    task=serve owns SIGINT and SIGTERM."""

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class XGenServer:
    """The server and what its handlers share: the engine's tokenizer and limits, the chat
    template, and the scheduler (`batcher`, which alone calls the engine)."""

    def __init__(
        self,
        engine: Engine,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        model_name: str = "xgen",
        template: ChatTemplateConfig | None = None,
        scheduler: str = "continuous",
        max_batch: int = 8,
        prefill_chunk: int = 128,
        batch_wait_ms: float = 5.0,
        max_queued_rows: int = 4096,
        default_max_tokens: int = 128,
        max_body_bytes: int = MAX_BODY_BYTES,
        shutdown_grace_s: float = 30.0,
        timeout_keep_alive: float = 5.0,
    ):
        self.engine, self.model_name = engine, model_name
        self.template = template or ChatTemplateConfig()
        self.default_max_tokens, self.max_body_bytes, self.shutdown_grace_s = default_max_tokens, max_body_bytes, shutdown_grace_s
        self.limits = Limits(engine.max_len, getattr(engine, "vocab_limit", engine.tokenizer.n_tokens))
        self.socket = _listen(host, port)
        try:
            self.batcher = make_scheduler(engine, str(scheduler), max_batch=max_batch, prefill_chunk=prefill_chunk,
                                          batch_wait_ms=batch_wait_ms, max_queued_rows=max_queued_rows)  # fmt: skip
        except BaseException:
            self.socket.close()
            raise
        self.app = OpenAIApp(self)
        config = uvicorn.Config(
            self.app, http=_H11Protocol, ws="none", lifespan="off", interface="asgi3",
            log_config=None, access_log=False,  # app.py logs one line per request through `logging`
            backlog=BACKLOG, timeout_keep_alive=timeout_keep_alive, proxy_headers=False,
            server_header=False, headers=[("server", "xgen")],
        )  # fmt: skip
        self._uvicorn = _Server(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> "XGenServer":
        """Serve from a background thread (task=serve, tests, notebooks); `close()` stops it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="xgen-http", daemon=True)
            self._thread.start()
            while not self._uvicorn.started:
                if not self._thread.is_alive():
                    raise RuntimeError("the HTTP server did not start (see the log)")
                time.sleep(0.01)
        return self

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._uvicorn.serve(sockets=[self.socket]))
        except BaseException:  # noqa: BLE001 - uvicorn exits on a failed startup
            log.exception("the HTTP server stopped")
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _stop_listening(self) -> None:
        for server in getattr(self._uvicorn, "servers", []):
            server.close()

    def close(self, grace_s: float | None = None) -> None:
        """Stop accepting connections and requests (503), give queued and running rows
        `grace_s` seconds (default `shutdown_grace_s`), end the rest with 503, release the port."""
        if self._closed:
            return
        self._closed = True
        grace = self.shutdown_grace_s if grace_s is None else max(0.0, grace_s)
        self.app.closing = True
        if self._thread is not None and self._loop is not None:
            # uvicorn closes idle connections and waits for the others; past this it cancels them.
            self._uvicorn.config.timeout_graceful_shutdown = int(grace + STOP_TIMEOUT_S)
            self._uvicorn.should_exit = True
            with contextlib.suppress(RuntimeError):  # the loop has already stopped
                self._loop.call_soon_threadsafe(self._stop_listening)
        self.batcher.close(grace_s=grace)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.socket.close()


def make_server(engine: Engine, cfg: XGenConfig, **overrides) -> XGenServer:
    """An XGenServer configured from `serve.*`, `chat_template` and `generate.max_new_tokens`."""
    s = cfg.serve
    kw = dict(
        host=s.host,
        port=s.port,
        model_name=s.model_name,
        template=cfg.chat_template,
        scheduler=str(s.scheduler),
        max_batch=s.max_batch,
        prefill_chunk=s.prefill_chunk,
        batch_wait_ms=s.batch_wait_ms,
        max_queued_rows=s.max_queued_rows,
        default_max_tokens=cfg.generate.max_new_tokens,
        max_body_bytes=s.max_body_bytes,
        shutdown_grace_s=s.shutdown_grace_s,
    )
    return XGenServer(engine, **{**kw, **overrides})
