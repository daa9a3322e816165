"""HumanEval (task=eval eval=humaneval): the pass@k estimator, the sandbox's limits, sampling
that does not depend on batching, resume, and the command end to end."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.config.schema import SandboxConfig
from xgen.eval.common import ItemStore
from xgen.eval.fixtures.humaneval import PROBLEMS, write, write_humaneval
from xgen.eval.humaneval import (
    EngineCompleter,
    Problem,
    estimate_pass_at_k,
    evaluate,
    markdown_table,
    program_for,
    read_problems,
    sample_seed,
)
from xgen.eval.sandbox import Sandbox

FAST = SandboxConfig(timeout_s=2.0, cpu_s=10, memory_mb=256, workers=4)
FIXTURE = [Problem(**p) for p in PROBLEMS]
WRONG_BODY = "    return None\n"


# ---- pass@k -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [(5, 2, 2, 0.7), (200, 0, 1, 0.0), (200, 0, 100, 0.0), (7, 7, 3, 1.0), (10, 3, 1, 0.3), (4, 1, 4, 1.0), (6, 3, 2, 0.8)],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert estimate_pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_fraction_of_k_subsets_holding_a_pass():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))  # samples 0..c-1 pass
                brute = sum(any(i < c for i in s) for s in subsets) / len(subsets)
                assert estimate_pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    value = estimate_pass_at_k(2000, 3, 100)
    assert value == pytest.approx(1 - math.comb(1997, 100) / math.comb(2000, 100), rel=1e-9)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError):
        estimate_pass_at_k(5, 1, 6)


# ---- problems, prompts, seeds -----------------------------------------------------------


def test_program_is_prompt_completion_test_and_check_call():
    p = FIXTURE[0]
    assert program_for(p, "BODY") == p.prompt + "BODY\n" + p.test + "\ncheck(count_vowels)"


def test_fixture_lands_where_the_conf_file_looks_and_reads_back(tmp_path):
    cfg = compose_config("task=eval", "eval=humaneval", f"data_dir={tmp_path}")
    assert Path(cfg.eval.data_path) == write(tmp_path)
    assert read_problems(cfg.eval.data_path) == FIXTURE
    assert cfg.eval.stop == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    assert (cfg.eval.n_samples, cfg.eval.temperature, cfg.eval.top_p) == (200, 0.2, 0.95)


def test_record_without_a_field_is_one_error_naming_file_and_record(tmp_path):
    broken = [PROBLEMS[0], {k: v for k, v in PROBLEMS[1].items() if k != "test"}]
    path = write_humaneval(tmp_path / "HumanEval.jsonl.gz", broken)
    with pytest.raises(ConfigError, match=r"HumanEval\.jsonl\.gz record 2 lacks string field\(s\) test"):
        read_problems(path)


def test_sample_seeds_are_distinct_and_depend_only_on_seed_problem_and_sample():
    seeds = {sample_seed(0, i, j) for i in range(30) for j in range(30)}
    assert len(seeds) == 900 and all(0 <= s < 2**32 for s in seeds)
    assert sample_seed(0, 3, 4) == sample_seed(0, 3, 4) != sample_seed(1, 3, 4)


# ---- the sandbox ------------------------------------------------------------------------


def test_every_fixture_canonical_solution_passes_and_a_wrong_one_fails():
    with Sandbox(FAST) as sandbox:
        results = sandbox.run_all([program_for(p, p.canonical_solution) for p in FIXTURE] + [program_for(FIXTURE[0], WRONG_BODY)])
    assert [r.passed for r in results[:-1]] == [True] * len(FIXTURE), results
    assert results[-1].passed is False and results[-1].result.startswith("failed: exception: AssertionError")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Programs that misbehave, all run at once: name -> ExecResult, plus what they aimed at."""
    base = tmp_path_factory.mktemp("hostile")
    victim_dir = base / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "keep.txt"
    victim.write_text("precious")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    programs = {
        "loop": "while True:\n    pass\n",
        "memory": "hoard = []\nwhile True:\n    hoard.append(bytearray(10 * 1024 * 1024))\n",
        "remove": f"import os\nos.remove({str(victim)!r})\n",
        "rmtree": f"import shutil\nshutil.rmtree({str(victim_dir)!r})\n",
        "shell": f"import subprocess\nsubprocess.run(['rm', '-rf', {str(victim_dir)!r}])\n",
        "exit_early": "import sys\nsys.exit(0)\n",
        "hard_exit": "import os\nos._exit(0)\n",
        "syntax": "def f(:\n",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n",
        "environment": "import os\nassert 'XGEN_TEST_SECRET' not in os.environ\n",
    }
    boxes = base / "boxes"
    boxes.mkdir()
    os.environ["XGEN_TEST_SECRET"] = "must not leak"
    try:
        with Sandbox(SandboxConfig(timeout_s=2.0, cpu_s=10, memory_mb=256, workers=len(programs)), root=boxes) as sandbox:
            results = dict(zip(programs, sandbox.run_all(list(programs.values()))))
    finally:
        del os.environ["XGEN_TEST_SECRET"]
        listener.close()
    return {"results": results, "victim": victim, "boxes": boxes, "network_isolated": sandbox.network_isolated}


