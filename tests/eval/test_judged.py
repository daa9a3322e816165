"""Judged benchmarks (longform_qa, mt_bench, alpaca_eval): the exact requests the judge gets,
reading its verdicts, win rate over both orders, the judge client (retry, cache, API key,
errors), truncation, and the command end to end against a fake judge on localhost."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.eval.fake_judge import FakeJudge, longform_scores, pair_verdict, rating
from xgen.config import ConfigError, JudgeConfig
from xgen.eval import judge_prompts as jp
from xgen.eval.fixtures.judged import write as write_fixtures
from xgen.eval.judge import JudgeClient
from xgen.eval.judged import Answerer, Prompt, pair_score, win_rate
from xgen.tokenizer import Tokenizer

# ---- the requests ------------------------------------------------------------------------


def test_the_longform_request_shows_instruction_document_question_reference_and_answer():
    messages = jp.longform_messages("The pier is 40 m long.", "How long is the pier?", "It is 40 m.", "40 metres.")
    assert messages == [
        {"role": "system", "content": "You are a careful and impartial grader of answers to questions about documents."},
        {"role": "user", "content": (
            "[Instruction]\n"
            "Please act as an impartial judge and grade the answer that an AI assistant gave to a question about the "
            "document below. Grade three aspects, each with a whole number from 0 (worst) to 3 (best):\n"
            "Coherence: the answer is well organised, fluent and easy to follow.\n"
            "Relevance: the answer addresses the question that was asked, without digressions.\n"
            "Accuracy: every claim in the answer is supported by the document.\n"
            "Start with a short explanation and stay objective. Then finish with exactly these three lines, "
            "replacing each # by its score:\n"
            "Coherence: #\n"
            "Relevance: #\n"
            "Accuracy: #\n"
            "\n"
            "[Document]\n"
            "The pier is 40 m long.\n"
            "\n"
            "[Question]\n"
            "How long is the pier?\n"
            "\n"
            "[The Start of Reference Answer]\n"
            "40 metres.\n"
            "[The End of Reference Answer]\n"
            "\n"
            "[The Start of Assistant's Answer]\n"
            "It is 40 m.\n"
            "[The End of Assistant's Answer]"
        )},
    ]  # fmt: skip
    no_reference = jp.longform_messages("d", "q", "a")[1]["content"]
    assert "Reference Answer" not in no_reference and no_reference.endswith("[Question]\nq\n\n[The Start of Assistant's Answer]\na\n[The End of Assistant's Answer]")


def test_mt_bench_first_turn_uses_the_single_answer_template():
    assert jp.mt_bench_messages(["What is 2+2?", "And 3+3?"], ["4", "6"], turn=1) == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": (
            "[Instruction]\n"
            "Please act as an impartial judge and assess the quality of the response an AI assistant gave to the user "
            "question shown below. Weigh how helpful, relevant, accurate, deep and creative it is, and its level of "
            "detail. Start with a short explanation and stay as objective as possible. After your explanation, rate "
            "the response on a scale of 1 to 10, writing the rating strictly in this format: \"[[rating]]\", for "
            "example: \"Rating: [[5]]\".\n"
            "\n"
            "[Question]\n"
            "What is 2+2?\n"
            "\n"
            "[The Start of Assistant's Answer]\n"
            "4\n"
            "[The End of Assistant's Answer]"
        )},
    ]  # fmt: skip


def test_mt_bench_second_turn_shows_the_conversation_after_the_reference():
    system, user = jp.mt_bench_messages(["What is 2+2?", "And 3+3?"], ["4", "6"], turn=2, reference=["four", "six"])
    assert system["role"] == "system" and "second question" in system["content"]
    assert system["content"].endswith('for example: "Rating: [[5]]".\n\n')
    assert user == {"role": "user", "content": (
        "<|The Start of Reference Answer|>\n\n"
        "### User:\nWhat is 2+2?\n\n### Reference answer:\nfour\n\n"
        "### User:\nAnd 3+3?\n\n### Reference answer:\nsix\n\n"
        "<|The End of Reference Answer|>\n\n\n"
        "<|The Start of Assistant A's Conversation with User|>\n\n"
        "### User:\nWhat is 2+2?\n\n### Assistant A:\n4\n\n"
        "### User:\nAnd 3+3?\n\n### Assistant A:\n6\n\n"
        "<|The End of Assistant A's Conversation with User|>"
    )}  # fmt: skip
    plain = jp.mt_bench_messages(["q1", "q2"], ["a1", "a2"], turn=2)
    assert "second user question" in plain[0]["content"] and "Reference" not in plain[1]["content"]


def test_the_pairwise_request_puts_answer_a_before_answer_b():
    system, user = jp.pair_messages("Say hi.", "Hello!", "Hi.")
    assert '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.' in system["content"]
    assert user["content"] == (
        "[User Question]\nSay hi.\n\n"
        "[The Start of Assistant A's Answer]\nHello!\n[The End of Assistant A's Answer]\n\n"
        "[The Start of Assistant B's Answer]\nHi.\n[The End of Assistant B's Answer]"
    )


# ---- reading verdicts --------------------------------------------------------------------


@pytest.mark.parametrize(
    "verdict, expected",
    [("[[7]]", 7.0), ("Good answer. Rating: [[10]]", 10.0), ("Rating: [[7.5]]", 7.5), ("Rating: [8]", 8.0),
     ("No rating here.", None), ("Rating: [[11]]", None), ("Rating: [[0]]", None)],
)  # fmt: skip
def test_a_rating_is_read_from_double_brackets(verdict, expected):
    assert jp.parse_rating(verdict) == expected


@pytest.mark.parametrize(
    "verdict, expected",
    [("[[A]]", "A"), ("Assistant B is better. [[B]]", "B"), ("Equal. [[C]]", "tie"), ("I prefer A.", None),
     ('Format: "[[A]]" if A is better... Final verdict: [[B]]', "B")],
)  # fmt: skip
def test_a_pairwise_verdict_is_the_last_bracketed_letter(verdict, expected):
    assert jp.parse_pair(verdict) == expected


@pytest.mark.parametrize(
    "verdict, expected",
    [("Clear.\nCoherence: 2\nRelevance: 3\nAccuracy: 1", {"coherence": 2, "relevance": 3, "accuracy": 1}),
     ('{"coherence": 3, "relevance": 2, "accuracy": 0}', {"coherence": 3, "relevance": 2, "accuracy": 0}),
     ("Its coherence - 1 at first.\n**Coherence:** 3/3\nRelevance score: 2\nAccuracy: [1]",
      {"coherence": 3, "relevance": 2, "accuracy": 1}),
     ("Coherence: 2\nRelevance: 3", None), ("Coherence: 2\nRelevance: 5\nAccuracy: 1", None), ("Fine.", None)],
)  # fmt: skip
def test_longform_scores_are_read_per_aspect(verdict, expected):
    assert jp.parse_longform(verdict) == expected


# ---- win rate ----------------------------------------------------------------------------


def test_win_rate_combines_both_orders_and_counts_ties_half():
    # (model first: model is A; model second: model is B)
    assert pair_score("A", "B") == 1.0  # wins in both orders
    assert pair_score("A", "A") == 0.5  # the judge always picks the first: position bias cancels
    assert pair_score("tie", "A") == 0.25  # tie, then loss
    assert pair_score("B", None) == 0.0  # one readable order counts alone
    assert pair_score(None, None) is None
    rate, se = win_rate([1.0, 0.5, 0.25, 0.0])
    # mean 0.4375; deviations .5625 .0625 -.1875 -.4375, squares sum .546875, / 3 = .182292,
    # sd .426956, / sqrt(4) = .213478
    assert rate == pytest.approx(43.75) and se == pytest.approx(21.3478, abs=1e-4)


def _answerer(max_len: int, max_input_tokens: int | None, truncation: str) -> Answerer:
    from xgen.config import ChatTemplateConfig, EvalConfig

    ev = EvalConfig(name="t", kind="longform_qa", data_path="-", max_new_tokens=8,
                    max_input_tokens=max_input_tokens, truncation=truncation)  # fmt: skip
    engine = SimpleNamespace(tokenizer=Tokenizer.xgen(), max_len=max_len)
    return Answerer(engine, SimpleNamespace(eval=ev, chat_template=ChatTemplateConfig()))


@pytest.mark.parametrize("side, kept", [("left", "END."), ("right", "START"), ("middle", "END.")])
def test_a_long_document_is_cut_to_the_budget_and_the_question_kept(side, kept):
    answerer = _answerer(max_len=1024, max_input_tokens=120, truncation=side)
    document = "START " + "filler words " * 300 + "END."
    prompt = Prompt(lambda d: [{"role": "user", "content": f"{d}\n\nQuestion: why?"}], document, seed=0)
    ids, cut = answerer.fit(prompt)
    text = Tokenizer.xgen().decode(ids)
    assert cut and len(ids) <= 120 and kept in text and text.endswith("Question: why?\n### Assistant:")
    short = Prompt(prompt.render, "START END.", seed=0)
    assert answerer.fit(short) == (answerer.ids(short, "START END."), False)


def test_max_new_tokens_leaving_no_input_room_is_a_config_error():
    with pytest.raises(ConfigError, match="leaves no room"):
        _answerer(max_len=8, max_input_tokens=None, truncation="left")


# ---- the judge client --------------------------------------------------------------------


def _client(judge: FakeJudge | None, cache: Path, **kw) -> JudgeClient:
    fields = {"base_url": judge.url if judge else "http://127.0.0.1:9/v1", "model": "fake-judge", "retries": 2,
              "cache_dir": str(cache), "timeout_s": 5.0, "api_key_env": "XGEN_TEST_JUDGE_KEY", **kw}  # fmt: skip
    return JudgeClient(JudgeConfig(**fields), backoff_s=0.0)


def test_a_503_is_retried_and_a_cached_verdict_is_never_asked_again(tmp_path):
    messages = jp.mt_bench_messages(["q1", "q2"], ["four", "six"], turn=1)
    with FakeJudge(fail_first=1) as judge:
        client = _client(judge, tmp_path)
        assert client.complete(messages) == "Short explanation. Rating: [[5]]"
        assert len(judge.bodies) == 2 and client.sent == 2  # the 503, then the answer
        assert judge.bodies[1] == {"model": "fake-judge", "messages": messages, "temperature": 0.0, "max_tokens": 512}
        again = _client(judge, tmp_path)  # a new process: only the disk is shared
        assert again.complete(messages) == "Short explanation. Rating: [[5]]"
        assert len(judge.bodies) == 2 and again.sent == 0 and again.cache_hits == 1
        assert len(list(tmp_path.glob("*.json"))) == 1 and not list(tmp_path.glob("*.tmp"))
        other = _client(judge, tmp_path, model="another-judge")  # the cache key includes the judge model
        other.complete(messages)
        assert len(judge.bodies) == 3


def test_the_api_key_is_sent_as_a_bearer_token_only_when_its_variable_is_set(tmp_path, monkeypatch):
    with FakeJudge() as judge:
        monkeypatch.delenv("XGEN_TEST_JUDGE_KEY", raising=False)
        _client(judge, tmp_path / "a").complete([{"role": "user", "content": "[[A]] [The Start of Assistant's Answer]\nx\n[The End of Assistant's Answer]"}])
        monkeypatch.setenv("XGEN_TEST_JUDGE_KEY", "sk-test-123")
        _client(judge, tmp_path / "b").complete([{"role": "user", "content": "[The Start of Assistant's Answer]\ny\n[The End of Assistant's Answer]"}])
    assert "Authorization" not in judge.headers[0]
    assert judge.headers[1]["Authorization"] == "Bearer sk-test-123"


def test_a_4xx_is_one_error_naming_the_url_and_status(tmp_path):
    with FakeJudge() as judge:
        client = _client(judge, tmp_path)
        client.url = judge.url + "/wrong"
        with pytest.raises(ConfigError, match=r"judge http://127\.0\.0\.1:\d+/v1/wrong answered HTTP 404"):
            client.complete([{"role": "user", "content": "x"}])
        assert len(judge.bodies) == 1  # a 404 is not retried


def test_an_unreachable_judge_is_one_error_after_the_retries(tmp_path, caplog):
    with FakeJudge() as judge:
        url = judge.url
    client = _client(None, tmp_path, base_url=url, retries=1)  # the port is closed now
    with pytest.raises(ConfigError, match=r"judge http://127\.0\.0\.1:\d+/v1/chat/completions: unreachable .* after 2 attempt") as info:
        client.complete([{"role": "user", "content": "x"}])
    assert client.sent == 2
    assert "its default, http://127.0.0.1:8000/v1, is where task=serve listens" in str(info.value)
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 1 and retries[0].endswith("retry 1/1")  # never "retry 2/1"


def test_retries_are_counted_and_the_served_model_is_recorded_live_and_from_the_cache(tmp_path, caplog):
    messages = jp.mt_bench_messages(["q1", "q2"], ["four", "six"], turn=1)
    with FakeJudge(fail_first=2, served_model="judge-7b-q4") as judge:
        client = _client(judge, tmp_path, retries=3)
        client.complete(messages)
        assert client.served == {"judge-7b-q4"}
        again = _client(judge, tmp_path, retries=3)
        again.complete(messages)
        assert again.cache_hits == 1 and again.served == {"judge-7b-q4"}
    assert [r.getMessage()[-9:] for r in caplog.records if "retry" in r.getMessage()] == ["retry 1/3", "retry 2/3"]


# ---- the command -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fixtures(tmp_path_factory.mktemp("judged_data"))


def _overrides(name: str, checkpoint: Path, data_dir: Path, judge: FakeJudge, cache: Path, *extra: str) -> list[str]:
    return [f"eval={name}", f"checkpoint={checkpoint}", f"data_dir={data_dir}", f"eval.judge.base_url={judge.url}",
            f"eval.judge.cache_dir={cache}", "eval.judge.retries=0", "eval.max_new_tokens=8", "generate.max_len=512",
            *extra]  # fmt: skip


def _answers(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"{name}_answers.jsonl").read_text().splitlines()]


def _rerun_without_model_or_new_requests(run_eval, run_dir, overrides, judge, monkeypatch) -> dict:
    """A rerun in the same run directory: answers and verdicts come from its partial files."""
    import xgen.generate.load

    def no_model(cfg):
        raise AssertionError("the rerun loaded the model")

    monkeypatch.setattr(xgen.generate.load, "load_engine", no_model)
    before = len(judge.bodies)
    result = run_eval(run_dir, *overrides)
    assert len(judge.bodies) == before
    return result


def test_mt_bench_end_to_end_per_turn_and_category(run_eval, tiny_checkpoint, data_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # question 7's second turn is "Explain it to a ten-year-old.": its verdict is unreadable
    with FakeJudge(malformed_if="ten-year-old") as judge:
        overrides = _overrides("mt_bench", tiny_checkpoint, data_dir, judge, tmp_path / "cache")
        result = run_eval(run_dir, *overrides)
        assert len(judge.bodies) == 16
        rows = _answers(run_dir, "mt_bench")
        assert [r["question_id"] for r in rows] == list(range(1, 9))
        expected = {r["question_id"]: [rating(t) for t in r["choices"][0]["turns"]] for r in rows}
        expected[7][1] = None
        first = [v[0] for v in expected.values()]
        second = [v[1] for v in expected.values() if v[1] is not None]
        assert result["first_turn"] == pytest.approx(sum(first) / 8)
        assert result["second_turn"] == pytest.approx(sum(second) / 7)
        assert result["average"] == pytest.approx((sum(first) + sum(second)) / 15)
        assert result["categories"]["math"] == pytest.approx(sum(expected[4]) / 2)
        assert result["unparseable"] == 1 and result["unparseable_ids"] == ["7"]
        # math, reasoning and coding are judged against FastChat's reference answers
        # (requests go out in parallel: find each turn's by its template, not by its position)
        math = [b["messages"][1]["content"] for b in judge.bodies if "What is 17 + 25?" in b["messages"][1]["content"]]
        first_turn = [m for m in math if "### User:" not in m]
        second_turn = [m for m in math if "### User:" in m]
        assert len(first_turn) == len(second_turn) == 1
        assert "[The Start of Reference Answer]\n42\n" in first_turn[0]
        assert "### Reference answer:\n42\n" in second_turn[0]
        table = (run_dir / "mt_bench.md").read_text()
        assert "| Model | First turn | Second turn | Average |" in table
        assert "Judge: fake-judge-1;" in table and result["judge"]["served"] == ["fake-judge-1"]  # who answered
        assert "| Model | Writing | Roleplay | Reasoning | Math | Coding | Extraction | STEM | Humanities |" in table
        assert json.loads((run_dir / "mt_bench.json").read_text())["benchmark"] == "mt_bench"
        again = _rerun_without_model_or_new_requests(run_eval, run_dir, overrides, judge, monkeypatch)
        assert again["average"] == result["average"]


def test_alpaca_eval_end_to_end_win_rate_over_both_orders(run_eval, tiny_checkpoint, data_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with FakeJudge() as judge:
        overrides = _overrides("alpaca_eval", tiny_checkpoint, data_dir, judge, tmp_path / "cache")
        result = run_eval(run_dir, *overrides)
        assert len(judge.bodies) == 8  # 4 instructions x 2 orders
        rows = _answers(run_dir, "alpaca_eval")
        assert set(rows[0]) >= {"instruction", "output", "generator", "dataset"}
        refs = {r["instruction"]: r["output"] for r in json.loads((data_dir / "alpaca_eval" / "alpaca_eval.json").read_text())}
        score = {"A": 1.0, "C": 0.5, "B": 0.0}
        scores = [score[pair_verdict(r["output"], refs[r["instruction"]])] for r in rows]
        assert result["win_rate"] == pytest.approx(100 * sum(scores) / 4)
        assert result["wins"] == scores.count(1.0) and result["ties"] == scores.count(0.5)
        assert result["position_agreement"] == 1.0 and result["reference"] == "text_davinci_003"
        assert "| Model | Win rate (%) | Std. error |" in (run_dir / "alpaca_eval.md").read_text()
        _rerun_without_model_or_new_requests(run_eval, run_dir, overrides, judge, monkeypatch)


def test_longform_qa_end_to_end_with_truncation(run_eval, tiny_checkpoint, data_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with FakeJudge() as judge:
        overrides = _overrides("longform_qa", tiny_checkpoint, data_dir, judge, tmp_path / "cache", "eval.max_input_tokens=200")
        result = run_eval(run_dir, *overrides)
        rows = _answers(run_dir, "longform_qa")
        assert [r["truncated"] for r in rows] == [False, False, True, False]  # lf-3's document is long
        scores = [longform_scores(r["answer"]) for r in rows]
        for k, aspect in enumerate(("coherence", "relevance", "accuracy")):
            assert result[aspect] == pytest.approx(sum(s[k] for s in scores) / 4)
        assert result["truncated"] == 1 and result["unparseable"] == 0
        assert {k: v["items"] for k, v in result["by_length"].items()} == {"<=1K": 3, "1K-2K": 1}  # 75, 99, 1207, 42 tokens
        # the judge reads the whole document, not the truncated input
        lf3 = next(b for b in judge.bodies if "copper mines?" in b["messages"][1]["content"])
        assert "(Record 59.)" in lf3["messages"][1]["content"]
        assert "| Model | Coherence | Relevance | Accuracy | Average |" in (run_dir / "longform_qa.md").read_text()
        _rerun_without_model_or_new_requests(run_eval, run_dir, overrides, judge, monkeypatch)


def test_missing_data_fails_before_the_model_loads(run_eval, tmp_path, monkeypatch):
    import xgen.generate.load

    monkeypatch.setattr(xgen.generate.load, "load_engine", lambda cfg: pytest.fail("loaded the model"))
    with pytest.raises(ConfigError, match=r"mt_bench: file not found: expected .*question\.jsonl"):
        run_eval(tmp_path / "run", "eval=mt_bench", "checkpoint=unused", f"data_dir={tmp_path}")
    (tmp_path / "mt_bench").mkdir()
    (tmp_path / "mt_bench" / "question.jsonl").write_text('{"question_id": 1, "category": "math", "turns": ["only one"]}\n')
    with pytest.raises(ConfigError, match=r"question\.jsonl: record 1 is not"):
        run_eval(tmp_path / "run", "eval=mt_bench", "checkpoint=unused", f"data_dir={tmp_path}")


def test_xgens_own_server_can_be_the_judge(tiny_engine, tmp_path):
    """`task=serve` speaks the protocol the client needs: the reply is the model's greedy
    answer to the rendered judging prompt (a random model's verdict is unreadable, and says so)."""
    from xgen.config import ChatTemplateConfig
    from xgen.generate.chat import render_prompt, stop_strings
    from xgen.generate.engine import SamplingConfig
    from xgen.serve import XGenServer

    template = ChatTemplateConfig(system="")
    server = XGenServer(tiny_engine, port=0, model_name="xgen", template=template, max_batch=1, batch_wait_ms=0).start()
    try:
        fields = {"base_url": server.url + "/v1", "model": "xgen", "cache_dir": str(tmp_path), "max_tokens": 6}
        client = JudgeClient(JudgeConfig(**fields), backoff_s=0.0)
        messages = [{"role": "user", "content": "Rate this answer: 4. Your rating: [[n]]"}]
        reply = client.complete(messages)
    finally:
        server.close()
    prompt = tiny_engine.tokenizer.encode(render_prompt(template, messages))
    settings = SamplingConfig(max_new_tokens=6, stop=tuple(stop_strings(template)))
    expected = tiny_engine.generate([prompt], settings)[0].text
    assert client.sent == 1 and reply.strip() == expected.strip()
    assert jp.parse_rating(reply) is None
