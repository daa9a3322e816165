"""Trainer.fit reads any BatchSource, and whatever ends it leaves nothing behind."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from tests.conftest import compose_config
from xgen import checkpoint
from xgen.data import build_pipeline
from xgen.data.batches import Batches, BatchSource
from xgen.tokenizer import Tokenizer

FAST = ("stage.seq_len=32", "stage.batch_tokens=128", "data_mix.sources.python_stdlib.max_documents=20")


class Broken(Exception):
    pass


class FailingAt:
    """A BatchSource whose iterator raises at step `fail_at` (a reader hitting a bad disk)."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at = inner, fail_at
        self.dataset, self.global_batch = inner.dataset, inner.global_batch

    def iterator(self):
        source, fail_at = self.inner.iterator(), self.fail_at

        class It:
            n = 0

            def __iter__(self):
                return self

            def __next__(self):
                It.n += 1
                if It.n == fail_at:
                    raise Broken(f"batch {It.n}")
                return next(source)

            def get_state(self):
                return source.get_state()

            def set_state(self, state):
                source.set_state(state)

            def close(self):
                source.close()

        return It()

    def epochs(self, steps):
        return self.inner.epochs(steps)


def pretrain_pipeline(cfg):
    return build_pipeline(cfg.data_mix, cfg.stage, Tokenizer.from_name(cfg.tokenizer.name), loader=cfg.loader)


def test_pretraining_and_sft_data_both_satisfy_the_batches_protocol(tmp_path):
    from xgen.sft.data import build_sft_data
    from xgen.sft.synthetic import write_fixtures

    cfg = compose_config(*FAST)
    pretrain = pretrain_pipeline(cfg)
    write_fixtures(tmp_path / "sft" / "synthetic")
    sft_cfg = compose_config("sft=synthetic", f"data_dir={tmp_path}", "stage.seq_len=64", "stage.batch_tokens=256")
    sft, _ = build_sft_data(sft_cfg, Tokenizer.from_name(sft_cfg.tokenizer.name))
    for source in (pretrain, sft):
        assert isinstance(source, BatchSource)
        it = source.iterator()
        assert isinstance(it, Batches)
        batch = next(it)
        assert {"inputs", "targets"} <= set(batch) and batch["inputs"].shape[0] == source.global_batch
        assert set(source.epochs(3)) and sum(source.epochs(3).values()) > 0
        it.close()
    assert not isinstance(object(), BatchSource)


def test_an_exception_mid_run_closes_the_checkpoint_and_data_threads_and_restores_the_signal_handler(tmp_path):
    from xgen.train.trainer import Trainer

    cfg = compose_config(*FAST, "trainer.steps=6", "trainer.checkpoint_every=2")
    before_handler, before_threads = signal.getsignal(signal.SIGTERM), set(threading.enumerate())
    with pytest.raises(Broken, match="batch 5"):
        Trainer(cfg, tmp_path).fit(FailingAt(pretrain_pipeline(cfg), fail_at=5))
    assert signal.getsignal(signal.SIGTERM) is before_handler
    deadline = time.time() + 10
    while time.time() < deadline and set(threading.enumerate()) - before_threads:
        time.sleep(0.1)
    assert not set(threading.enumerate()) - before_threads, set(threading.enumerate()) - before_threads
    # The checkpoint of step 4, saved asynchronously before the failure, was committed.
    assert checkpoint.latest_step(tmp_path / "checkpoints") == 4
