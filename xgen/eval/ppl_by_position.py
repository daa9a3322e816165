"""Perplexity by token position (the XGen-7B report's Figure 2): how well a model predicts a
token given the 1, 2, 4, ... 8K tokens before it, on held-out documents of at least
`eval.min_tokens` tokens. Comparing the 2K, 4K and 8K stage checkpoints shows whether the
longer-context stages actually use the longer context (their curves keep falling).

Each document's first `min_tokens` tokens are scored in one forward pass; the negative
log-likelihood at position p (the token with p tokens before it, p = 1 .. min_tokens-1) is
averaged over documents and perplexity = exp(mean NLL). The Engine computes the output head
over 1,024 positions at a time, so a document's [length, vocab] logits never exist at once;
past 8K use a memory-saving attention kernel too (`execution.attention=block_causal`): at
32K the dense kernel's scores are 16 GiB per layer for a 4-head model. A tiny model scores
a 32K document in 0.83 GiB peak RSS (docs/long-context.md).

Results: the per-position curve of every checkpoint, perplexity over log-scale position
buckets ([1,2), [2,4), ... up to min_tokens) as a Markdown table, and `ppl_by_position.png`
(log-scale positions).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from xgen.config import ConfigError

log = logging.getLogger(__name__)

WHAT = "ppl_by_position"
NLL_DECIMALS = 5  # what the resume file keeps per position (ppl to ~1e-5 relative)


@dataclass(frozen=True)
class Document:
    """A held-out document: its id and its first `min_tokens` token ids."""

    id: str
    ids: list[int]


# ---- data -------------------------------------------------------------------------------


def read_documents(path: str | Path, tokenizer, min_tokens: int, limit: int | None = None) -> tuple[list[Document], dict]:
    """The first `limit` documents of at least `min_tokens` tokens, cut to `min_tokens`, and
    counts of what was read and skipped as too short (documents are tokenized as pre-training
    data is: special-token strings are plain text)."""
    from xgen.eval.common import read_records

    if min_tokens < 2:
        raise ConfigError(f"eval.min_tokens={min_tokens}: need at least 2 tokens to score a position")
    rows = read_records(path, WHAT)
    docs, short, read, seen = [], 0, 0, set()
    for n, row in enumerate(rows, 1):
        if limit is not None and len(docs) >= limit:
            break
        text = row.get("text")
        if not isinstance(text, str):
            raise ConfigError(f"{WHAT}: {path} record {n} has no string 'text' field")
        doc_id = str(row.get("id", n))
        if doc_id in seen:
            raise ConfigError(f"{WHAT}: {path} record {n} repeats id {doc_id!r}")
        seen.add(doc_id)
        read += 1
        ids = tokenizer.encode_ordinary(text)
        if len(ids) < min_tokens:
            short += 1
            continue
        docs.append(Document(doc_id, ids[:min_tokens]))
    counts = {"documents": len(docs), "documents_read": read, "skipped_short": short}
    log.info("%s: %d document(s) of >= %d tokens; %d of %d read skipped as shorter", WHAT, len(docs), min_tokens, short, read)
    if not docs:
        raise ConfigError(f"{WHAT}: none of the {read} documents in {path} has eval.min_tokens={min_tokens} tokens")
    return docs, counts


# ---- scoring ----------------------------------------------------------------------------


def score_documents(engine, docs: Sequence[Document], batch_size: int, store, key: str, progress=None) -> np.ndarray:
    """NLL [documents, min_tokens - 1] of each token given the ones before it (column j is
    position j + 1); `batch_size` documents per forward pass; documents already in `store`
    (under `key::<id>`) are not scored again."""
    from xgen.eval.common import batched

    todo = [d for d in docs if f"{key}::{d.id}" not in store]
    for batch in batched(todo, max(1, batch_size)):
        for doc, scored in zip(batch, engine.score([d.ids for d in batch])):
            store.add(f"{key}::{doc.id}", [round(-lp, NLL_DECIMALS) for lp in scored.token_logprobs[1:]])
        if progress is not None:
            progress.advance(len(batch))
    return np.array([store.get(f"{key}::{d.id}") for d in docs], np.float64)


# ---- aggregation ------------------------------------------------------------------------


def log_buckets(min_tokens: int, per_octave: int = 1) -> list[tuple[int, int]]:
    """Position ranges [lo, hi) from 1 to min_tokens whose ends grow by 2**(1/per_octave)."""
    edges, k = {min_tokens}, 0
    while (edge := round(2 ** (k / per_octave))) < min_tokens:
        edges.add(edge)
        k += 1
    edges = sorted(edges)
    return list(zip(edges[:-1], edges[1:]))


def _short(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _ppl_cell(x: float) -> str:
    return f"{x:.2f}" if x < 1e5 else f"{x:.3g}"


def bucket_label(lo: int, hi: int) -> str:
    return f"{_short(lo)}-{_short(hi)}"


def bucket_ppl(mean_nll: np.ndarray, buckets: Sequence[tuple[int, int]]) -> list[float]:
    """exp(mean NLL) over each bucket's positions; `mean_nll[j]` is position j + 1's."""
    return [math.exp(float(mean_nll[lo - 1 : hi - 1].mean())) for lo, hi in buckets]


def curve(nll: np.ndarray, path: str, buckets: Sequence[tuple[int, int]]) -> dict:
    """One checkpoint's JSON: perplexity at every position (index = position; 0 has none),
    per bucket, and overall."""
    mean_nll = nll.mean(axis=0)
    return {
        "path": path,
        "ppl": math.exp(float(nll.mean())),
        "buckets": {bucket_label(lo, hi): p for (lo, hi), p in zip(buckets, bucket_ppl(mean_nll, buckets))},
        "ppl_by_position": [None] + [round(math.exp(x), 4) for x in mean_nll.tolist()],
    }


def markdown_table(result: dict) -> str:
    """Rows = checkpoints, columns = position buckets (perplexity), then the overall one."""
    from xgen.eval.common import markdown

    labels = result["bucket_labels"]
    rows = [["Model", *labels, "All"]]
    for name, c in result["curves"].items():
        rows.append([name, *(_ppl_cell(c["buckets"][b]) for b in labels), _ppl_cell(c["ppl"])])
    note = (
        f"\nPerplexity by token position: {result['documents']} document(s) of >= {result['min_tokens']} tokens "
        f"({result['skipped_short']} of {result['documents_read']} read were shorter and skipped).\n"
    )
    return markdown(rows) + note


# ---- the plot ---------------------------------------------------------------------------


def plot_curves(path: Path, mean_nll: dict[str, np.ndarray], min_tokens: int, per_octave: int = 4) -> str:
    """`path` (PNG): one line per checkpoint, perplexity averaged within quarter-octave buckets
    (raw per-position values are too noisy to read), positions on a log axis. Returns the x
    axis' scale. Uses matplotlib's Figure directly (Agg), never pyplot's global state."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise ConfigError(f"{WHAT}: drawing {path.name} needs matplotlib: install xgen[plot]") from None
    buckets = log_buckets(min_tokens, per_octave)
    centers = [math.sqrt(lo * hi) for lo, hi in buckets]
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    for label, nll in mean_nll.items():
        ax.plot(centers, bucket_ppl(nll, buckets), marker=".", label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _short(round(x))))
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perplexity by position (documents of >= {min_tokens} tokens)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return ax.get_xscale()


