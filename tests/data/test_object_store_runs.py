"""Raw data, prepared shards and training reads on an object store (S3 through moto's server,
GCS through its emulator, both on 127.0.0.1): prepare -> train -> kill -9 -> resume, with no
FUSE mount and no local copy of the shards, gives the losses of a run on local files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from tests.conftest import compose_config
from xgen.data.synthetic import write_corpus
from xgen.tasks import run_task

REPO = Path(__file__).resolve().parents[2]
TRAIN = ("data_mix=synthetic", "stage=s1_2k", "stage.seq_len=128", "stage.batch_tokens=512", "model=tiny", "trainer.steps=6",
         "trainer.log_every=1", "trainer.checkpoint_every=2", "optimizer.decay_steps=6")  # fmt: skip
PREPARE = ("task=prepare", "data_mix=synthetic", "prepare.workers=0", "prepare.split_bytes=200000")


def xgen(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xgen.run", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The same corpus prepared and trained on from local files: the reference."""
    root = tmp_path_factory.mktemp("local")
    write_corpus(root / "synthetic" / "raw")
    for args, name in ((PREPARE, "p"), (TRAIN, "t")):
        (root / name).mkdir()
        run_task(compose_config(*args, f"data_dir={root}"), root / name)
    return root, losses(root / "t")


@pytest.mark.slow
def test_prepare_train_kill_and_resume_read_the_object_store_directly(object_store, local_run, tmp_path):
    local_root, reference = local_run
    url = object_store.unique_url("run")
    with object_store.applied():
        fs = fsspec.filesystem(object_store.protocol)
        fs.put(str(local_root / "synthetic" / "raw"), f"{url}/synthetic/raw", recursive=True)
    env = object_store.subprocess_env(XGEN_CACHE_DIR=str(tmp_path / "cache"))
    with object_store.applied():  # prepare in this process (its command is tested elsewhere)
        (tmp_path / "p").mkdir()
        run_task(compose_config(*PREPARE, f"data_dir={url}"), tmp_path / "p")
        fs = fsspec.filesystem(object_store.protocol)
        fs.invalidate_cache()
        manifest = json.loads(fs.cat_file(f"{url}/synthetic/prepared/code/manifest.json"))
        assert manifest["complete"] and all(s.get("store_identity") for e in manifest["files"].values() for s in e["shards"])
    assert not (tmp_path / "synthetic").exists()  # nothing prepared on local disk

    run_dir = tmp_path / "t"
    args = [sys.executable, "-m", "xgen.run", *TRAIN, f"data_dir={url}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)  # after step 3: the checkpoint of step 2 is there
    proc.wait()
    proc = xgen(*TRAIN, f"data_dir={url}", f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert losses(run_dir) == reference  # the same documents in the same order, bit for bit
    mix = json.loads((run_dir / "data_mix.json").read_text())
    assert sum(s["reconciliation"]["tokens_consumed"] for s in mix["sources"].values()) == 6 * 512
