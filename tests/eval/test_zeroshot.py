"""Zero-shot tasks (Table 6): lm-eval's prompts and choices to the character, acc / acc_norm /
MC2 by hand, batched log-likelihoods against the model's own forward pass (truncation, the
context's trailing space), resume, and the command end to end."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.eval.common import ItemStore
from xgen.eval.fixtures.zeroshot import ROWS, write_zeroshot
from xgen.eval.loglik import LogLik, encode_pair, loglikelihood, loglikelihood_tokens
from xgen.eval.zeroshot import TABLE_COLUMNS, evaluate, load_task, markdown_table, selected_tasks
from xgen.eval.zeroshot_tasks import TASKS, Rendered, choice_metrics, truthfulqa_metrics
from xgen.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.xgen()


def render(task: str, row: dict) -> Rendered:
    return TASKS[task].render(row)


# ---- prompts ------------------------------------------------------------------------------


def test_arc_openbookqa_boolq_piqa_render_lm_evals_prompts_and_space_led_choices():
    arc = render("arc_challenge", {"question": "Why is the sky blue?", "answerKey": "3",
                                   "choices": {"text": ["Dust", "Scattering", "Paint"], "label": ["1", "3", "4"]}})
    q = "Question: Why is the sky blue?\nAnswer:"
    assert arc.requests == ((q, " Dust"), (q, " Scattering"), (q, " Paint")) and arc.gold == 1
    assert arc.lengths == (4, 10, 5)  # acc_norm divides by the choice's characters, not the " "
    obqa = render("openbookqa", {"question_stem": "Frogs are", "answerKey": " D",
                                 "choices": {"text": ["rocks", "plants", "stars", "animals"], "label": list("ABCD")}})
    assert obqa.requests[3] == ("Frogs are", " animals") and obqa.gold == 3
    boolq = render("boolq", {"passage": "Cats -- Cats purr.", "question": "do cats purr", "label": 1})
    p = "Cats -- Cats purr.\nQuestion: do cats purr?\nAnswer:"
    assert boolq.requests == ((p, " no"), (p, " yes")) and boolq.gold == 1
    piqa = render("piqa", {"goal": "Boil an egg", "sol1": "Use water.", "sol2": "Use sand.", "label": 0})
    assert piqa.requests == (("Question: Boil an egg\nAnswer:", " Use water."), ("Question: Boil an egg\nAnswer:", " Use sand."))


def test_hellaswag_joins_ctx_a_and_capitalized_ctx_b_and_strips_wikihow_brackets():
    row = {"activity_label": "Personal Care", "ctx_a": "[header] How to wash [title] Wet your HANDS.",
           "ctx_b": "then RUB them", "ctx": "unused", "label": "2",
           "endings": [" soap [step] it. ", "dry  them.", "[substeps] rinse.", "stop."]}  # fmt: skip
    r = render("hellaswag", row)
    query = "Personal Care: How to wash. Wet your HANDS. Then rub them"  # str.capitalize lowers the rest
    # lm-eval strips before removing brackets, so "[substeps] rinse." keeps a leading space.
    assert r.requests == ((query, " soap it."), (query, " dry them."), (query, "  rinse."), (query, " stop."))
    assert r.gold == 2 and r.lengths == (8, 9, 7, 5)


def test_winogrande_puts_each_option_in_the_context_and_shares_the_rest_as_continuation():
    r = render("winogrande", {"sentence": "Sam gave Kim a book because _ liked  reading. ",
                              "option1": "Sam", "option2": "Kim", "answer": "2"})
    assert r.requests == (("Sam gave Kim a book because Sam", " liked  reading."),
                          ("Sam gave Kim a book because Kim", " liked  reading."))  # fmt: skip
    assert r.gold == 1


def test_truthfulqa_renders_lm_evals_six_shot_preamble_then_mc1_and_mc2_choices():
    row = {"question": "Is water wet?",
           "mc1_targets": {"choices": ["Yes.", "No."], "labels": [1, 0]},
           "mc2_targets": {"choices": ["Yes.", "It is.", "No."], "labels": [1, 1, 0]}}  # fmt: skip
    r = render("truthfulqa_mc", row)
    prompt = (
        "Q: What is human life expectancy in the United States?\n"
        "A: Human life expectancy in the United States is 78 years.\n"
        "\n"
        "Q: Who was president of the United States in 1955?\n"
        "A: Dwight D. Eisenhower was president of the United States in 1955.\n"
        "\n"
        "Q: Which party did he belong to?\n"
        "A: He belonged to the Republican Party.\n"
        "\n"
        "Q: What is the square root of banana?\n"
        "A: I have no comment.\n"
        "\n"
        "Q: How does a telescope work?\n"
        "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n"
        "\n"
        "Q: Where were the 1992 Olympics held?\n"
        "A: The 1992 Olympics were held in Barcelona, Spain.\n"
        "\n"
        "Q: Is water wet?\n"
        "A:"
    )
    assert [c for c, _ in r.requests] == [prompt] * 5
    assert [x for _, x in r.requests] == [" Yes.", " No.", " Yes.", " It is.", " No."]
    assert (r.n_mc1, r.mc2_labels) == (2, (1, 1, 0))


# ---- metrics ------------------------------------------------------------------------------


def test_acc_takes_the_raw_loglik_and_acc_norm_the_loglik_per_character():
    requests = (("q", " ab"), ("q", " abcdefgh"))
    # raw: -3 > -4 picks choice 0; per character: -3/2 < -4/8 picks choice 1.
    assert choice_metrics(Rendered(requests, gold=1, lengths=(2, 8)), [-3.0, -4.0]) == {"acc": 0.0, "acc_norm": 1.0}
    assert choice_metrics(Rendered(requests, gold=0, lengths=(2, 8)), [-3.0, -4.0]) == {"acc": 1.0, "acc_norm": 0.0}


def test_mc2_is_the_normalized_probability_mass_of_the_true_answers():
    r = Rendered((("q", " a"),) * 5, gold=0, n_mc1=2, mc2_labels=(1, 1, 0))
    lls = [-2.0, -1.0, math.log(0.1), math.log(0.2), math.log(0.3)]  # MC1: the false answer is likelier
    m = truthfulqa_metrics(r, lls)
    assert m["mc1"] == 0.0 and m["mc2"] == pytest.approx((0.1 + 0.2) / (0.1 + 0.2 + 0.3))
    # Log-likelihoods far below exp's range give the same ratio.
    assert truthfulqa_metrics(r, [0, -1] + [x - 2000 for x in lls[2:]])["mc2"] == pytest.approx(0.5)


# ---- log-likelihoods against the model ----------------------------------------------------


@pytest.fixture(scope="module")
def forward(tiny_model):
    """The tiny model's logits for one unpadded sequence (jit: one compile per length)."""
    import jax.numpy as jnp
    from flax import nnx

    _, model, _ = tiny_model
    call = nnx.jit(lambda m, x: m(x))
    return lambda ids: np.asarray(call(model, jnp.asarray([ids]))[0], np.float64)


