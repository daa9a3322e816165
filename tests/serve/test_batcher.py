"""Batching and failure handling with a stand-in engine (no JAX): rows are split across
batches, padded to a power of two, and a failing batch answers 500 without stopping anything."""

from __future__ import annotations

import pytest

from tests.serve.conftest import Client
from xgen.generate import Completion, SamplingConfig, Scored
from xgen.serve import Job, Row, XGenServer
from xgen.tokenizer import Tokenizer


class FakeEngine:
    """Repeats each prompt's last token; records the batch sizes it was called with."""

    max_len = 64
    tokenizer = Tokenizer.xgen()

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self.fail = False

    def generate(self, prompts, settings, on_text=None, logprobs=0):
        self.calls.append(("generate", len(prompts)))
        if self.fail:
            raise RuntimeError("the accelerator fell over")
        out = []
        for i, (p, s) in enumerate(zip(prompts, settings)):
            tokens = [p[-1]] * s.max_new_tokens
            text = self.tokenizer.decode(tokens)
            if on_text and text:
                on_text(i, text)
            tops = [{t: -1.0} for t in tokens] if logprobs else []
            out.append(Completion(list(p), tokens, text, "length", [-1.0] * len(tokens), tops))
        return out

    def score(self, sequences, top_logprobs=0):
        self.calls.append(("score", len(sequences)))
        return [Scored(list(s), [None] + [-2.0] * (len(s) - 1), [None] + [{t: -2.0} for t in s[1:]]) for s in sequences]


@pytest.fixture
def fake():
    engine = FakeEngine()
    srv = XGenServer(engine, port=0, scheduler="static", max_batch=4, batch_wait_ms=50).start()
    yield engine, srv, Client(srv.url)
    srv.close()


def test_rows_beyond_max_batch_run_in_further_batches_padded_to_a_power_of_two(fake):
    engine, srv, client = fake
    prompts = [[10 + i] for i in range(6)]
    status, out = client.post("/v1/completions", {"prompt": prompts, "max_tokens": 2})
    assert status == 200, out
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert [c["text"] for c in out["choices"]] == [engine.tokenizer.decode([10 + i] * 2) for i in range(6)]
    assert engine.calls == [("generate", 4), ("generate", 2)]
    counters = srv.batcher.counters()
    assert (counters["batches"], counters["rows"], counters["padding_rows"]) == (2, 6, 0)
    engine.calls.clear()
    assert client.post("/v1/completions", {"prompt": prompts[:3], "max_tokens": 1})[0] == 200
    assert engine.calls == [("generate", 4)] and srv.batcher.counters()["padding_rows"] == 1


def test_echo_scores_prompt_and_completion_and_max_tokens_0_only_scores(fake):
    engine, srv, client = fake
    status, out = client.post("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 0, "echo": True, "logprobs": 1})
    assert status == 200, out
    assert engine.calls == [("score", 1)]
    lp = out["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [None, -2.0, -2.0] and lp["top_logprobs"][0] is None
    status, out = client.post("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 2, "echo": True, "logprobs": 0})
    assert status == 200 and engine.calls[1:] == [("generate", 1), ("score", 1)]
    assert len(out["choices"][0]["logprobs"]["tokens"]) == 5
    assert out["choices"][0]["logprobs"]["top_logprobs"][1:] == [{}] * 4


def test_an_engine_failure_is_a_500_and_the_server_keeps_serving(fake):
    engine, srv, client = fake
    engine.fail = True
    status, out = client.post("/v1/completions", {"prompt": "hello", "max_tokens": 3})
    assert status == 500 and out["error"]["type"] == "server_error"
    assert "the accelerator fell over" in out["error"]["message"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    events = client.events("/v1/chat/completions", chat)
    assert "error" in events[-2] and events[-1] == "[DONE]"
    engine.fail = False
    status, out = client.post("/v1/completions", {"prompt": "hello", "max_tokens": 3})
    tok = engine.tokenizer
    assert status == 200 and out["choices"][0]["text"] == tok.decode(tok.encode("hello")[-1:] * 3)
    assert srv.batcher.counters()["failed_batches"] == 2


def test_rows_that_do_not_fit_one_cache_together_run_apart(fake):
    engine, srv, client = fake
    # 40 + 4 and 3 + 30 each fit the cache of 64; in one batch (40 + 30) they would not.
    jobs = [Job([Row([1] * 40, SamplingConfig(max_new_tokens=4))]), Job([Row([2] * 3, SamplingConfig(30))])]
    for job in jobs:
        srv.batcher.submit(job)
    for job in jobs:
        job.wait(30)
    assert engine.calls == [("generate", 1), ("generate", 1)]


def test_uvicorns_own_lines_come_out_as_xgen_serve_http_not_uvicorn_error(caplog):
    """uvicorn logs "Started server process" as `uvicorn.error`: a healthy start read as an error."""
    import logging

    with caplog.at_level(logging.INFO):
        XGenServer(FakeEngine(), port=0, scheduler="static").start().close()
    own = [r for r in caplog.records if "server process" in r.getMessage() or r.getMessage() == "Shutting down"]
    assert len(own) == 3 and {(r.name, r.levelname) for r in own} == {("xgen.serve.http", "INFO")}
    assert not [r.name for r in caplog.records if r.name.startswith("uvicorn")]


def test_a_padding_row_among_the_alternatives_has_a_name_of_its_own():
    """Log-probs over every output row can rank padding rows (ids the tokenizer cannot decode)
    among the top alternatives: each keeps its own key instead of all collapsing into ""."""
    from xgen.serve.protocol import logprobs_block, token_string

    tok = FakeEngine.tokenizer
    assert token_string(tok, 50256) == "<|endoftext|>" and token_string(tok, 50400) == "<|pad:50400|>"
    block = logprobs_block(tok, [15496, 11], [None, -1.0], [None, {11: -1.0, 50400: -2.0, 50401: -3.0}], 3, 0, "output_rows")
    assert block["top_logprobs"][1] == {",": -1.0, "<|pad:50400|>": -2.0, "<|pad:50401|>": -3.0}
    assert block["normalized_over"] == "output_rows"
