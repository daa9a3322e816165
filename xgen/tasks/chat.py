"""task=chat: an interactive terminal chat in XGen-Inst's format, streaming the answer.

    python -m xgen.run task=chat checkpoint=<dir> generate.temperature=0.7 generate.top_p=0.9

Each line you type is a human turn; the conversation so far is rendered with
`chat_template` (the SFT format) and the answer streams as it is generated. `/reset`
starts over, `/exit` or end of input quits."""

from __future__ import annotations

import sys
from pathlib import Path

from xgen.config import XGenConfig
from xgen.generate import settings_from_config
from xgen.generate.chat import prompt_ids, stop_strings
from xgen.generate.load import load_engine


def run(cfg: XGenConfig, run_dir: Path) -> list[dict]:
    engine = load_engine(cfg)
    settings = settings_from_config(
        cfg.generate, stop=tuple(cfg.generate.stop) + tuple(stop_strings(cfg.chat_template))
    )
    messages: list[dict] = []
    out = sys.stdout
    while True:
        out.write(">>> ")
        out.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = []
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        ids = prompt_ids(cfg.chat_template, messages, engine.tokenizer)
        budget = engine.max_len - len(ids)
        if budget <= 0:
            out.write("[the conversation no longer fits the model's context; /reset to start over]\n")
            messages.pop()
            continue
        turn = settings if settings.max_new_tokens <= budget else settings_from_config(
            cfg.generate, stop=settings.stop, max_new_tokens=budget
        )
        (completion,) = engine.generate([ids], turn, on_text=lambda _row, delta: (out.write(delta), out.flush()))
        out.write("\n")
        messages.append({"role": "assistant", "content": completion.text.strip()})
    return messages
