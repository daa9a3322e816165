"""task=sft end to end: a pretrained tiny model learns a synthetic instruction set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xgen.sft.synthetic import FACTS, write_fixtures

REPO = Path(__file__).resolve().parents[2]
# Two formats that teach the same facts, so held-out conversations ask seen facts in unseen
# examples; short rows without the system header keep this to a minute on 2 cores.
SMALL = (
    "~sft.sources.scrolls", "~sft.sources.baize", "~sft.sources.oasst", "~sft.sources.sharegpt",
    "sft.system_header=false", "chat_template.system=", "stage.seq_len=64", "stage.batch_tokens=1024",
    "sft.epochs=40", "optimizer.lr=1e-2", "sft.heldout=8", "trainer.log_every=50",
)  # fmt: skip


def xgen_run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", *args], capture_output=True, text=True, timeout=600, cwd=REPO, input=stdin
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_fine_tuned_tiny_model_learns_the_instructions_and_chat_answers_them(tmp_path):
    write_fixtures(tmp_path / "data" / "sft" / "synthetic")
    base = tmp_path / "base"
    xgen_run("trainer.steps=20", "stage.seq_len=64", "stage.batch_tokens=512", f"hydra.run.dir={base}")
    tuned = tmp_path / "tuned"
    xgen_run(
        "task=sft", "sft=synthetic", f"data_dir={tmp_path / 'data'}", f"trainer.init_from={base}", *SMALL,
        f"hydra.run.dir={tuned}",
    )  # fmt: skip
    losses = json.loads((tuned / "sft_eval.json").read_text())
    assert losses["final"] < 0.5 * losses["base"], losses
    metrics = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 1  # fine-tuning starts at step 0 with a fresh optimizer

    questions = [q for q, _ in FACTS[:3]]
    chat = xgen_run(
        "task=chat", f"checkpoint={tuned}", "generate.max_new_tokens=16", "chat_template.system=",
        f"hydra.run.dir={tmp_path / 'chat'}", stdin="\n/reset\n".join(questions) + "\n",  # one question per chat
    )  # fmt: skip
    answers = [a for _, a in FACTS[:3]]
    assert sum(a in chat.stdout for a in answers) >= 2, chat.stdout


def test_sft_needs_a_setting_and_a_starting_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "task=sft", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and "needs sft=" in proc.stderr and proc.stderr.strip().count("\n") == 0
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "task=sft", "sft=synthetic", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and "trainer.init_from" in proc.stderr
