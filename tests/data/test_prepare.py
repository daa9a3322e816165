import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.data.prepare import prepare_source
from xgen.data.store import ShardStore
from xgen.data.synthetic import write_corpus
from xgen.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]


def manifest(data_dir: Path, source: str) -> dict:
    return json.loads((data_dir / "synthetic" / "prepared" / source / "manifest.json").read_text())


def test_manifest_counts_documents_tokens_shards_drops_and_errors(synthetic_data):
    m = manifest(synthetic_data, "natural_language")
    t = m["totals"]
    assert m["tokenizer"]["identity"] == Tokenizer.xgen().identity and m["min_doc_tokens"] == 100
    assert t["files"] == 8 and t["shards"] >= 6 and t["documents"] > 300
    for kind in ("dropped_short", "empty_files", "corrupt_files", "invalid_utf8", "malformed_json", "missing_field"):
        assert t[kind] >= 1, kind
    store = ShardStore(synthetic_data / "synthetic" / "prepared" / "natural_language", Tokenizer.xgen())
    assert len(store) == t["documents"] and int(store.lengths.sum()) == t["tokens"]
    assert store.lengths.min() >= 100


def test_shards_hold_the_ordinary_encoding_of_each_document(synthetic_data):
    store = ShardStore(synthetic_data / "synthetic" / "prepared" / "starcoder", Tokenizer.xgen())
    text = Tokenizer.xgen().decode(store.tokens(0))
    assert text.startswith(("int f", "function f", "func f", "fn f"))
    assert set(store.meta) == {"language", "license", "repository"}
    m = manifest(synthetic_data, "starcoder")
    assert sum(m["totals"]["tokens_by"]["language"].values()) == m["totals"]["tokens"]


def test_data_from_another_tokenizer_is_refused_in_one_line(synthetic_data, tmp_path):
    src = synthetic_data / "synthetic" / "prepared" / "code"
    copy = tmp_path / "code"
    copy.mkdir()
    m = json.loads((src / "manifest.json").read_text())
    m["tokenizer"]["identity"] = "gpt2-0123456789abcdef"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="tokenized with tokenizer gpt2-0123456789abcdef"):
        ShardStore(copy, Tokenizer.xgen())


def all_documents(out: Path) -> list[tuple[str, bytes]]:
    store = ShardStore(out, Tokenizer.xgen())
    return sorted((store.meta["source"][i], store.tokens(i).tobytes()) for i in range(len(store)))


def test_an_interrupted_prepare_resumes_without_losing_or_duplicating(tmp_path, monkeypatch):
    from xgen.data import units as units_module

    raw = write_corpus(tmp_path / "raw")
    cfg = compose_config("data_mix=synthetic", f"data_dir={tmp_path}", "prepare.workers=0", "prepare.shard_tokens=5000", "prepare.batch_documents=8")
    spec = cfg.data_mix.sources["natural_language"].raw
    spec.paths = [str(raw / "prose" / "*")]
    tok = Tokenizer.xgen()
    clean = prepare_source("nl", tmp_path / "clean", spec, tok, 100, cfg.prepare)

    real_read = units_module.read_documents

    def crash_in_part_1(path, spec, counts, parts=(), **kw):
        for i, doc in enumerate(real_read(path, spec, counts, parts, **kw)):
            if path.endswith("part-1.jsonl.gz") and i == 60:
                raise KeyboardInterrupt("killed mid-file")
            yield doc

    monkeypatch.setattr(units_module, "read_documents", crash_in_part_1)
    with pytest.raises(KeyboardInterrupt):
        prepare_source("nl", tmp_path / "resumed", spec, tok, 100, cfg.prepare)
    m = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert not m["complete"] and len(m["pending"]) == 8 and not m["files"]
    # empty, latin1, mixed-quality and part-0 (in path order) were committed before the kill.
    assert len(list((tmp_path / "resumed" / "units").glob("*.json"))) == 4
    assert list((tmp_path / "resumed" / "shards").glob(".stage-*/*.tokens"))  # the cut unit's staged shards
    with pytest.raises(ConfigError, match=r"its prepare did not finish: 4 units are not done .*run task=prepare again"):
        ShardStore(tmp_path / "resumed", tok)
    monkeypatch.setattr(units_module, "read_documents", real_read)
    resumed = prepare_source("nl", tmp_path / "resumed", spec, tok, 100, cfg.prepare)

    assert resumed == clean
    assert not list((tmp_path / "resumed" / "shards").glob(".stage-*"))
    assert all_documents(tmp_path / "resumed") == all_documents(tmp_path / "clean")