def reference(forward, tokenizer, context: list[int], continuation: list[int], max_len: int, all_rows: bool = False):
    """(sum of log-probs, greedy) from one forward pass over the request's kept tokens alone,
    kept as lm-eval keeps them: the last max_len + 1, of which the model reads all but the last."""
    seq = (context + continuation)[-(max_len + 1) :]
    n = min(len(continuation), len(seq) - 1)
    logits = forward(seq[:-1])
    logits = logits if all_rows else logits[:, : tokenizer.n_tokens]  # masked: never an id past the vocabulary
    top = logits.max(-1, keepdims=True)
    logprobs = logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))
    positions = range(len(seq) - n, len(seq))
    return sum(logprobs[p - 1, seq[p]] for p in positions), all(int(np.argmax(logprobs[p - 1])) == seq[p] for p in positions)


def test_encode_pair_moves_the_contexts_trailing_space_into_the_continuation(tokenizer):
    context, continuation = encode_pair(tokenizer, "Question: Are fish wet?\nAnswer: ", "yes")
    assert context == tokenizer.encode("Question: Are fish wet?\nAnswer:")
    assert continuation == tokenizer.encode(" yes") and len(continuation) == 1  # not " " + "yes"
    assert encode_pair(tokenizer, "", "Hello")[0] == [tokenizer.eos_id]


def test_batched_logliks_equal_each_request_scored_alone_by_the_models_forward_pass(forward, tiny_engine, tokenizer):
    texts = [
        ("Question: Are fish wet?\nAnswer: ", "yes"),  # the trailing space moves to the continuation
        ("The cat sat on the", " mat"),
        ("A much longer context that keeps going for a while, with commas, and more words", " than the others."),
        ("Short", " continuation of several tokens here"),
    ]
    engine = SimpleNamespace(tokenizer=tokenizer, max_len=tiny_engine.max_len, score_tails=tiny_engine.score_tails)
    got = loglikelihood(engine, texts, batch_size=2)  # two engine calls, sorted by length
    pairs = [encode_pair(tokenizer, c, x) for c, x in texts]
    for (ctx, cont), answer in zip(pairs, got):
        logprob, greedy = reference(forward, tokenizer, ctx, cont, engine.max_len)
        assert answer.logprob == pytest.approx(logprob, abs=2e-4) and answer.greedy == greedy
    # The greedy flag both ways: the model's argmax after "The cat sat on the" is greedy, the next id is not.
    ctx, mat = pairs[1]
    argmax = int(np.argmax(forward(ctx + mat)[len(ctx) - 1, : tokenizer.n_tokens]))
    assert reference(forward, tokenizer, ctx, [argmax], 1024)[1] and len(mat) == 1  # same length: no new compile
    greedy, other = loglikelihood_tokens(engine, [(ctx, [argmax]), (ctx, [argmax + 1])], batch_size=2)
    assert greedy.greedy and not other.greedy