# ---- the run ----------------------------------------------------------------------------


def curve_labels(paths: Sequence[str]) -> list[str]:
    """Each checkpoint's directory name (the full path where two share a name)."""
    names = [Path(p).name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def load_checkpoint_engine(cfg, checkpoint: str, min_tokens: int):
    """An Engine for `checkpoint` whose length holds `min_tokens` tokens."""
    from xgen.generate.load import load_engine

    generate = dataclasses.replace(cfg.generate, max_len=max(cfg.generate.max_len or 0, min_tokens))
    engine = load_engine(dataclasses.replace(cfg, checkpoint=checkpoint, generate=generate))
    if engine.max_len < min_tokens:
        raise ConfigError(
            f"checkpoint={checkpoint}: the model holds {engine.max_len} positions (model.max_positions, plain RoPE), "
            f"fewer than eval.min_tokens={min_tokens}"
        )
    return engine


def run_benchmark(cfg, run_dir: Path) -> dict:
    """`task=eval eval=ppl_by_position [eval.checkpoints=[a,b,c]]`: ppl_by_position.json/.md/.png."""
    from xgen.eval.common import ItemStore, Progress, data_fingerprint, model_identity, score_settings, write_result
    from xgen.tokenizer import Tokenizer

    ev = cfg.eval
    checkpoints = [str(Path(p)) for p in (ev.checkpoints or ([cfg.checkpoint] if cfg.checkpoint else []))]
    if not checkpoints:
        raise ConfigError(f"{WHAT}: give checkpoint=<dir> or eval.checkpoints=[<dir>,...]")
    if len(set(checkpoints)) < len(checkpoints):
        raise ConfigError(f"{WHAT}: eval.checkpoints lists a checkpoint twice: {checkpoints}")
    for p in checkpoints:
        if not Path(p).exists():
            raise ConfigError(f"{WHAT}: checkpoint {p}: no such directory (eval.checkpoints / checkpoint)")
    # Data before any model loads: a missing or malformed file fails fast.
    docs, counts = read_documents(ev.data_path, Tokenizer.from_name(cfg.tokenizer.name), ev.min_tokens, ev.limit)
    settings = {"min_tokens": ev.min_tokens, "limit": ev.limit, **score_settings(cfg)}
    # Several models share one file, so each item's key names its model's parameters.
    models = {p: model_identity(p) for p in checkpoints}
    keys = {p: f"{p}@{m['params'] or m['step']}" for p, m in models.items()}
    store = ItemStore(run_dir / f"{ev.name}_partial.jsonl", settings, data=data_fingerprint(ev.data_path))
    todo = {p: sum(f"{keys[p]}::{d.id}" not in store for d in docs) for p in checkpoints}
    progress = Progress(f"{WHAT} (documents x checkpoints)", sum(todo.values()))
    buckets = log_buckets(ev.min_tokens)
    curves, mean_nll = {}, {}
    for label, path in zip(curve_labels(checkpoints), checkpoints):
        engine = load_checkpoint_engine(cfg, path, ev.min_tokens) if todo[path] else None
        nll = score_documents(engine, docs, ev.batch_size, store, keys[path], progress)
        del engine
        curves[label], mean_nll[label] = curve(nll, path, buckets), nll.mean(axis=0)
        log.info("%s: %s perplexity %.3f over %d documents", WHAT, label, curves[label]["ppl"], len(docs))
    x_scale = plot_curves(run_dir / f"{ev.name}.png", mean_nll, ev.min_tokens)
    result = {
        "min_tokens": ev.min_tokens,
        **counts,
        "bucket_labels": [bucket_label(lo, hi) for lo, hi in buckets],
        "plot": f"{ev.name}.png",
        "plot_x_scale": x_scale,
        "curves": curves,
        "identity": {**store.identity, "model": models},
    }
    return write_result(run_dir, cfg, result, markdown_table(result))