def test_endless_loop_is_stopped_at_the_timeout_and_fails(hostile):
    result = hostile["results"]["loop"]
    assert not result.passed and result.result == "timed out", result


def test_runaway_allocation_is_stopped_and_fails(hostile):
    result = hostile["results"]["memory"]
    assert not result.passed and result.result != "timed out", result


@pytest.mark.parametrize("attempt", ["remove", "rmtree", "shell"])
def test_deleting_a_file_outside_the_working_directory_fails_and_the_file_survives(hostile, attempt):
    assert not hostile["results"][attempt].passed, hostile["results"][attempt]
    assert hostile["victim"].read_text() == "precious"


@pytest.mark.parametrize("attempt", ["exit_early", "hard_exit", "syntax"])
def test_a_program_that_does_not_run_to_its_end_fails(hostile, attempt):
    assert not hostile["results"][attempt].passed, hostile["results"][attempt]


def test_programs_get_a_minimal_environment(hostile):
    assert hostile["results"]["environment"].passed, hostile["results"]["environment"]


def test_programs_cannot_reach_the_network_where_the_os_allows_isolation(hostile):
    if not hostile["network_isolated"]:
        pytest.skip("this OS does not allow a user/network namespace")
    result = hostile["results"]["network"]
    # Its own network namespace: loopback down (xgen's jail) or up but empty (bubblewrap's).
    assert not result.passed and ("unreachable" in result.result.lower() or "refused" in result.result.lower()), result


def test_working_directories_are_removed_even_after_a_timeout(hostile):
    assert list(hostile["boxes"].iterdir()) == []


def test_program_runs_in_its_own_working_directory_which_is_then_removed(tmp_path):
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    program = "open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n"
    with Sandbox(SandboxConfig(timeout_s=3.0, workers=1), root=boxes) as sandbox:
        result = sandbox.run(program)
    assert result.passed, result
    assert list(boxes.iterdir()) == []


def test_without_network_isolation_the_sandbox_says_so_once(caplog):
    with caplog.at_level("WARNING", logger="xgen.eval.sandbox"):
        with Sandbox(FAST, isolate_network=False, jail=False) as sandbox:  # the jail always cuts the network
            results = sandbox.run_all(["x = 1\n", "y = 2\n", "z = 3\n"])
    assert all(r.passed for r in results) and sandbox.network_isolated is False
    assert sum("NOT cut off from the network" in r.message for r in caplog.records) == 1


# ---- sampling, scoring, resume (a fake engine) ------------------------------------------


@dataclass
class FakeCompletion:
    text: str


class FakeEngine:
    """Answers sample 0 of each problem with its canonical solution, others wrongly; records
    every row's prompt and settings."""

    max_len = 1024

    def __init__(self):
        from xgen.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.xgen()
        self.rows: dict[tuple[str, int], tuple] = {}
        self.calls = 0
        self.by_prompt = {tuple(self.tokenizer.encode(p.prompt)): p for p in FIXTURE}

    def generate(self, prompts, settings):
        self.calls += 1
        out = []
        for ids, s in zip(prompts, settings):
            problem = self.by_prompt[tuple(ids)]
            sample = sum(1 for key in self.rows if key[0] == problem.task_id)
            self.rows[(problem.task_id, sample)] = (tuple(ids), s)
            out.append(FakeCompletion(problem.canonical_solution if sample == 0 else WRONG_BODY))
        return out


def completer(engine):
    return EngineCompleter(engine, max_new_tokens=64, temperature=0.2, top_p=0.95, stop=["\ndef"], seed=7)


