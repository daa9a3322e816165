"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"; also LongLoRA's and
YaRN's): does a model find one line hidden at a given depth in a long, dull text? The
report's Figure 2 shows that perplexity keeps falling with context; this shows whether the
model can *use* a fact from anywhere in it, at each length and depth.

A prompt is the instruction, filler sentences ("The grass is green. The sky is blue. ..."
repeated) with "The pass key is 12345. Remember it. 12345 is the pass key." between two of
them, and "What is the pass key? The pass key is". The model answers greedily; a trial is
correct when the first run of digits in its answer is the key.

Choices, and why:

- **Exact lengths.** A prompt is assembled from token pieces (instruction, whole filler
  sentences, the key line, the question), so it has exactly `eval.passkey_lengths[i]`
  tokens of the run's tokenizer; the last filler sentence is cut to fit.
- **Depth on a sentence boundary.** The key line goes between two filler sentences, at the
  boundary nearest `depth` x the filler's tokens (0: right after the instruction, 1: after
  the last whole sentence): the needle is never spliced into a word, and is within one
  sentence of the asked depth.
- **Keys** are 5 digits, distinct within a cell, drawn from `seed`, the length and the depth
  (`random.Random` seeded by their string): a rerun asks the same questions, and adding a
  length or depth leaves the other cells' keys alone.
- **Lengths past the model.** Under plain RoPE a prompt plus `eval.max_new_tokens` must fit
  the checkpoint's `model.max_positions`, else a one-line error before the model loads. A
  checkpoint with a RoPE scaling rule (`model.rope_scaling`) may be asked any length: how
  the rule holds up past the trained length is what this measures.
- **Memory.** Prefilling a 32K prompt in one pass needs [rows, heads, 32K, 32K] float32
  scores; `execution.attention=block_causal` (or `chunked`) makes the Engine prefill
  `execution.attention_chunk` tokens at a time against its cache.

Results: `passkey.json` (every cell's trials and accuracy, totals by length, depth and
overall), `passkey.md` (rows = lengths, columns = depths) and `passkey.png` (the heat map of
needle-in-a-haystack plots). Finished trials resume as every benchmark's do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from xgen.config import ConfigError

log = logging.getLogger(__name__)

WHAT = "passkey"
INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
KEY_DIGITS = 5


@dataclass(frozen=True)
class Prompt:
    """One trial: its token ids, the key, and where the key line starts in the filler."""

    ids: list[int]
    key: int
    needle_at: int  # filler tokens before the key line
    filler_tokens: int  # filler tokens in the prompt


