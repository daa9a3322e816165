"""Local object-store servers for tests: S3 (moto's server mode) and GCS (gcp-storage-emulator).

xgen opens `s3://` and `gs://` URLs through fsspec with no endpoint or credential arguments, so
each server is reached purely through environment variables: `store.env`. A fresh process started
with `os.environ | store.env` talks to the server; the current process does inside
`with store.applied():` (which also updates fsspec's config, read from the environment only at
import, and drops the cached filesystem instances).

    with s3_server() as store:       # or gcs_server(); the fixtures in tests/data/conftest.py
        url = store.unique_url("run")  # "s3://xgen-test/run-1a2b3c4d", a prefix no other test uses
        subprocess.run([sys.executable, "-m", "xgen.run", f"data_dir={url}"], env=store.subprocess_env(), check=True)
        with store.applied():
            fs, path = fsspec.core.url_to_fs(url)

Each server is a subprocess on a free 127.0.0.1 port, in memory, started in about a second and
terminated (then killed) on exit. Its log goes to a file, not a pipe: moto logs every request,
and a pipe nobody reads would fill and stall it.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BUCKET = "xgen-test"
START_TIMEOUT_S = 30.0


def _no_proxy() -> dict[str, str]:
    """In both stores' env: requests to 127.0.0.1 never go through a proxy set on the machine."""
    have = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    value = ",".join(filter(None, [have, "127.0.0.1", "localhost"]))
    return {"NO_PROXY": value, "no_proxy": value}


