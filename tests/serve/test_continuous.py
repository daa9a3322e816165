"""The continuous scheduler on the tiny model: every row's tokens are those of generating it
alone, whatever joins or leaves the batch around it (or its slot: a preempted row resumes
exactly); a request of many prompts does not hold back a request of one; shutdown finishes
or fails rows, never leaves them waiting."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from xgen.generate import SamplingConfig
from xgen.serve.continuous import ContinuousBatcher
from xgen.serve.jobs import Job, Row, ServerError

LENGTHS = (3, 17, 40, 5, 33, 70, 1, 16)  # 64-token chunks or 16-token pieces: prompts of 1 to 5 pieces
NEW = (5, 12, 3, 20, 7, 9, 4, 15)


@pytest.fixture(scope="module")
def batcher(engine):
    """3 slots (fewer than the requests: rows wait, join and leave) and 16-token pieces."""
    cb = ContinuousBatcher(engine, max_batch=3, prefill_chunk=64)
    yield cb
    cb.close()


def prompts(n: int = len(LENGTHS), seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 50000, LENGTHS[i % len(LENGTHS)])] for i in range(n)]


def test_rows_get_exactly_the_tokens_of_unbatched_generation(batcher, engine):
    greedy = [SamplingConfig(max_new_tokens=m, temperature=0.0) for m in NEW]
    sampled = [SamplingConfig(max_new_tokens=m, temperature=0.9, top_k=50, seed=7 + i) for i, m in enumerate(NEW)]
    work = [(p, s) for p, s in zip(prompts(), greedy)] + [(p, s) for p, s in zip(prompts(seed=1), sampled)][::2]
    expected = [engine.generate([p], s, logprobs=2)[0] for p, s in work]
    jobs = [batcher.submit(Job([Row(p, s, top_logprobs=2)])) for p, s in work]
    for job, want in zip(jobs, expected):
        (row,) = job.wait(300)
        got = row.completion
        assert (got.tokens, got.text, got.finish_reason, got.eos) == (want.tokens, want.text, want.finish_reason, want.eos)
        assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-4)
        assert [list(d) for d in got.top_logprobs] == [list(d) for d in want.top_logprobs]
    counters = batcher.counters()
    assert counters["running_rows"] == counters["queued_rows"] == 0 and counters["failed_rows"] == 0
    assert counters["prefill_calls"] < sum(-(-len(p) // 16) for p, _ in work)  # pieces of several rows shared calls


def test_stop_strings_and_streams_are_those_of_the_engine(batcher, engine):
    (p,) = prompts(1, seed=3)
    full = engine.generate([p], SamplingConfig(max_new_tokens=12, temperature=0.0))[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    settings = SamplingConfig(max_new_tokens=12, temperature=0.0, stop=(stop, "x" * 1_000_000))
    want = engine.generate([p], settings)[0]
    events = []
    job = batcher.submit(Job([Row(p, settings)], on_event=events.append))
    (row,) = job.wait(300)
    assert row.completion.text == want.text and row.completion.finish_reason == "stop" == want.finish_reason
    assert row.completion.tokens == want.tokens
    assert "".join(e[2] for e in events if e[0] == "text") == want.text
    assert events[-2:] == [("row", 0), ("end",)]


def test_a_request_of_many_prompts_does_not_hold_back_a_request_of_one(batcher):
    finished: list[str] = []
    many = Job([Row(p, SamplingConfig(max_new_tokens=6, temperature=0.0)) for p in prompts(24)],
               on_event=lambda e: e[0] == "row" and finished.append("many"))  # fmt: skip
    one = Job([Row(prompts(1, seed=5)[0], SamplingConfig(max_new_tokens=6, temperature=0.0))],
              on_event=lambda e: e[0] == "row" and finished.append("one"))  # fmt: skip
    batcher.submit(many)
    batcher.submit(one)
    one.wait(300)
    many.wait(300)
    # Round-robin admission: the single row takes the second free slot, not the 25th.
    assert finished.index("one") < 6, finished


def test_a_preempted_row_resumes_with_exactly_the_tokens_of_unbatched_generation(batcher, engine):
    # 3 slots: a request keeps 1 of them while another waits, so the small request takes a
    # slot from the 3-row one, whose row then prefills again and replays its tokens.
    assert batcher.share_rows == 1
    before = batcher.counters()
    ps = prompts(3, seed=6)
    settings = [SamplingConfig(40, temperature=0.0), SamplingConfig(40, temperature=0.9, top_k=50, seed=3),
                SamplingConfig(40, temperature=0.0)]  # fmt: skip
    events: list = []
    big = batcher.submit(Job([Row(p, s, top_logprobs=2) for p, s in zip(ps, settings)], on_event=events.append))
    deadline = time.monotonic() + 120
    while {e[1] for e in list(events) if e[0] == "text"} != {0, 1, 2}:  # every row has streamed text
        assert time.monotonic() < deadline
        time.sleep(0.005)
    small = batcher.submit(Job([Row(prompts(1, seed=7)[0], SamplingConfig(3, temperature=0.0))]))
    small.wait(300)
    rows = big.wait(300)
    after = batcher.counters()
    assert after["preempted_rows"] > before["preempted_rows"] and after["replayed_tokens"] > before["replayed_tokens"]
    assert after["replay_mismatches"] == before["replay_mismatches"] == 0
    for row, p, s in zip(rows, ps, settings):
        (want,) = engine.generate([p], s, logprobs=2)
        got = row.completion
        assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, want.finish_reason)
        assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-4)
        assert [list(d) for d in got.top_logprobs] == [list(d) for d in want.top_logprobs]
        assert "".join(e[2] for e in events if e[0] == "text" and e[1] == row.index) == want.text  # streamed once each


def test_echo_rows_are_scored_after_generating(batcher, engine):
    (p,) = prompts(1, seed=4)
    job = batcher.submit(Job([Row(p, SamplingConfig(max_new_tokens=4, temperature=0.0), score=True),
                              Row(p, SamplingConfig(max_new_tokens=0), score=True)]))  # fmt: skip
    gen, echo = job.wait(300)
    (want,) = engine.score([gen.sequence(engine.tokenizer.eos_id)])
    assert gen.scored.token_logprobs[1:] == pytest.approx(want.token_logprobs[1:], abs=1e-5)
    assert echo.completion is None and echo.scored.tokens == p


def test_close_fails_what_cannot_finish_within_the_grace_and_refuses_new_work(engine):
    cb = ContinuousBatcher(engine, max_batch=2, prefill_chunk=64)
    try:
        slow = [cb.submit(Job([Row(p, SamplingConfig(max_new_tokens=200, temperature=0.0, stop=()))])) for p in prompts(4)]
    finally:
        cb.close(grace_s=0.0)
    for job in slow:
        with pytest.raises(ServerError) as err:
            job.wait(60)
        assert err.value.status == 503
    with pytest.raises(ServerError) as err:
        cb.submit(Job([Row([1, 2], SamplingConfig(max_new_tokens=2))]))
    assert err.value.status == 503


@pytest.mark.parametrize("grace", [0.0, 120.0])
def test_shutdown_ends_a_running_stream_with_an_error_and_done_or_lets_it_finish(engine, grace):
    from tests.serve.test_http import Stream
    from xgen.serve import XGenServer

    srv = XGenServer(engine, port=0, model_name="tiny", max_batch=2, prefill_chunk=64).start()
    try:
        stream = Stream(srv.url, {"prompt": "Once upon a time", "max_tokens": 300, "temperature": 0})
        first = stream.next()
        assert first["choices"][0]["finish_reason"] is None  # running
    finally:
        closer = threading.Thread(target=srv.close, args=(grace,))
        closer.start()
    events = stream.rest()
    closer.join()
    assert events[-1] == "[DONE]"  # never a cut stream
    if grace:
        assert events[-2]["choices"][0]["finish_reason"] in ("length", "stop")
        assert "".join(e["choices"][0]["text"] for e in [first, *events[:-1]])
    else:
        assert events[-2]["error"]["type"] == "server_error" and "shut down" in events[-2]["error"]["message"]


def _in_order(client, first: dict, second: dict) -> list[str]:
    """Send `first` (a thread), then `second` once `first` is running; the order they end in."""
    from tests.serve.test_http import Stream

    ended: list[str] = []
    stream = Stream(client_url(client), first)
    assert stream.next()["choices"][0]["finish_reason"] is None  # `first` is generating

    def finish_first() -> None:
        events = stream.rest()
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        ended.append("first")

    thread = threading.Thread(target=finish_first)
    thread.start()
    status, out = client.post("/v1/completions", second)
    assert status == 200, out
    ended.append("second")
    thread.join()
    return ended


def client_url(client) -> str:
    return f"http://{client.host}:{client.port}"


def test_a_1mb_stop_string_is_answered_while_another_client_streams(client):
    long = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
    stop = {"prompt": "Hello there", "max_tokens": 2, "temperature": 0, "stop": ["z" * 1_000_000]}
    assert _in_order(client, long, stop) == ["second", "first"]


def test_a_request_of_many_prompts_does_not_hold_back_one_of_one_over_http(client, server):
    many = {"prompt": [[11 + i, 12, 13] for i in range(48)], "max_tokens": 12, "temperature": 0}
    one = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0}
    # 48 rows on 4 slots; round-robin admission gives the single row the next free slot.
    assert _in_order(client, many, one) == ["second", "first"]