class PromptBuilder:
    """Prompts of an exact token count: the instruction, then filler sentences (each with its
    leading space) cut to fit, the key line at a sentence boundary, then the question."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.head = tokenizer.encode_ordinary(INSTRUCTION)
        self.question = tokenizer.encode_ordinary(QUESTION)
        self.sentences = [tokenizer.encode_ordinary(" " + s) for s in FILLER]
        self.longest_sentence = max(len(s) for s in self.sentences)

    def needle(self, key: int) -> list[int]:
        return self.tokenizer.encode_ordinary(" " + NEEDLE.format(key=key))

    def shortest(self) -> int:
        """The fewest tokens a prompt can have (no filler, the longest key line)."""
        return len(self.head) + len(self.needle(10**KEY_DIGITS - 1)) + len(self.question)

    def filler(self, n: int) -> tuple[list[int], list[int]]:
        """(n filler tokens: the sentences in turn, the last one cut; the offsets where a
        whole sentence ends, 0 included)."""
        ids, ends, k = [], [0], 0
        while len(ids) < n:
            ids += self.sentences[k % len(self.sentences)]
            k += 1
            if len(ids) <= n:
                ends.append(len(ids))
        return ids[:n], ends

    def build(self, length: int, depth: float, key: int) -> Prompt:
        needle = self.needle(key)
        n = length - len(self.head) - len(needle) - len(self.question)
        if n < 0:
            raise ConfigError(
                f"eval.passkey_lengths has {length}: a passkey prompt needs at least {self.shortest()} tokens "
                "(the instruction, the key line and the question)"
            )
        filler, ends = self.filler(n)
        at = min(ends, key=lambda e: (abs(e - depth * n), e))
        ids = self.head + filler[:at] + needle + filler[at:] + self.question
        return Prompt(ids, key, at, n)


def cell_keys(seed: int, length: int, depth: float, trials: int) -> list[int]:
    """`trials` distinct 5-digit keys of one (length, depth) cell, reproducible from `seed`."""
    rng = random.Random(f"passkey:{seed}:{length}:{depth!r}")
    return rng.sample(range(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS), trials)


def is_correct(answer: str, key: int) -> bool:
    """Whether the first run of digits in `answer` is the key."""
    digits = re.search(r"\d+", answer)
    return digits is not None and digits.group() == str(key)


def template_digest() -> str:
    """What the prompts are made of: results are reused only for the same texts."""
    text = "\0".join([INSTRUCTION, *FILLER, NEEDLE, QUESTION])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- settings and the model's reach -------------------------------------------------------


def check_settings(lengths: Sequence[int], depths: Sequence[float], trials: int) -> None:
    """One line naming the key for an empty or repeated list, a depth outside [0, 1], a
    non-positive length or trial count (validate refuses these too; callers of
    `run_benchmark` may not have validated)."""
    for key, values in (("eval.passkey_lengths", lengths), ("eval.passkey_depths", depths)):
        if not values:
            raise ConfigError(f"{key} is empty: give at least one value")
        repeated = sorted({v for v in values if list(values).count(v) > 1})
        if repeated:
            raise ConfigError(f"{key} lists {repeated[0]} more than once")
    for length in lengths:
        if length <= 0:
            raise ConfigError(f"eval.passkey_lengths has {length}: a length is a positive number of tokens")
    for depth in depths:
        if not 0 <= depth <= 1:
            raise ConfigError(f"eval.passkey_depths has {depth}: a depth is a fraction of the filler, in [0, 1]")
    if not 0 < trials <= 9 * 10 ** (KEY_DIGITS - 1):
        raise ConfigError(f"eval.passkey_trials={trials} must be from 1 to {9 * 10 ** (KEY_DIGITS - 1)} (distinct 5-digit keys)")


def checkpoint_model(path: str | Path):
    """The checkpoint's ModelConfig, read from its metadata or config.json (no weights)."""
    path = Path(path)
    if (path / "config.json").is_file():
        from xgen.hf.convert import model_config
        from xgen.hf.io import read_config

        return model_config(read_config(path, "checkpoint"), path.resolve().name, f"checkpoint={path}/config.json")
    from xgen.generate.load import model_config_of

    return model_config_of(path)


def check_reach(model_cfg, lengths: Sequence[int], max_new_tokens: int) -> None:
    """Under plain RoPE every prompt and its answer fit `model.max_positions`; with a
    scaling rule any length is a fair question."""
    if model_cfg.rope_scaling.type != "default":
        return
    room = model_cfg.max_positions - max_new_tokens
    too_long = [n for n in lengths if n > room]
    if too_long:
        raise ConfigError(
            f"eval.passkey_lengths has {too_long[0]}: the checkpoint's model.max_positions={model_cfg.max_positions} "
            f"holds prompts of at most {room} tokens with eval.max_new_tokens={max_new_tokens} "
            "(plain RoPE; a checkpoint with model.rope_scaling may go past its trained length)"
        )


# ---- the table and the figure ---------------------------------------------------------------


def _short(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _depth(d: float) -> str:
    return f"{100 * d:g}%"


def summarize(lengths: Sequence[int], depths: Sequence[float], outcomes: dict[tuple[int, float], list[bool]]) -> dict:
    """Accuracy of every cell, of every length and depth, and overall."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    cells = [
        {"length": n, "depth": d, "trials": len(outcomes[n, d]), "correct": sum(outcomes[n, d]), "accuracy": mean(outcomes[n, d])}
        for n in lengths
        for d in depths
    ]
    by_length = {str(n): mean([x for d in depths for x in outcomes[n, d]]) for n in lengths}
    by_depth = {str(d): mean([x for n in lengths for x in outcomes[n, d]]) for d in depths}
    overall = mean([x for v in outcomes.values() for x in v])
    return {"cells": cells, "accuracy_by_length": by_length, "accuracy_by_depth": by_depth, "accuracy": overall}


def markdown_table(result: dict) -> str:
    """Rows = prompt lengths, columns = depths, then each length's total; a last row of each
    depth's total and the overall accuracy."""
    from xgen.eval.common import markdown

    lengths, depths = result["lengths"], result["depths"]
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}
    rows = [["Length", *(_depth(d) for d in depths), "All"]]
    for n in lengths:
        rows.append([_short(n), *(f"{acc[n, d]:.2f}" for d in depths), f"{result['accuracy_by_length'][str(n)]:.2f}"])
    rows.append(["All", *(f"{result['accuracy_by_depth'][str(d)]:.2f}" for d in depths), f"{result['accuracy']:.2f}"])
    note = (
        f"\nPasskey retrieval accuracy of {result['model']}: {result['trials']} trial(s) per cell, "
        f"depth = where the key sits in the filler (0%: start, 100%: end).\n"
    )
    return markdown(rows) + note


