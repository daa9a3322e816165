"""Your own data in one line: `python -m xgen.run data_mix=files data_mix.paths='[...]'`.

The inputs are written as the world writes them: JSON Lines exported by hand, a Hugging Face
dataset written by `datasets` itself (`save_to_disk`: Arrow IPC streams, `state.json`,
`dataset_info.json`; `to_parquet` with the Hub's shard names, as `push_to_hub` and a Hub
download lay them out). The documents are the interpreter's own documentation, long enough
to pass the report's 100-token rule.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.config.validate import validate
from xgen.data.prepare import ensure_prepared, prepare_mix, sources_to_prepare
from xgen.data.store import ShardStore
from xgen.tasks import run_task
from xgen.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]


def topics(start: int, stop: int) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(key, topics[key]) for key in sorted(topics)[start:stop]]


def write_jsonl_gz(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return path


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory) -> dict[str, Path]:
    """One dataset as `datasets` saves it to disk (two Arrow shards) and as the Hub holds it
    (train and test Parquet shards, a README and .gitattributes beside them)."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    rows = topics(0, 60)
    ds = datasets.Dataset.from_dict({"id": list(range(len(rows))), "title": [k for k, _ in rows], "content": [t for _, t in rows]})
    ds.save_to_disk(str(root / "saved"), num_shards=2)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(root / "saved_dict"))
    hub = root / "hub"
    (hub / "data").mkdir(parents=True)
    ds.to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    ds.select(range(5)).to_parquet(str(hub / "data" / "test-00000-of-00001.parquet"))
    (hub / "README.md").write_text("---\nlicense: psf-2.0\n---\n# Python topics\n")
    (hub / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    return {"saved": root / "saved", "saved_dict": root / "saved_dict", "hub": hub, "documents": len(rows)}


def files_mix(tmp_path: Path, *paths: str, field: str | None = None):
    overrides = ["data_mix=files", f"data_mix.paths=[{','.join(paths)}]", f"data_dir={tmp_path / 'data'}", "prepare.workers=0"]
    return compose_config(*overrides, *([f"data_mix.text_field={field}"] if field else []))


def prepared(tmp_path: Path) -> Path:
    return tmp_path / "data" / "prepared" / "files"


def test_own_jsonl_files_train_in_one_line_prepared_on_first_use_and_reused_by_the_next_run(tmp_path, caplog):
    write_jsonl_gz(tmp_path / "my" / "a.jsonl.gz", [{"id": k, "text": t, "url": f"https://docs.python.org/{k}"} for k, t in topics(0, 40)])
    write_jsonl_gz(tmp_path / "my" / "b.jsonl.gz", [{"id": k, "text": t, "url": f"https://docs.python.org/{k}"} for k, t in topics(40, 70)])
    one_line = ["data_mix=files", f"data_mix.paths=[{tmp_path}/my/*.jsonl.gz]", "debug=fast", f"data_dir={tmp_path / 'data'}"]
    run = subprocess.run(
        [sys.executable, "-m", "xgen.run", *one_line, "prepare.workers=0", f"hydra.run.dir={tmp_path / 'run1'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    manifest = json.loads((prepared(tmp_path) / "manifest.json").read_text())
    t = manifest["totals"]
    assert manifest["raw"]["text_field"] == "text" and manifest["text_field"]["how"].startswith("found: 'text'")
    assert "data_mix.sources.files: the text is field 'text' (found: 'text', a usual name for text" in run.stdout
    assert re.search(rf"preparing 2 files \(\d+\.\d KB\) into {prepared(tmp_path)}: tokenized once, reused by later runs", run.stdout)
    summary = f"prepared data_mix.sources.files: 2 files, {t['documents']:,} documents, {t['tokens']:,} tokens in 2 shards at {prepared(tmp_path)}"
    assert summary in run.stdout and t["documents"] + t["dropped_short"] == 70
    steps = [json.loads(line) for line in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3]

    # The next run (in this process) reuses the shards: nothing read, nothing written.
    before = {p: p.stat().st_mtime_ns for p in prepared(tmp_path).rglob("*")}
    cfg = compose_config(*one_line, "trainer.steps=1", f"hydra.run.dir={tmp_path / 'run2'}")
    validate(cfg)
    with caplog.at_level(logging.INFO, logger="xgen.data.prepare"):
        run_task(cfg, tmp_path / "run2")
    assert f"reusing data_mix.sources.files: 2 files, {t['documents']:,} documents" in caplog.text
    assert "preparing" not in caplog.text and {p: p.stat().st_mtime_ns for p in prepared(tmp_path).rglob("*")} == before

    # A file added to the set is prepared, alone; the others stay as they were.
    write_jsonl_gz(tmp_path / "my" / "c.jsonl.gz", [{"id": k, "text": t, "url": "u"} for k, t in topics(70, 80)])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xgen.data.prepare"):
        totals = ensure_prepared(cfg.data_mix, Tokenizer.xgen(), cfg.prepare)
    assert "prepare files: 3 files, 2 already prepared; 1 units to run" in caplog.text
    assert totals["files"]["files"] == 3 and totals["files"]["documents"] > t["documents"]

    # run2's checkpoint was trained on the two files' documents: going on over the three
    # files' (the same config) would continue it on another data order, and is refused.
    longer = compose_config(*one_line, "trainer.steps=2", "trainer.allow_changes=[trainer.steps]")
    with pytest.raises(ConfigError, match="the documents of data_mix source.s. files are not those the checkpoint was trained on"):
        run_task(longer, tmp_path / "run2")


def test_a_saved_hugging_face_dataset_folder_trains_in_one_line(hf_dataset, tmp_path):
    cfg = compose_config(
        "data_mix=files", f"data_mix.paths=[{hf_dataset['saved']}]", "debug=fast", "trainer.steps=2",
        f"data_dir={tmp_path / 'data'}", "prepare.workers=0",
    )  # fmt: skip
    validate(cfg)
    summary = run_task(cfg, tmp_path / "run")
    manifest = json.loads((prepared(tmp_path) / "manifest.json").read_text())
    # Both Arrow shards that state.json lists, read in its order; the text is the one string
    # column of a usual name ('title' is a string too, and is not read as the text).
    assert [Path(e["paths"][0]).name for e in manifest["files"].values()] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert manifest["raw"]["text_field"] == "content" and "among string fields title, content" in manifest["text_field"]["how"]
    assert manifest["totals"]["records"] == hf_dataset["documents"] and summary["steps"] == 2
    tok = Tokenizer.xgen()
    kept = [t for _, t in topics(0, 60) if len(tok.encode_ordinary(t)) >= 100]
    store = ShardStore(prepared(tmp_path), tok)
    assert [tok.decode(store.tokens(i)) for i in range(len(store))] == kept


def test_a_hub_parquet_download_reads_its_train_split_and_the_same_documents_as_the_saved_arrow(hf_dataset, tmp_path):
    totals = {}
    for name, path in (("hub", hf_dataset["hub"]), ("saved", hf_dataset["saved"]), ("saved_dict", hf_dataset["saved_dict"])):
        cfg = files_mix(tmp_path / name, str(path))
        if name == "hub":  # the one line trains on it
            cfg = compose_config("data_mix=files", f"data_mix.paths=[{path}]", "debug=fast", "trainer.steps=2", f"data_dir={tmp_path / name / 'data'}",
                                 "prepare.workers=0")
            validate(cfg)
            assert run_task(cfg, tmp_path / name / "run")["steps"] == 2
        totals[name] = prepare_mix(cfg.data_mix, Tokenizer.xgen(), cfg.prepare)["files"]
        store = ShardStore(prepared(tmp_path / name), Tokenizer.xgen())
        totals[name] = (totals[name]["records"], [store.tokens(i).tobytes() for i in range(len(store))])
    assert totals["hub"][0] == hf_dataset["documents"]  # the test split and README.md left out
    assert totals["hub"] == totals["saved"] == totals["saved_dict"]


def test_the_text_field_is_found_or_named(tmp_path):
    only = write_jsonl_gz(tmp_path / "only" / "x.jsonl.gz", [{"body": t, "score": 3, "tags": None} for _, t in topics(0, 3)])
    assert sources_to_prepare(files_mix(tmp_path, str(only)).data_mix)["files"].raw.text_field == "body"
    two = write_jsonl_gz(tmp_path / "two" / "x.jsonl.gz", [{"title": k, "abstract": t} for k, t in topics(0, 3)])
    named = files_mix(tmp_path, str(two), field="abstract")
    assert sources_to_prepare(named.data_mix)["files"].raw.text_field == "abstract"
    totals = prepare_mix(named.data_mix, Tokenizer.xgen(), named.prepare)["files"]
    assert totals["documents_read"] == 3 and "missing_field" not in totals
    manifest = json.loads((prepared(tmp_path) / "manifest.json").read_text())
    assert manifest["text_field"] == {"field": "abstract", "how": "named in the config"}


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"title": "t", "abstract": "a", "n": 1}], r"\S+x\.jsonl\.gz has several string fields \(title, abstract\), none of a usual name "
                                                     r"for text \(text, content, .*\); name it: data_mix\.text_field=title$"),
        ([{"text": "t", "code": "c"}], r"\S+x\.jsonl\.gz has several string fields of usual names for text \(text, code\); name it: data_mix\.text_field=text$"),
        ([{"tokens": [1, 2], "n": 1}], r"\S+x\.jsonl\.gz has no string field \(fields: tokens, n\); name it: data_mix\.text_field=<field>$"),
    ],
    ids=["two-unusual-strings", "two-usual-names", "no-string"],
)
def test_a_text_field_that_cannot_be_told_is_one_error_listing_the_fields(tmp_path, records, message):
    path = write_jsonl_gz(tmp_path / "x.jsonl.gz", records)
    with pytest.raises(ConfigError, match=r"^data_mix\.sources\.files: which field holds the text\? " + message):
        sources_to_prepare(files_mix(tmp_path, str(path)).data_mix)


