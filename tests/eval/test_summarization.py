"""Dialogue summarization (task=eval eval=summarization): truncation on each side, ROUGE on
hand-checked pairs, the exact chat prompt, Table 13's layout, resume, and the command."""

from __future__ import annotations

import json

import pytest

from xgen.config import ChatTemplateConfig, ConfigError
from xgen.eval import summarization as summ
from xgen.eval.common import TRUNCATION_SIDES, ItemStore
from xgen.eval.fixtures.summarization import write
from xgen.generate.engine import Completion, SamplingConfig
from xgen.tokenizer import Tokenizer

DIALOGUE = "Project Manager: Shall we start?\nMarketing: Yes. Users want a fancy remote."


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.xgen()


@pytest.fixture(scope="module")
def scorer():
    return summ.rouge_scorer()


def test_rouge_f_measures_of_hand_checked_pairs(scorer):
    same = summ.rouge(scorer, "The team chose a rubber case.", "the team chose a rubber case")
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert summ.rouge(scorer, "rubber case", "titanium buttons") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # Unigrams in common: the, cat, on, mat (4 of 6 each side); bigrams: "the cat" (1 of 5);
    # longest common subsequence: the cat on mat (4).
    got = summ.rouge(scorer, "the cat sat on the mat", "the cat lay on a mat")
    assert got == pytest.approx({"rouge1": 2 / 3, "rouge2": 1 / 5, "rougeL": 2 / 3})
    # Porter stemming: "meetings" and "meeting" count as one word.
    assert summ.rouge(scorer, "meetings", "meeting")["rouge1"] == 1.0


def test_the_prompt_is_the_chat_template_around_instruction_and_transcript():
    expected = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.\n\n"
        "### Human: Summarize the following transcript. Cover the main topics, events and decisions, and who was "
        "involved.\n\n"
        "Project Manager: Shall we start?\nMarketing: Yes. Users want a fancy remote.\n"
        "### Assistant:"
    )
    assert summ.build_prompt(ChatTemplateConfig(), DIALOGUE) == expected


def test_a_long_transcript_is_cut_on_its_side_to_fit_the_budget(tokenizer):
    template = ChatTemplateConfig()
    turns = [f"Speaker {i}: point number {i} of the meeting." for i in range(60)]
    item = summ.Dialogue("ami", "x", "\n".join(turns), "ref")
    full = len(tokenizer.encode(summ.build_prompt(template, item.dialogue)))
    assert summ.fit_prompt(tokenizer, template, item, full, "left").dropped == 0
    n_dialogue = len(tokenizer.encode(item.dialogue))
    budget = full - 200
    kept = {}
    for side in TRUNCATION_SIDES:
        p = summ.fit_prompt(tokenizer, template, item, budget, side)
        text = tokenizer.decode(p.ids)
        assert budget - 5 < len(p.ids) <= budget and 200 <= p.dropped < 210
        assert text.endswith("### Assistant:") and "### Human: Summarize" in text
        kept[side] = {i for i in range(60) if f"point number {i} of" in text}
        assert n_dialogue - p.dropped > 0
    assert 0 not in kept["left"] and 59 in kept["left"]
    assert 0 in kept["right"] and 59 not in kept["right"]
    assert {0, 59} <= kept["middle"] and 30 not in kept["middle"]
    with pytest.raises(ConfigError, match="no room for the transcript"):
        summ.fit_prompt(tokenizer, template, item, 20, "left")


class FakeEngine:
    """Answers every prompt with a fixed summary and records the batches it was given."""

    def __init__(self, tokenizer, text="Mara finds the ledger under the stairs."):
        self.tokenizer, self.max_len, self.text, self.calls = tokenizer, 4096, text, []

    def generate(self, prompts, settings):
        self.calls.append((len(prompts), settings))
        return [Completion(prompt_tokens=list(p), text=" " + self.text + " ", finish_reason="stop") for p in prompts]


