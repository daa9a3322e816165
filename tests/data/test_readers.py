import bz2
import gzip
import json
import lzma
import re
from collections import Counter

import pytest

from xgen.config import ConfigError, RawInputConfig
from xgen.data.readers import detect_format, read_documents
from xgen.data.synthetic import write_corpus


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("raw"))


def read(path, **spec):
    counts = Counter()
    docs = list(read_documents(str(path), RawInputConfig(**spec), counts))
    return docs, counts


@pytest.mark.parametrize("name", ["part-0.jsonl", "part-1.jsonl.gz", "part-2.jsonl.zst"])
def test_json_lines_plain_gzip_and_zstd_read_every_record(raw, name):
    docs, counts = read(raw / "prose" / name, meta={"source": "source"})
    assert len(docs) > 50 and counts["documents_read"] == len(docs) == counts["records"]
    assert all(meta == {"source": "python-docs"} for _, meta in docs)
    assert counts.pop("raw_bytes") == (raw / "prose" / name).stat().st_size  # every byte read once
    assert sum(counts.values()) == 2 * len(docs)  # nothing but records and documents counted


def test_parquet_reads_text_and_metadata(raw):
    pytest.importorskip("pyarrow")
    docs, counts = read(raw / "starcoder" / "rust.parquet", text_field="content", meta={"language": "language", "license": "license"})
    assert len(docs) == 5 and all(m["language"] == "rust" and "license" in m for _, m in docs)
    assert "fn f" in docs[0][0]


def test_plain_text_is_one_document(raw):
    docs, _ = read(raw / "prose" / "part-3.txt")
    assert len(docs) == 1 and len(docs[0][0]) > 1000


def test_empty_file_is_counted(raw):
    docs, counts = read(raw / "prose" / "empty.jsonl")
    assert docs == [] and counts["empty_files"] == 1


def test_truncated_gzip_keeps_what_came_before_the_cut_and_is_counted(raw):
    docs, counts = read(raw / "prose" / "truncated.jsonl.gz")
    assert counts["corrupt_files"] == 1 and 0 < len(docs) < 50


