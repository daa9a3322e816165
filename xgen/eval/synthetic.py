"""Made-up questions in MMLU's own layout (`dev/<subject>_dev.csv`, `test/<subject>_test.csv`,
no header: question, A, B, C, D, answer), so tests and demo runs need no download.

    python -m xgen.eval.synthetic data/mmlu     # then: task=eval eval=mmlu_5shot data_dir=data
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Sequence

from xgen.eval.mmlu import LETTERS

DEFAULT_SUBJECTS = ("abstract_algebra", "high_school_us_history", "sociology", "virology")


def question(subject: str, split: str, i: int) -> list[str]:
    """Row i: a question whose answer cycles A, B, C, D (known to the tests)."""
    answer = LETTERS[i % 4]
    choices = [f"{subject} {split} {i} option {L}" for L in LETTERS]
    return [f"Which option of {subject} {split} question {i}, with a comma, is right?", *choices, answer]


def write_mmlu(root: str | Path, subjects: Sequence[str] = DEFAULT_SUBJECTS, n_dev: int = 5, n_test: int = 4) -> Path:
    root = Path(root)
    for split, n in (("dev", n_dev), ("test", n_test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(question(subject, split, i) for i in range(n))
    return root


if __name__ == "__main__":
    print(write_mmlu(sys.argv[1] if len(sys.argv) > 1 else "data/mmlu"))