def test_prepare_task_with_worker_processes_then_training_on_the_shards(tmp_path):
    write_corpus(tmp_path / "synthetic" / "raw")
    common = ["data_mix=synthetic", f"data_dir={tmp_path}"]
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "task=prepare", *common, "prepare.workers=2", f"hydra.run.dir={tmp_path}/p"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    totals = json.loads((tmp_path / "p" / "prepare.json").read_text())
    assert totals["natural_language"]["documents"] > 300 and totals["code"]["documents"] > 100
    train = [
        "stage=s1_2k", "model=tiny", "trainer.steps=3", "stage.batch_tokens=4096", f"hydra.run.dir={tmp_path}/t",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", *common, *train], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and np.isfinite(records[-1]["loss"])
    assert set(records[-1]["data_epochs"]) == {"natural_language", "code"}
    mix = json.loads((tmp_path / "t" / "data_mix.json").read_text())
    parts = {p["part"]: p for p in mix["parts"]}
    assert set(parts) == {"natural_language", "code"}
    assert sum(p["weight"] for p in parts.values()) == pytest.approx(1.0, abs=1e-5)
    assert parts["code"]["configured_weight"] == pytest.approx(0.0469, abs=1e-4)
    nl = parts["natural_language"]
    prepared = totals["natural_language"]
    for reason in ("dropped_short", "malformed_json", "invalid_utf8", "missing_field", "corrupt_files", "empty_files"):
        assert nl["dropped"][reason] == prepared[reason] > 0, reason  # what prepare dropped, not "0 dropped"
    assert {"source", "documents", "tokens"} <= set(nl) and nl["documents"] > 0 and nl["tokens"] > 0
    log_text = "".join(p.read_text() for p in (tmp_path / "t").glob("*.log")) + proc.stderr
    assert "data mixture:" in log_text and "dropped_short" in log_text


def small_source(tmp_path, n=6):
    raw = tmp_path / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    docs = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 12 for i in range(n)]
    for k in range(2):
        (raw / f"part-{k}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[k::2]))
    return raw


def prep(tmp_path, out, pattern):
    from xgen.config import PrepareConfig, RawInputConfig

    return prepare_source("s", out, RawInputConfig(paths=[pattern]), Tokenizer.xgen(), 10, PrepareConfig(workers=0))


def test_inputs_are_identified_by_content_not_by_path(tmp_path, monkeypatch):
    raw = small_source(tmp_path)
    out = tmp_path / "prepared"
    first = prep(tmp_path, out, str(raw / "*.jsonl"))
    assert first["documents"] == 6
    monkeypatch.chdir(tmp_path)  # data_dir=data against data_dir=$PWD/data
    assert prep(tmp_path, out, "raw/*.jsonl") == first
    (raw / "part-0.jsonl").rename(raw / "renamed-0.jsonl")  # a renamed raw file
    shutil.copy(raw / "part-1.jsonl", raw / "copy-of-1.jsonl")  # the same file twice
    again = prep(tmp_path, out, str(raw / "*.jsonl"))
    assert again["documents"] == 6 and again["duplicate_files"] == 1
    copied = tmp_path / "copied"
    shutil.copytree(out, copied)  # a copied prepared folder: nothing to redo, nothing doubled
    assert prep(tmp_path, copied, str(raw / "*.jsonl"))["documents"] == 6
    assert all_texts(copied) == all_texts(out)


def all_texts(out):
    store = ShardStore(out, Tokenizer.xgen())
    return sorted(Tokenizer.xgen().decode(store.tokens(i)) for i in range(len(store)))


def test_a_raw_file_that_changed_is_prepared_again_and_its_old_documents_go(tmp_path):
    raw = small_source(tmp_path)
    out = tmp_path / "prepared"
    prep(tmp_path, out, str(raw / "*.jsonl"))
    old_shards = set((out / "shards").iterdir())
    path = raw / "part-1.jsonl"
    path.write_text(json.dumps({"text": "A new version of the file. " * 10}) + "\n")
    totals = prep(tmp_path, out, str(raw / "*.jsonl"))
    assert totals["documents"] == 4 and totals["files"] == 2
    texts = all_texts(out)
    assert any(t.startswith("A new version") for t in texts) and not any(t.startswith("Document 1.") for t in texts)
    assert len(old_shards - set((out / "shards").iterdir())) == 2  # the old file's shard and index, deleted
    path.unlink()  # raw data deleted after preparing: its documents are kept
    assert prep(tmp_path, out, str(raw / "*.jsonl"))["documents"] == 4


def test_dangling_symlinks_are_counted_and_a_pattern_of_only_dangling_links_is_an_error(tmp_path):
    raw = small_source(tmp_path)
    (raw / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    totals = prep(tmp_path, tmp_path / "prepared", str(raw / "*.jsonl"))
    assert totals["dangling_symlinks"] == 1 and totals["documents"] == 6
    with pytest.raises(ConfigError, match=r"match no file \(1 dangling symlinks\)"):
        prep(tmp_path, tmp_path / "other", str(raw / "gone.jsonl"))


def test_data_prepared_in_the_old_layout_or_with_other_raw_settings_is_refused_in_one_line(tmp_path):
    from xgen.config import PrepareConfig, RawInputConfig

    raw = small_source(tmp_path)
    out = tmp_path / "prepared"
    prep(tmp_path, out, str(raw / "*.jsonl"))
    with pytest.raises(ConfigError, match="was prepared with raw="):
        prepare_source("s", out, RawInputConfig(paths=[str(raw / "*")], meta={"lang": "language"}), Tokenizer.xgen(), 10, PrepareConfig(workers=0))
    m = json.loads((out / "manifest.json").read_text())
    m["format"] = "xgen-shards-v2"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="format 'xgen-shards-v2' is not 'xgen-shards-v4'; prepare it again"):
        ShardStore(out, Tokenizer.xgen())


def long_document_store(tmp_path, n_tokens: int):
    """A prepared source holding one document of `n_tokens` (written without tokenizing)."""
    from xgen.data.shards import write_token_documents

    tokens = (np.arange(n_tokens) % 50_000).astype(np.uint16)
    write_token_documents(tmp_path / "long", "long", [tokens], Tokenizer.xgen())
    return ShardStore(tmp_path / "long", Tokenizer.xgen()), tokens


def test_a_window_of_a_ten_million_token_document_reads_only_the_tokens_it_covers(tmp_path):
    from xgen.data.packing import PackedWindows

    n = 10_000_000
    store, tokens = long_document_store(tmp_path, n)
    reads = []
    real_read = store._read

    def counting(shard, start, stop):
        reads.append(stop - start)
        return real_read(shard, start, stop)

    store._read = counting
    windows = PackedWindows(store, np.array([0]), seq_len=8192, eot_id=50256)
    assert len(windows) == n // 8192
    for i in (0, 1, 617, len(windows) - 1):
        reads.clear()
        got = windows[i]["tokens"]
        want = np.concatenate([tokens, [50256]])[i * 8192 : i * 8192 + 8193]
        np.testing.assert_array_equal(got, want)
        assert len(reads) == 1 and reads[0] <= 8193, reads  # one slice of the window's tokens
    tail = store.tokens(0, n - 5, n + 100)  # a slice past the end stops at the end
    np.testing.assert_array_equal(tail, tokens[-5:])


def test_files_no_longer_matched_by_raw_paths_leave_the_prepared_data(tmp_path):
    raw = small_source(tmp_path)
    out = tmp_path / "prepared"
    assert prep(tmp_path, out, str(raw / "*.jsonl"))["documents"] == 6
    assert prep(tmp_path, out, str(raw / "part-0.jsonl"))["documents"] == 3  # narrowed: part-1 goes


def test_a_source_that_gives_no_document_is_a_one_line_error_naming_the_counts(tmp_path):
    from xgen.config import PrepareConfig, RawInputConfig

    raw = small_source(tmp_path)
    spec = RawInputConfig(paths=[str(raw / "*.jsonl")], text_field="content")  # StarCoder's name, not this file's
    with pytest.raises(ConfigError, match=r"2 files under .* gave no document \(\{'missing_field': 6, 'records': 6\}\); check raw.text_field='content'"):
        prepare_source("s", tmp_path / "out", spec, Tokenizer.xgen(), 10, PrepareConfig(workers=0))


def copy_prepared(synthetic_data: Path, to: Path) -> Path:
    shutil.copytree(synthetic_data / "synthetic" / "prepared", to / "synthetic" / "prepared")
    return to / "synthetic" / "prepared"


def test_a_missing_or_truncated_shard_is_refused_at_start_up_naming_its_raw_file(synthetic_data, tmp_path):
    prepared = copy_prepared(synthetic_data, tmp_path)
    shards = sorted((prepared / "natural_language" / "shards").glob("*.tokens"))
    shards[0].unlink()
    with pytest.raises(ConfigError, match=rf"1 of {len(shards)} shards are missing or damaged: {shards[0].stem} \(missing; from .*/prose/.*\); run task=prepare again"):
        ShardStore(prepared / "natural_language", Tokenizer.xgen())
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:-2])
    with pytest.raises(ConfigError, match=rf"2 of .* \({len(data) - 2} bytes, not {len(data)}; from "):
        ShardStore(prepared / "natural_language", Tokenizer.xgen())