def test_scores_and_seeds_do_not_depend_on_batch_size(tmp_path):
    runs = []
    with Sandbox(FAST) as sandbox:
        for batch_size in (1, 3):
            engine = FakeEngine()
            store = ItemStore(None, {})
            result = evaluate(FIXTURE, completer(engine), sandbox, n=2, pass_k=[1, 2], batch_size=batch_size, store=store)
            runs.append((engine, result))
    (one, r1), (three, r3) = runs
    assert (one.calls, three.calls) == (10, 4)
    assert one.rows == three.rows  # same prompt and settings (seed included) for every sample
    assert len({s.seed for _, s in one.rows.values()}) == 10
    assert r1 == r3
    assert r1["pass@k"] == {"pass@1": 0.5, "pass@2": 1.0}
    assert all(v["n"] == 2 and v["c"] == 1 for v in r1["per_problem"].values())


def test_resume_generates_only_unfinished_problems(tmp_path):
    partial = tmp_path / "humaneval_partial.jsonl"
    settings = {"n_samples": 2}
    with Sandbox(FAST) as sandbox:
        evaluate(FIXTURE[:2], completer(FakeEngine()), sandbox, n=2, pass_k=[1], batch_size=4, store=ItemStore(partial, settings))
        engine = FakeEngine()
        result = evaluate(FIXTURE, completer(engine), sandbox, n=2, pass_k=[1], batch_size=4, store=ItemStore(partial, settings))
    assert {task for task, _ in engine.rows} == {p.task_id for p in FIXTURE[2:]}
    assert len(partial.read_text().splitlines()) == len(FIXTURE)
    assert result["pass@k"]["pass@1"] == 0.5


def test_markdown_table_is_laid_out_like_table_7():
    table = markdown_table({"pass@k": {"pass@1": 0.142, "pass@10": 0.3}}, "xgen-7b")
    assert table.splitlines() == ["| Models | pass@1 | pass@10 |", "| --- | --- | --- |", "| xgen-7b | 14.20 | 30.00 |"]


# ---- the command ------------------------------------------------------------------------


def test_missing_data_file_is_one_config_error_before_the_model_loads(tmp_path, run_eval, monkeypatch):
    import xgen.generate.load

    monkeypatch.setattr(xgen.generate.load, "load_engine", lambda cfg: pytest.fail("model loaded before data was read"))
    with pytest.raises(ConfigError, match=r"file not found: expected .*humaneval/HumanEval\.jsonl\.gz"):
        run_eval(tmp_path / "run", "eval=humaneval", "checkpoint=nowhere", f"data_dir={tmp_path / 'empty'}")


def test_command_samples_scores_and_resumes_without_the_model(tmp_path, run_eval, tiny_checkpoint, monkeypatch):
    write(tmp_path / "data")
    run_dir = tmp_path / "run"
    overrides = (
        "eval=humaneval",
        f"checkpoint={tiny_checkpoint}",
        f"data_dir={tmp_path / 'data'}",
        "eval.limit=2",
        "eval.n_samples=2",
        "eval.max_new_tokens=8",
        "eval.batch_size=4",
        "eval.pass_k=[1,10]",
        "eval.sandbox.timeout_s=3",
        "generate.max_len=256",
    )
    first = run_eval(run_dir, *overrides)
    samples = [json.loads(line) for line in (run_dir / "humaneval_samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["Fixture/0"] * 2 + ["Fixture/1"] * 2
    assert all(set(s) == {"task_id", "completion", "passed", "result"} for s in samples)
    assert first["problems"] == 2 and list(first["pass@k"]) == ["pass@1"]  # k=10 > n=2 is dropped
    for task, record in first["per_problem"].items():
        passed = [s["passed"] for s in samples if s["task_id"] == task]
        assert (record["n"], record["c"]) == (2, sum(passed))
    assert first["pass@k"]["pass@1"] == pytest.approx(sum(s["passed"] for s in samples) / 4)
    assert json.loads((run_dir / "humaneval.json").read_text())["pass@k"] == first["pass@k"]
    assert (run_dir / "humaneval.md").read_text().startswith("| Models | pass@1 |")

    import xgen.generate.load

    partial = (run_dir / "humaneval_partial.jsonl").read_text()
    monkeypatch.setattr(xgen.generate.load, "load_engine", lambda cfg: pytest.fail("resume regenerated"))
    second = run_eval(run_dir, *overrides)
    assert (run_dir / "humaneval_partial.jsonl").read_text() == partial
    assert second["per_problem"] == first["per_problem"] and second["pass@k"] == first["pass@k"]
