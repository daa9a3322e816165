"""What one connection may hold of the server: its time, its file descriptor, its answer's buffer.

uvicorn's h11 protocol only times out a keep-alive connection after a response; a
connection that sends nothing, half a request line, or a `Content-Length` larger than its
body stayed open forever, and `limit_concurrency` counts connections only when a request
arrives, so 1,100 idle sockets against a 1,024 file-descriptor limit left asyncio's accept
loop failing (and logging a traceback) thousands of times a second while every request hung
(issue 31). `Connection`, the protocol the server runs, adds:

- an idle timeout (`serve.idle_timeout_s`): a connection with no request under way is closed
  after it, a new one that sends nothing as well as a keep-alive one between requests;
- a read deadline (`serve.read_timeout_s`): from a request's first byte, its request line,
  headers and body must all arrive within it, or it is answered 408 and closed (a trickle of
  one byte a second does not extend it);
- a stall timeout (`serve.stall_timeout_s`): a client that takes nothing of its answer for
  that long (the socket's send buffer, capped at SEND_BUFFER_BYTES, stays full) is
  disconnected, which cancels its request;
- a bound on open connections (`serve.max_connections`, by default what the process's
  open-file limit leaves): one past it is answered 503 at once and closed.

Each of these is counted (`/metrics`) and logged as a warning, which logs.py rate-limits.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import resource
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from xgen.serve.protocol import RequestError

log = logging.getLogger(__name__)

TIMED_OUT = "xgen.timed_out"  # the scope key set when a request's body did not arrive in time (app.py answers 408)
LINGER_S = 2.0  # a refused connection is read (and dropped) this long, so the client reads its 503 instead of a reset
MAX_LINGERING = 16  # refused connections read at once at most (each holds a descriptor); the others close at once
# asyncio accepts up to its `backlog` argument's connections per wakeup, each holding a
# descriptor before a protocol can refuse it: the server passes this (and listens with a
# longer queue), so a burst past the bound takes at most a few of these batches.
ACCEPT_BATCH = 16
# Each connection's kernel send buffer (SO_SNDBUF; Linux doubles it). Left to autotuning it
# grows to megabytes on loopback: what a client that stops reading holds of the server's
# memory is this, uvicorn's 64 KiB write buffer and serve.stream_buffer_chunks.
SEND_BUFFER_BYTES = 256 * 2**10
COUNTS = ("idle_closed", "read_timeouts", "stalled_connections", "refused_connections")


def connection_bound(requested: int) -> int:
    """The most connections the server keeps open: `requested` (0: as many as allowed), at
    most the open-file limit less the descriptors open now and a reserve: a sixteenth of the
    limit (at least 32) for the process's other files, the refused connections still being
    read, and two accept batches not yet refused."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        allowed = 65536
    else:
        try:
            used = len(os.listdir("/proc/self/fd"))
        except OSError:  # not Linux: assume a modest number in use
            used = 64
        allowed = max(1, soft - used - max(32, soft // 16) - MAX_LINGERING - 2 * ACCEPT_BATCH)
    if requested > allowed:
        log.warning("serve.max_connections=%d: the open-file limit (%d; raise it with `ulimit -n`) allows %d; serving at most %d",
                    requested, soft, allowed, allowed)  # fmt: skip
    return min(requested, allowed) if requested > 0 else allowed


def error_bytes(status: int, reason: str, message: str, kind: str, extra: str = "") -> bytes:
    """A whole HTTP/1.1 response with OpenAI's error object that closes the connection, for
    the answers written before (or instead of) the application's."""
    body = json.dumps(RequestError(message, status=status, kind=kind).body()).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nserver: xgen\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


class Limits:
    """The settings and counters every connection of one server shares."""

    def __init__(self, idle_timeout_s: float, read_timeout_s: float, stall_timeout_s: float, max_connections: int):
        self.idle_timeout_s, self.read_timeout_s, self.stall_timeout_s = idle_timeout_s, read_timeout_s, stall_timeout_s
        self.max_connections = max_connections
        self.send_buffer_bytes = SEND_BUFFER_BYTES
        self.lingering: set = set()  # transports of refused connections being read before they close
        self.counts: collections.Counter[str] = collections.Counter(dict.fromkeys(COUNTS, 0))


class Connection(H11Protocol):
    """uvicorn's h11 protocol with the limits above, and the one reply it writes itself, the
    400 for a request h11 cannot parse, as OpenAI's JSON error object like every other answer."""

    def __init__(self, *args, limits: Limits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.timeout_keep_alive = limits.idle_timeout_s
        self._read_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._refused = False

    def _who(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"

    # ---- the connection's life ----------------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            return self._refuse(transport)
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and self.limits.send_buffer_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer_bytes)
        # uvicorn arms its keep-alive timer only after a response: a connection that never
        # sends a byte would stay open for good.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _refuse(self, transport) -> None:
        """503 at once; the request the client sends meanwhile is read and dropped until it
        closes or LINGER_S passes, so that it reads the answer rather than a reset."""
        self.transport, self._refused = transport, True
        self.limits.counts["refused_connections"] += 1
        peer = transport.get_extra_info("peername")
        log.warning("refused a connection from %s with 503: %d connections are open, serve.max_connections allows %d",
                    "%s:%s" % peer[:2] if peer else "a client", len(self.connections), self.limits.max_connections)  # fmt: skip
        message = f"the server has {len(self.connections)} connections open, the most it keeps; retry later"
        transport.write(error_bytes(503, "Service Unavailable", message, "server_error", "retry-after: 1\r\n"))
        if len(self.limits.lingering) >= MAX_LINGERING:  # a flood: the descriptors matter more
            return transport.close()
        self.limits.lingering.add(transport)
        if transport.can_write_eof():
            transport.write_eof()
        self._linger = self.loop.call_later(LINGER_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._watch_read()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._read_timer, self._stall_timer, self._linger):
            if timer is not None:
                timer.cancel()
        self.limits.lingering.discard(self.transport)
        self._read_timer = self._stall_timer = self._linger = None
        if not self._refused:
            super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._watch_read()  # a pipelined request may have begun

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self.limits.counts["idle_closed"] += 1
        super().timeout_keep_alive_handler()

    # ---- reading: the request must arrive in time --------------------------------------

    def _watch_read(self) -> None:
        """Arm the read deadline at a request's first byte; disarm it once it is all in."""
        state = self.conn.their_state
        reading = state is h11.SEND_BODY or (state is h11.IDLE and bool(self.conn.trailing_data[0]))
        if reading and self._read_timer is None and not self.transport.is_closing():
            self._read_timer = self.loop.call_later(self.limits.read_timeout_s, self._read_timed_out)
        elif not reading and self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        self.limits.counts["read_timeouts"] += 1
        body = self.conn.their_state is h11.SEND_BODY
        what = "body" if body else "request line and headers"
        log.warning("closed a connection from %s with 408: its request's %s did not arrive within %g s (serve.read_timeout_s)",
                    self._who(), what, self.limits.read_timeout_s)  # fmt: skip
        answered = False
        if body and self.cycle is not None:
            cycle = self.cycle
            answered = cycle.response_started
            if not cycle.response_complete:  # the application waits for the body: it sees the client go
                cycle.scope[TIMED_OUT] = True  # type: ignore[typeddict-unknown-key]
                cycle.disconnected = True
                cycle.message_event.set()
        if not answered:
            message = f"the request's {what} did not arrive within {self.limits.read_timeout_s:g} s"
            self.transport.write(error_bytes(408, "Request Timeout", message, "invalid_request_error"))
        self.transport.close()

    # ---- writing: the client must take its answer --------------------------------------

    def pause_writing(self) -> None:
        if self._refused:
            return
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.limits.stall_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        if self._refused:
            return
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled(self) -> None:
        self._stall_timer = None
        if self.transport.is_closing():
            return
        self.limits.counts["stalled_connections"] += 1
        scope = self.scope or {}
        log.warning("disconnected %s: it took nothing of its answer (%s %s) for %g s (serve.stall_timeout_s); its request is cancelled",
                    self._who(), scope.get("method", "-"), str(scope.get("path", "-"))[:200], self.limits.stall_timeout_s)  # fmt: skip
        self.transport.abort()  # close() would wait for the full buffer to drain

    # ---- the 400 h11 writes itself -------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        error = RequestError("invalid HTTP request (malformed request line, header or Content-Length)")
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), (b"connection", b"close")]
        events = (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage())
        try:
            for event in events:
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response had already started
            pass
        self.transport.close()