def test_a_damaged_shard_stops_training_at_start_up_in_one_line_and_a_checked_one_is_not_read_again(synthetic_data, tmp_path, monkeypatch):
    from xgen.data import shards as shards_module

    prepared = copy_prepared(synthetic_data, tmp_path)
    store = ShardStore(prepared / "natural_language", Tokenizer.xgen())  # checks every shard once
    verified = json.loads((prepared / "natural_language" / "verified.json").read_text())
    assert len([k for k in verified if not k.startswith("index/")]) == store.manifest["totals"]["shards"]
    assert {k for k in verified if k.startswith("index/")} == {f"index/{n}" for n in store.manifest["index"]["files"]}
    with monkeypatch.context() as m:
        m.setattr(shards_module, "file_digest", lambda path: pytest.fail(f"{path} was read again"))
        ShardStore(prepared / "natural_language", Tokenizer.xgen())
    shard = sorted((prepared / "natural_language" / "shards").glob("*.tokens"))[1]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # one flipped bit-pattern, same size
    shard.write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, "-m", "xgen.run", "data_mix=synthetic", "stage=s1_2k", f"data_dir={tmp_path}", "model=tiny", "trainer.steps=1",
         "stage.batch_tokens=4096", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{shard.stem} (its checksum differs; from " in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_running_prepare_again_redoes_a_damaged_shard_and_a_damaged_index_file(tmp_path):
    raw = small_source(tmp_path, n=40)
    out = tmp_path / "prepared"
    first = prep(tmp_path, out, str(raw / "*.jsonl"))
    before = all_texts(out)
    shard = sorted((out / "shards").glob("*.tokens"))[0]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "index" / "lengths.npy").write_bytes((out / "index" / "lengths.npy").read_bytes()[:-4])
    with pytest.raises(ConfigError, match=r"1 of 2 shards and 1 of \d+ index files are missing or damaged"):
        ShardStore(out, Tokenizer.xgen())
    assert prep(tmp_path, out, str(raw / "*.jsonl")) == first
    assert all_texts(out) == before
    (raw / "part-0.jsonl").unlink()  # its raw file gone: a damaged shard cannot be redone
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = [e for e in manifest["files"].values() if any(p.endswith("part-0.jsonl") for p in e["paths"])]
    shard = out / "shards" / (entry["shards"][0]["name"] + ".tokens")
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ConfigError, match=r"are missing or damaged and the raw file is gone"):
        prep(tmp_path, out, str(raw / "*.jsonl"))