def plot_heatmap(path: Path, result: dict) -> None:
    """`path` (PNG): accuracy by length (x) and depth (y), green 1 to red 0, each cell
    labelled. Uses matplotlib's Figure directly (Agg), never pyplot's global state."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(f"{WHAT}: drawing {path.name} needs matplotlib: install xgen[eval]") from None
    lengths, depths = result["lengths"], result["depths"]
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}
    grid = np.array([[acc[n, d] for n in lengths] for d in depths])
    fig = Figure(figsize=(1.1 * len(lengths) + 2.5, 0.55 * len(depths) + 1.8), dpi=120)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [_short(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [_depth(d) for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("depth of the key")
    ax.set_title(f"Passkey retrieval: {result['model']} ({result['trials']} trials per cell)")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, format="png")


# ---- the run --------------------------------------------------------------------------------


def load_passkey_engine(cfg, max_len: int):
    """An Engine for `cfg.checkpoint` whose cache holds `max_len` tokens."""
    from xgen.generate.load import load_engine

    generate = dataclasses.replace(cfg.generate, max_len=max(cfg.generate.max_len or 0, max_len))
    engine = load_engine(dataclasses.replace(cfg, generate=generate))
    if engine.max_len < max_len:
        raise ConfigError(
            f"checkpoint={cfg.checkpoint}: the model holds {engine.max_len} positions, a prompt and its answer need {max_len}"
        )
    return engine


def run_benchmark(cfg, run_dir: Path) -> dict:
    """`task=eval eval=passkey checkpoint=...`: passkey.json/.md/.png."""
    from xgen.config import SamplingConfig
    from xgen.eval.common import ItemStore, Progress, batched, model_identity, model_label, score_settings, write_result
    from xgen.tokenizer import Tokenizer

    ev = cfg.eval
    lengths, depths, trials = list(ev.passkey_lengths), list(ev.passkey_depths), ev.passkey_trials
    check_settings(lengths, depths, trials)
    builder = PromptBuilder(Tokenizer.from_name(cfg.tokenizer.name))
    cells = {(n, d): [builder.build(n, d, k) for k in cell_keys(cfg.seed, n, d, trials)] for n in lengths for d in depths}
    # The model's reach from its metadata, before any weights load.
    model = model_identity(cfg.checkpoint)
    check_reach(checkpoint_model(cfg.checkpoint), lengths, ev.max_new_tokens)
    settings = {"seed": cfg.seed, "max_new_tokens": ev.max_new_tokens, **score_settings(cfg)}
    store = ItemStore(run_dir / f"{ev.name}_partial.jsonl", settings, model=model, data=template_digest())
    item = lambda n, d, t: f"{n}@{d!r}#{t}"  # noqa: E731
    todo = [(n, d, t) for (n, d), prompts in cells.items() for t in range(len(prompts)) if item(n, d, t) not in store]
    progress = Progress(f"{WHAT} (trials)", len(todo))
    if todo:
        engine = load_passkey_engine(cfg, max(lengths) + ev.max_new_tokens)
        greedy = SamplingConfig(max_new_tokens=ev.max_new_tokens, temperature=0.0)
        for n in lengths:  # batches of one length: one prompt shape, no padding
            for batch in batched([(d, t) for m, d, t in todo if m == n], max(1, ev.batch_size)):
                prompts = [cells[n, d][t] for d, t in batch]
                for (d, t), prompt, answer in zip(batch, prompts, engine.generate([p.ids for p in prompts], greedy)):
                    correct = is_correct(answer.text, prompt.key)
                    store.add(item(n, d, t), {"key": prompt.key, "answer": answer.text, "correct": correct})
                progress.advance(len(batch), note=f"{_short(n)} tokens")
        del engine
    outcomes = {(n, d): [store.get(item(n, d, t))["correct"] for t in range(trials)] for n in lengths for d in depths}
    result = {
        "model": model_label(cfg),
        "lengths": lengths,
        "depths": depths,
        "trials": trials,
        **summarize(lengths, depths, outcomes),
        "plot": f"{ev.name}.png",
        "identity": store.identity,
    }
    log.info("%s: accuracy %.3f over %d cells x %d trials", WHAT, result["accuracy"], len(cells), trials)
    plot_heatmap(run_dir / f"{ev.name}.png", result)
    return write_result(run_dir, cfg, result, markdown_table(result))
