"""A prepared source of 10^8 documents: start-up time and resident memory of one host.

    python bench/index_scale.py                      # 10^8 documents, ~3 minutes, ~2 GB of disk
    python bench/index_scale.py --documents 1000000  # a quick look

The source is written directly in `xgen.data.shards`' layout (index arrays as `prepare`
writes them; shards as sparse files of the recorded sizes, so 10^10 tokens take no disk)
with `verified.json` saying every shard and index file was checked: the start-up of a restart, the one a
run of weeks repeats. A first start also reads every local shard once to check its BLAKE2b;
that cost is the disk's read rate and is not part of this figure.

Each measurement runs in a fresh process: resident memory (VmRSS) is taken after the
imports and again after the step, so the figure is what opening the data adds:

1. open: `ShardStore(...)`, the whole `lengths` array and one metadata column scanned (what
   filtering touches), 1,000 random documents read;
2. select: then the loader's selection for one part (min_doc_tokens and a `where` filter,
   the stage's chunk) and its packed windows, as `build_pipeline` does on every host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data import write_section  # noqa: E402

SHARD_TOKENS = 50_000_000


def build(root: Path, documents: int, seed: int = 0) -> dict:
    from xgen.config import RawInputConfig
    from xgen.data.shards import file_digest, new_manifest, summarize, write_json
    from xgen.tokenizer import Tokenizer

    tok = Tokenizer.xgen()
    rng = np.random.default_rng(seed)
    index = root / "index"
    index.mkdir(parents=True)
    lengths = np.lib.format.open_memmap(index / "lengths.npy", "w+", np.uint32, (documents,))
    starts = np.lib.format.open_memmap(index / "starts.npy", "w+", np.int64, (documents + 1,))
    starts[0] = 0
    step = 10_000_000
    for lo in range(0, documents, step):  # lengths like a web corpus: many short, a long tail
        hi = min(lo + step, documents)
        lengths[lo:hi] = np.minimum(rng.lognormal(4.2, 1.0, hi - lo).astype(np.uint32) + 1, 2**31)
        starts[lo + 1 : hi + 1] = starts[lo] + np.cumsum(lengths[lo:hi], dtype=np.int64)
    languages = [f"lang{k:02d}" for k in range(30)]
    for field, values in (("source", ["arxiv", "books", "c4", "github", "wikipedia"]), ("language", languages)):
        codes = np.lib.format.open_memmap(index / f"meta_{field}.npy", "w+", np.uint8, (documents,))
        for lo in range(0, documents, step):
            codes[lo : lo + step] = rng.integers(0, len(values), min(step, documents - lo), dtype=np.uint8)
        codes.flush()
        np.save(index / f"meta_{field}.values.npy", np.asarray(values))
    lengths.flush()
    starts.flush()
    total = int(starts[-1])
    # Shards end at document boundaries, about SHARD_TOKENS each.
    cuts = np.searchsorted(starts, np.arange(SHARD_TOKENS, total, SHARD_TOKENS), side="left")
    bounds = np.unique(np.concatenate([[0], cuts, [documents]]))
    (root / "shards").mkdir()
    shards, verified = [], {}
    for k in range(len(bounds) - 1):
        a, b = int(bounds[k]), int(bounds[k + 1])
        tokens = int(starts[b] - starts[a])
        name = f"bench-{k:05d}"
        path = root / "shards" / f"{name}.tokens"
        with open(path, "wb") as fh:
            fh.truncate(tokens * 2)  # sparse
        digest = f"{k:032x}"
        shards.append({"name": name, "bytes": tokens * 2, "blake2b": digest, "documents": b - a, "tokens": tokens})
        st = path.stat()
        verified[name] = [st.st_size, f"mtime_ns:{st.st_mtime_ns}", digest]
    manifest = new_manifest("bench", tok, RawInputConfig(meta={"source": "source", "language": "language"}), 0, [], 0)
    manifest["files"]["bench"] = {
        "paths": [], "units": ["bench"], "shards": shards, "documents": documents, "tokens": total,
        "counts": {"documents_read": documents, "records": documents}, "tokens_by": {},
    }  # fmt: skip
    files = {p.name: {"bytes": p.stat().st_size, "blake2b": file_digest(p)} for p in sorted(index.iterdir())}
    manifest["index"] = {"documents": documents, "fields": {"source": 5, "language": 30}, "of": "bench", "files": files}
    for name, entry in files.items():  # checked once, as a first start does
        st = (index / name).stat()
        verified[f"index/{name}"] = [st.st_size, f"mtime_ns:{st.st_mtime_ns}", entry["blake2b"]]
    manifest["totals"] = summarize(manifest)
    manifest["complete"] = True
    write_json(root / "manifest.json", manifest)
    write_json(root / "verified.json", verified)
    return {"documents": documents, "tokens": total, "shards": len(shards)}


MEASURE = r"""
import json, sys, time
import numpy as np
from xgen.config import DataMixConfig, SourceConfig
from xgen.data.mixture import select_parts
from xgen.data.packing import PackedWindows
from xgen.data.store import ShardStore
from xgen.tokenizer import Tokenizer

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

