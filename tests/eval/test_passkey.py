"""Passkey retrieval (task=eval eval=passkey): prompts of the exact length with the key at
the asked depth, reproducible keys, scoring that counts exactly the trials a model gets
right, the table and heat map, resume, lengths past the model, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from xgen.config import ConfigError, ModelConfig, RopeScalingConfig
from xgen.eval import passkey
from xgen.generate.engine import Completion
from xgen.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def builder():
    return passkey.PromptBuilder(Tokenizer.xgen())


@pytest.mark.parametrize("length", [58, 100, 1000, 4096])
def test_prompt_has_the_asked_length_and_the_key_at_the_asked_depth(builder, length):
    tok = builder.tokenizer
    for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
        prompt = builder.build(length, depth, 12345)
        assert len(prompt.ids) == length
        head, needle = len(builder.head), builder.needle(12345)
        at = head + prompt.needle_at
        assert prompt.ids[:head] == builder.head and prompt.ids[-len(builder.question) :] == builder.question
        assert prompt.ids[at : at + len(needle)] == needle
        assert abs(prompt.needle_at - depth * prompt.filler_tokens) <= builder.longest_sentence
        before = tok.decode(prompt.ids[head:at])
        assert before == "" or before.endswith("."), before  # never spliced into a sentence
        text = tok.decode(prompt.ids)
        assert text.count("The pass key is 12345. Remember it. 12345 is the pass key.") == 1
        assert text.startswith(passkey.INSTRUCTION) and text.endswith("What is the pass key? The pass key is")
    assert builder.build(length, 0.0, 12345).needle_at == 0
    if length >= 1000:  # depth 1: after the last whole sentence, so within one of the end
        end = builder.build(length, 1.0, 12345)
        assert end.filler_tokens - builder.longest_sentence < end.needle_at <= end.filler_tokens


def test_keys_are_reproducible_distinct_five_digit_numbers_per_cell():
    keys = passkey.cell_keys(0, 1024, 0.5, 20)
    assert keys == passkey.cell_keys(0, 1024, 0.5, 20)
    assert len(set(keys)) == 20 and all(10_000 <= k <= 99_999 for k in keys)
    assert keys != passkey.cell_keys(1, 1024, 0.5, 20)  # the seed decides
    assert keys != passkey.cell_keys(0, 2048, 0.5, 20) and keys != passkey.cell_keys(0, 1024, 0.25, 20)


@pytest.mark.parametrize(
    "answer, correct",
    [(" 12345.", True), (" 12345 is the pass key", True), ("\nThe key: 12345", True), (" 1234", False),
     (" 123456", False), (" 54321 12345", False), (" twelve", False), ("", False)],
)  # fmt: skip
def test_a_trial_is_correct_when_the_first_digits_are_the_key(answer, correct):
    assert passkey.is_correct(answer, 12345) is correct


class KeyReadingEngine:
    """Answers with the key it finds in the prompt for prompts of `knows_length` tokens and for
    even keys, else with another number: a model whose accuracy per cell is known."""

    def __init__(self, tokenizer, knows_length: int, max_new_tokens: int):
        self.tokenizer, self.knows_length, self.max_new_tokens = tokenizer, knows_length, max_new_tokens
        self.batches = []

    def generate(self, prompts, settings):
        assert settings.temperature == 0.0 and settings.max_new_tokens == self.max_new_tokens
        assert len({len(p) for p in prompts}) == 1  # one length per batch: no padding
        self.batches.append(len(prompts))
        out = []
        for ids in prompts:
            key = int(re.search(r"The pass key is (\d+)\.", self.tokenizer.decode(ids)).group(1))
            knows = len(ids) == self.knows_length or key % 2 == 0
            out.append(Completion(prompt_tokens=list(ids), text=f" {key if knows else key - 1}. Remember"))
        return out


PASSKEY_ARGS = ("eval=passkey", "eval.passkey_lengths=[128,256]", "eval.passkey_depths=[0,0.5,1]", "eval.passkey_trials=4",
                "eval.batch_size=3", "eval.max_new_tokens=6")  # fmt: skip


def test_accuracy_counts_exactly_the_trials_the_model_answers_and_resume_reuses_them(
    tiny_checkpoint, run_eval, tmp_path, monkeypatch
):
    engine = KeyReadingEngine(Tokenizer.xgen(), knows_length=128, max_new_tokens=6)
    loads = []
    monkeypatch.setattr(passkey, "load_passkey_engine", lambda cfg, max_len: loads.append(max_len) or engine)
    run_dir = tmp_path / "run"
    result = run_eval(run_dir, *PASSKEY_ARGS, f"checkpoint={tiny_checkpoint}", "seed=7")
    assert loads == [256 + 6] and engine.batches == [3, 3, 3, 3, 3, 3, 3, 3]  # 24 trials, 3 per call
    expected = {
        (n, d): sum(n == 128 or k % 2 == 0 for k in passkey.cell_keys(7, n, d, 4)) for n in (128, 256) for d in (0.0, 0.5, 1.0)
    }
    assert {(c["length"], c["depth"]): c["correct"] for c in result["cells"]} == expected
    assert all(c["accuracy"] == c["correct"] / 4 and c["trials"] == 4 for c in result["cells"])
    assert result["accuracy_by_length"]["128"] == 1.0
    assert result["accuracy_by_length"]["256"] == sum(expected[256, d] for d in (0.0, 0.5, 1.0)) / 12
    assert result["accuracy"] == sum(expected.values()) / 24
    assert 0 < result["accuracy_by_length"]["256"] < 1  # the fake model gets some, not all, wrong
    assert json.loads((run_dir / "passkey.json").read_text())["cells"] == result["cells"]
    md = (run_dir / "passkey.md").read_text().splitlines()
    assert md[0] == "| Length | 0% | 50% | 100% | All |" and md[2] == "| 128 | 1.00 | 1.00 | 1.00 | 1.00 |"
    assert md[4].startswith("| All |") and md[4].endswith(f"| {result['accuracy']:.2f} |")
    assert (run_dir / "passkey.png").read_bytes()[:4] == b"\x89PNG" and result["plot"] == "passkey.png"

    monkeypatch.setattr(passkey, "load_passkey_engine", lambda *a: pytest.fail("a finished run loaded a model again"))
    assert run_eval(run_dir, *PASSKEY_ARGS, f"checkpoint={tiny_checkpoint}", "seed=7")["cells"] == result["cells"]
    with pytest.raises(pytest.fail.Exception, match="loaded a model"):  # other keys: not reused
        run_eval(run_dir, *PASSKEY_ARGS, f"checkpoint={tiny_checkpoint}", "seed=8")


def test_a_tiny_model_fills_every_cell_through_chunked_prefill(tiny_checkpoint, run_eval, tmp_path):
    run_dir = tmp_path / "run"
    args = ("eval=passkey", f"checkpoint={tiny_checkpoint}", "eval.passkey_lengths=[96,160]", "eval.passkey_depths=[0,1]",
            "eval.passkey_trials=2", "eval.batch_size=2", "eval.max_new_tokens=4", "execution.attention=block_causal",
            "execution.attention_chunk=64")  # fmt: skip
    result = run_eval(run_dir, *args)
    assert [(c["length"], c["depth"]) for c in result["cells"]] == [(96, 0.0), (96, 1.0), (160, 0.0), (160, 1.0)]
    assert all(0 <= c["accuracy"] <= 1 and c["trials"] == 2 for c in result["cells"])
    assert 0 <= result["accuracy"] <= 1 and set(result["accuracy_by_depth"]) == {"0.0", "1.0"}
    trials = [json.loads(line)["result"] for line in (run_dir / "passkey_partial.jsonl").read_text().splitlines()]
    assert len(trials) == 8 and all(t["correct"] == passkey.is_correct(t["answer"], t["key"]) for t in trials)
    png = run_dir / "passkey.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_prefill_in_pieces_answers_as_one_pass_does(tiny_model, tiny_engine, builder):
    """What a 32K prompt relies on: under block_causal the Engine prefills 64 tokens at a time
    against its cache (rows of two lengths, so left padding spans pieces)."""
    import numpy as np

    from xgen.config import ExecutionConfig, SamplingConfig
    from xgen.generate.engine import Engine
    from xgen.runtime import Runtime

    cfg, _, params = tiny_model
    execution = ExecutionConfig(attention="block_causal", attention_chunk=64)
    pieces = Engine(Runtime.local(cfg, execution), params, builder.tokenizer, max_len=1024)
    assert pieces._prefill_pieces(304) == [(0, 48), (48, 112), (112, 176), (176, 240), (240, 304)]
    prompts = [builder.build(300, 0.5, 12345).ids, builder.build(300, 1.0, 67890).ids, builder.build(150, 0.0, 11111).ids]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    one, chunked = tiny_engine.generate(prompts, greedy), pieces.generate(prompts, greedy)
    for a, b in zip(one, chunked):
        assert a.tokens == b.tokens and len(a.tokens) == 6
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)
    assert len({tuple(c.tokens) for c in one}) > 1  # the rows answer differently: not one constant answer


@pytest.fixture(scope="module")
def rope_checkpoints(tiny_model, tmp_path_factory):
    """The tiny weights as a 128-position model, with plain RoPE and with a linear rule."""
    from xgen.checkpoint import save_params

    cfg, _, params = tiny_model
    root = tmp_path_factory.mktemp("rope")
    out = {}
    for name, scaling in (("plain", RopeScalingConfig()), ("linear", RopeScalingConfig(type="linear", factor=2.0))):
        model = dataclasses.replace(cfg, max_positions=128, rope_scaling=scaling)
        save_params(root / name, params, {"config": {"model": json.loads(json.dumps(dataclasses.asdict(model)))}})
        out[name] = root / name
    return out


def test_lengths_past_max_positions_need_a_rope_rule(rope_checkpoints, run_eval, tmp_path):
    args = ("eval=passkey", "eval.passkey_lengths=[64,200]", "eval.passkey_depths=[0.5]", "eval.passkey_trials=1",
            "eval.max_new_tokens=4")  # fmt: skip
    with pytest.raises(ConfigError) as ex:
        run_eval(tmp_path / "plain", *args, f"checkpoint={rope_checkpoints['plain']}")
    message = str(ex.value)
    assert "\n" not in message and "eval.passkey_lengths has 200" in message and "model.max_positions=128" in message
    assert "at most 124 tokens" in message
    result = run_eval(tmp_path / "linear", *args, f"checkpoint={rope_checkpoints['linear']}")  # the rule's reach is measured
    assert [c["length"] for c in result["cells"]] == [64, 200]


def test_check_reach_allows_exactly_what_fits():
    plain = ModelConfig(name="m", d_model=8, n_layers=1, n_heads=1, d_ff=8, max_positions=1024)
    passkey.check_reach(plain, [1016], 8)
    with pytest.raises(ConfigError, match="has 1017: .*at most 1016 tokens"):
        passkey.check_reach(plain, [512, 1017], 8)
    passkey.check_reach(dataclasses.replace(plain, rope_scaling=RopeScalingConfig(type="dynamic", factor=4.0)), [32768], 8)


@pytest.mark.parametrize(
    "override, message",
    [("eval.passkey_lengths=[]", "eval.passkey_lengths is empty"),
     ("eval.passkey_depths=[]", "eval.passkey_depths is empty"),
     ("eval.passkey_depths=[0,1.5]", "eval.passkey_depths has 1.5: a depth is a fraction of the filler, in [0, 1]"),
     ("eval.passkey_lengths=[128,128]", "eval.passkey_lengths lists 128 more than once"),
     ("eval.passkey_lengths=[20]", "eval.passkey_lengths has 20: a passkey prompt needs at least 58 tokens"),
     ("eval.passkey_trials=0", "eval.passkey_trials=0 must be from 1 to 90000"),
     ("eval.passkey_lengths=[8192]", "eval.passkey_lengths has 8192: the checkpoint's model.max_positions=8192 holds "
                                     "prompts of at most 8184 tokens")],
)  # fmt: skip
def test_bad_settings_are_one_line_errors_before_a_model_loads(
    override, message, tiny_checkpoint, run_eval, tmp_path, monkeypatch
):
    monkeypatch.setattr(passkey, "load_passkey_engine", lambda *a: pytest.fail("loaded a model before checking"))
    with pytest.raises(ConfigError) as ex:
        run_eval(tmp_path / "r", "eval=passkey", f"checkpoint={tiny_checkpoint}", override)
    assert message in str(ex.value) and "\n" not in str(ex.value)


@pytest.mark.parametrize(
    "override, message",
    [("eval.passkey_depths=[0,1.5]", "eval.passkey_depths[1]=1.5 must be a finite number in [0, 1]"),
     ("eval.passkey_lengths=[1024,0]", "eval.passkey_lengths[1]=0 must be a finite number > 0"),
     ("eval.passkey_trials=-1", "eval.passkey_trials=-1 must be a finite number > 0")],
)  # fmt: skip
def test_validate_refuses_out_of_range_settings(override, message, make_config):
    from xgen.config.validate import validate

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(make_config("task=eval", "eval=passkey", override))


def test_a_missing_checkpoint_is_one_line(run_eval, tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint=.*nowhere: no such directory"):
        run_eval(tmp_path / "r", "eval=passkey", f"checkpoint={tmp_path / 'nowhere'}")
