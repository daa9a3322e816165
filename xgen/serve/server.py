"""task=serve's HTTP front: uvicorn (h11) serving the ASGI app of app.py (Starlette), the
stack vLLM serves from, on an event loop of its own thread.

`XGenServer(engine, port=0).start()` listens at once (so `url` is known before it starts),
serves from a background thread, and `close(grace_s)` stops the way a deployment expects:
the listening socket closes and idle connections with it, new requests get 503, queued and
running rows get `grace_s` seconds to finish, and whatever still runs then ends with 503
(a stream with an error event and `data: [DONE]`, never a cut stream).

No client holds more than its part: connections time out and are bounded (limits.py),
a request's rows hold at most their share of the slots while others wait, and a stream
whose client does not read is paused (scheduling.py, continuous.py, app.py); repeated
warnings are rate-limited (logs.py), asyncio's accept-loop errors included.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time

import uvicorn

from xgen.config import ChatTemplateConfig, ConfigError, XGenConfig
from xgen.generate import Engine
from xgen.serve.app import OpenAIApp
from xgen.serve.limits import ACCEPT_BATCH, Connection, Limits, connection_bound
from xgen.serve.logs import REPEATS, rename_uvicorn
from xgen.serve.protocol import Limits as RequestLimits
from xgen.serve.scheduling import make_scheduler

log = logging.getLogger(__name__)

OUTPUT_ROWS, TOKENIZER_IDS = "output_rows", "tokenizer_ids"  # what log-probs are normalized over
MAX_BODY_BYTES = 16 * 2**20
BACKLOG = 2048  # connections the kernel queues before they are accepted (capped by net.core.somaxconn)
STOP_TIMEOUT_S = 60.0  # after the grace: how long the scheduler's last batch may take before streams are cancelled


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
        max_request_share: float = 0.5,
        stream_buffer_chunks: int = 512,
        idle_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        stall_timeout_s: float = 30.0,
        max_connections: int = 0,
        log_repeat_s: float = 10.0,
    ):
        for name, value, ok, rule in [
            ("max_request_share", max_request_share, 0 < max_request_share <= 1, "in (0, 1]"),
            ("stream_buffer_chunks", stream_buffer_chunks, stream_buffer_chunks >= 2, ">= 2"),
            ("idle_timeout_s", idle_timeout_s, idle_timeout_s > 0, "> 0"),
            ("read_timeout_s", read_timeout_s, read_timeout_s > 0, "> 0"),
            ("stall_timeout_s", stall_timeout_s, stall_timeout_s > 0, "> 0"),
            ("max_connections", max_connections, max_connections >= 0, ">= 0 (0: what the open-file limit allows)"),
            ("log_repeat_s", log_repeat_s, log_repeat_s >= 0, ">= 0 (0: log every line)"),
        ]:
            if not ok:
                raise ConfigError(f"serve.{name}={value} is out of range: it must be {rule}")
        self.engine, self.model_name = engine, model_name
        self.template = template or ChatTemplateConfig()
        self.default_max_tokens, self.max_body_bytes, self.shutdown_grace_s = default_max_tokens, max_body_bytes, shutdown_grace_s
        self.stream_buffer_chunks, self.log_repeat_s = stream_buffer_chunks, log_repeat_s
        self.limits = RequestLimits(engine.max_len, getattr(engine, "vocab_limit", engine.tokenizer.n_tokens))
        # Which softmax every log-prob it returns is (the engine's choice), said in each
        # response: over every row of the output head (51,200 for XGen; what eval=zeroshot and
        # lm-eval's hf backend compute) or over the tokenizer's ids (50,313; the padding rows,
        # which sampling never draws, left out).
        all_rows = getattr(engine, "score_all_rows", False)
        self.normalized_over = OUTPUT_ROWS if all_rows else TOKENIZER_IDS
        rows = getattr(getattr(engine, "model_cfg", None), "vocab_size", self.limits.vocab)
        self.normalized_ids = rows if all_rows else self.limits.vocab
        self.connection_limits = Limits(idle_timeout_s, read_timeout_s, stall_timeout_s, connection_bound(max_connections))
        self.socket = _listen(host, port)
        try:
            self.batcher = make_scheduler(engine, str(scheduler), max_batch=max_batch, prefill_chunk=prefill_chunk,
                                          batch_wait_ms=batch_wait_ms, max_queued_rows=max_queued_rows,
                                          max_request_share=max_request_share)  # fmt: skip
        except BaseException:
            self.socket.close()
            raise
        self.app = OpenAIApp(self)
        config = uvicorn.Config(
            self.app, http=functools.partial(Connection, limits=self.connection_limits), ws="none", lifespan="off",
            interface="asgi3", log_config=None, access_log=False,  # app.py logs one line per request through `logging`
            backlog=ACCEPT_BATCH, timeout_keep_alive=idle_timeout_s, proxy_headers=False,  # start() sets BACKLOG again
            server_header=False, headers=[("server", "xgen")],
        )  # fmt: skip
        self._uvicorn = _Server(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._previous_log_repeat_s: float | None = None  # the rate limit's interval before start()

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def counters(self) -> dict[str, float | str]:
        """The scheduler's counters, the connections' (open now, closed idle, timed out,
        stalled, refused) and the log lines left out by the rate limit (on the event loop)."""
        open_now = len(self._uvicorn.server_state.connections)
        return {**self.batcher.counters(), **self.connection_limits.counts, "open_connections": open_now,
                "max_connections": self.connection_limits.max_connections, "suppressed_log_lines": REPEATS.left_out}  # fmt: skip

    def start(self) -> "XGenServer":
        """Serve from a background thread (task=serve, tests, notebooks); `close()` stops it."""
        if self._thread is None:
            rename_uvicorn()
            self._previous_log_repeat_s = REPEATS.install(self.log_repeat_s)
            self._thread = threading.Thread(target=self._serve, name="xgen-http", daemon=True)
            self._thread.start()
            while not self._uvicorn.started:
                if not self._thread.is_alive():
                    raise RuntimeError("the HTTP server did not start (see the log)")
                time.sleep(0.01)
            self.socket.listen(BACKLOG)  # asyncio listened with its accept batch (limits.ACCEPT_BATCH)
        return self

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_loop_error)
        loop.call_soon(self._flush_logs)
        try:
            loop.run_until_complete(self._uvicorn.serve(sockets=[self.socket]))
        except BaseException:  # noqa: BLE001 - uvicorn exits on a failed startup
            log.exception("the HTTP server stopped")
        finally:
            for transport in list(self.connection_limits.lingering):  # refused connections still being read
                transport.abort()
            loop.run_until_complete(asyncio.sleep(0))  # their connection_lost
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _flush_logs(self) -> None:
        """Every `log_repeat_s`: one line for each warning the rate limit left out."""
        if self.log_repeat_s > 0 and self._loop is not None:
            REPEATS.flush()
            self._loop.call_later(self.log_repeat_s, self._flush_logs)

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
        REPEATS.flush(everything=True)
        if self._previous_log_repeat_s is not None and REPEATS.interval_s == self.log_repeat_s:
            REPEATS.interval_s = self._previous_log_repeat_s


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio's errors of the listening socket in one line (rate-limited), not a traceback:
    out of file descriptors, its accept loop logs one per attempt, thousands a second."""
    message, error = context.get("message", ""), context.get("exception")
    if isinstance(error, OSError) or "_start_serving" in message or "_accept_connection" in message:
        log.error("the event loop: %s: %s", message.splitlines()[0][:200] if message else "-", f"{type(error).__name__}: {error}")
    else:
        loop.default_exception_handler(context)


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
        max_request_share=s.max_request_share,
        stream_buffer_chunks=s.stream_buffer_chunks,
        idle_timeout_s=s.idle_timeout_s,
        read_timeout_s=s.read_timeout_s,
        stall_timeout_s=s.stall_timeout_s,
        max_connections=s.max_connections,
        log_repeat_s=s.log_repeat_s,
    )
    return XGenServer(engine, **{**kw, **overrides})
