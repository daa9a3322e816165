"""The HTTP front over real sockets: malformed requests get JSON errors (never a 500 or a
traceback), 100 concurrent connections are all answered, `n` choices, chat logprobs,
/metrics, and a graceful shutdown that never cuts a stream."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import socket
import threading
import time

import pytest

from tests.serve.conftest import TEMPLATE, Client
from tests.serve.test_batcher import FakeEngine
from xgen.generate import Completion, SamplingConfig
from xgen.generate.chat import render_prompt, stop_strings
from xgen.serve import XGenServer
from xgen.serve.protocol import MAX_N, MAX_STOP_CHARS

CHAT = [{"role": "user", "content": "Say something."}]


class SlowEngine(FakeEngine):
    """FakeEngine that streams one token every `delay` seconds."""

    delay = 0.05

    def generate(self, prompts, settings, on_text=None, logprobs=0):
        self.calls.append(("generate", len(prompts)))
        out = [Completion(list(p)) for p in prompts]
        for step in range(max(s.max_new_tokens for s in settings)):
            time.sleep(self.delay)
            for i, (p, s, c) in enumerate(zip(prompts, settings, out)):
                if step < s.max_new_tokens:
                    c.tokens.append(p[-1])
                    c.token_logprobs.append(-1.0)
                    if on_text:
                        on_text(i, self.tokenizer.decode([p[-1]]))
        for c in out:
            c.text = self.tokenizer.decode(c.tokens)
        return out


@pytest.fixture(scope="module")
def fake():
    srv = XGenServer(FakeEngine(), port=0, scheduler="static", max_batch=4, batch_wait_ms=1).start()
    yield srv
    srv.close()


def address(url: str) -> tuple[str, int]:
    host, port = re.fullmatch(r"http://([\d.]+):(\d+)", url).groups()
    return host, int(port)


def raw_request(url: str, data: bytes, timeout: float = 30) -> tuple[int, bytes]:
    """Send bytes as they are (what a client library would refuse to send); (status, body)."""
    with socket.create_connection(address(url), timeout=timeout) as sock:
        sock.sendall(data)  # with Connection: close (or an error): the server closes after its reply
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def post(path: str, body: bytes, content_type: str | None = "application/json", extra: str = "") -> bytes:
    headers = f"Content-Type: {content_type}\r\n" if content_type else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
            .encode() + body)  # fmt: skip


def assert_json_error(status: int, body: bytes, expected: int, param: str | None = None) -> dict:
    assert status == expected, body[:300]
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# ---- malformed requests ----------------------------------------------------------------


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1" * 30, b"3, 4"])
def test_a_bad_content_length_is_a_400_json_error(fake, length):
    data = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " + length
    status, body = raw_request(fake.url, data + b"\r\n\r\n{}")
    assert_json_error(status, body, 400)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_only_json_bodies_are_read(fake, content_type):
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    status, out = raw_request(fake.url, post("/v1/completions", body, content_type))
    assert "Content-Type" in assert_json_error(status, out, 415)["message"]
    status, out = raw_request(fake.url, post("/v1/completions", body, "application/json; charset=utf-8"))
    assert status == 200, out


def test_the_body_limit_holds_from_content_length_and_while_reading(fake, monkeypatch):
    monkeypatch.setattr(fake, "max_body_bytes", 1000)
    body = json.dumps({"prompt": "x" * 2000}).encode()
    status, out = raw_request(fake.url, post("/v1/completions", body))
    assert "2014 bytes" in assert_json_error(status, out, 413)["message"]
    # Declared far beyond: answered before the body is sent, and the connection closes.
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
    status, out = raw_request(fake.url, head)
    assert "10000000000 bytes" in assert_json_error(status, out, 413)["message"]
    # Chunked: no Content-Length, so the limit holds while reading.
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 300]), body[i : i + 300]) for i in range(0, len(body), 300))
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    status, out = raw_request(fake.url, head + chunked + b"0\r\n\r\n")
    assert "limit of 1000" in assert_json_error(status, out, 413)["message"]
    small = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    status, out = raw_request(fake.url, head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small))
    assert status == 200, out


@pytest.mark.parametrize(
    "body",
    [b'{"prompt": "hi",', b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "hi", "seed": ' + b"7" * 5000 + b"}",
     b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}"],
    ids=["truncated", "not-utf8", "deeply-nested", "5000-digits", "nested-prompt"],
)  # fmt: skip
def test_unparsable_json_is_a_400_never_a_500(fake, body, caplog):
    status, out = raw_request(fake.url, post("/v1/completions", body))
    assert_json_error(status, out, 400)
    assert not [r for r in caplog.records if r.exc_info], "a client's request logged a traceback"


def test_a_client_gone_mid_body_is_no_error(fake, caplog):
    with caplog.at_level(logging.INFO, logger="xgen.serve.app"):
        with socket.create_connection(address(fake.url)) as sock:
            sock.sendall(post("/v1/completions", b"{" * 1000)[:-990])  # 10 of the 1000 bytes
        deadline = time.monotonic() + 10
        while not any(" 499 " in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.02)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert Client(fake.url).post("/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200


def test_the_model_field_is_the_served_name_or_absent(fake):
    client = Client(fake.url)
    status, out = client.post("/v1/completions", {"model": "gpt-4", "prompt": "hi", "max_tokens": 1})
    assert status == 404 and out["error"]["code"] == "model_not_found" and out["error"]["param"] == "model"
    status, out = client.post("/v1/chat/completions", {"model": "gpt-4", "messages": CHAT, "max_tokens": 1})
    assert status == 404 and out["error"]["code"] == "model_not_found"
    assert client.post("/v1/completions", {"model": 5, "prompt": "hi"})[0] == 400
    assert client.post("/v1/completions", {"model": "xgen", "prompt": "hi", "max_tokens": 1})[0] == 200
    assert client.post("/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200


def test_paths_methods_and_limits_are_json_errors(fake):
    client = Client(fake.url)
    for method, path, expected in [("GET", "/v1/nothing", 404), ("GET", "/", 404), ("DELETE", "/v1/completions", 405),
                                   ("POST", "/health", 405), ("GET", "/v1/models/", 200)]:  # fmt: skip
        status, out = client.request(method, path)
        assert status == expected, (method, path, out)
        assert expected == 200 or set(out["error"]) == {"message", "type", "param", "code"}
    cases = [
        ({"prompt": "hi", "n": MAX_N + 1}, "n"),
        ({"prompt": "hi", "stop": ["a" * (MAX_STOP_CHARS // 4 + 1)] * 4}, "stop"),
        ({"prompt": "hi", "stop": ["a"] * 17}, "stop"),
    ]
    for body, param in cases:
        status, out = client.post("/v1/completions", body)
        assert status == 400 and out["error"]["param"] == param, out
    for body, param in [({"logprobs": True, "stream": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                        ({"logprobs": True, "top_logprobs": 6}, "top_logprobs"), ({"n": 0}, "n")]:  # fmt: skip
        status, out = client.post("/v1/chat/completions", {"messages": CHAT, **body})
        assert status == 400 and out["error"]["param"] == param, out
    status, out = client.post("/v1/completions", {"prompt": "hi", "stop": ["a" * (MAX_STOP_CHARS // 4)] * 4, "max_tokens": 1})
    assert status == 200, out


def test_a_full_queue_is_a_429_with_retry_after_and_a_request_larger_than_the_queue_a_400():
    srv = XGenServer(SlowEngine(), port=0, scheduler="static", max_batch=1, batch_wait_ms=0, max_queued_rows=2).start()
    try:
        client = Client(srv.url)
        for body, param in [({"prompt": [[1]] * 3}, "prompt"), ({"prompt": [[1]] * 2, "n": 2}, "n")]:
            status, out = client.post("/v1/completions", {**body, "max_tokens": 1})
            assert status == 400 and out["error"]["param"] == param, out  # never a 429 that no retry can pass
        running = Stream(srv.url, {"prompt": "hi", "max_tokens": 10})
        assert running.next()
        queued = Stream(srv.url, {"prompt": ["a", "b"], "max_tokens": 1})
        _waiting(srv, 2)
        conn = http.client.HTTPConnection(*address(srv.url), timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 1}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = json.loads(resp.read())
        conn.close()
        assert resp.status == 429 and resp.getheader("Retry-After") == "1" and out["error"]["code"] == "rate_limit_exceeded"
        assert running.rest()[-1] == queued.rest()[-1] == "[DONE]"
    finally:
        srv.close()


# ---- concurrency -----------------------------------------------------------------------


def test_100_concurrent_connections_are_all_answered(fake):
    host, port = address(fake.url)

    async def one(i: int) -> tuple[int, bytes]:
        body = {"prompt": f"number {i}", "max_tokens": 2, "stream": i % 2 == 0}
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(post("/v1/completions", json.dumps(body).encode()))
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        head, _, rest = reply.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), rest

    async def main():
        return await asyncio.gather(*(one(i) for i in range(100)))

    replies = asyncio.run(main())
    assert [status for status, _ in replies] == [200] * 100
    streamed = [rest for i, (_, rest) in enumerate(replies) if i % 2 == 0]
    assert all(b"data: [DONE]" in rest for rest in streamed)


# ---- n, logprobs, metrics (the real model) ---------------------------------------------


def test_n_choices_are_the_engines_with_seed_plus_j(client, engine):
    ids = engine.tokenizer.encode("Once upon a time")
    status, out = client.post("/v1/completions", {"prompt": "Once upon a time", "n": 3, "max_tokens": 5, "temperature": 0})
    assert status == 200, out
    (greedy,) = engine.generate([ids], SamplingConfig(max_new_tokens=5, temperature=0.0))
    assert [c["index"] for c in out["choices"]] == [0, 1, 2] and {c["text"] for c in out["choices"]} == {greedy.text}

    body = {"prompt": ["Once upon a time", "Hello"], "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 2**32 - 1}
    status, out = client.post("/v1/completions", body)
    assert status == 200, out
    prompts = [ids, engine.tokenizer.encode("Hello")]
    settings = [SamplingConfig(6, temperature=1.0, seed=(2**32 - 1 + j) % 2**32) for _ in prompts for j in range(2)]
    expected = engine.generate([p for p in prompts for _ in range(2)], settings)
    assert [c["text"] for c in out["choices"]] == [c.text for c in expected]  # choice i * n + j: prompt i, seed + j
    assert client.post("/v1/completions", body)[1]["choices"] == out["choices"]  # reproducible

    events = client.events("/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    texts = ["".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == i) for i in range(4)]
    assert texts == [c.text for c in expected]


def test_chat_logprobs_are_the_engines(client, engine):
    body = {"messages": CHAT, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    status, out = client.post("/v1/chat/completions", body)
    assert status == 200, out
    ids = engine.tokenizer.encode(render_prompt(TEMPLATE, CHAT))
    settings = SamplingConfig(max_new_tokens=6, temperature=0.0, stop=tuple(stop_strings(TEMPLATE)))
    (expected,) = engine.generate([ids], settings, logprobs=2)
    content = out["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in content] == pytest.approx(expected.token_logprobs, abs=1e-4)
    tok = engine.tokenizer
    assert [bytes(e["bytes"]) for e in content] == [tok.encoding.decode_single_token_bytes(t) for t in expected.tokens]
    for entry, top in zip(content, expected.top_logprobs):
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(list(top.values()), abs=1e-4)
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-4)  # greedy: the top token
    status, out = client.post("/v1/chat/completions", {**body, "top_logprobs": 0})
    assert status == 200 and all(e["top_logprobs"] == [] for e in out["choices"][0]["logprobs"]["content"])
    status, out = client.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
    assert status == 200 and out["choices"][0]["logprobs"] is None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus's text format, strictly: HELP and TYPE before each metric's samples."""
    typed, samples = {}, {}
    for line in text.splitlines():
        if m := re.fullmatch(r"# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge)", line):
            typed[m.group(1)] = m.group(2)
        elif not line.startswith("# HELP "):
            m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]\w*="[^"]*",?)*\})? (-?[0-9.e+-]+)', line)
            assert m and m.group(1) in typed, line
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def test_metrics_and_health_reflect_a_request(client, server, caplog):
    conn = http.client.HTTPConnection(*address(server.url), timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    before = parse_metrics(resp.read().decode())
    for name in ("xgen_queued_rows", "xgen_running_rows", "xgen_tokens_per_second", "xgen_requests_total"):
        assert name in before
    with caplog.at_level(logging.INFO, logger="xgen.serve.app"):
        status, out = client.post("/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert status == 200
    assert any(re.search(r"POST /v1/completions 200 [\d.]+ ms prompt_tokens=\d+ completion_tokens=\d+", r.getMessage())
               for r in caplog.records)  # fmt: skip
    conn.request("GET", "/metrics")
    after = parse_metrics(conn.getresponse().read().decode())
    conn.close()
    assert after["xgen_requests_total"] == before["xgen_requests_total"] + 1
    assert after["xgen_generated_tokens_total"] >= before["xgen_generated_tokens_total"] + 1
    route = 'xgen_http_responses_total{route="/v1/completions",code="200"}'
    assert after[route] == before.get(route, 0) + 1
    status, out = client.request("GET", "/health")
    assert status == 200 and out["status"] == "ok" and out["model"] == "tiny" and "running_rows" in out


# ---- graceful shutdown -----------------------------------------------------------------


class Stream:
    """A streamed request read as it arrives."""

    def __init__(self, url: str, body: dict):
        self.conn = http.client.HTTPConnection(*address(url), timeout=60)
        self.conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200

    def next(self):
        while line := self.resp.readline():
            if line.startswith(b"data: "):
                data = line[6:].strip().decode()
                return data if data == "[DONE]" else json.loads(data)
        return None  # the connection ended

    def rest(self) -> list:
        out = []
        while (event := self.next()) is not None:
            out.append(event)
        self.conn.close()
        return out


def _waiting(srv: XGenServer, rows: int) -> None:
    deadline = time.monotonic() + 10
    while srv.batcher.counters()["queued_rows"] < rows:
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("grace", [0.0, 30.0])
def test_close_lets_streams_finish_within_the_grace_and_ends_the_rest_with_an_error_and_done(grace):
    srv = XGenServer(SlowEngine(), port=0, scheduler="static", max_batch=1, batch_wait_ms=0).start()
    client = Client(srv.url)
    running = Stream(srv.url, {"prompt": "hi", "max_tokens": 20})
    assert running.next()["choices"][0]["text"]  # generating
    queued = Stream(srv.url, {"prompt": "there", "max_tokens": 5})
    waiter: list = []
    thread = threading.Thread(target=lambda: waiter.append(client.post("/v1/completions", {"prompt": "x", "max_tokens": 2})))
    thread.start()
    _waiting(srv, 2)
    started = time.monotonic()
    closer = threading.Thread(target=srv.close, args=(grace,))
    closer.start()
    time.sleep(0.3)
    with pytest.raises(OSError):  # no longer listening
        socket.create_connection(address(srv.url), timeout=5).close()
    ran, rest = running.rest(), queued.rest()
    closer.join(60)
    thread.join(60)
    assert ran[-1] == "[DONE]" and rest[-1] == "[DONE]"  # never a cut stream
    assert ran[-2]["choices"][0]["finish_reason"] == "length"  # the running batch finished (static scheduler)
    if grace:
        assert rest[-2]["choices"][0]["finish_reason"] == "length" and waiter[0][0] == 200
        assert time.monotonic() - started < grace  # close returned when the work was done
    else:
        assert rest[-2]["error"]["type"] == "server_error" and "shutting down" in rest[-2]["error"]["message"]
        status, out = waiter[0]
        assert status == 503 and out["error"]["type"] == "server_error"
