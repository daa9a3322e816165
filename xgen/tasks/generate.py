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
    sys.stdout.flush()
    return record
