"""Instruction-tuning datasets as released → `Conversation`s (the report's Section 4 data).

Each public dataset has its own record shape; one small parser per format turns a record into
a `Conversation` (alternating user/assistant turns, ending on the assistant) or raises
`Malformed(reason)`. Bad records are skipped and counted per reason, never raised: released
instruction sets all carry some (empty responses, broken role orders), and one of them must
not stop a run. What is raised is a config mistake: an unknown format, a path that matches no
file, a file that is not JSON at all, a source left with no conversation. Turn contents are
stripped: the chat template supplies its own separators, so edge whitespace would only add
untrained or mistrained tokens.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import itertools
import json
import logging
import os
import re
import zlib
from collections import Counter
from typing import IO, Any, Callable, Iterator

import numpy as np

from xgen.config import ConfigError, SFTSourceConfig
from xgen.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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
        rank = reply.get("rank")  # NaN (a null rank read through pandas) is null too
        numeric = isinstance(rank, (int, float)) and not isinstance(rank, bool) and rank == rank
        return (not numeric, rank if numeric else 0.0)

    return min(usable, key=key, default=None)  # min is stable: ties keep the first


def parse_oasst(record: dict) -> Conversation:
    """OpenAssistant trees export: the prompt, then the highest-ranked reply at each level
    down to a leaf (the conversation the rankers preferred), ending on an assistant turn.
    Message rows (the Hugging Face layout) reach it as trees rebuilt by `oasst_trees`."""
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


def is_oasst_message(record: Any) -> bool:
    """One message of OpenAssistant's flat layout (Hugging Face `OpenAssistant/oasst1`
    parquet, `*.messages.jsonl.gz`), rather than a whole tree of the trees export."""
    return isinstance(record, dict) and "message_id" in record and "prompt" not in record


def oasst_trees(rows: list[dict]) -> Iterator[dict | Malformed]:
    """Trees-export records rebuilt from message rows by `parent_id`: one per prompt (a row
    without a parent), in the order the prompts come, each message's replies in row order so
    that rank ties keep the first, as in the trees file. The rows of all of a source's files
    are linked together. What cannot join a prompt's tree comes out as `Malformed`: a
    missing or repeated id, and a message whose parent is not there (its replies go with it)
    or that descends from itself."""
    nodes: dict[str, dict] = {}
    for row in rows:
        message_id = row["message_id"]
        if not isinstance(message_id, str) or message_id in nodes:
            yield Malformed("message_id")
            continue
        nodes[message_id] = {**row, "replies": []}
    roots, detached = [], []
    for node in nodes.values():
        parent = node.get("parent_id")
        if parent is None:
            roots.append(node)
        elif isinstance(parent, str) and parent in nodes:
            nodes[parent]["replies"].append(node)
        else:
            detached.append(node)
            yield Malformed("parent")
    reached, stack = 0, roots + detached
    while stack:  # what no prompt or orphan reaches is a cycle of parent links
        reached += 1
        stack.extend(stack.pop()["replies"])
    for _ in range(len(nodes) - reached):
        yield Malformed("parent")
    for root in roots:
        yield {"message_tree_id": root.get("message_tree_id"), "tree_state": root.get("tree_state"), "prompt": root}


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

# What a parser failure can be besides JSONDecodeError: RecursionError for deep nesting,
# ValueError for an integer over Python's digit limit (and UnicodeDecodeError, a ValueError).
JSON_ERRORS = (ValueError, RecursionError)


def _first_line(error: BaseException) -> str:
    """Config errors are one line; some library messages are not."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _json_records(where: str, stream: IO[bytes], array_ok: bool) -> Iterator[Any]:
    """A JSON array's elements, or else JSON Lines, streamed (a bad line yields Malformed).

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
        except JSON_ERRORS as e:
            raise ConfigError(f"{where}: not valid JSON ({_first_line(e)})") from None
        yield from records
        return
    good = bad = 0
    for line in itertools.chain([first], lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except JSON_ERRORS:
            bad += 1
            yield Malformed("json")
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
    a pattern that matches nothing is a config mistake, not an empty source. Dangling
    symlinks (a download cache whose blobs are gone) are skipped with a warning that counts
    them, since the source is then smaller than its files suggest."""
    if not patterns:
        raise ConfigError(f"sft.sources.{name}.paths is empty")
    files: list[str] = []
    dangling: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        matches = [p for p in found if os.path.isfile(p)]
        broken = [p for p in found if os.path.islink(p) and not os.path.exists(p)]
        if not matches:
            links = f" (only {len(broken)} dangling symlinks, e.g. {broken[0]})" if broken else ""
            raise ConfigError(f"sft.sources.{name}.paths: {pattern!r} matches no file{links}")
        files += [m for m in matches if m not in files]
        dangling += [b for b in broken if b not in dangling]
    if dangling:
        log.warning("sft.sources.%s.paths: skipped %d dangling symlinks, e.g. %s", name, len(dangling), dangling[0])
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