def test_results_are_stored_per_item_and_a_rerun_generates_nothing(tokenizer, scorer, tmp_path):
    write(tmp_path)
    items = {t: summ.read_task(tmp_path / "summarization", t) for t in ("ami", "forever_dreaming")}
    prompts = [summ.fit_prompt(tokenizer, ChatTemplateConfig(), d, 300, "middle") for ds in items.values() for d in ds]
    base, path = SamplingConfig(max_new_tokens=16, stop=("<|endoftext|>",)), tmp_path / "partial.jsonl"
    engine = FakeEngine(tokenizer)
    summ.generate_summaries(engine, prompts[:4], base, 3, ItemStore(path, {"k": 1}))
    assert [n for n, _ in engine.calls] == [3, 1] and len(path.read_text().splitlines()) == 4
    seeds = [s.seed for _, batch in engine.calls for s in batch]
    assert len(set(seeds)) == 4  # one seed per item, from its key: batching does not change samples
    engine.calls.clear()
    store = ItemStore(path, {"k": 1})
    summ.generate_summaries(engine, prompts, base, 3, store)
    assert [n for n, _ in engine.calls] == [2]  # only the two not yet stored
    per_task, outputs = summ.aggregate(items, store, scorer)
    expected = summ.rouge(scorer, items["ami"][0].summary, engine.text)
    assert outputs[0]["summary"] == engine.text and outputs[0]["rouge1"] == expected["rouge1"]
    ami = per_task["ami"]
    assert ami["items"] == 3 and ami["truncated"] == 1 and ami["dropped_tokens"] == outputs[2]["dropped_tokens"] > 1000
    assert ami["rouge2"] == pytest.approx(sum(r["rouge2"] for r in outputs[:3]) / 3)
    table = summ.markdown_table({"tasks": per_task, "max_input_tokens": 300, "truncation": "middle"}, "m").splitlines()
    assert table[0] == ("| Model | AMI R-1 | AMI R-2 | AMI R-L | ForeverDreaming R-1 | ForeverDreaming R-2 "
                        "| ForeverDreaming R-L |")  # fmt: skip
    assert table[2] == "| m | " + " | ".join(f"{100 * per_task[t][r]:.2f}" for t in per_task for r in summ.ROUGE_TYPES) + " |"
    assert table[4].startswith("| Model | Dataset | Dialogues | Truncated inputs | Tokens dropped |")
    assert table[6].startswith(f"| m | AMI | 3 | 1 | {ami['dropped_tokens']} |") and table[6].endswith("| 300 (middle) |")
    engine.calls.clear()
    summ.generate_summaries(engine, prompts, base, 3, ItemStore(path, {"k": 2}))  # other settings: redone
    assert sum(n for n, _ in engine.calls) == 6


def test_missing_or_malformed_data_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"task 'ami' not found: expected .*/nowhere/ami.jsonl"):
        summ.read_task(tmp_path / "nowhere", "ami")
    (tmp_path / "ami.jsonl").write_text('{"id": 1, "dialogue": "A: hi", "summary": "s"}\n{"id": 2, "dialogue": "B"}\n')
    with pytest.raises(ConfigError, match=r"ami.jsonl record 2 needs 'id', and 'dialogue' and 'summary'"):
        summ.read_task(tmp_path, "ami")


def test_the_command_writes_table_json_and_outputs_with_the_tiny_model(tiny_checkpoint, run_eval, tmp_path):
    write(tmp_path / "data")
    run_dir = tmp_path / "run"
    result = run_eval(run_dir, "eval=summarization", f"checkpoint={tiny_checkpoint}", f"data_dir={tmp_path / 'data'}",
                      "eval.max_new_tokens=6", "eval.batch_size=5", "generate.max_len=256")  # fmt: skip
    assert result["max_input_tokens"] == 250 and result["truncation"] == "middle"
    assert list(result["tasks"]) == ["ami", "forever_dreaming", "tv_mega_site"]
    for task, r in result["tasks"].items():
        assert r["items"] == 3 and 1 <= r["truncated"] <= 2 and r["dropped_tokens"] > 1000 and r["mean_prompt_tokens"] <= 250
        assert all(0.0 <= r[t] <= 1.0 for t in summ.ROUGE_TYPES)
    assert json.loads((run_dir / "summarization.json").read_text())["tasks"] == result["tasks"]
    md = (run_dir / "summarization.md").read_text()
    assert md.startswith("| Model | AMI R-1 | AMI R-2 | AMI R-L | ForeverDreaming R-1 |") and "TVMegaSite R-L |" in md
    outputs = [json.loads(line) for line in (run_dir / "summarization_outputs.jsonl").read_text().splitlines()]
    assert [o["id"] for o in outputs[:3]] == ["ami-0", "ami-1", "ami-2"] and len(outputs) == 9
    assert all(o["prompt_tokens"] <= 250 and o["reference"] and "summary" in o for o in outputs)
    assert len((run_dir / "summarization_partial.jsonl").read_text().splitlines()) == 9
