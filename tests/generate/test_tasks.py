"""task=generate and task=chat from a trained run, through `python -m xgen.run`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xgen.tasks.generate import COMPLETION_MARK

REPO = Path(__file__).resolve().parents[2]


def xgen_run(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xgen.run", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, input=stdin
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained")
    proc = xgen_run("debug=fast", f"hydra.run.dir={run_dir}")  # 3 steps, one checkpoint
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_generate_prints_the_prompt_marks_the_completion_and_records_it(trained, tmp_path):
    args = ("task=generate", f"checkpoint={trained}", "prompt='def main():'", "generate.max_new_tokens=6")
    proc = xgen_run(*args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert record["prompt"] == "def main():" and len(record["completion_tokens"]) <= 6
    assert record["settings"]["max_new_tokens"] == 6 and record["settings"]["temperature"] == 0.0
    assert f"def main():{COMPLETION_MARK}{record['completion']}\n" in proc.stdout
    # Greedy decoding is reproducible: the same command appends the same completion.
    again = xgen_run(*args, f"hydra.run.dir={tmp_path}")
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert again.returncode == 0 and len(records) == 2 and records[1] == records[0]


def test_generate_without_a_checkpoint_or_with_a_missing_one_says_so_in_one_line(tmp_path):
    proc = xgen_run("task=generate", "prompt=hi", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "needs checkpoint=" in proc.stderr
    proc = xgen_run("task=generate", "prompt=hi", f"checkpoint={tmp_path}/nowhere", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "no such directory" in proc.stderr


def test_chat_streams_answers_turn_by_turn_until_exit(trained, tmp_path):
    proc = xgen_run(
        "task=chat", f"checkpoint={trained}", "generate.max_new_tokens=5", f"hydra.run.dir={tmp_path}",
        stdin="Hello there\n/reset\nWhat is 2+2?\n/exit\nnever read\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(">>> ") == 4  # two questions, /reset, /exit
    banner = proc.stdout.split(">>> ")[0]  # before the first prompt: the model and the commands
    assert f"from {trained}" in banner and "a pre-trained base model (task=pretrain)" in banner
    assert "continues the conversation's text rather than answering it" in banner
    assert "/reset" in banner and "/exit" in banner


def test_the_chat_banner_tells_an_instruction_tuned_model_from_a_base_one():
    from xgen.tasks.chat import describe

    model = {"name": "tiny", "n_layers": 2, "d_model": 64}
    sft = describe("runs/sft", {"step": 30, "config": {"task": {"name": "sft"}, "sft": {"name": "wizardlm"}, "model": model}})
    assert sft == "Model: tiny (2 layers, d_model 64) from runs/sft, step 30: an instruction-tuned model (task=sft, sft=wizardlm), in chat_template's format"
    base = describe("runs/pre", {"step": 200, "config": {"task": {"name": "pretrain"}, "sft": None, "model": model}})
    assert "step 200: a pre-trained base model (task=pretrain)" in base and "rather than answering it" in base
    imported = describe("imports/x", {"params_only": True, "source": "/models/open_llama", "config": {"model": model}})
    assert "imported from /models/open_llama, which does not record whether it was instruction-tuned" in imported
    hf = describe("hf/xgen-tiny", None, {"num_hidden_layers": 2, "hidden_size": 64})
    assert hf.startswith("Model: the Hugging Face directory hf/xgen-tiny (2 layers, d_model 64)") and "base model" in hf


def test_a_blank_completion_is_explained_in_one_line():
    from xgen.tasks.generate import blank_note

    assert blank_note("\n\ndef main():", 3, False) is None
    note = blank_note("\n" * 64, 64, False)
    assert note.startswith("(the completion is 64 newlines only, 64 tokens:") and "\n" not in note
    assert "experiment=python_demo" in note and "train longer" in note
    assert blank_note(" \n\t", 2, False).startswith("(the completion is 3 whitespace characters (1 newline) only")
    assert blank_note("", 0, True) == "(the completion is empty: end-of-text was its most likely next token)"


def test_an_exported_run_continues_greedily_in_transformers_as_task_generate_does(trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    proc = xgen_run("task=export_hf", f"checkpoint={trained}", f"out={out}", f"hydra.run.dir={tmp_path / 'export'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    prompt, n = "import os\nimport sys\n\ndef", 12
    records = []
    for source in (trained, out):  # the xgen checkpoint, and the exported directory itself
        run_dir = tmp_path / f"gen_{source.name}"
        proc = xgen_run(
            "task=generate", f"checkpoint={source}", f"prompt='{prompt}'", f"generate.max_new_tokens={n}",
            f"hydra.run.dir={run_dir}",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        records.append(json.loads((run_dir / "generations.jsonl").read_text()))
    assert records[0]["completion_tokens"] == records[1]["completion_tokens"]

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    theirs = generated[0, ids.shape[1] :].tolist()
    theirs = theirs[: theirs.index(50256)] if 50256 in theirs else theirs
    assert theirs == records[0]["completion_tokens"]
    assert tokenizer.decode(theirs) == records[0]["completion"]
