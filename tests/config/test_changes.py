"""The one key-level comparison behind resume checks, snapshots and task=diff."""

from __future__ import annotations

from xgen.config.changes import ABSENT, change_line, key_changes
from xgen.train.resume import run_changes

OLD = {"optimizer": {"lr": 3e-4, "b1": 0.9}, "eval": None, "trainer": {"tensorboard": False}}
NEW = {"optimizer": {"lr": 1e-4, "b1": 0.9}, "eval": {"kind": "mmlu", "shots": 5}, "trainer": {"tensorboard": 0}, "seed": 1}


def test_changed_added_and_removed_keys_each_get_one_readable_line():
    changes = key_changes(OLD, NEW, whole_subtrees=True)
    assert [change_line(k, a, b) for k, (a, b) in changes.items()] == [
        "optimizer.lr: 0.0003 -> 0.0001",
        'eval: null -> {"kind": "mmlu", "shots": 5}',
        "trainer.tensorboard: false -> 0",  # 0 == False in Python, yet a flag became a number
        "+ seed: 1",
    ]
    assert change_line("optimizer.b2", 0.95, ABSENT) == "- optimizer.b2: 0.95"


def test_leaf_by_leaf_unless_whole_subtrees_are_asked_for():
    assert list(key_changes(OLD, NEW)) == ["optimizer.lr", "eval", "eval.kind", "eval.shots", "trainer.tensorboard", "seed"]
    assert key_changes(OLD, NEW)["eval.kind"] == (ABSENT, "mmlu")


def test_strings_that_would_read_as_other_values_are_quoted():
    assert change_line("execution.remat", "none", "full") == "execution.remat: none -> full"
    assert change_line("prompt", "true", "def f(): ...") == 'prompt: "true" -> "def f(): ..."'
    assert change_line("packages.jax", "0.10.1", "1e-4") == 'packages.jax: 0.10.1 -> "1e-4"'


def test_a_resume_still_compares_leaf_keys_of_what_the_run_computes():
    saved = {"optimizer": {"lr": 3e-4}, "trainer": {"log_every": 10}, "data_mix": {"sources": {"a": {"weight": 1.0}}}}
    current = {"optimizer": {"lr": 1e-4}, "trainer": {"log_every": 5}, "data_mix": {"sources": {"b": {"weight": 1.0}}}}
    assert run_changes(saved, current) == {
        "data_mix.sources.a.weight": (1.0, None),
        "data_mix.sources.b.weight": (None, 1.0),
        "optimizer.lr": (3e-4, 1e-4),
    }
