from collections import Counter

import pytest

from xgen.config import RawInputConfig
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
    docs, counts = read(raw / "prose" / name, meta_fields=["source"])
    assert len(docs) > 50 and counts["documents_read"] == len(docs) == counts["records"]
    assert all(meta == {"source": "python-docs"} for _, meta in docs)
    assert sum(counts.values()) == 2 * len(docs)  # nothing but records and documents counted


def test_parquet_reads_text_and_metadata(raw):
    pytest.importorskip("pyarrow")
    docs, counts = read(raw / "starcoder" / "rust.parquet", text_field="content", meta_fields=["language", "license"])
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
    docs, counts = read(raw / "prose" / "mixed-quality.jsonl", meta_fields=["source"])
    assert len(docs) == 2
    assert counts["malformed_json"] == 1 and counts["invalid_utf8"] == 1 and counts["missing_field"] == 2


def test_format_is_inferred_from_the_name():
    assert detect_format("a/b.jsonl.zst", None) == "jsonl"
    assert detect_format("gs://bucket/x.parquet", None) == "parquet"
    assert detect_format("notes.md", None) == "text"
    assert detect_format("weird.bin", "jsonl") == "jsonl"
