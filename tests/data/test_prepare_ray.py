"""`prepare.engine=ray`: Ray core tasks, on a local Ray started by the tests (as a cluster
would be) or by the task itself; output byte-identical to the local engine's, whatever dies."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.data.test_prepare_units import kill_one_when, spec_for, tree, write_lines_corpus
from xgen.config import PrepareConfig
from xgen.data.prepare import prepare_source
from xgen.tokenizer import Tokenizer

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[2]
TOK = Tokenizer.xgen()
OPTS = dict(split_bytes=60_000, shard_tokens=30_000)


@pytest.fixture(scope="module")
def cluster():
    """A running Ray, as `ray start` on a head node gives; its address for other drivers."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus and its output from one local worker (the reference)."""
    root = tmp_path_factory.mktemp("ray")
    raw = write_lines_corpus(root / "raw", files=4, records=500)
    prepare_source("s", root / "local-1", spec_for(raw), TOK, 5, PrepareConfig(workers=1, **OPTS))
    return raw, tree(root / "local-1")


def test_two_ray_workers_give_the_bytes_of_one_local_worker(cluster, corpus, tmp_path):
    raw, reference = corpus
    prepare_source("s", tmp_path / "ray-2", spec_for(raw), TOK, 5, PrepareConfig(engine="ray", workers=2, **OPTS))
    assert tree(tmp_path / "ray-2") == reference


def _unit_workers() -> list[int]:
    """Ray worker processes running a unit now (Ray titles a busy worker `ray::<task>`)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::run_unit"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


@pytest.mark.parametrize("after_units", [0, 30, 120])
def test_a_ray_worker_killed_mid_unit_is_retried_and_the_output_is_byte_identical(cluster, corpus, tmp_path, after_units):
    raw, reference = corpus
    thread, done, killed = kill_one_when(_unit_workers, tmp_path / "out" / "units", after_units)
    try:
        prepare_source("s", tmp_path / "out", spec_for(raw), TOK, 5, PrepareConfig(engine="ray", workers=2, **OPTS))
    finally:
        done.set()
        thread.join()
    assert killed, "no unit was running to kill"
    assert tree(tmp_path / "out") == reference
    assert sum(name.startswith("units/") for name in reference) > 120


def _prepare_command(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "xgen.run", "task=prepare", "data_mix=synthetic", f"data_dir={data_dir}",
            "prepare.split_bytes=20000", "prepare.shard_tokens=20000", f"hydra.run.dir={run_dir}", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def synthetic_reference(tmp_path_factory):
    from xgen.data.synthetic import write_corpus

    data_dir = tmp_path_factory.mktemp("driver")
    write_corpus(data_dir / "synthetic" / "raw")
    proc = subprocess.run(_prepare_command(data_dir, data_dir / "run-0", "prepare.workers=0"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    prepared = data_dir / "synthetic" / "prepared"
    reference = {name: tree(prepared / name) for name in ("natural_language", "code")}
    return data_dir, reference


@pytest.mark.parametrize("after_units", [1, 40])
def test_a_driver_killed_mid_prepare_then_run_again_gives_the_uninterrupted_bytes(cluster, synthetic_reference, after_units):
    """The killed driver joined the running cluster; the rerun after 40 units starts a Ray of its
    own (no `ray_address`, as on a laptop) and stops it when done."""
    data_dir, reference = synthetic_reference
    prepared = data_dir / "synthetic" / "prepared"
    for name in reference:
        subprocess.run(["rm", "-rf", str(prepared / name)], check=True)
    ray_opts = ["prepare.engine=ray", "prepare.workers=2", f"prepare.ray_address={cluster}"]
    driver = subprocess.Popen(_prepare_command(data_dir, data_dir / "run-1", *ray_opts), cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    units = prepared / "code" / "units"
    deadline = time.monotonic() + 120
    while len(list(units.glob("*.json"))) < after_units and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver, as a node failure takes it
    driver.wait()
    assert len(list(units.glob("*.json"))) < 110, "the prepare finished before it was killed"
    rerun = ray_opts[:2] if after_units == 40 else ray_opts
    proc = subprocess.run(_prepare_command(data_dir, data_dir / "run-2", *rerun), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("Started a local Ray instance" in proc.stderr + proc.stdout) == (after_units == 40)
    for name, files in reference.items():
        assert tree(prepared / name) == files, name
