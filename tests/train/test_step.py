import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from xgen.config import ModelConfig, OptimizerConfig, SpikeConfig
from xgen.model import XGenModel
from xgen.model.loss import cross_entropy
from xgen.train.optimizer import applied_learning_rate, decay_mask, lr_schedule, make_optimizer, mark_reset
from xgen.train.step import RunningStats, TrainState, train_step

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
    tx = make_optimizer(opt)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), stats=RunningStats.zeros())
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



def setup_step(policy: str, warmup: int = 5):
    model = XGenModel(TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    opt = OptimizerConfig(lr=1e-3, warmup_steps=0)
    sched = lr_schedule(opt, 100)
    tx = make_optimizer(opt)
    spike = SpikeConfig(policy=policy, threshold=3.0, warmup_steps=warmup)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), RunningStats.zeros())
    step = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, tx=tx, schedule=sched, spike=spike))
    return state, step


def batch_of(seed: int, vocab: int = TINY.vocab_size):
    tokens = jax.random.randint(jax.random.key(seed), (4, 17), 0, vocab)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def same(a, b) -> bool:
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("policy", ["log", "skip", "rollback"])
def test_a_nonfinite_loss_never_reaches_the_parameters(policy):
    state, step = setup_step(policy)
    state, _ = step(state, batch_of(0))
    poisoned = state.replace(params=jax.tree.map(lambda p: p, state.params))
    # An infinite embedding row makes every sequence that holds token 3 produce NaN logits.
    emb = poisoned.params["embed_tokens"]
    emb[...] = emb[...].at[3].set(jnp.inf)
    batch = batch_of(1)
    batch["inputs"] = batch["inputs"].at[0, 0].set(3)
    after, out = step(poisoned, batch)
    assert bool(out["nonfinite"]) and bool(out["skipped"])
    assert same(after.params, poisoned.params) and same(after.opt_state, poisoned.opt_state)
    assert int(after.step) == int(poisoned.step) + 1 and int(after.stats.count) == int(poisoned.stats.count)


@pytest.mark.parametrize("policy,applied", [("log", True), ("skip", False)])
def test_a_loss_spike_is_flagged_and_skipped_only_under_skip(policy, applied):
    state, step = setup_step(policy, warmup=5)
    fixed = batch_of(0)
    for _ in range(8):  # the running statistics settle on this batch's loss
        state, out = step(state, fixed)
        assert not bool(out["spike"])
    spiky = dict(fixed, targets=(fixed["targets"] + 1) % TINY.vocab_size)  # a batch the model has not fit
    after, out = step(state, spiky)
    assert bool(out["spike"])
    assert bool(out["skipped"]) != applied
    assert same(after.params, state.params) != applied
    assert int(after.stats.count) == int(state.stats.count)  # spikes never enter the statistics


def test_flops_per_token_is_six_n_plus_attention(make_config):
    from xgen.model import count_params
    from xgen.train.throughput import flops_per_token

    cfg = make_config("model=xgen_7b").model
    n = count_params(cfg) - 51200 * 4096
    assert flops_per_token(cfg, 8192) == 6 * n + 6 * 32 * 8192 * 4096
    assert flops_per_token(cfg, 8192) - flops_per_token(cfg, 2048) == 6 * 32 * (8192 - 2048) * 4096


def test_adam_first_moment_can_be_kept_in_bfloat16():
    params = nnx.state(XGenModel(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    opt = OptimizerConfig(mu_dtype="bfloat16")
    state = make_optimizer(opt).init(params)
    (adam,) = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype("float32")}


def lr_setup(rewarm_steps: int = 0):
    graphdef, params = nnx.split(XGenModel(TINY, rngs=nnx.Rngs(0)))
    opt = OptimizerConfig(lr=1e-3, warmup_steps=10)
    sched = lr_schedule(opt, 100)
    tx = make_optimizer(opt)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), RunningStats.zeros())
    step = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, tx=tx, schedule=sched, rewarm_steps=rewarm_steps))
    return state, step, sched, tx


def test_the_rate_applied_is_the_rate_logged_also_after_skipped_steps():
    state, step, sched, _ = lr_setup()
    poison = batch_of(1)
    poison["inputs"] = poison["inputs"].at[0, 0].set(3)
    for k in range(8):
        if k in (2, 3):  # two non-finite steps: skipped, yet the clock moves on with the train step
            bad = state.replace(params=jax.tree.map(lambda p: p, state.params))
            emb = bad.params["embed_tokens"]
            emb[...] = emb[...].at[3].set(jnp.inf)
            after, out = step(bad, poison)
            assert bool(out["skipped"])
            state = after.replace(params=state.params)
            continue
        before = int(state.step)
        state, out = step(state, batch_of(k))
        applied = float(applied_learning_rate(state.opt_state))
        assert applied == pytest.approx(float(out["learning_rate"]), rel=1e-6) == pytest.approx(float(sched(before)), rel=1e-6)
    assert float(applied_learning_rate(state.opt_state)) == pytest.approx(float(sched(7)), rel=1e-6)


@pytest.mark.parametrize("rewarm", [0, 4])
def test_reset_optimizer_continues_the_schedule_and_warms_up_again_only_when_asked(rewarm):
    state, step, sched, tx = lr_setup(rewarm)
    for k in range(30):
        state, _ = step(state, batch_of(k % 3))
    reset = state.replace(opt_state=mark_reset(tx.init(state.params), state.step))  # what trainer.reset_optimizer does
    after, out = step(reset, batch_of(0))
    expected = float(sched(30)) * (1 / rewarm if rewarm else 1.0)
    assert float(out["learning_rate"]) == pytest.approx(expected, rel=1e-6)
    assert float(applied_learning_rate(after.opt_state)) == pytest.approx(expected, rel=1e-6)
    for _ in range(5):
        after, out = step(after, batch_of(1))
    assert float(out["learning_rate"]) == pytest.approx(float(sched(35)), rel=1e-6)  # the ramp is over
