"""A tiny random model behind a real server on an ephemeral port, and an HTTP client.

One engine and one server serve the whole package: every new batch size or prompt bucket
is an XLA compilation, so the tests keep prompts under 16 tokens and batches at 1 or 4."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from xgen.config import ChatTemplateConfig


@pytest.fixture(scope="session")
def tiny_model():
    """(ModelConfig, parameters) of a small random model with a real vocabulary."""
    from flax import nnx

    from xgen.config import ModelConfig
    from xgen.model.transformer import XGenModel

    cfg = ModelConfig(name="t", d_model=64, n_layers=2, n_heads=4, d_ff=128, init_std=0.5)
    return cfg, nnx.state(XGenModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)


@pytest.fixture(scope="session")
def engine(tiny_model):
    from xgen.generate import Engine
    from xgen.runtime import Runtime
    from xgen.tokenizer import Tokenizer

    cfg, params = tiny_model
    return Engine(Runtime.local(cfg), params, Tokenizer.xgen(), max_len=512)


# No system header: a chat prompt stays within one 16-token bucket.
TEMPLATE = ChatTemplateConfig(system="")


@pytest.fixture(scope="session")
def server(engine):
    from xgen.serve import XGenServer

    srv = XGenServer(engine, port=0, model_name="tiny", template=TEMPLATE, max_batch=4, prefill_chunk=64).start()
    yield srv
    srv.close()


class Client:
    """A real HTTP client (http.client) for one server."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port

    def request(self, method: str, path: str, body=None, raw: bytes | None = None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, json.loads(payload) if payload else None
        finally:
            conn.close()

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def events(self, path: str, body: dict) -> list:
        """A streamed request's Server-Sent Events: parsed JSON objects, then "[DONE]"."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Content-Type").split(";")[0] == "text/event-stream"
            out = []
            for line in resp:
                line = line.decode().strip()
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    out.append(data if data == "[DONE]" else json.loads(data))
            return out
        finally:
            conn.close()


@pytest.fixture(scope="session")
def client(server) -> Client:
    return Client(server.url)
