"""`prepare`'s units: byte ranges of a large file, and output that does not depend on who ran them."""

import gzip
import hashlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

from xgen.config import PrepareConfig, RawInputConfig
from xgen.data.prepare import prepare_source
from xgen.data.readers import read_documents
from xgen.data.store import ShardStore
from xgen.data.units import plan_units
from xgen.tokenizer import Tokenizer

TOK = Tokenizer.xgen()


def write_lines_corpus(root: Path, files: int = 3, records: int = 400, seed: int = 0) -> Path:
    """JSON Lines with documents of very different sizes (some longer than a unit), multi-byte
    characters, blank lines and a bad line; one gzip file (never split)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    words = ["alpha", "beta", "gamma", "délta", "epsilon", "ζeta", "eta", "theta", "日本", "kappa"]
    for f in range(files):
        lines = []
        for r in range(records):
            n = rng.choice([3, 20, 150, 600, 4000])
            lines.append(json.dumps({"text": f"file {f} doc {r}: " + " ".join(rng.choice(words) for _ in range(n)), "lang": "xx"}, ensure_ascii=False))
            if r % 97 == 0:
                lines.append("")  # a blank line
            if r % 151 == 0:
                lines.append('{"text": "cut off')  # a malformed record
        (root / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(root / "extra.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps({"text": f"gz doc {i} " + "word " * 200, "lang": "gz"}) + "\n" for i in range(50)))
    return root


def tree(root: Path) -> dict[str, str]:
    """Every file of a prepared folder by its relative path: content hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


SPEC = RawInputConfig(meta={"lang": "lang"})


def spec_for(raw: Path) -> RawInputConfig:
    return RawInputConfig(paths=[str(raw / "*")], meta=dict(SPEC.meta))


@pytest.mark.parametrize("split", [7, 97, 1000, 4096, 10**9])
def test_byte_ranges_read_every_document_once_whatever_the_cut(tmp_path, split):
    raw = write_lines_corpus(tmp_path, files=1, records=40)
    path = str(raw / "part-0.jsonl")
    size = Path(path).stat().st_size
    whole_counts: Counter = Counter()
    whole = list(read_documents(path, SPEC, whole_counts))
    units = plan_units(path, (), (size, "x"), SPEC, split)
    assert len(units) == (-(-size // split) if size > split else 1)
    counts: Counter = Counter()
    pieces = [doc for u in units for doc in read_documents(path, SPEC, counts, byte_range=u.byte_range)]
    assert pieces == whole  # a line crossing a cut is read once, by the range holding its first byte
    assert counts["raw_bytes"] == size and counts["records"] == whole_counts["records"]
    assert counts["malformed_json"] == whole_counts["malformed_json"] > 0


def test_compressed_files_are_one_unit_and_large_plain_ones_several(tmp_path):
    raw = write_lines_corpus(tmp_path)
    gz, plain = str(raw / "extra.jsonl.gz"), str(raw / "part-0.jsonl")
    assert len(plan_units(gz, (), (Path(gz).stat().st_size, "x"), SPEC, 100)) == 1
    size = Path(plain).stat().st_size
    assert len(plan_units(plain, (), (size, "x"), SPEC, size // 3)) == 4


def test_one_worker_two_workers_and_in_process_give_byte_identical_shards_manifests_and_order(tmp_path):
    raw = write_lines_corpus(tmp_path / "raw")
    outs = {}
    for workers in (0, 1, 2):
        out = tmp_path / f"out-{workers}"
        prepare_source("s", out, spec_for(raw), TOK, 5, PrepareConfig(workers=workers, split_bytes=60_000, shard_tokens=30_000))
        outs[workers] = tree(out)
    assert outs[0] == outs[1] == outs[2]
    manifest = json.loads((tmp_path / "out-0" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["units"] > 8 and manifest["totals"]["shards"] > manifest["totals"]["units"] // 2
    store = ShardStore(tmp_path / "out-0", TOK)
    texts = [TOK.decode(store.tokens(i)) for i in range(len(store))]
    expected = [t for p in sorted(raw.iterdir()) for t, _ in read_documents(str(p), SPEC, Counter()) if len(TOK.encode_ordinary(t)) >= 5]
    assert texts == expected  # document order: input path, then byte offset


def test_a_rerun_after_everything_is_done_runs_no_unit_and_changes_no_byte(tmp_path, caplog):
    raw = write_lines_corpus(tmp_path / "raw", files=1)
    opts = PrepareConfig(workers=0, split_bytes=60_000)
    prepare_source("s", tmp_path / "out", spec_for(raw), TOK, 5, opts)
    before = tree(tmp_path / "out")
    caplog.set_level("INFO")
    prepare_source("s", tmp_path / "out", spec_for(raw), TOK, 5, opts)
    assert tree(tmp_path / "out") == before
    assert "0 units to run" in caplog.text


def test_changing_split_bytes_on_prepared_data_is_refused_in_one_line(tmp_path):
    from xgen.config import ConfigError

    raw = write_lines_corpus(tmp_path / "raw", files=1)
    prepare_source("s", tmp_path / "out", spec_for(raw), TOK, 5, PrepareConfig(workers=0, split_bytes=60_000))
    with pytest.raises(ConfigError, match=r"prepare.split_bytes=60000, this run says .* prepare.split_bytes=70000; prepare into another"):
        prepare_source("s", tmp_path / "out", spec_for(raw), TOK, 5, PrepareConfig(workers=0, split_bytes=70_000))


def kill_one_when(find: Callable[[], list[int]], units: Path, after_units: int) -> tuple[threading.Thread, threading.Event, list[int]]:
    """A thread that SIGKILLs the first process `find` names once `after_units` completion
    records exist under `units`; set the event to stop it, then join it."""
    killed, done = [], threading.Event()

    def run():
        while not done.is_set():
            pids = find()
            if pids and len(list(units.glob("*.json"))) >= after_units:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.002)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done, killed


def _pool_workers() -> list[int]:
    """This process's spawned pool workers."""
    return [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
            if _parent(p) == os.getpid() and b"spawn_main" in _read(p.parent / "cmdline")]  # fmt: skip


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_a_local_worker_process_killed_mid_prepare_is_replaced_and_the_output_is_byte_identical(tmp_path, caplog):
    raw = write_lines_corpus(tmp_path / "raw", files=2, records=400)
    opts = PrepareConfig(workers=2, split_bytes=30_000)
    prepare_source("s", tmp_path / "clean", spec_for(raw), TOK, 5, opts)
    thread, done, killed = kill_one_when(_pool_workers, tmp_path / "out" / "units", after_units=10)
    caplog.set_level("WARNING")
    try:
        prepare_source("s", tmp_path / "out", spec_for(raw), TOK, 5, opts)
    finally:
        done.set()
        thread.join()
    assert killed and "a worker process died" in caplog.text
    assert tree(tmp_path / "out") == tree(tmp_path / "clean")


def _parent(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
