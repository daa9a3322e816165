"""task=chat: an interactive terminal chat in XGen-Inst's format, streaming the answer.

    python -m xgen.run task=chat checkpoint=<dir> generate.temperature=0.7 generate.top_p=0.9

Each line you type is a human turn; the conversation so far is rendered with
`chat_template` (the SFT format) and the answer streams as it is generated. `/reset`
starts over, `/exit` or end of input quits. A banner says first which model answers and
whether it was instruction-tuned: a pre-trained base model continues the rendered text
rather than answering it, which otherwise looks like a broken chat."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from xgen.config import ConfigError, XGenConfig
from xgen.generate import settings_from_config
from xgen.generate.chat import prompt_ids, stop_strings
from xgen.generate.load import load_engine

COMMANDS = "Type a message and press Enter; /reset starts a new conversation, /exit (or Ctrl-D) quits."
BASE_MODEL = (
    "a pre-trained base model ({how}), not an instruction-tuned one (task=sft): it continues the "
    "conversation's text rather than answering it (docs/sft.md tunes one)"
)


def describe(checkpoint: str, meta: dict | None, hf_config: dict | None = None) -> str:
    """The banner's line about the model: its architecture, where it comes from and whether it
    was instruction-tuned, from the checkpoint's stored config (`meta`: an xgen checkpoint's
    metadata) or a Hugging Face directory's config.json (`hf_config`), which records no training."""
    if hf_config is not None:
        shape = f"{hf_config.get('num_hidden_layers', '?')} layers, d_model {hf_config.get('hidden_size', '?')}"
        return (f"Model: the Hugging Face directory {checkpoint} ({shape}); it does not record whether it was "
                "instruction-tuned: a base model continues text rather than answering it")  # fmt: skip
    meta = meta or {}
    cfg = meta.get("config") or {}
    model = cfg.get("model") or {}
    step = f", step {meta['step']}" if meta.get("step") is not None else ""
    head = f"Model: {model.get('name', '?')} ({model.get('n_layers', '?')} layers, d_model {model.get('d_model', '?')}) from {checkpoint}{step}"
    task = (cfg.get("task") or {}).get("name")
    if task == "sft" or cfg.get("sft"):
        sft = (cfg.get("sft") or {}).get("name")
        return f"{head}: an instruction-tuned model (task=sft{f', sft={sft}' if sft else ''}), in chat_template's format"
    if meta.get("source"):  # task=import_hf: the weights came from elsewhere
        return (f"{head}: imported from {meta['source']}, which does not record whether it was instruction-tuned: "
                "a base model continues text rather than answering it")  # fmt: skip
    return f"{head}: {BASE_MODEL.format(how=f'task={task}' if task else 'its config names no task')}"


def _model_line(checkpoint: str) -> str:
    path = Path(checkpoint)
    if (path / "config.json").is_file():
        try:
            return describe(checkpoint, None, json.loads((path / "config.json").read_text()))
        except (OSError, ValueError):
            return describe(checkpoint, None, {})
    from xgen.checkpoint import read_meta

    try:
        return describe(checkpoint, read_meta(path))
    except ConfigError:  # loaded a moment ago; if its metadata cannot be read now, say less
        return describe(checkpoint, None)


def run(cfg: XGenConfig, run_dir: Path) -> list[dict]:
    engine = load_engine(cfg)
    settings = settings_from_config(
        cfg.generate, stop=tuple(cfg.generate.stop) + tuple(stop_strings(cfg.chat_template))
    )
    messages: list[dict] = []
    out = sys.stdout
    out.write(f"{_model_line(str(cfg.checkpoint))}\n{COMMANDS}\n")
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
