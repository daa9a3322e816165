"""task=generate: complete one prompt with a trained (or imported) model.

    python -m xgen.run task=generate checkpoint=outputs/pretrain/<time> "prompt='def fib(n):'" \
        generate.max_new_tokens=64 generate.temperature=0

Prints the prompt, a `»` where the model's text starts, then the completion (the prompt's
length locates the mark, whatever the texts hold), and appends a record (prompt, completion,
its token ids, the sampler settings, the checkpoint) to `generations.jsonl` in the run
directory, the record to read from a program."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from xgen.config import ConfigError, XGenConfig
from xgen.generate import settings_from_config
from xgen.generate.load import load_engine

# Between the prompt and the completion on stdout: in Latin-1 and the usual consoles' code pages.
COMPLETION_MARK = "»"


def blank_note(text: str, n_tokens: int, eos: bool) -> str | None:
    """One line that says why a completion shows nothing (None when it shows text): a blank
    completion printed after `»` looks like a failure of the command, where it is the model's
    own most likely text: the default run's tiny model, 200 steps on prose, writes newlines
    (the README's generate example printed 64 of them and nothing else)."""
    if text.strip():
        return None
    if not text:
        why = "end-of-text was its most likely next token" if eos else "a stop string ended it before any text"
        return f"(the completion is empty: {why})"
    n = text.count("\n")
    newlines = f"{n} newline{'' if n == 1 else 's'}"
    what = newlines if n == len(text) else f"{len(text)} whitespace characters ({newlines})"
    return (f"(the completion is {what} only, {n_tokens} tokens: a small model trained briefly on prose, as the "
            "default run's 200 steps, likely ranks the line breaks between paragraphs above any word; the demo model "
            "writes Python (python -m xgen.run experiment=python_demo), or train longer, or sample: generate.temperature=0.8)")  # fmt: skip


def run(cfg: XGenConfig, run_dir: Path) -> dict:
    if cfg.prompt is None:
        raise ConfigError("task=generate needs \"prompt='...'\" (Hydra's quotes inside the shell's)")
    engine = load_engine(cfg)
    settings = settings_from_config(cfg.generate)
    prompt_ids = engine.tokenizer.encode(cfg.prompt)
    try:
        (completion,) = engine.generate([prompt_ids], settings)
    except ValueError as ex:
        raise ConfigError(f"prompt: {ex}") from None
    record = {
        "prompt": cfg.prompt,
        "completion": completion.text,
        "completion_tokens": completion.tokens,
        "finish_reason": completion.finish_reason,
        "settings": dataclasses.asdict(settings),
        "checkpoint": str(cfg.checkpoint),
    }
    with open(run_dir / "generations.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{cfg.prompt}{COMPLETION_MARK}{completion.text}", flush=True)
    note = blank_note(completion.text, len(completion.tokens), completion.eos)
    if note:
        print(note, flush=True)
    sys.stdout.flush()
    return record