def test_truncated_zstd_is_counted(raw, tmp_path):
    data = (raw / "prose" / "part-2.jsonl.zst").read_bytes()
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(data[: len(data) // 2])
    docs, counts = read(cut)
    assert counts["corrupt_files"] == 1


def test_text_file_that_is_not_utf8_is_skipped_and_counted(raw):
    docs, counts = read(raw / "prose" / "latin1.txt")
    assert docs == [] and counts["invalid_utf8"] == 1


def test_bad_json_lines_are_skipped_and_counted_per_kind(raw):
    docs, counts = read(raw / "prose" / "mixed-quality.jsonl", meta={"source": "source"})
    assert len(docs) == 2
    assert counts["malformed_json"] == 1 and counts["invalid_utf8"] == 1 and counts["missing_field"] == 2


def test_format_is_inferred_from_the_name():
    assert detect_format("a/b.jsonl.zst", None) == "jsonl"
    assert detect_format("gs://bucket/x.parquet", None) == "parquet"
    assert detect_format("notes.md", None) == "text"
    assert detect_format("weird.bin", "jsonl") == "jsonl"


def write(path, data: bytes):
    path.write_bytes(data)
    return path


RECORDS = [{"text": f"document {i}", "meta": {"set": "a"}} for i in range(3)]
LINES = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()


def test_a_json_file_holding_an_array_is_read_as_an_array_and_one_holding_lines_as_lines(tmp_path):
    array = write(tmp_path / "a.json", json.dumps(RECORDS, indent=2).encode())
    lines = write(tmp_path / "b.json", LINES)
    for path in (array, lines):
        docs, counts = read(path, meta={"set": "meta.set"})
        assert [d for d, _ in docs] == ["document 0", "document 1", "document 2"], path
        assert all(m == {"set": "a"} for _, m in docs) and counts["records"] == 3


@pytest.mark.parametrize("suffix, compress", [(".jsonl.bz2", bz2.compress), (".jsonl.xz", lzma.compress), (".json.gz", gzip.compress)])
def test_bz2_and_xz_are_read_by_name(tmp_path, suffix, compress):
    docs, counts = read(write(tmp_path / f"part{suffix}", compress(LINES)))
    assert len(docs) == 3 and counts["corrupt_files"] == 0


@pytest.mark.parametrize("name", ["shard.jsonl.lz4", "dump.zip", "dump.tar", "dump.7z", "c4.jsonl.br"])
def test_archives_and_unknown_codecs_are_refused_by_name_not_read_as_text(tmp_path, name):
    path = write(tmp_path / name, b"\x04\x22\x4d\x18 binary")
    with pytest.raises(ConfigError, match=rf"{re.escape(name)}: \w+ files are not read"):
        read(path)


def test_a_text_file_with_one_bad_byte_loses_that_document_only(tmp_path):
    write(tmp_path / "good.txt", ("A clean document. " * 20).encode())
    write(tmp_path / "bad.txt", ("Almost clean " * 20).encode() + b"\xff" + b" tail")
    counts = Counter()
    spec = RawInputConfig()
    docs = [d for p in sorted(tmp_path.glob("*.txt")) for d in read_documents(str(p), spec, counts)]
    assert len(docs) == 1 and docs[0][0].startswith("A clean") and counts["invalid_utf8"] == 1


def test_records_that_break_the_json_parser_are_skipped_and_counted(tmp_path):
    deep = b"[" * 200_000 + b"]" * 200_000
    huge = b'{"text": "x", "n": ' + b"7" * 5000 + b"}"
    data = LINES + deep + b"\n" + huge + b"\n" + b'{"text": ' + b"[" * 200_000 + b"\n" + LINES
    docs, counts = read(write(tmp_path / "hostile.jsonl", data))
    assert len(docs) == 6 and counts["malformed_json"] == 3
    docs, counts = read(write(tmp_path / "hostile.json", deep))  # a .json "array" that nests too deep
    assert docs == [] and counts["malformed_json"] == 1


def test_nested_addresses_lists_and_path_components():
    from xgen.data.addresses import LIST_SEP, Address, stored_value

    record = {"meta": {"language": [{"name": "Python", "bytes": "10"}, {"name": "Shell"}], "set": "RedPajamaC4"}, "n": 3}
    assert stored_value(Address.parse("meta.language[].name").get(record, ())) == f"Python{LIST_SEP}Shell"
    assert stored_value(Address.parse("meta.set").get(record, ())) == "RedPajamaC4"
    assert stored_value(Address.parse("n").get(record, ())) == "3"
    assert Address.parse("meta.missing.deeper").get(record, ()) is None
    assert Address.parse("path:0").get(record, ("python", "train-00000-of-00001.parquet")) == "python"
    assert Address.parse("path:-2").get(record, ("data", "go", "data-00000.parquet")) == "go"
    with pytest.raises(ConfigError, match="path:N needs an integer"):
        Address.parse("path:x")


def test_missing_metadata_is_counted_per_field(raw):
    docs, counts = read(raw / "starcoder" / "rust.parquet", text_field="content", meta={"language": "language", "license": "no_such_column"})
    assert len(docs) == 5 and counts["missing_meta:license"] == 5 and all("license" not in m for _, m in docs)


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    """A Hugging Face dataset as `datasets.Dataset.save_to_disk` writes it: Arrow IPC streams."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path_factory.mktemp("saved")
    rows = {"id": [1, 2, 3], "title": ["a", "b", None], "text": ["first text", "second text", "third text"], "score": [0.5, 1.0, 2.0]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    return folder / "data-00000-of-00001.arrow"


def test_an_arrow_stream_saved_by_datasets_reads_text_and_metadata(saved_dataset):
    docs, counts = read(saved_dataset, meta={"title": "title"})
    assert docs == [("first text", {"title": "a"}), ("second text", {"title": "b"}), ("third text", {})]
    assert counts["missing_meta:title"] == 1 and counts["records"] == 3
    assert counts["raw_bytes"] == saved_dataset.stat().st_size  # hashed whole, once


def test_an_arrow_ipc_file_reads_like_the_stream_and_a_cut_one_is_counted_as_corrupt(saved_dataset, tmp_path):
    import pyarrow as pa
    import pyarrow.feather

    table = pa.ipc.open_stream(saved_dataset.read_bytes()).read_all()
    pyarrow.feather.write_feather(table, tmp_path / "same.arrow", compression="uncompressed")
    assert read(tmp_path / "same.arrow")[0] == read(saved_dataset)[0]
    data = saved_dataset.read_bytes()
    (tmp_path / "cut.arrow").write_bytes(data[: len(data) - 40])
    docs, counts = read(tmp_path / "cut.arrow")
    assert counts["corrupt_files"] == 1 and len(docs) < 3


def test_text_fields_come_from_the_schema_or_the_first_records(saved_dataset, tmp_path):
    from xgen.data.readers import text_fields

    assert text_fields(str(saved_dataset), None) == (["title", "text"], ["id", "title", "text", "score"])
    lines = tmp_path / "x.jsonl"
    records = [{"id": 1, "body": "b", "tags": None, "n": "1"}, {"id": 2, "body": 42, "n": 2}, {"id": 3, "body": "d", "n": 3}]
    lines.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    # A string in most records is a text field (one bad record does not hide it); null, or a
    # string in a few records only, is not.
    assert text_fields(str(lines), None) == (["body"], ["id", "body", "tags", "n"])
    assert text_fields(str(tmp_path / "notes.txt"), None) is None  # a text file has no fields
    assert detect_format("x.arrow", None) == "arrow"
    with pytest.raises(ConfigError, match="a compressed Arrow file is not read"):
        detect_format("x.arrow.gz", None)
