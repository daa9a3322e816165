import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xgen.config import ModelConfig, OptimizerConfig
from xgen.model import XGenModel
from xgen.train.optimizer import decay_mask, lr_schedule, make_optimizer
from xgen.train.step import TrainState, cross_entropy, train_step

TINY = ModelConfig(name="t", d_model=32, n_layers=1, n_heads=2, d_ff=64, vocab_size=64, max_positions=64)


def test_masked_loss_is_the_mean_cross_entropy_over_unmasked_targets():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    mask = jnp.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]])
    logp = jax.nn.log_softmax(logits)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]
    assert float(cross_entropy(logits, targets, mask)) == pytest.approx(nll[np.asarray(mask) == 1].mean(), rel=1e-6)
    assert float(cross_entropy(logits, targets)) == pytest.approx(nll.mean(), rel=1e-6)


def test_schedule_warms_up_linearly_then_decays_to_ten_percent():
    opt = OptimizerConfig(lr=1e-3, warmup_steps=10)
    sched = lr_schedule(opt, total_steps=110)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(60)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-5)
    assert float(sched(110)) == pytest.approx(1e-4)


def test_a_run_shorter_than_its_warmup_still_has_a_schedule():
    sched = lr_schedule(OptimizerConfig(lr=1e-3, warmup_steps=2000), total_steps=1)
    assert np.isfinite(float(sched(0)))


def test_weight_decay_skips_norm_scales():
    params = nnx.state(XGenModel(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
    for path, decayed in flat:
        name = jax.tree_util.keystr(path)
        assert decayed == ("norm" not in name), name


def test_train_steps_fit_a_fixed_batch():
    model = XGenModel(TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    opt = OptimizerConfig(lr=1e-2, warmup_steps=0)
    sched = lr_schedule(opt, 30)
    tx = make_optimizer(opt, sched)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    tokens = jax.random.randint(jax.random.key(3), (4, 17), 0, TINY.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    step = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, tx=tx, schedule=sched))
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 30
    assert losses[0] == pytest.approx(np.log(TINY.vocab_size), rel=0.05)
    assert losses[-1] < 0.5 * losses[0]

