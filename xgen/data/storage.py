"""Files of prepared data on a local disk or an object store, through one set of calls.

`prepare` writes and training reads the same layout at a local path, `s3://` or `gs://`
(fsspec: s3fs, gcsfs; endpoints and credentials come from the environment, as fsspec
configures them: `FSSPEC_S3_ENDPOINT_URL`, `STORAGE_EMULATOR_HOST`, ...). The differences
that matter are kept here and nowhere else:

- a write is atomic: locally a uniquely named temporary file renamed into place, on an
  object store one PUT (an object is never seen half-written);
- a file's identity without reading it: locally size and modification time; on object
  stores the store's own checksum (S3's ETag, GCS's crc32c), which changes with any byte;
- reads of a byte range are ranged GETs on object stores, `pread`s locally.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import fsspec

from xgen.config import ConfigError


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def join(root: str | Path, *names: str) -> str:
    """`root/names...` for local paths and URLs alike."""
    return "/".join([str(root).rstrip("/"), *names])


def filesystem(path: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem for `path` and the path as it names it; an unknown or
    uninstalled protocol is one line naming the extra to install."""
    try:
        return fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as ex:
        protocol = str(path).split("://")[0]
        extra = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(protocol)
        hint = f": pip install {extra}" if extra else ""
        raise ConfigError(f"{path}: cannot open {protocol}:// ({ex}){hint}") from None


def makedirs(path: str | Path) -> None:
    if not is_url(path):
        Path(path).mkdir(parents=True, exist_ok=True)  # object stores have no folders


def read_bytes(path: str | Path) -> bytes:
    if not is_url(path):
        return Path(path).read_bytes()
    fs, p = filesystem(path)
    return fs.cat_file(p)


def read_range(path: str | Path, start: int, stop: int) -> bytes:
    """Bytes `start:stop` of a file: one ranged GET on an object store."""
    if not is_url(path):
        with open(path, "rb") as fh:
            return os.pread(fh.fileno(), stop - start, start)
    fs, p = filesystem(path)
    return fs.cat_file(p, start=start, end=stop)


def exists(path: str | Path) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = filesystem(path)
    fs.invalidate_cache(p)  # fsspec answers from its last listing, which another process may have outdated
    return fs.exists(p)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically: readers see the old file or the new one, never a part."""
    if is_url(path):
        fs, p = filesystem(path)
        fs.pipe_file(p, data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def staging_dir(root: str | Path) -> str:
    """A private folder for files being written: on the same disk as `root` (so a rename
    commits them), or in the system's temporary folder when `root` is an object store."""
    if is_url(root):
        return tempfile.mkdtemp(prefix="xgen-stage-")
    makedirs(root)
    return tempfile.mkdtemp(prefix=".stage-", dir=str(root))


def commit_file(staged: str, dest: str) -> None:
    """Move a finished staged file to its final name (a rename, or an upload then delete)."""
    if is_url(dest):
        fs, p = filesystem(dest)
        fs.put_file(staged, p)
        os.unlink(staged)
    else:
        os.replace(staged, dest)


def remove(path: str | Path) -> None:
    if not is_url(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    fs, p = filesystem(path)
    try:
        fs.rm_file(p)
    except FileNotFoundError:
        pass


def identity(info: dict) -> str:
    """What says a file is unchanged, from the store's metadata (no read): S3's ETag, GCS's
    crc32c, functions of the bytes; locally the modification time in nanoseconds."""
    for key in ("ETag", "crc32c", "md5Hash", "mtime_ns"):  # not GCS's etag/generation: new on every write
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("updated") or info.get("LastModified") or ""
    return f"mtime:{mtime}"


def stat(path: str) -> tuple[int, str]:
    """(size, identity) of one file."""
    if not is_url(path):
        st = os.stat(path)
        return st.st_size, f"mtime_ns:{st.st_mtime_ns}"
    fs, p = filesystem(path)
    fs.invalidate_cache(p)
    info = fs.info(p)
    return int(info["size"]), identity(info)


def listing(folder: str | Path) -> dict[str, tuple[int, str]]:
    """Name -> (size, identity) of the files directly in `folder` (one LIST call on an
    object store; a missing folder is empty)."""
    if not is_url(folder):
        out = {}
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return {}
        for e in entries:
            if e.is_file():
                st = e.stat()
                out[e.name] = (st.st_size, f"mtime_ns:{st.st_mtime_ns}")
        return out
    fs, p = filesystem(folder)
    fs.invalidate_cache(p)  # another process (a worker) wrote here since the last listing
    try:
        infos = fs.ls(p, detail=True)
    except FileNotFoundError:
        return {}
    return {i["name"].rstrip("/").rsplit("/", 1)[-1]: (int(i["size"]), identity(i)) for i in infos if i.get("type") != "directory"}


def local_copy(path: str, cache_root: str | Path, key: str) -> Path:
    """A local file with `path`'s bytes (itself when local): object-store index arrays are
    downloaded once per `key` into `cache_root`, then memory-mapped."""
    if not is_url(path):
        return Path(path)
    dest = Path(cache_root) / key / path.rsplit("/", 1)[-1]
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs, p = filesystem(path)
        tmp = f"{dest}.tmp-{uuid.uuid4().hex[:12]}"
        fs.get_file(p, tmp)
        os.replace(tmp, dest)
    return dest
