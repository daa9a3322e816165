"""MMLU (task=eval): the original prompt to the character, shot reduction, letter scoring
against the model's own forward pass, category aggregation, resume, and the command."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.eval.fixtures.mmlu import write_mmlu
from xgen.eval.mmlu import (
    CATEGORIES,
    SUBCATEGORIES,
    EnginePredictor,
    Question,
    build_item,
    category_of,
    evaluate,
    gen_prompt,
    markdown_table,
    read_split,
    subjects_in,
)
from xgen.runtime import Runtime
from xgen.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
DEV = [
    Question("What is 1+1?", ("1", "2", "3", "4"), "B"),
    Question("Pick the group.", ("Z, +", "N, +", "Z, -", "none"), "A"),
    Question("unused third shot", ("a", "b", "c", "d"), "D"),
]
TEST_Q = Question("Find the order of S_3.", ("3", "6", "9", "12"), "B")
EXPECTED_2_SHOT = (
    "The following are multiple choice questions (with answers) about  abstract algebra.\n"
    "\n"
    "What is 1+1?\n"
    "A. 1\n"
    "B. 2\n"
    "C. 3\n"
    "D. 4\n"
    "Answer: B\n"
    "\n"
    "Pick the group.\n"
    "A. Z, +\n"
    "B. N, +\n"
    "C. Z, -\n"
    "D. none\n"
    "Answer: A\n"
    "\n"
    "Find the order of S_3.\n"
    "A. 3\n"
    "B. 6\n"
    "C. 9\n"
    "D. 12\n"
    "Answer:"
)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.xgen()


@pytest.fixture(scope="module")
def tiny():
    from flax import nnx

    from xgen.config import ModelConfig
    from xgen.model.transformer import XGenModel

    cfg = ModelConfig(name="t", d_model=64, n_layers=2, n_heads=4, d_ff=128, init_std=0.5)
    model = XGenModel(cfg, rngs=nnx.Rngs(0))
    return cfg, model, nnx.state(model, nnx.Param)


def test_the_two_shot_prompt_is_the_originals_character_for_character(tokenizer):
    item = build_item(tokenizer, 1000, "abstract_algebra", DEV, TEST_Q, 2)
    assert item.prompt == EXPECTED_2_SHOT
    assert item.ids == tokenizer.encode(EXPECTED_2_SHOT) and item.shots == 2 and item.answer == "B"
    assert gen_prompt(DEV, "abstract_algebra", 0).endswith("about  abstract algebra.\n\n")  # two spaces


# Cells as the public files hold them: choices that pandas reads as NaN ("None", "NA", ""),
# integer columns ("007"), integers beside an NA or a fraction (printed "2.0"), exponents,
# quoted commas and newlines, non-ASCII text.
ODD_ROWS = [
    ["Which is prime?", "4", "6", "007", "9", "C"],
    ["Pick none.", "None", "NA", "", "all of the above", "A"],
    ["Pick 2.", "2", "2.5", "1e3", "-0", "A"],
    ['Quote "this", then a comma, then\na newline.', "a, b", "c\nd", "é", "中文", "D"],
    ["Numbers again?", "1", "2", "3", "null", "B"],
]


def write_odd_mmlu(root: Path, subjects) -> Path:
    import csv

    for split, n in (("dev", 5), ("test", 7)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for k, subject in enumerate(subjects):
            if k % 2:  # numeric choices, as abstract_algebra's: pandas types these columns
                rows = [[f"{subject} {split} q{i}?", str(i), f"{2 * i:03d}", f"{i}.5", str(3 * i), "ABCD"[i % 4]] for i in range(n)]
            else:
                rows = [[f"{subject} {split} q{i}?", *(f"{subject} {L} {i}" for L in "ABCD"), "ABCD"[i % 4]] for i in range(n)]
            rows[k % n] = ODD_ROWS[k % len(ODD_ROWS)]  # each subject gets one odd row, in another place
            if k % 3 == 0:
                rows[(k + 1) % n] = ODD_ROWS[(k + 2) % len(ODD_ROWS)]
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows)
    return root


def test_prompts_equal_the_original_evaluate_py_on_every_subject_with_pandas_reading_the_files(tokenizer, tmp_path):
    """xgen's MMLU prompts against the original code (tests/eval/reference, transcribed from
    hendrycks/test), run on pandas-read files with the cells that pandas retypes, for each
    of the 57 subject names, at a length that fits every shot and one that drops some."""
    pytest.importorskip("pandas")
    from tests.eval.reference import hendrycks_evaluate as original

    subjects = sorted(SUBCATEGORIES)
    assert len(subjects) == 57
    root = write_odd_mmlu(tmp_path / "mmlu", subjects)
    dropped = 0
    for budget in (10**6, 160):  # every shot fits; some shots dropped (zero shots always fit)
        crop = lambda p: p if len(tokenizer.encode(p)) <= budget else p[:-1]  # noqa: E731 - stands in for crop.py
        for subject in subjects:
            want = original.prompts(root, subject, 5, crop)
            dev, test = read_split(root, "dev", subject), read_split(root, "test", subject)
            got = [build_item(tokenizer, budget, subject, dev, q, 5) for q in test]
            assert [(it.prompt, it.answer) for it in got] == want, subject
            dropped += sum(it.shots < 5 for it in got)
    assert dropped > 0


def test_cells_are_typed_as_pandas_types_them(tmp_path):
    """`as_pandas_text` against pandas itself, on random columns of the values pandas retypes."""
    pd = pytest.importorskip("pandas")
    import csv
    import io
    import random

    from xgen.eval.mmlu import as_pandas_text

    pool = ["7", " 7", "+5", "-3", "007", "-0", "1e3", ".5", "5.", "-0.0", "2.50", "inf", "-inf", "Infinity", "nan",
            "None", "NA", "N/A", "null", "", "1_000", "0x10", "True", "abc", "x y", "12345678901234567", "1.5e400"]  # fmt: skip
    rng = random.Random(0)
    for _ in range(400):
        column = [rng.choice(pool) for _ in range(rng.randint(1, 5))]
        buf = io.StringIO()
        csv.writer(buf).writerows(["q", v, "b", "c", "d", "A"] for v in column)
        df = pd.read_csv(io.StringIO(buf.getvalue()), header=None)
        assert as_pandas_text(column) == ["{}".format(df.iloc[i, 1]) for i in range(len(column))], column


def test_shots_are_dropped_one_by_one_until_the_prompt_fits_the_engine(tokenizer, tiny):
    from xgen.generate.engine import Engine

    cfg, _, params = tiny
    lengths = [len(build_item(tokenizer, 10**6, "virology", DEV, TEST_Q, k).ids) for k in range(4)]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4
    engine = Engine(Runtime.local(cfg), params, tokenizer, max_len=lengths[1] + 1)  # room for 1 shot
    item = build_item(tokenizer, engine.max_len, "virology", DEV, TEST_Q, 3)
    assert item.shots == 1 and len(item.ids) == lengths[1] <= engine.max_len
    item = build_item(tokenizer, lengths[0] - 5, "virology", DEV, TEST_Q, 3)  # not even 0 shots fit
    assert item.shots == 0 and len(item.ids) == lengths[0] - 5 and item.prompt.endswith("Answer:")


def test_the_predicted_letter_is_the_argmax_of_the_models_own_letter_logits(tokenizer, tiny, tmp_path):
    import jax.numpy as jnp

    from xgen.generate.engine import Engine

    cfg, model, params = tiny
    root = write_mmlu(tmp_path / "mmlu", subjects=["astronomy"], n_dev=3, n_test=6)
    dev, test = read_split(root, "dev", "astronomy"), read_split(root, "test", "astronomy")
    items = [build_item(tokenizer, 1023, "astronomy", dev, q, 2 + i % 2) for i, q in enumerate(test)]
    predictor = EnginePredictor(Engine(Runtime.local(cfg), params, tokenizer, max_len=1024), batch_size=8)
    predicted, scored = predictor(items), predictor.letter_logprobs(items)
    letter_ids = [tokenizer.encode(" " + L)[0] for L in "ABCD"]
    for item, letter, lp in zip(items, predicted, scored):
        # The engine never predicts the padding ids above the tokenizer's vocabulary.
        logits = np.asarray(model(jnp.asarray([item.ids]))[0, -1], np.float64)[: tokenizer.n_tokens]
        top2 = np.sort(logits[letter_ids])[-2:]
        assert top2[1] - top2[0] > 1e-3, "a near tie: pick another seed"
        assert letter == "ABCD"[int(np.argmax(logits[letter_ids]))]
        # Not only the argmax: the engine's letter log-probs are the forward pass's.
        logsumexp = logits.max() + np.log(np.exp(logits - logits.max()).sum())
        np.testing.assert_allclose(lp, logits[letter_ids] - logsumexp, rtol=1e-4, atol=1e-4)


def test_categories_and_the_weighted_average_with_a_fake_predictor(tokenizer, tmp_path):
    assert len(SUBCATEGORIES) == 57 and all(category_of(s) in CATEGORIES for s in SUBCATEGORIES)
    subjects = ["abstract_algebra", "college_physics", "philosophy", "sociology", "virology"]
    sizes = [4, 8, 6, 5, 3]
    root = tmp_path / "mmlu"
    for s, n in zip(subjects, sizes):
        write_mmlu(root, subjects=[s], n_dev=5, n_test=n)
    # Right on every STEM question, on even-numbered ones elsewhere ("... question 4, ...").
    def fake(items):
        return [it.answer if it.subject in ("abstract_algebra", "college_physics") or
                int(it.prompt.rsplit("question ", 1)[1].split(",")[0]) % 2 == 0 else "D" if it.answer != "D" else "A"
                for it in items]  # fmt: skip

    result = evaluate(root, tokenizer, 2047, fake, shots=5)
    even = lambda n: (n + 1) // 2  # noqa: E731
    assert result["subjects"]["philosophy"]["correct"] == 3 and result["subjects"]["sociology"]["correct"] == 3
    cats = result["categories"]
    assert cats["STEM"] == {"correct": 12, "questions": 12, "accuracy": 1.0}
    assert cats["humanities"]["accuracy"] == pytest.approx(3 / 6)
    assert cats["social sciences"]["accuracy"] == pytest.approx(3 / 5)
    assert cats["other (business, health, misc.)"]["accuracy"] == pytest.approx(even(3) / 3)
    correct = 12 + 3 + 3 + even(3)
    assert result["correct"] == correct and result["questions"] == sum(sizes)
    assert result["average"] == pytest.approx(correct / sum(sizes))  # each question weighs one
    table = markdown_table(result, "fake").splitlines()
    assert table[0] == "| Models | Humanities | STEM | Social Sciences | Other | Weighted average |"
    assert table[2] == f"| fake | 50.0 | 100.0 | 60.0 | {100 * 2 / 3:.1f} | {100 * correct / 26:.1f} |"


def test_finished_subjects_are_kept_and_skipped_on_rerun(tokenizer, tmp_path):
    root = write_mmlu(tmp_path / "mmlu", subjects=["anatomy", "marketing"], n_test=3)
    partial, seen = tmp_path / "mmlu_partial.jsonl", []

    def fake(items):
        seen.extend(it.subject for it in items)
        return [it.answer for it in items]

    first = evaluate(root, tokenizer, 2047, fake, shots=5, partial_path=partial, subjects=["anatomy"])
    assert seen == ["anatomy"] * 3 and len(partial.read_text().splitlines()) == 1
    seen.clear()
    both = evaluate(root, tokenizer, 2047, fake, shots=5, partial_path=partial)
    assert seen == ["marketing"] * 3 and both["subjects"]["anatomy"] == first["subjects"]["anatomy"]
    seen.clear()
    evaluate(root, tokenizer, 2047, fake, shots=0, partial_path=partial)  # other settings: not reused
    assert len(seen) == 6


def test_missing_data_names_the_file_and_where_it_is_expected(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="no test/ directory: expected .*nowhere/test"):
        subjects_in(tmp_path / "nowhere")
    root = write_mmlu(tmp_path / "mmlu", subjects=["nutrition"])
    (root / "dev" / "nutrition_dev.csv").unlink()
    with pytest.raises(ConfigError) as ex:
        evaluate(root, tokenizer, 2047, lambda items: [], shots=5)
    assert str(ex.value).count("\n") == 0 and f"expected {root}/dev/nutrition_dev.csv" in str(ex.value)
    assert evaluate(root, tokenizer, 2047, lambda items: ["A"] * len(items), shots=0)["questions"] == 4


def test_the_eval_group_composes_with_data_under_data_dir():
    cfg = compose_config("task=eval", "eval=mmlu_0shot", "data_dir=/d", "eval.limit=3")
    assert (cfg.eval.kind, cfg.eval.shots, cfg.eval.data_path, cfg.eval.limit) == ("mmlu", 0, "/d/mmlu", 3)
    assert compose_config().eval is None


def test_the_command_writes_mmlu_json_and_md(tiny, tmp_path):
    from xgen.checkpoint import save_params

    cfg, _, params = tiny
    save_params(tmp_path / "ckpt", params, {"config": {"model": dataclasses.asdict(cfg)}})
    write_mmlu(tmp_path / "data" / "mmlu", subjects=["astronomy", "world_religions"], n_test=4)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "task=eval", "eval=mmlu_5shot", f"checkpoint={tmp_path / 'ckpt'}",
         f"data_dir={tmp_path / 'data'}", "eval.limit=2", "generate.max_len=512", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "mmlu_5shot.json").read_text())
    assert result["shots"] == 5 and result["questions"] == 4 and set(result["subjects"]) == {"astronomy", "world_religions"}
    assert set(result["categories"]) == {"STEM", "humanities"}
    md = (run_dir / "mmlu_5shot.md").read_text()
    assert md.startswith("| Models | Humanities |") and md.splitlines()[2] in proc.stdout
    assert len((run_dir / "mmlu_5shot_partial.jsonl").read_text().splitlines()) == 2
