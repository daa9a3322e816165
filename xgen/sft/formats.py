"""Instruction-tuning datasets as released → `Conversation`s (the report's Section 4 data).

Each public dataset has its own record shape; one small parser per format turns a record into
a `Conversation` (alternating user/assistant turns, ending on the assistant) or raises
`Malformed(reason)`. Bad records are skipped and counted per reason, never raised: released
instruction sets all carry some (empty responses, broken role orders), and one of them must
not stop a run. What is raised is a config mistake: an unknown format, a path that matches no
file, a file that is not JSON at all. Turn contents are stripped: the chat template supplies
its own separators, so edge whitespace would only add untrained or mistrained tokens.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import itertools
import json
import os
import re
import zlib
from collections import Counter
from typing import IO, Any, Callable, Iterator

import numpy as np

from xgen.config import ConfigError, SFTSourceConfig
from xgen.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    content: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]  # alternating, starting with "user", ending with "assistant"
    system: str | None = None  # the record's own system message, if any
    source: str = ""  # the SFT source name it came from


class Malformed(Exception):
    """A record that cannot become a conversation; `reason` is counted as `malformed:<reason>`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- helpers shared by the parsers -------------------------------------------------------


def _field(record: dict, name: str, *, required: bool = True) -> str:
    """A stripped string field; missing, empty or not a string → Malformed(name) if required."""
    value = record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise Malformed(name)
    return value.strip()


def _joined(first: str, second: str) -> str:
    """Instruction plus its input/context, as Alpaca's and Dolly's own prompts join them."""
    return f"{first}\n\n{second}" if second else first


def _dialogue(turns: list[tuple[str, str]], system: str | None = None) -> Conversation:
    """Normalize (role, text) turns: leading assistant turns and a trailing user turn carry no
    trainable exchange and are dropped; what is left must alternate and not be empty."""
    while turns and turns[0][0] == "assistant":
        turns = turns[1:]
    if any(a[0] == b[0] for a, b in zip(turns, turns[1:])):
        raise Malformed("roles")
    if turns and turns[-1][0] == "user":
        turns = turns[:-1]
    if not turns:
        raise Malformed("empty")
    return Conversation(tuple(Turn(role, text) for role, text in turns), system=system or None)


# --- one parser per format ---------------------------------------------------------------


def parse_alpaca(record: dict) -> Conversation:
    """Alpaca, WizardLM-70K: instruction (+ "\\n\\n" + input when given) → output."""
    user = _joined(_field(record, "instruction"), _field(record, "input", required=False))
    return _dialogue([("user", user), ("assistant", _field(record, "output"))])


def parse_dolly(record: dict) -> Conversation:
    """databricks-dolly-15k: instruction (+ "\\n\\n" + context when given) → response."""
    user = _joined(_field(record, "instruction"), _field(record, "context", required=False))
    return _dialogue([("user", user), ("assistant", _field(record, "response"))])


def parse_scrolls(record: dict) -> Conversation:
    """SCROLLS tasks (tau/scrolls): the long input (document and question) → output."""
    return _dialogue([("user", _field(record, "input")), ("assistant", _field(record, "output"))])


SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "system": "system",
}  # fmt: skip


def parse_sharegpt(record: dict) -> Conversation:
    """ShareGPT, WizardLM evol_instruct_V2: `conversations` of {from, value}.

    Non-alternating roles are malformed rather than merged: merged turns would train the
    assistant on replies to questions it never saw answered in that order."""
    messages = record.get("conversations")
    if not isinstance(messages, list):
        raise Malformed("conversations")
    turns: list[tuple[str, str]] = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("from"), str) or not isinstance(m.get("value"), str):
            raise Malformed("conversations")
        role = SHAREGPT_ROLES.get(m["from"].lower())
        if role is None:
            raise Malformed("roles")
        turns.append((role, m["value"].strip()))
    system = None
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    if any(role == "system" for role, _ in turns):
        raise Malformed("roles")
    if any(not text for _, text in turns):
        raise Malformed("value")
    return _dialogue(turns, system)


