"""A small multi-source raw corpus, made locally, to try `task=prepare` and test the pipeline.

    python -m xgen.data.synthetic data/synthetic/raw

writes, in every format `prepare` reads:
- `prose/`: paragraphs of the Python documentation (real English) as JSON Lines (plain,
  gzip, zstd) and plain text;
- `code/`: standard-library modules as Python, with language, license and repository fields;
- `starcoder/`: code-like files in several languages under a mix of licenses, some not
  permissive (JSON Lines, and Parquet when pyarrow is installed);
- bad input that must be skipped and counted: an empty file, a truncated gzip file, a file
  that is not UTF-8, malformed JSON lines and records without the text field.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np

from xgen.data.sources import python_docs, python_stdlib

LANGUAGES = {
    "c": "int {name}(int x) {{\n    int total = 0;\n    for (int i = 0; i < x; i++) {{\n        total += i * {k};\n    }}\n    return total;\n}}\n",
    "javascript": "function {name}(x) {{\n  let total = 0;\n  for (let i = 0; i < x; i++) {{\n    total += i * {k};\n  }}\n  return total;\n}}\n",
    "go": "func {name}(x int) int {{\n\ttotal := 0\n\tfor i := 0; i < x; i++ {{\n\t\ttotal += i * {k}\n\t}}\n\treturn total\n}}\n",
    "rust": "fn {name}(x: i64) -> i64 {{\n    let mut total = 0;\n    for i in 0..x {{\n        total += i * {k};\n    }}\n    total\n}}\n",
}
# Relative sizes, so that per-language weights are visibly unequal.
LANGUAGE_FILES = {"c": 40, "javascript": 30, "go": 20, "rust": 10}
LICENSES = ["mit", "apache-2.0", "bsd-3-clause", "gpl-3.0", "agpl-3.0"]


def _paragraph_docs(seed: int) -> list[str]:
    """The documentation cut into documents of a few paragraphs each."""
    docs = []
    for topic in python_docs():
        paragraphs = [p for p in topic.split("\n\n") if p.strip()]
        for i in range(0, len(paragraphs), 6):
            docs.append("\n\n".join(paragraphs[i : i + 6]))
    return [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))]


def _write_jsonl(path: Path, records: list[dict], opener=open) -> None:
    with opener(path, "wb") as fh:
        for r in records:
            fh.write((json.dumps(r) + "\n").encode())


def _code_like(language: str, n_functions: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    template = LANGUAGES[language]
    return "\n".join(template.format(name=f"f{seed}_{i}", k=int(rng.integers(1, 99))) for i in range(n_functions))


def write_corpus(root: str | Path, seed: int = 0) -> Path:
    """Write the corpus under `root` (created); returns `root`."""
    import zstandard

    root = Path(root)
    prose, code, star = root / "prose", root / "code", root / "starcoder"
    for d in (prose, code, star):
        d.mkdir(parents=True, exist_ok=True)

    docs = _paragraph_docs(seed)
    quarter = len(docs) // 4
    records = [{"text": t, "source": "python-docs"} for t in docs]
    _write_jsonl(prose / "part-0.jsonl", records[:quarter])
    _write_jsonl(prose / "part-1.jsonl.gz", records[quarter : 2 * quarter], gzip.open)
    with open(prose / "part-2.jsonl.zst", "wb") as fh:
        fh.write(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in records[2 * quarter : 3 * quarter]).encode()))
    (prose / "part-3.txt").write_text("\n\n".join(docs[3 * quarter :]))
    # Bad input: each must be skipped and counted, never stop the run.
    (prose / "empty.jsonl").write_bytes(b"")
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in records[:50]).encode())
    (prose / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (prose / "latin1.txt").write_bytes("Ceci n'est pas de l'UTF-8: caf\u00e9 cr\u00e8me.".encode("latin-1") * 40)
    with open(prose / "mixed-quality.jsonl", "wb") as fh:
        fh.write((json.dumps({"text": docs[0], "source": "ok"}) + "\n").encode())
        fh.write(b'{"text": "this line is cut off\n')
        fh.write(b'{"text": "bad utf-8 \xff\xfe here"}\n')
        fh.write((json.dumps({"body": "no text field"}) + "\n").encode())
        fh.write((json.dumps({"text": 42}) + "\n").encode())
        fh.write((json.dumps({"text": docs[1], "source": "ok"}) + "\n").encode())

    modules = python_stdlib(120, seed)
    code_records = [
        {"content": m, "language": "python", "license": "psf-2.0", "repository": f"cpython/module_{i}"}
        for i, m in enumerate(modules)
    ]
    _write_jsonl(code / "python.jsonl", code_records)

    rng = np.random.default_rng(seed)
    for language, n_files in LANGUAGE_FILES.items():
        rows = [
            {
                "content": _code_like(language, int(rng.integers(8, 20)), seed * 1000 + i),
                "language": language,
                "license": LICENSES[int(rng.integers(len(LICENSES)))],
                "repository": f"example/{language}-{i}",
            }
            for i in range(n_files)
        ]
        _write_jsonl(star / f"{language}.jsonl", rows[: n_files // 2])
        rest = rows[n_files // 2 :]
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rest), star / f"{language}.parquet")
        except ImportError:
            _write_jsonl(star / f"{language}-rest.jsonl", rest)
    return root


if __name__ == "__main__":
    out = write_corpus(sys.argv[1] if len(sys.argv) > 1 else "data/synthetic/raw")
    print(f"wrote {sum(1 for p in out.rglob('*') if p.is_file())} files under {out}")