def test_a_request_longer_than_max_len_keeps_its_last_max_len_plus_one_tokens_as_lm_eval(forward, tiny_engine, tokenizer):
    engine = SimpleNamespace(tokenizer=tokenizer, max_len=24, score_tails=tiny_engine.score_tails)
    ctx = tokenizer.encode(" ".join(f"word{i}" for i in range(30)))
    cont = tokenizer.encode(" and the end")
    short = tokenizer.encode("Just a few"), tokenizer.encode(" tokens")
    assert len(ctx) + len(cont) > 24
    long_answer, short_answer = loglikelihood_tokens(engine, [(ctx, cont), short], batch_size=2)
    assert long_answer.logprob == pytest.approx(reference(forward, tokenizer, ctx, cont, 24)[0], abs=2e-4)
    assert short_answer.logprob == pytest.approx(reference(forward, tokenizer, *short, 24)[0], abs=2e-4)
    untruncated = reference(forward, tokenizer, ctx, cont, 1024)[0]
    assert abs(long_answer.logprob - untruncated) > 1e-3  # the truncation did change the context
    assert abs(long_answer.logprob - reference(forward, tokenizer, ctx, cont, 23)[0]) > 1e-4  # one token more than max_len


def test_scores_are_normalized_over_every_output_row_as_the_reference_unless_told(forward, tiny_model, tokenizer):
    """lm-eval's hf backend (and the training loss) normalize over all 51,200 rows of the head;
    the masked normalization (over the tokenizer's 50,313 ids) gives higher log-likelihoods."""
    from xgen.generate.engine import Engine
    from xgen.runtime import Runtime

    cfg, _, params = tiny_model
    ctx, cont = tokenizer.encode("The cat sat on the"), tokenizer.encode(" mat and slept")
    scores = {}
    for all_rows in (True, False):
        engine = Engine(Runtime.local(cfg), params, tokenizer, max_len=64, score_all_rows=all_rows)
        (answer,) = loglikelihood_tokens(engine, [(ctx, cont)])
        assert answer.logprob == pytest.approx(reference(forward, tokenizer, ctx, cont, 64, all_rows)[0], abs=2e-4)
        scores[all_rows] = answer.logprob
    assert scores[False] > scores[True] + 1e-4


# ---- the run ------------------------------------------------------------------------------


class CountingLogLik:
    """A fake model: log-likelihood = -len(continuation) (the shortest choice wins), counting
    requests and failing on call `fail_on` (an interruption)."""

    def __init__(self, fail_on: int | None = None):
        self.calls, self.requests, self.fail_on = 0, 0, fail_on

    def __call__(self, requests):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt
        self.requests += len(requests)
        return [LogLik(-float(len(cont)), False) for _, cont in requests]


def test_missing_task_file_and_unknown_task_are_one_line_errors(tmp_path):
    root = write_zeroshot(tmp_path / "zeroshot")
    (root / "piqa" / "validation.jsonl").unlink()
    with pytest.raises(ConfigError) as ex:
        load_task(root, TASKS["piqa"])
    assert "\n" not in str(ex.value) and f"expected {root}/piqa/validation.jsonl" in str(ex.value)
    with pytest.raises(ConfigError, match="unknown task.*arc_easy"):
        selected_tasks(["arc_easy"])
    (root / "boolq" / "validation.jsonl").write_text('{"passage": "p", "question": "q"}\n')
    with pytest.raises(ConfigError, match=r"boolq/validation.jsonl row 1 .*missing field 'label'"):
        load_task(root, TASKS["boolq"])


def test_a_parquet_export_reads_like_the_json_lines_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = write_zeroshot(tmp_path / "zeroshot")
    from_jsonl = load_task(root, TASKS["truthfulqa_mc"])
    (root / "truthfulqa_mc" / "validation.jsonl").unlink()
    pq.write_table(pa.Table.from_pylist(ROWS["truthfulqa_mc"][1]), root / "truthfulqa_mc" / "validation.parquet")
    assert load_task(root, TASKS["truthfulqa_mc"], limit=2) == from_jsonl[:2]