def test_the_command_line_gets_that_error_in_one_line_without_a_traceback(tmp_path):
    write_jsonl_gz(tmp_path / "my" / "x.jsonl.gz", [{"title": k, "abstract": t} for k, t in topics(0, 3)])
    run = subprocess.run(
        [sys.executable, "-m", "xgen.run", "task=prepare", "data_mix=files", f"data_mix.paths=[{tmp_path}/my/*.jsonl.gz]",
         f"data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("xgen: config error: data_mix.sources.files: which field holds the text?")
    assert run.stderr.rstrip().endswith("name it: data_mix.text_field=title") and not prepared(tmp_path).exists()


def test_files_that_keep_their_text_in_different_fields_are_refused(tmp_path):
    write_jsonl_gz(tmp_path / "my" / "a.jsonl.gz", [{"text": "a"}])
    write_jsonl_gz(tmp_path / "my" / "b.jsonl.gz", [{"content": "b"}])
    with pytest.raises(ConfigError, match=r"hold their text in different fields \(\S+a\.jsonl\.gz: text, \S+b\.jsonl\.gz: content\); "):
        sources_to_prepare(files_mix(tmp_path, f"{tmp_path}/my/*").data_mix)


def test_a_dataset_dict_without_a_train_split_asks_for_one(hf_dataset, tmp_path):
    folder = tmp_path / "dd"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["validation", "test"]}))
    with pytest.raises(ConfigError, match=r"is a Hugging Face DatasetDict without a train split \(splits: validation, test\): "
                                          r"name the split to read, e.g. \S+/dd/validation$"):  # fmt: skip
        sources_to_prepare(files_mix(tmp_path, str(folder)).data_mix)