@dataclass
class StoreServer:
    """A running local object store: `url` is its bucket ("s3://xgen-test"), `env` the variables
    that point fsspec (and boto/google clients) at it."""

    protocol: str  # "s3" or "gs"
    bucket: str
    endpoint: str  # http://127.0.0.1:<port>
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.bucket}"

    def unique_url(self, name: str = "t") -> str:
        """A fresh prefix in the bucket: the server lives for the whole session (one per xdist
        worker), so tests keep apart by prefix."""
        return f"{self.url}/{name}-{uuid.uuid4().hex[:8]}"

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """The environment for a child process (`python -m xgen.run ...`) that uses this store."""
        return os.environ | self.env | extra

    def applied(self) -> contextlib.AbstractContextManager[None]:
        """In this process, for the `with` block: the env set, fsspec's config and instance caches
        refreshed; all restored after."""
        return apply_env(self.env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# ---------------------------------------------------------------------------------------------
# Applying an env in this process


def _cached_fs_classes() -> list[type]:
    """The s3fs/gcsfs classes imported so far (each fsspec class has its own instance cache)."""
    classes = []
    if "s3fs" in sys.modules:
        classes.append(sys.modules["s3fs"].S3FileSystem)
    if "gcsfs" in sys.modules:
        classes.append(sys.modules["gcsfs.core"].GCSFileSystem)
        classes.append(sys.modules["gcsfs"].GCSFileSystem)  # the extended one, unless turned off
    return classes


def _clear_instance_caches() -> None:
    for cls in _cached_fs_classes():
        cls.clear_instance_cache()


@contextlib.contextmanager
def apply_env(env: dict[str, str]) -> Iterator[None]:
    """Set `env` in os.environ and in fsspec's config (`FSSPEC_<PROTO>_<KWARG>` is read into
    `fsspec.config.conf` only when fsspec is imported), clear s3fs/gcsfs instance caches (an
    instance keeps its credentials and listings) and, if gcsfs was imported before
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set, map gs:// to gcsfs's plain class. Everything is
    restored on exit."""
    import fsspec.config

    registry = importlib.import_module("fsspec.registry")
    saved_environ = {k: os.environ.get(k) for k in env}
    saved_conf = copy.deepcopy(fsspec.config.conf)
    saved_registry = {p: registry._registry.get(p) for p in ("gs", "gcs")}
    try:
        os.environ.update(env)
        # The same dict object (fsspec.spec imported it by name), updated in place.
        fsspec.config.set_conf_env(fsspec.config.conf, {k: v for k, v in env.items() if k.startswith("FSSPEC_")})
        if env.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT") == "false" and "gcsfs" in sys.modules:
            plain = sys.modules["gcsfs.core"].GCSFileSystem
            for proto in ("gs", "gcs"):
                registry.register_implementation(proto, plain, clobber=True)
        _clear_instance_caches()
        yield
    finally:
        for k, v in saved_environ.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.config.conf.clear()
        fsspec.config.conf.update(saved_conf)
        for proto, cls in saved_registry.items():
            if cls is None:
                registry._registry.pop(proto, None)
            else:
                registry._registry[proto] = cls
        _clear_instance_caches()


# ---------------------------------------------------------------------------------------------
# Starting servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@contextlib.contextmanager
def _server(name: str, argv_for_port, ready_path: str, attempts: int = 3) -> Iterator[tuple[int, subprocess.Popen, Path]]:
    """Start `argv_for_port(port)` on a free port, wait until GET `ready_path` answers 200, yield
    (port, process, log path); terminate then kill on exit. A start that dies at once (another
    process took the port between our probe and its bind) is retried on a new port."""
    log_dir = Path(tempfile.mkdtemp(prefix=f"xgen-{name}-"))
    errors = []
    for attempt in range(attempts):
        port = free_port()
        log_path = log_dir / f"server-{port}.log"
        log = open(log_path, "wb")
        proc = subprocess.Popen(
            argv_for_port(port),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | _no_proxy() | {"PYTHONUNBUFFERED": "1"},
            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if _request(port, "GET", ready_path) == 200:
                    ready = True
                    break
            except OSError:
                pass
            time.sleep(0.05)
        if ready:
            break
        _stop(proc)
        log.close()
        errors.append(
            f"{name} on port {port} {'exited with ' + str(proc.returncode) if proc.returncode else 'did not answer'} "
            f"within {START_TIMEOUT_S:.0f} s; its output:\n{log_path.read_text(errors='replace')[-4000:]}"
        )
    else:
        raise RuntimeError(f"could not start {name} ({attempts} tries):\n" + "\n".join(errors))
    try:
        yield port, proc, log_path
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(log_dir, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the process that started it dies, so a
    killed pytest worker leaves no server behind. Only from the main thread: the signal follows
    the thread that forked, not the process."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        # s3fs: read into fsspec.config.conf["s3"]["endpoint_url"] at import; part of the instance
        # token too, so two servers (or a real S3) never share a cached instance.
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        # botocore's own endpoint setting (1.31+): plain boto3/aiobotocore clients use it too.
        "AWS_ENDPOINT_URL_S3": endpoint,
        # moto accepts any keys; with none botocore would walk its credential chain (files, IMDS).
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # No instance-metadata lookups (169.254.169.254), no profile files from the machine.
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        **_no_proxy(),
    }


def gcs_env(endpoint: str) -> dict[str, str]:
    return {
        # gcsfs reads it on every request: the JSON API at http://127.0.0.1:<port>/storage/v1/.
        "STORAGE_EMULATOR_HOST": endpoint,
        # No credentials lookup: token=None tries google.auth.default (metadata server included).
        "FSSPEC_GCS_TOKEN": "anon",
        # gcsfs >= 2026 maps gs:// to ExtendedGcsFileSystem, which asks the gRPC storage-control
        # API for each bucket's layout: against the emulator (HTTP only) every write waits out a
        # 60 s retry before falling back, and the failure is not cached. Read at `import gcsfs`.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        **_no_proxy(),
    }


@contextlib.contextmanager
def s3_server(bucket: str = BUCKET) -> Iterator[StoreServer]:
    """moto's S3 server (in memory) with `bucket` created."""
    argv = lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]  # noqa: E731
    with _server("moto S3 server", argv, "/") as (port, proc, log_path):
        endpoint = f"http://127.0.0.1:{port}"
        status = _request(port, "PUT", f"/{bucket}")  # moto takes unsigned requests
        if status != 200:
            raise RuntimeError(f"moto: creating bucket {bucket} answered {status}:\n{log_path.read_text(errors='replace')}")
        yield StoreServer("s3", bucket, endpoint, s3_env(endpoint), log_path, proc)


@contextlib.contextmanager
def gcs_server(bucket: str = BUCKET) -> Iterator[StoreServer]:
    """gcp-storage-emulator (in memory) with `bucket` created."""
    argv = lambda port: [  # noqa: E731
        sys.executable, "-m", "gcp_storage_emulator", "start",
        "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", bucket,
    ]  # fmt: skip
    with _server("gcp-storage-emulator", argv, f"/storage/v1/b/{bucket}") as (port, proc, log_path):
        endpoint = f"http://127.0.0.1:{port}"
        yield StoreServer("gs", bucket, endpoint, gcs_env(endpoint), log_path, proc)


SERVERS = {"s3": s3_server, "gs": gcs_server}