def source_records(name: str, cfg: SFTSourceConfig, tally: Counter[str]) -> Iterator[Any]:
    """The records of all of a source's files, in order. OpenAssistant message rows are held
    back (counted in `tally["messages"]`) and follow the last file as rebuilt trees."""
    messages: list[dict] = []
    for path in resolve_paths(name, list(cfg.paths)):
        for record in read_records(f"sft.sources.{name}: {path}", path):
            if cfg.format == "oasst" and is_oasst_message(record):
                messages.append(record)
            else:
                yield record
    if messages:
        tally["messages"] = len(messages)
        yield from oasst_trees(messages)


def load_source(
    name: str, cfg: SFTSourceConfig, tokenizer: Tokenizer, seed: int
) -> tuple[list[Conversation], dict[str, int]]:
    """All conversations of one configured source, and counts for the log:
    {"records": read (for OASST message rows: rebuilt trees, with "messages": rows read),
    "malformed": skipped (with reasons counted separately as "malformed:<reason>"),
    "too_short": dropped by min_tokens, "kept": n, "sampled": after max_examples}.

    A source that keeps no conversation is a ConfigError with these counts: a wrong format
    or a filter that drops everything would otherwise train on the other sources unnoticed.
    `max_examples` samples without replacement and keeps the file order, so a source's
    conversations stay in a reproducible order for a seed whatever later stages shuffle."""
    parse = PARSERS.get(cfg.format)
    if parse is None:
        raise ConfigError(f"sft.sources.{name}.format={cfg.format!r} is not one of {', '.join(FORMATS)}")
    if cfg.min_tokens < 0 or (cfg.max_examples is not None and cfg.max_examples < 0):
        raise ConfigError(f"sft.sources.{name}: min_tokens and max_examples must not be negative")
    records = 0
    tally: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    parsed: list[Conversation] = []
    for record in source_records(name, cfg, tally):
        records += 1
        try:
            if isinstance(record, Malformed):
                raise record
            if not isinstance(record, dict):
                raise Malformed("record")
            parsed.append(dataclasses.replace(parse(record), source=name))
        except Malformed as e:
            reasons[f"malformed:{e.reason}"] += 1
    kept = parsed
    if cfg.min_tokens:
        kept = [c for c, n in zip(parsed, token_counts(parsed, tokenizer)) if n >= cfg.min_tokens]
    counts = {"records": records, **tally, "malformed": reasons.total(), **dict(sorted(reasons.items()))}
    counts.update(too_short=len(parsed) - len(kept), kept=len(kept))
    if not kept:
        listed = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise ConfigError(f"sft.sources.{name} ({cfg.format}): no conversation kept ({listed})")
    if cfg.max_examples is not None and cfg.max_examples < len(kept):
        chosen = np.sort(np.random.default_rng(seed).choice(len(kept), size=cfg.max_examples, replace=False))
        kept = [kept[i] for i in chosen]
    counts["sampled"] = len(kept)
    return kept, counts