def test_finished_items_are_skipped_when_an_interrupted_run_resumes(tmp_path):
    root = write_zeroshot(tmp_path / "zeroshot")
    items = {t.name: load_task(root, t) for t in selected_tasks(["arc_challenge", "piqa"])}  # 4 + 3 items
    partial = tmp_path / "zeroshot_partial.jsonl"
    first = CountingLogLik(fail_on=3)  # chunks of 2: arc 0-1, arc 2-3, then the interruption
    with pytest.raises(KeyboardInterrupt):
        evaluate(items, first, ItemStore(partial, {"max_len": 64}), chunk=2)
    assert len(partial.read_text().splitlines()) == 4
    second = CountingLogLik()
    summary = evaluate(items, second, ItemStore(partial, {"max_len": 64}), chunk=2)
    assert second.calls == 2 and second.requests == 3 * 2  # only piqa's 3 items (2 choices each)
    assert summary["arc_challenge"]["items"] == 4 and summary["piqa"]["items"] == 3
    # acc picks the shortest choice (ties: the first), acc_norm (-1 - 1/len per character) the longest.
    assert (summary["arc_challenge"]["acc"], summary["arc_challenge"]["acc_norm"]) == (0.0, 0.25)
    assert summary["piqa"]["acc"] == pytest.approx(2 / 3) and summary["piqa"]["acc_norm"] == pytest.approx(1 / 3)
    third = CountingLogLik()
    evaluate(items, third, ItemStore(partial, {"max_len": 32}), chunk=2)  # other settings: redone
    assert third.requests == (4 + 4 + 3 + 4) + 3 * 2


def test_the_table_names_each_columns_metric_and_marks_tasks_not_run():
    summary = {"hellaswag": {"items": 3, "acc": 0.25, "acc_norm": 0.5}, "truthfulqa_mc": {"items": 2, "mc1": 0.5, "mc2": 0.625}}
    lines = markdown_table(summary, "m").splitlines()
    assert lines[0] == ("| Models | ARC-C (acc_norm) | HellaSwag (acc_norm) | Winogrande (acc) | TruthfulQA (mc2) "
                        "| BoolQ (acc) | PIQA (acc_norm) | OpenBookQA (acc_norm) |")  # fmt: skip
    assert lines[2] == "| m | - | 50.0 | - | 62.5 | - | - | - |"
    assert "| m | hellaswag | 3 | 25.0 | 50.0 | - | - |" in lines
    assert [t for t, _, _ in TABLE_COLUMNS] == list(TASKS)


def test_the_command_writes_zeroshot_json_and_md(run_eval, tiny_checkpoint, tmp_path):
    write_zeroshot(tmp_path / "data" / "zeroshot")
    run_dir = tmp_path / "run"
    args = ("eval=zeroshot", f"checkpoint={tiny_checkpoint}", f"data_dir={tmp_path / 'data'}", "generate.max_len=256",
            "eval.batch_size=4")  # fmt: skip
    result = run_eval(run_dir, *args)
    assert {name: entry["items"] for name, entry in result["tasks"].items()} == {t: len(rows) for t, (_, rows) in ROWS.items()}
    saved = json.loads((run_dir / "zeroshot.json").read_text())
    assert saved["kind"] == "zeroshot" and saved["table"] == result["table"] and saved["max_len"] == 256
    assert all(0.0 <= v <= 1.0 for v in saved["table"].values())
    md = (run_dir / "zeroshot.md").read_text()
    assert md.startswith("| Models | ARC-C (acc_norm) |") and f"| {tiny_checkpoint.name} | " in md
    assert len((run_dir / "zeroshot_partial.jsonl").read_text().splitlines()) == sum(len(r) for _, r in ROWS.values())
    again = run_eval(run_dir, *args, "eval.tasks=[boolq,piqa]", "eval.limit=2")  # resumed: nothing rescored
    assert set(again["tasks"]) == {"boolq", "piqa"} and again["tasks"]["boolq"]["items"] == 2
    assert len((run_dir / "zeroshot_partial.jsonl").read_text().splitlines()) == sum(len(r) for _, r in ROWS.values())


def test_the_eval_group_composes_with_data_under_data_dir_and_refuses_shots(run_eval, tmp_path):
    cfg = compose_config("task=eval", "eval=zeroshot", "data_dir=/d", "eval.tasks=[hellaswag]")
    assert (cfg.eval.kind, cfg.eval.data_path, cfg.eval.tasks) == ("zeroshot", "/d/zeroshot", ["hellaswag"])
    with pytest.raises(ConfigError, match="eval.shots=5"):  # before any model is loaded
        run_eval(tmp_path / "run", "eval=zeroshot", "eval.shots=5", f"checkpoint={tmp_path}/none", f"data_dir={tmp_path}")
