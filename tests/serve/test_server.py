"""The server over real HTTP: results equal the Engine's own, streams equal non-streamed
answers, bad requests get one-line 400s, and concurrent requests share batches."""

from __future__ import annotations

import threading

import pytest

from tests.serve.conftest import TEMPLATE
from xgen.generate import SamplingConfig
from xgen.generate.chat import render_prompt, stop_strings

PROMPT = "The quick brown fox jumps over"


def greedy(engine, prompts: list[list[int]], max_new: int, stop=()) -> list:
    return engine.generate(prompts, SamplingConfig(max_new_tokens=max_new, temperature=0.0, stop=tuple(stop)))


def test_echo_logprobs_are_the_engines_scores_and_greedy_text_is_the_engines(client, engine):
    ids = engine.tokenizer.encode(PROMPT)
    status, out = client.post(
        "/v1/completions",
        {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True},
    )
    assert status == 200, out
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    (choice,) = out["choices"]
    (expected,) = greedy(engine, [ids], 4)
    assert choice["text"] == PROMPT + expected.text
    assert choice["finish_reason"] == expected.finish_reason
    lp = choice["logprobs"]
    n = len(ids) + len(expected.tokens) + expected.eos
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(len(top) <= 2 for top in lp["top_logprobs"][1:]) and all(lp["top_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert "".join(lp["tokens"][: len(ids)]) == PROMPT
    (scored,) = engine.score([ids + expected.tokens])
    assert lp["token_logprobs"][1 : len(scored.tokens)] == pytest.approx(scored.token_logprobs[1:], abs=1e-5)
    n_new = len(expected.tokens)
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n_new, "total_tokens": len(ids) + n_new}

    status, out = client.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert status == 200, out
    assert out["choices"][0]["text"] == greedy(engine, [ids], 8)[0].text
    assert out["choices"][0]["logprobs"] is None


def test_lm_eval_loglikelihood_requests(client, engine):
    """lm-evaluation-harness's local-completions: token ids, echo, max_tokens=1, logprobs=1;
    it sums token_logprobs[ctxlen:-1] and checks each against max(top_logprobs)."""
    tok = engine.tokenizer
    contexts = [tok.encode(c) for c in ("The capital of France", "2 + 2 =", "Once upon", "Hello")]
    conts = [tok.encode(c) for c in (" is Paris", " 4", " a time", ",")]
    seqs = [c + x for c, x in zip(contexts, conts)]
    status, out = client.post(
        "/v1/completions",
        {"model": "tiny", "prompt": seqs, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True},
    )
    assert status == 200, out
    scored = engine.score(seqs, top_logprobs=1)
    for choice, ctx, seq, s in zip(sorted(out["choices"], key=lambda c: c["index"]), contexts, seqs, scored):
        lps = choice["logprobs"]["token_logprobs"]
        assert len(lps) == len(seq) + 1  # the generated token, also when it is end-of-text
        assert sum(lps[len(ctx) : -1]) == pytest.approx(sum(s.token_logprobs[len(ctx) :]), abs=1e-4)
        tops = choice["logprobs"]["top_logprobs"][len(ctx) : -1]
        greedy_flags = [lp == pytest.approx(max(t.values()), abs=1e-6) for lp, t in zip(lps[len(ctx) : -1], tops)]
        expected = [s.token_logprobs[j] >= max(s.top_logprobs[j].values()) - 1e-6 for j in range(len(ctx), len(seq))]
        assert greedy_flags == expected


def test_streamed_chat_equals_the_non_streamed_answer(client, engine):
    messages = [{"role": "user", "content": "Say something."}]
    body = {"messages": messages, "max_tokens": 12, "temperature": 0}
    status, out = client.post("/v1/chat/completions", body)
    assert status == 200, out
    assert out["object"] == "chat.completion"
    answer = out["choices"][0]["message"]
    assert answer["role"] == "assistant"
    ids = engine.tokenizer.encode(render_prompt(TEMPLATE, messages))
    (expected,) = greedy(engine, [ids], 12, stop_strings(TEMPLATE))
    assert answer["content"] == expected.text.removeprefix(" ")

    events = client.events("/v1/chat/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == answer["content"]


def test_streamed_completion_with_echo(client, engine):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "echo": True, "stream": True}
    events = client.events("/v1/completions", body)
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in events[:-1])
    assert text == PROMPT + greedy(engine, [engine.tokenizer.encode(PROMPT)], 6)[0].text


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "max_tokenz": 3}, "max_tokenz"),
        ({"prompt": "hi", "max_tokens": "3"}, "max_tokens"),
        ({"prompt": "hi", "temperature": True}, "temperature"),
        ({"prompt": "hi", "temperature": 3.0}, "temperature"),
        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"prompt": "hi", "n": 17}, "n"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "stop": [str(i) for i in range(17)]}, "stop"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": [1, 2, 10**9]}, "prompt"),
        ({"prompt": "x " * 600}, "prompt"),
        ({"prompt": "hi", "max_tokens": 600}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_bad_completion_requests_get_400_naming_the_field(client, body, param):
    status, out = client.post("/v1/completions", body)
    assert status == 400, out
    err = out["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert "\n" not in err["message"] and err["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": "x " * 600}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ],
)
def test_bad_chat_requests_get_400_naming_the_field(client, body, param):
    status, out = client.post("/v1/chat/completions", body)
    assert status == 400, out
    assert out["error"]["param"] == param


def test_malformed_and_misrouted_requests_then_the_server_still_answers(client, server, monkeypatch):
    status, out = client.post("/v1/completions", raw=b'{"prompt": "hi",')
    assert status == 400 and "JSON" in out["error"]["message"]
    status, out = client.post("/v1/completions", raw=b"[1, 2]")
    assert status == 400 and "object" in out["error"]["message"]
    monkeypatch.setattr(server, "max_body_bytes", 1000)
    status, out = client.post("/v1/completions", raw=b"x" * 1001)
    assert status == 413 and "1001 bytes" in out["error"]["message"]
    monkeypatch.undo()
    assert client.request("GET", "/v1/nothing")[0] == 404
    assert client.request("GET", "/v1/completions")[0] == 405
    status, out = client.request("GET", "/health")
    assert status == 200 and out["status"] == "ok"
    status, out = client.request("GET", "/v1/models")
    assert status == 200 and out["data"][0]["id"] == "tiny"
    status, out = client.post("/v1/completions", {"prompt": "still there?", "max_tokens": 2, "temperature": 0})
    assert status == 200 and out["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_share_decoding_steps(client, server, engine):
    prompts = ["One", "Two three", "Four five six", "Seven"]
    # Sampled, with different settings per row: each equals its own unbatched result.
    settings = [SamplingConfig(5 + i, temperature=0.0 if i % 2 else 0.8, top_k=i * 10, seed=i) for i in range(4)]
    ids = [engine.tokenizer.encode(p) for p in prompts]
    expected = [c.text for c in engine.generate(ids, settings)]
    before = server.batcher.counters()
    barrier, results = threading.Barrier(len(prompts)), [None] * len(prompts)

    def send(i: int) -> None:
        s = settings[i]
        body = {"prompt": prompts[i], "max_tokens": s.max_new_tokens, "temperature": s.temperature}
        body |= {"top_k": s.top_k, "seed": s.seed}
        barrier.wait()
        results[i] = client.post("/v1/completions", body)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [200] * 4, results
    assert [r[1]["choices"][0]["text"] for r in results] == expected
    after = server.batcher.counters()
    assert after["rows"] - before["rows"] == 4
    tokens = after["generated_tokens"] - before["generated_tokens"]
    assert after["steps"] - before["steps"] < tokens - 4  # rows decoded side by side (a row's first token is its prefill's)


def test_the_developer_role_of_the_current_openai_sdk_is_the_system_message():
    from xgen.config import ChatTemplateConfig
    from xgen.serve.protocol import Limits, parse_chat
    from xgen.tokenizer import Tokenizer

    tokenizer, limits = Tokenizer.xgen(), Limits(max_len=1024, vocab=51200)
    as_role = lambda role: {"messages": [{"role": role, "content": "Be brief."}, {"role": "user", "content": "hi"}]}  # noqa: E731
    developer = parse_chat(as_role("developer"), tokenizer, ChatTemplateConfig(), limits, 16)
    assert developer.prompt == parse_chat(as_role("system"), tokenizer, ChatTemplateConfig(), limits, 16).prompt
    assert "Be brief." in tokenizer.decode(developer.prompt)
