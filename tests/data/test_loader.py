import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.data import build_dataset
from xgen.data.loader import source_windows
from xgen.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def demo():
    cfg = compose_config("stage.seq_len=64", "stage.batch_tokens=256")
    return cfg, build_dataset(cfg.data_mix, cfg.stage, Tokenizer.xgen())


def test_batches_have_the_stage_shape_and_shifted_targets(demo):
    cfg, ds = demo
    batch = ds[0]
    assert batch["inputs"].shape == batch["targets"].shape == (4, 64)
    assert batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_same_seed_same_batches_other_seed_other_batches(demo):
    cfg, ds = demo
    again = build_dataset(cfg.data_mix, cfg.stage, Tokenizer.xgen())
    np.testing.assert_array_equal(ds[3]["inputs"], again[3]["inputs"])
    cfg2 = compose_config("stage.seq_len=64", "stage.batch_tokens=256", "data_mix.seed=1")
    other = build_dataset(cfg2.data_mix, cfg2.stage, Tokenizer.xgen())
    assert not np.array_equal(ds[3]["inputs"], other[3]["inputs"])


def test_iterator_state_resumes_the_same_batches(demo):
    _, ds = demo
    it = iter(ds.to_iter_dataset())
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(3)]
    resumed = iter(ds.to_iter_dataset())
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["inputs"], want)


def test_mixture_follows_table_2_proportions(demo):
    cfg, ds = demo
    code_rows = {w.tobytes() for w in source_windows(cfg.data_mix, cfg.stage, Tokenizer.xgen())["python_stdlib"]}
    rows = np.concatenate([np.concatenate([ds[i]["inputs"], ds[i]["targets"][:, -1:]], axis=1) for i in range(1000)])
    share = np.mean([r.tobytes() in code_rows for r in rows])
    assert share == pytest.approx(0.0469, abs=0.005)


def test_prepared_sources_are_refused_in_one_line_until_task_prepare_exists():
    cfg = compose_config("data_mix=stage1")
    with pytest.raises(ConfigError, match="data_mix.sources.natural_language"):
        build_dataset(cfg.data_mix, cfg.stage, Tokenizer.xgen())