def _oasst_best_reply(node: dict, role: str) -> dict | None:
    """The best usable reply: lowest rank (null after any number, ties: the first), skipping
    deleted, review-rejected, wrong-role and empty messages."""
    usable = [
        r for r in node.get("replies") or []
        if isinstance(r, dict) and not r.get("deleted") and r.get("review_result") is not False
        and r.get("role", role) == role and isinstance(r.get("text"), str) and r["text"].strip()
    ]  # fmt: skip

    def key(reply: dict) -> tuple[bool, float]:
        rank = reply.get("rank")
        numeric = isinstance(rank, (int, float)) and not isinstance(rank, bool)
        return (not numeric, rank if numeric else 0.0)

    return min(usable, key=key, default=None)  # min is stable: ties keep the first


def parse_oasst(record: dict) -> Conversation:
    """OpenAssistant trees export: the prompt, then the highest-ranked reply at each level
    down to a leaf (the conversation the rankers preferred), ending on an assistant turn."""
    prompt = record.get("prompt")
    if (
        not isinstance(prompt, dict) or prompt.get("deleted") or prompt.get("review_result") is False
        or not isinstance(prompt.get("text"), str) or not prompt["text"].strip()
    ):  # fmt: skip
        raise Malformed("prompt")
    turns = [("user", prompt["text"].strip())]
    node, role = prompt, "assistant"
    while (node := _oasst_best_reply(node, role)) is not None:
        turns.append(("user" if role == "prompter" else "assistant", node["text"].strip()))
        role = "prompter" if role == "assistant" else "assistant"
    return _dialogue(turns)


BAIZE_MARKER = re.compile(r"\[\|(Human|AI)\|\]")


def parse_baize(record: dict) -> Conversation:
    """Baize: one `input` string of `[|Human|]` / `[|AI|]` turns after a preamble; the last
    `[|Human|]` is empty in the released data (where self-chat stopped) and is dropped."""
    text = record.get("input")
    if not isinstance(text, str) or not text.strip():
        raise Malformed("input")
    pieces = BAIZE_MARKER.split(text)[1:]  # [marker, text, marker, text, ...], preamble dropped
    roles = ["user" if who == "Human" else "assistant" for who in pieces[::2]]
    turns = [(role, said.strip()) for role, said in zip(roles, pieces[1::2])]
    if turns and turns[-1] == ("user", ""):
        turns = turns[:-1]
    if any(not said for _, said in turns):
        raise Malformed("input")
    return _dialogue(turns)


PARSERS: dict[str, Callable[[dict], Conversation]] = {
    "alpaca": parse_alpaca,
    "sharegpt": parse_sharegpt,
    "oasst": parse_oasst,
    "dolly": parse_dolly,
    "baize": parse_baize,
    "scrolls": parse_scrolls,
}
FORMATS = tuple(PARSERS)


# --- files -------------------------------------------------------------------------------

_BAD_JSON = object()  # a JSON Lines line that does not parse: counted as malformed:json