def test_paths_or_a_text_field_given_to_a_mix_that_does_not_read_them_are_refused_and_files_needs_paths():
    with pytest.raises(ConfigError, match=r"data_mix.paths is set but no source of data_mix=demo reads it"):
        validate(compose_config("data_mix.paths=[x.jsonl]"))
    with pytest.raises(ConfigError, match=r"data_mix.text_field=body is set but no source of data_mix=synthetic reads it"):
        validate(compose_config("data_mix=synthetic", "stage=s1_2k", "task=prepare", "data_mix.text_field=body"))
    with pytest.raises(ConfigError, match=r"data_mix=files: no files to read .*name them: data_mix.paths='\[my/\*.jsonl.gz\]'"):
        validate(compose_config("data_mix=files"))


def test_a_folder_of_split_files_reads_its_train_split_and_refuses_a_test_split_beside_unsplit_files(tmp_path):
    from xgen.config import ConfigError
    from xgen.data.inputs import folder_files

    splits = tmp_path / "splits"
    splits.mkdir()
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        (splits / name).write_text('{"text": "x"}\n')
    assert folder_files(str(splits)) == [f"{splits}/train.jsonl"]
    nested = tmp_path / "nested"
    for split in ("train", "test"):
        (nested / split).mkdir(parents=True)
        (nested / split / "part-0.jsonl").write_text('{"text": "x"}\n')
    assert folder_files(str(nested)) == [f"{nested}/train/part-0.jsonl"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("data.jsonl", "test.jsonl"):
        (mixed / name).write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match=r"holds split files \(test.jsonl\) beside files of no split"):
        folder_files(str(mixed))
