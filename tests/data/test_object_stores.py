"""The local object stores (tests/storage_servers.py) through plain fsspec calls, as xgen makes
them: no endpoint or credential arguments, only the environment. Each check runs twice per store:
in a fresh `python` started with `os.environ | store.env` (the env alone configures it) and in this
process inside `store.applied()` (for tests that call library functions directly).

The checks are module-level functions taking a URL and returning JSON, so both routes run the same
code; the fresh process imports this module and calls one by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import fsspec
import pytest

REPO = Path(__file__).resolve().parents[2]

# The key that names an object's content in `ls(detail=True)`/`info()`: S3's MD5 ETag ('"<hex>"'
# for a one-part upload), GCS's base64 MD5 (also "crc32c"; "generation" changes on every write).
IDENTITY = {"s3": "ETag", "gs": "md5Hash"}
ALPHABET = b"0123456789abcdefghijklmnopqrstuvwxyz"


def _identity(info: dict) -> str:
    return str(info.get("ETag") or info.get("md5Hash"))


# --------------------------------------------------------------------------------------------
# The checks (run in either route)


def check_write_and_read(url: str) -> dict:
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/piped.bin", ALPHABET)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "local.txt"
        local.write_bytes(ALPHABET.upper())
        fs.put_file(str(local), f"{root}/uploaded.txt")
    with fsspec.open(f"{url}/piped.bin", "rb") as f:
        f.seek(10)
        seek_read = f.read(10)
    with fsspec.open(f"{url}/uploaded.txt", "rt") as f:
        text = f.read()
    return {
        "fs": type(fs).__name__,
        "whole": fs.cat_file(f"{root}/piped.bin").decode(),
        "range": fs.cat_file(f"{root}/piped.bin", start=10, end=20).decode(),
        "seek_read": seek_read.decode(),
        "tail": fs.cat_file(f"{root}/uploaded.txt", start=-6, end=36).decode(),
        "suffix": fs.cat_file(f"{root}/uploaded.txt", start=-6).decode(),  # a "bytes=-6" request
        "uploaded_text": text,
        "sizes": [fs.info(f"{root}/piped.bin")["size"], fs.size(f"{root}/uploaded.txt")],
    }


def check_listing(url: str) -> dict:
    fs, root = fsspec.core.url_to_fs(url)
    for name, size in (("c.jsonl", 3), ("a.jsonl", 1), ("b.jsonl", 20), ("notes.txt", 7)):
        fs.pipe_file(f"{root}/dir/{name}", b"x" * size)
    fs.pipe_file(f"{root}/dir/sub/d.jsonl", b"y")
    listing = fs.ls(f"{root}/dir", detail=True)
    _, _, paths = fsspec.get_fs_token_paths(f"{url}/dir/*.jsonl")
    fresh = fsspec.filesystem(fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol, skip_instance_cache=True)
    info = fresh.info(f"{root}/dir/b.jsonl")
    return {
        "root": root,
        "listing": sorted((e["name"], e["type"], e["size"], _identity(e) if e["type"] == "file" else None) for e in listing),
        "glob_paths": paths,
        "glob": fs.glob(f"{root}/dir/**/*.jsonl"),
        "info_keys": sorted(info),
        "ls_keys": sorted(next(e for e in listing if e["type"] == "file")),
        "info_size": info["size"],
        "info_identity": _identity(info),
    }


def check_overwrite(url: str) -> dict:
    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root}/obj.bin"
    identities = []
    for content in (ALPHABET, ALPHABET[::-1], ALPHABET[::-1]):  # new bytes of the same size, then the same bytes
        fs.pipe_file(path, content)
        fs.invalidate_cache()
        info = fs.info(path)
        listed = next(e for e in fs.ls(root, detail=True) if e["name"] == path)
        identities.append(
            {"info": _identity(info), "ls": _identity(listed), "size": info["size"], "generation": info.get("generation")}
        )
    return {"identities": identities, "content": fs.cat_file(path).decode()}


def check_remove(url: str) -> dict:
    fs, root = fsspec.core.url_to_fs(url)
    for name in ("keep.txt", "gone.txt", "tree/a.txt", "tree/b/c.txt"):
        fs.pipe_file(f"{root}/{name}", b"1")
    fs.rm(f"{root}/gone.txt")
    fs.rm(f"{root}/tree", recursive=True)
    fs.invalidate_cache()
    return {
        "exists": [fs.exists(f"{root}/{n}") for n in ("keep.txt", "gone.txt", "tree/a.txt", "tree/b/c.txt")],
        "left": fs.find(root),
        "root": root,
    }


# --------------------------------------------------------------------------------------------
# Routes


def _fresh_process(store, check: str, url: str) -> dict:
    code = "import json, sys; from tests.data import test_object_stores as t; print(json.dumps(getattr(t, sys.argv[1])(sys.argv[2])))"
    proc = subprocess.run(
        [sys.executable, "-c", code, check, url],
        env=store.subprocess_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"{proc.stderr[-4000:]}\n--- server log ---\n{store.log()[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _in_process(store, check: str, url: str) -> dict:
    with store.applied():
        return json.loads(json.dumps(globals()[check](url)))


ROUTES = {"fresh process": _fresh_process, "in process": _in_process}


@pytest.fixture(params=list(ROUTES))
def run_check(request, object_store):
    def run(check: str, name: str) -> tuple[dict, str]:
        url = object_store.unique_url(name)
        return ROUTES[request.param](object_store, check, url), url

    run.store = object_store
    return run


# --------------------------------------------------------------------------------------------
# Tests


def test_an_object_piped_or_uploaded_reads_back_whole_by_byte_range_and_by_seek(run_check):
    got, _ = run_check("check_write_and_read", "rw")
    assert got["fs"] == {"s3": "S3FileSystem", "gs": "GCSFileSystem"}[run_check.store.protocol]
    assert got["whole"] == ALPHABET.decode()
    assert got["range"] == got["seek_read"] == "abcdefghij"
    assert got["tail"] == "UVWXYZ" and got["uploaded_text"] == ALPHABET.decode().upper()
    # A suffix range (start < 0, no end): gcp-storage-emulator ignores "Range: bytes=-6" and sends
    # the whole object with a 200, which gcsfs returns as is (real GCS honours it). Pinned here
    # so that reading a tail through the emulator is known to need an explicit end.
    suffix = {"s3": "UVWXYZ", "gs": ALPHABET.decode().upper()}[run_check.store.protocol]
    assert got["suffix"] == suffix
    assert got["sizes"] == [36, 36]


def test_a_listing_gives_each_objects_size_and_content_identity_and_a_glob_matches_sorted(run_check):
    got, url = run_check("check_listing", "ls")
    root, key = got["root"], IDENTITY[run_check.store.protocol]
    files = [(name, size) for name, kind, size, _ in got["listing"] if kind == "file"]
    assert files == [(f"{root}/dir/{n}", s) for n, s in (("a.jsonl", 1), ("b.jsonl", 20), ("c.jsonl", 3), ("notes.txt", 7))]
    assert [name for name, kind, *_ in got["listing"] if kind == "directory"] == [f"{root}/dir/sub"]
    identities = [ident for _, kind, _, ident in got["listing"] if kind == "file"]
    assert all(identities) and identities[0] != identities[2], identities  # 1 vs 3 bytes of "x"
    assert key in got["ls_keys"] and key in got["info_keys"] and "size" in got["ls_keys"]
    assert got["info_size"] == 20 and got["info_identity"] == identities[1]
    assert got["glob_paths"] == [f"{root}/dir/{n}" for n in ("a.jsonl", "b.jsonl", "c.jsonl")]
    assert got["glob"] == [f"{root}/dir/{n}" for n in ("a.jsonl", "b.jsonl", "c.jsonl", "sub/d.jsonl")]


def test_overwriting_an_object_with_other_bytes_of_the_same_size_changes_its_identity(run_check):
    got, _ = run_check("check_overwrite", "ow")
    first, second, same_again = got["identities"]
    assert first["size"] == second["size"] == 36
    assert first["info"] == first["ls"] and second["info"] == second["ls"]
    assert first["info"] != second["info"]
    assert same_again["info"] == second["info"]  # an MD5: the same bytes, the same identity
    if run_check.store.protocol == "gs":  # a generation is per write, even of the same bytes
        assert len({first["generation"], second["generation"], same_again["generation"]}) == 3
    assert got["content"] == ALPHABET[::-1].decode()


def test_rm_removes_an_object_and_a_recursive_rm_a_prefix(run_check):
    got, _ = run_check("check_remove", "rm")
    assert got["exists"] == [True, False, False, False]
    assert got["left"] == [f"{got['root']}/keep.txt"]


def test_applying_a_store_env_in_process_is_undone_on_exit(s3_store, gcs_store):
    import fsspec.config

    before_env, before_conf = dict(os.environ), json.dumps(fsspec.config.conf, sort_keys=True, default=str)
    with s3_store.applied():
        fs, _ = fsspec.core.url_to_fs(s3_store.url)
        assert fs.storage_options["endpoint_url"] == s3_store.endpoint
        assert fs.exists(s3_store.url)
    with gcs_store.applied():
        fs, _ = fsspec.core.url_to_fs(gcs_store.url)
        assert fs._location == gcs_store.endpoint and fs.exists(gcs_store.url)
    assert dict(os.environ) == before_env
    assert json.dumps(fsspec.config.conf, sort_keys=True, default=str) == before_conf


def test_gcs_in_process_is_quick_even_when_gcsfs_was_imported_before_the_env(gcs_store):
    """gcsfs picks its extended class (a gRPC bucket-layout lookup that the emulator makes wait
    60 s per write) at import: applying the env later must still give the plain class."""
    code = (
        "import json, sys, time, gcsfs, fsspec; from tests.storage_servers import apply_env\n"
        "assert gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem\n"
        "with apply_env(json.loads(sys.argv[1])):\n"
        "    t = time.monotonic(); fs, p = fsspec.core.url_to_fs(sys.argv[2]); fs.pipe_file(p, b'x'); fs.cat_file(p)\n"
        "    print(type(fs).__name__, time.monotonic() - t)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in gcs_store.env}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(gcs_store.env), gcs_store.unique_url("late") + "/x"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    name, seconds = proc.stdout.split()
    assert name == "GCSFileSystem" and float(seconds) < 10
