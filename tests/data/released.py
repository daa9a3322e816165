"""Small files in the exact layouts of the public releases that the report trains on.

File names, folder nesting, record shapes and column types copy the releases (the texts are
made up from the Python documentation and generated code, so nothing is downloaded):

- RedPajama-Data-1T (togethercomputer/RedPajama-Data-1T): `arxiv/arxiv_<uuid>.jsonl`,
  `book/book.jsonl`, `c4/c4-train.000NN-of-01024.jsonl`,
  `common_crawl/<date>/en_head_000N.json.gz.dedup.classifier.jsonl.zst`,
  `stackexchange/stackexchange.jsonl`, `wikipedia/wiki.jsonl`; records `{"text", "meta"}`
  with each subset's own meta keys (numbers where the release has numbers).
- RedPajama GitHub: `github/filtered_<hash>.sampled.jsonl`, meta with `repo_name`, `path`,
  `license`, and `language` as a list of `{"name", "bytes"}`.
- SlimPajama-627B (cerebras/SlimPajama-627B): `train/chunk<N>/example_train_<K>.jsonl.zst`,
  records `{"text", "meta": {"redpajama_set_name"}}`.
- StarCoderData (bigcode/starcoderdata): `<language>/train-000NN-of-000MM.parquet`, columns
  `max_stars_repo_path`, `max_stars_repo_name`, `max_stars_count` (int64), `id`, `content`;
  no language or license column.
- The Stack dedup (bigcode/the-stack-dedup): `data/<lang>/data-000NN-of-000MM.parquet`,
  columns as released, the three `*_repo_licenses` are lists of strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from xgen.data.sources import python_docs
from xgen.data.synthetic import _code_like

NL_SUBSETS = ("arxiv", "book", "c4", "common_crawl", "stackexchange", "wikipedia")
SLIM_SETS = (
    "RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook",
    "RedPajamaArXiv", "RedPajamaWikipedia", "RedPajamaStackExchange",
)  # fmt: skip
# StarCoderData's folders are language names; files per language differ, as in the release.
STARCODER_FILES = {"python": 3, "javascript": 2, "go": 1, "rust": 1}
CODE_STYLE = {"python": "c", "javascript": "javascript", "go": "go", "rust": "rust", "c": "c"}
PERMISSIVE = ["mit", "apache-2.0", "bsd-3-clause", "bsd-2-clause", "isc", "unlicense", "cc0-1.0"]


def prose(n: int, seed: int) -> list[str]:
    """`n` documents of a few paragraphs of English each (every one well over 100 tokens)."""
    paragraphs = [p for topic in python_docs() for p in topic.split("\n\n") if len(p) > 200]
    rng = np.random.default_rng(seed)
    return [f"Document {seed}-{i}.\n\n" + "\n\n".join(rng.choice(paragraphs, 3)) for i in range(n)]


def code(language: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [_code_like(CODE_STYLE[language], int(rng.integers(6, 14)), seed * 1000 + i) for i in range(n)]


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def redpajama(root: Path, per_subset: int = 12) -> Path:
    """RedPajama-Data-1T's natural-language subsets under `root` (one folder each)."""
    docs = iter(prose(per_subset * len(NL_SUBSETS), seed=1))
    take = lambda: [next(docs) for _ in range(per_subset)]  # noqa: E731
    ts = "2023-03-20T10:00:00"
    _jsonl(root / "arxiv" / "arxiv_023827cd-7ee8-42e6-aa7b-661731f4c70f.jsonl", [
        {"text": t, "meta": {"timestamp": ts, "yymm": "2303", "arxiv_id": f"2303.{i:05d}", "language": "en", "url": f"https://arxiv.org/abs/2303.{i:05d}"}}
        for i, t in enumerate(take())
    ])  # fmt: skip
    _jsonl(root / "book" / "book.jsonl", [
        {"text": t, "meta": {"short_book_title": f"Book {i}", "publication_date": 1900 + i, "url": f"https://www.gutenberg.org/ebooks/{i}"}}
        for i, t in enumerate(take())
    ])  # fmt: skip
    _jsonl(root / "c4" / "c4-train.00000-of-01024.jsonl", [
        {"text": t, "meta": {"timestamp": ts, "url": f"https://example.com/{i}", "language": "en", "source": "c4"}}
        for i, t in enumerate(take())
    ])  # fmt: skip
    _jsonl(root / "common_crawl" / "2023-06" / "en_head_0000.json.gz.dedup.classifier.jsonl.zst", [
        {"text": t, "meta": {"pred_label": "__label__wiki", "pred_label_prob": 0.71, "wiki_prob": 0.71, "source": "cc/2023-06/en_head_0000"}}
        for t in take()
    ])  # fmt: skip
    _jsonl(root / "stackexchange" / "stackexchange.jsonl", [
        {"text": t, "meta": {"language": "en", "url": f"https://stackoverflow.com/questions/{i}", "timestamp": ts, "question_score": str(i)}}
        for i, t in enumerate(take())
    ])  # fmt: skip
    _jsonl(root / "wikipedia" / "wiki.jsonl", [
        {"text": t, "meta": {"title": f"Article {i}", "url": f"https://en.wikipedia.org/wiki/{i}", "language": "en", "timestamp": "20230320"}}
        for i, t in enumerate(take())
    ])  # fmt: skip
    return root