tok = Tokenizer.xgen()
root, what = sys.argv[1], sys.argv[2]
before = rss()
t0 = time.perf_counter()
store = ShardStore(root, tok)
kept = int((store.lengths >= 100).sum())
codes, values = store.meta.codes("source")
counts = np.bincount(codes, minlength=len(values))
rng = np.random.default_rng(0)
for doc in rng.integers(0, len(store), 1000):
    store.tokens(int(doc), 0, 512)
out = {"open_s": time.perf_counter() - t0, "open_rss": rss() - before, "kept": kept}
if what == "select":
    t1 = time.perf_counter()
    mix = DataMixConfig(name="bench", min_doc_tokens=100, stage_split={"s1_2k": 0.5, "s2_4k": 0.5})
    src = SourceConfig(kind="prepared", weight=1.0, path=root, where={"source": ["c4", "wikipedia", "books"]})
    (part,) = select_parts("bench", src, store, mix, "s1_2k")
    windows = PackedWindows(store, part.docs, seq_len=2048, eot_id=tok.eos_id)
    windows[0], windows[len(windows) - 1]
    out.update(select_s=time.perf_counter() - t1, select_rss=rss() - before, part_documents=len(part.docs))
print(json.dumps(out))
"""


def measure(root: Path, what: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(root), what], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--documents", type=int, default=100_000_000)
    ap.add_argument("--workdir", default=None, help="where to build (default: a temporary folder)")
    args = ap.parse_args()
    command = "python bench/index_scale.py " + " ".join(sys.argv[1:])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp) / "source"
        t0 = time.perf_counter()
        built = build(root, args.documents)
        build_s = time.perf_counter() - t0
        index_bytes = sum(p.stat().st_size for p in (root / "index").iterdir())
        os.system("sync")
        opened = measure(root, "open")
        selected = measure(root, "select")
    n = built["documents"]
    result = {**built, "build_s": round(build_s, 1), "index_bytes": index_bytes,
              "open_s": round(opened["open_s"], 2), "open_bytes_per_doc": round(opened["open_rss"] / n, 2),
              "select_s": round(selected["select_s"], 2), "select_bytes_per_doc": round(selected["select_rss"] / n, 2),
              "part_documents": selected["part_documents"]}  # fmt: skip
    print(json.dumps(result, indent=1))
    date = time.strftime("%Y-%m-%d")
    write_section("data-index-scale", f"""
### Data: a prepared source of {n:,} documents on one host ({date}, {os.cpu_count()} CPUs, {cpu})

`{command}` — {built['tokens']:,} tokens in {built['shards']} shards (sparse files), an index of {index_bytes / 2**30:.2f} GiB on disk (`starts` int64, `lengths` uint32, two metadata columns of uint8 codes), every shard already checked (`verified.json`: the start-up of a restart). Each line is a fresh process; memory is VmRSS added after the imports.

| | time | resident per document |
|---|---|---|
| open: manifest, shard listing, index mapped, `lengths` and one metadata column scanned, 1,000 random documents read | {result['open_s']} s | **{result['open_bytes_per_doc']} bytes** |
| and the loader's selection of one part (min_doc_tokens, a `where` filter, the stage's chunk: {result['part_documents']:,} documents) and its packed windows | {result['select_s']} s more | {result['select_bytes_per_doc']} bytes in all |

Goal: start-up under 30 s and at most 16 bytes per document resident for the index.
""")


if __name__ == "__main__":
    main()
