"""No request holds the model (issue 31, item 6): on the tiny model and the package's server
(4 slots), a request of 16 rows keeps its share of the slots while a small one waits, and a
stream whose client never reads gives its slots to a normal request (test_continuous.py: a
row that gave up its slot ends with the tokens of generating it alone). Orderings and
counters, never durations."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

from tests.serve.test_http import Stream, address
from xgen.serve.logs import REPEATS


def until(condition, what: str, timeout: float = 120.0) -> None:
    """Wait for `condition()` (a bound for a hang, not a measured time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)


def idle(server) -> bool:
    c = server.batcher.counters()
    return c["running_rows"] == c["queued_rows"] == 0


def no_tracebacks(caplog) -> None:
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_a_small_request_is_answered_while_a_sixteen_row_request_runs(server, client, caplog):
    # 16 rows of 300 tokens on 4 slots: without the share the 4-token request would wait
    # for the first 4 rows to finish (it does: max_request_share=1.0 fails this test).
    assert server.batcher.max_request_share == 0.5 and server.batcher.share_rows == 2
    before = server.batcher.counters()
    big = Stream(server.url, {"prompt": "Once upon a time", "n": 16, "max_tokens": 300, "temperature": 0})
    first = big.next()
    assert first["choices"][0]["finish_reason"] is None
    until(lambda: server.batcher.counters()["running_rows"] == 4, "the 16-row request to fill the 4 slots")
    ended, stop = [], threading.Event()

    def read_big() -> None:
        while not stop.is_set() and (event := big.next()) is not None and event != "[DONE]":
            if event["choices"][0]["finish_reason"] is not None:
                ended.append(("big row", event["choices"][0]["index"]))

    reader = threading.Thread(target=read_big)
    reader.start()
    status, out = client.post("/v1/completions", {"prompt": "Hello there", "max_tokens": 4, "temperature": 0})
    ended.append(("small", status))
    stop.set()
    reader.join(60)
    big.conn.close()  # the client goes away: its rows are dropped
    assert status == 200 and out["choices"][0]["finish_reason"] == "length", out
    assert ended[0] == ("small", 200), ended  # before any of the 16 rows finished
    until(lambda: idle(server), "the cancelled rows to leave")
    after = server.batcher.counters()
    assert after["preempted_rows"] > before["preempted_rows"]
    assert after["dropped_rows"] >= 12 + before["dropped_rows"]  # the 16-row request's unstarted rows, counted
    no_tracebacks(caplog)


def test_a_stream_whose_client_never_reads_does_not_hold_a_normal_request(server, client, monkeypatch, caplog):
    # The share is off, so the stream's 4 rows would hold all 4 slots for 480 tokens each.
    monkeypatch.setattr(server.batcher, "max_request_share", 1.0)
    monkeypatch.setattr(server, "stream_buffer_chunks", 8)
    monkeypatch.setattr(server.connection_limits, "send_buffer_bytes", 16384)  # fills sooner than 256 KiB
    monkeypatch.setattr(REPEATS, "interval_s", 0)  # every warning logged: another test's may be recent
    before = server.batcher.counters()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # a small window: the server's buffers fill sooner
    sock.connect(address(server.url))
    body = json.dumps({"prompt": "Once upon a time", "n": 4, "max_tokens": 480, "temperature": 0, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING, logger="xgen.serve.app"):
            until(lambda: server.batcher.counters()["paused_streams"] > before["paused_streams"], "the stream to pause")
        status, out = client.post("/v1/completions", {"prompt": "Hello there", "max_tokens": 4, "temperature": 0})
        assert status == 200, out
        during = server.batcher.counters()
        assert during["running_rows"] + during["queued_rows"] == 4  # the stream's rows are there, paused, unfinished
        assert during["preempted_rows"] > before["preempted_rows"]
    finally:
        sock.close()  # with unread data: a reset, and the server drops the stream's rows
    until(lambda: idle(server), "the paused rows to be dropped")
    generated = server.batcher.counters()["generated_tokens"] - before["generated_tokens"]
    assert generated < 4 * 480  # the stream was cancelled, not run to its end
    assert any("paused a stream" in r.getMessage() for r in caplog.records)
    no_tracebacks(caplog)