def redpajama_github(root: Path, n: int = 40) -> Path:
    """RedPajama's GitHub subset: `language` is a list of {name, bytes}, some with two."""
    records = []
    for i, text in enumerate(code("python", n, seed=2)):
        languages = [{"name": "Python", "bytes": str(len(text))}]
        if i % 3 == 0:
            languages.append({"name": "Shell", "bytes": "120"})
        records.append({"text": text, "meta": {
            "content_hash": f"{i:032x}", "timestamp": "", "source": "github", "line_count": text.count("\n"),
            "max_line_length": 60, "avg_line_length": 30.5, "alnum_prop": 0.7, "repo_name": f"octo/repo-{i}",
            "id": f"{i:040x}", "size": len(text), "binary": False, "copies": 1, "ref": "refs/heads/main",
            "path": f"src/module_{i}.py", "mode": "33188", "license": ["mit", "apache-2.0", "bsd-3-clause"][i % 3],
            "language": languages,
        }})  # fmt: skip
    _jsonl(root / "github" / "filtered_8c2f3a1b4d5e6f70.sampled.jsonl", records)
    return root


def slimpajama(root: Path, per_set: int = 10) -> Path:
    """SlimPajama's train split: chunks of zstd JSON Lines, each record naming its set."""
    rows = []
    for k, name in enumerate(SLIM_SETS):
        texts = code("python", per_set, seed=30 + k) if name == "RedPajamaGithub" else prose(per_set, seed=30 + k)
        rows += [{"text": t, "meta": {"redpajama_set_name": name}} for t in texts]
    order = np.random.default_rng(3).permutation(len(rows))
    rows = [rows[i] for i in order]
    half = len(rows) // 2
    _jsonl(root / "train" / "chunk1" / "example_train_0.jsonl.zst", rows[:half])
    _jsonl(root / "train" / "chunk2" / "example_train_0.jsonl.zst", rows[half:])
    return root


def starcoderdata(root: Path, rows_per_file: int = 12) -> Path:
    """StarCoderData: one folder per language, parquet shards without language or license."""
    for language, n_files in STARCODER_FILES.items():
        for f in range(n_files):
            texts = code(language, rows_per_file, seed=100 + 10 * f + len(language))
            table = pa.table({
                "max_stars_repo_path": pa.array([f"src/{language}_{f}_{i}.x" for i in range(len(texts))], pa.string()),
                "max_stars_repo_name": pa.array([f"user/{language}-{f}-{i}" for i in range(len(texts))], pa.string()),
                "max_stars_count": pa.array([i * 3 for i in range(len(texts))], pa.int64()),
                "id": pa.array([f"{language}-{f}-{i}" for i in range(len(texts))], pa.string()),
                "content": pa.array(texts, pa.string()),
            })  # fmt: skip
            path = root / language / f"train-{f:05d}-of-{n_files:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
    return root


# Each The Stack row's max_stars_repo_licenses, cycled: single, several (one permissive),
# none permissive, empty (no license detected).
STACK_LICENSES = [["mit"], ["gpl-3.0", "apache-2.0"], ["gpl-2.0"], [], ["BSD-3-Clause"], ["agpl-3.0", "lgpl-2.1"]]


STACK_NAMES = {"python": "Python", "go": "Go", "javascript": "JavaScript"}  # the `lang` column's values
STACK_EXT = {"python": "py", "javascript": "js"}


def the_stack(root: Path, langs: dict[str, int] | None = None, licenses_of=None, seed: int = 200) -> Path:
    """The Stack dedup: data/<lang>/data-000NN-of-000MM.parquet with list-typed license columns.
    `licenses_of(lang, i)` gives row i's license list (default: STACK_LICENSES, cycled)."""
    for lang, n in (langs or {"python": 24, "go": 12}).items():
        texts = code(lang, n, seed=seed + len(lang))
        licenses = [licenses_of(lang, i) if licenses_of else STACK_LICENSES[i % len(STACK_LICENSES)] for i in range(n)]
        list_of_str = pa.list_(pa.string())
        table = pa.table({
            "hexsha": pa.array([f"{i:040x}" for i in range(n)], pa.string()),
            "size": pa.array([len(t) for t in texts], pa.int64()),
            "ext": pa.array([STACK_EXT.get(lang, lang)] * n, pa.string()),
            "lang": pa.array([STACK_NAMES[lang]] * n, pa.string()),
            "max_stars_repo_path": pa.array([f"pkg/{i}.{lang}" for i in range(n)], pa.string()),
            "max_stars_repo_name": pa.array([f"org/{lang}-{i}" for i in range(n)], pa.string()),
            "max_stars_repo_head_hexsha": pa.array([f"{i:040x}" for i in range(n)], pa.string()),
            "max_stars_repo_licenses": pa.array(licenses, list_of_str),
            "max_stars_count": pa.array([float(i) if i % 2 else None for i in range(n)], pa.float64()),
            "max_issues_repo_licenses": pa.array(licenses, list_of_str),
            "max_forks_repo_licenses": pa.array(licenses, list_of_str),
            "content": pa.array(texts, pa.string()),
            "avg_line_length": pa.array([30.0] * n, pa.float64()),
            "max_line_length": pa.array([60] * n, pa.int64()),
            "alphanum_fraction": pa.array([0.7] * n, pa.float64()),
        })  # fmt: skip
        path = root / "data" / lang / "data-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    return root