def _first_line(error: BaseException) -> str:
    """Config errors are one line; some library messages are not."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _json_records(where: str, stream: IO[bytes], array_ok: bool) -> Iterator[Any]:
    """A JSON array's elements, or else JSON Lines, streamed (a bad line yields `_BAD_JSON`).

    Real releases use both under `.json` (ShareGPT, Baize: an array; others: lines), so there
    the first non-blank line decides; `.jsonl` is always lines. A file with no parseable line
    at all is not a dataset: ConfigError, rather than a source that silently adds nothing."""
    lines = iter(stream)
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        return
    if array_ok and first.lstrip().startswith(b"["):
        try:
            records = json.loads(first + stream.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: not valid JSON ({_first_line(e)})") from None
        yield from records
        return
    good = bad = 0
    for line in itertools.chain([first], lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
            yield _BAD_JSON
            continue
        good += 1
        yield record
    if bad and not good:
        raise ConfigError(f"{where}: neither a JSON array nor JSON Lines")


def _parquet_records(where: str, path: str) -> Iterator[Any]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{where}: reading Parquet needs pyarrow: pip install 'xgen[parquet]'") from None
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except pyarrow.ArrowException as e:
        raise ConfigError(f"{where}: not a readable Parquet file ({_first_line(e)})") from None


def read_records(where: str, path: str) -> Iterator[Any]:
    """Every record of one file (`where` prefixes errors: the source and the file). A
    truncated or corrupt file is an error, not a partial source: curated SFT sets are small
    enough to fetch again, and half of one would change the mixture silently."""
    name = path.lower()
    if name.endswith(".parquet"):
        yield from _parquet_records(where, path)
        return
    if not name.removesuffix(".gz").endswith((".json", ".jsonl")):
        raise ConfigError(f"{where}: not a .json, .jsonl, .jsonl.gz or .parquet file")
    try:
        with (gzip.open if name.endswith(".gz") else open)(path, "rb") as stream:
            yield from _json_records(where, stream, array_ok=name.removesuffix(".gz").endswith(".json"))
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ConfigError(f"{where}: cannot be read ({_first_line(e)})") from None


def resolve_paths(name: str, patterns: list[str]) -> list[str]:
    """Files of the configured paths (globs, relative to the current directory), in order;
    a pattern that matches nothing is a config mistake, not an empty source."""
    if not patterns:
        raise ConfigError(f"sft.sources.{name}.paths is empty")
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        if not matches:
            raise ConfigError(f"sft.sources.{name}.paths: {pattern!r} matches no file")
        files += [m for m in matches if m not in files]
    return files


# --- a configured source -----------------------------------------------------------------


def token_counts(convs: list[Conversation], tokenizer: Tokenizer, batch: int = 4096) -> list[int]:
    """Tokens of each conversation's turn contents (what `min_tokens` compares; the system
    message and template markers are not counted), tokenized in batches on tiktoken's threads."""
    texts = [(i, t.content) for i, conv in enumerate(convs) for t in conv.turns]
    totals = [0] * len(convs)
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        for (i, _), ids in zip(chunk, tokenizer.encode_ordinary_batch([text for _, text in chunk])):
            totals[i] += len(ids)
    return totals


def load_source(
    name: str, cfg: SFTSourceConfig, tokenizer: Tokenizer, seed: int
) -> tuple[list[Conversation], dict[str, int]]:
    """All conversations of one configured source, and counts for the log:
    {"records": read, "malformed": skipped (with reasons counted separately as "malformed:<reason>"),
    "too_short": dropped by min_tokens, "kept": n, "sampled": after max_examples}.

    `max_examples` samples without replacement and keeps the file order, so a source's
    conversations stay in a reproducible order for a seed whatever later stages shuffle."""
    parse = PARSERS.get(cfg.format)
    if parse is None:
        raise ConfigError(f"sft.sources.{name}.format={cfg.format!r} is not one of {', '.join(FORMATS)}")
    if cfg.min_tokens < 0 or (cfg.max_examples is not None and cfg.max_examples < 0):
        raise ConfigError(f"sft.sources.{name}: min_tokens and max_examples must not be negative")
    records = 0
    reasons: Counter[str] = Counter()
    parsed: list[Conversation] = []
    for path in resolve_paths(name, list(cfg.paths)):
        for record in read_records(f"sft.sources.{name}: {path}", path):
            records += 1
            try:
                if record is _BAD_JSON:
                    raise Malformed("json")
                if not isinstance(record, dict):
                    raise Malformed("record")
                parsed.append(dataclasses.replace(parse(record), source=name))
            except Malformed as e:
                reasons[f"malformed:{e.reason}"] += 1
    kept = parsed
    if cfg.min_tokens:
        kept = [c for c, n in zip(parsed, token_counts(parsed, tokenizer)) if n >= cfg.min_tokens]
    counts = {"records": records, "malformed": reasons.total(), **dict(sorted(reasons.items()))}
    counts.update(too_short=len(parsed) - len(kept), kept=len(kept))
    if cfg.max_examples is not None and cfg.max_examples < len(kept):
        chosen = np.sort(np.random.default_rng(seed).choice(len(kept), size=cfg.max_examples, replace=False))
        kept = [kept[i] for i in chosen]
    counts["sampled"] = len(kept)
    return kept, counts
