"""The training loop: builds the partitioned state and step from the config, then runs them.

Config flows one way: the trainer reads `model`, `optimizer`, `stage`, `hardware` and
`trainer`, builds a mesh, a sharded TrainState and one compiled step, and consumes
batches from any grain dataset. It restores the newest checkpoint in the run directory,
so running the same command again in the same directory resumes the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from xgen import checkpoint
from xgen.config import ConfigError, StorageError, XGenConfig
from xgen.config.validate import mesh_shape
from xgen.console import heartbeat
from xgen.data.batches import Batches, BatchSource
from xgen.runtime import Runtime
from xgen.train.cadence import SaveCadence
from xgen.train.counted_flops import step_flops
from xgen.train.evaluation import HeldoutLoss
from xgen.train.goodput import Goodput, summary_line
from xgen.train.metrics import MetricsLog, SequenceTrace, TrainMetrics, progress_line
from xgen.train.optimizer import continue_schedule, lr_schedule, make_optimizer, mark_reset
from xgen.train.preemption import StopRequest
from xgen.train.profiling import Profiler
from xgen.train.resume import check_data, check_resume
from xgen.train.step import RunningStats, TrainState, train_step
from xgen.train.throughput import flops_per_token
from xgen.train.watchdog import Watchdog

log = logging.getLogger(__name__)


def step_memory_bytes(compiled) -> int | None:
    """Per-device bytes of a compiled step: arguments + outputs + temporaries - donated aliases."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    used = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return int(used - mem.alias_size_in_bytes)


def host_memory_bytes() -> int:
    """Physical memory of this host (what CPU devices share)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def stage_steps(cfg: XGenConfig) -> int:
    """`trainer.steps`, or the stage's token budget in steps."""
    return cfg.trainer.steps or max(cfg.stage.token_budget // cfg.stage.batch_tokens, 1)


def first_step(cfg: XGenConfig, run_dir: Path) -> int:
    """The step this stage starts at: 0, or the step of the checkpoint it starts from."""
    if cfg.trainer.init_from is None:
        return 0
    step = checkpoint.latest_step(checkpoint.checkpoints_dir(cfg.trainer.init_from))
    if step is None:
        raise ConfigError(f"trainer.init_from={cfg.trainer.init_from}: no complete checkpoint there")
    return 0 if _params_only(cfg) else step


def _params_only(cfg: XGenConfig) -> bool:
    """Whether init_from contributes parameters alone (fresh optimizer, step 0)."""
    return cfg.trainer.init_params_only or not checkpoint.has_optimizer_state(cfg.trainer.init_from)


class _Window:
    """Metrics accumulated since the last metrics.jsonl record."""

    def __init__(self, start: int):
        self.start, self.t0, self.acc = start, time.perf_counter(), None

    def add(self, out: dict) -> None:
        m = TrainMetrics.single_from_model_output(**out)
        self.acc = m if self.acc is None else self.acc.merge(m)


@dataclasses.dataclass
class _LoopParts:
    """What the step loop works with besides the state: its inputs, outputs and guards."""

    data: BatchSource
    batches: Batches
    mngr: object
    metrics_log: MetricsLog
    stop: StopRequest
    goodput: Goodput
    watchdog: Watchdog
    trace: "SequenceTrace"
    evaluators: list
    profiler: "Profiler"


class Trainer:
    """Owns the mesh, the sharded train state, the compiled step and the checkpoint manager."""

    def __init__(self, cfg: XGenConfig, run_dir: Path, runtime: Runtime | None = None):
        """`runtime`: the model on its mesh (`task=plan` passes one over a TPU topology's
        devices); by default the run's own, on this host's devices."""
        self.cfg = cfg
        self.run_dir = run_dir
        self.first_step = first_step(cfg, run_dir)
        self.steps = self.first_step + stage_steps(cfg)
        self.batch_size = cfg.stage.batch_tokens // cfg.stage.seq_len
        sizes = mesh_shape(cfg.hardware)
        micro = self.batch_size // cfg.trainer.grad_accum_steps
        if self.batch_size % cfg.trainer.grad_accum_steps or micro % (sizes["data"] * sizes["fsdp"]):
            raise ConfigError(
                f"batch of {self.batch_size} sequences (stage.batch_tokens / stage.seq_len) in "
                f"trainer.grad_accum_steps={cfg.trainer.grad_accum_steps} micro-batches does not split over "
                f"the mesh's data x fsdp = {sizes['data'] * sizes['fsdp']} devices"
            )
        self.runtime = runtime = runtime or Runtime.of(cfg)
        self.mesh = runtime.mesh
        self.tx = make_optimizer(cfg.optimizer)
        # The learning rate's course: [(0, total)] then (step, new total) for each resume that
        # changed the run's length; stored in every checkpoint (see `_schedule_for`).
        self.schedule_record = [(0, self.steps)]

        def from_params(params: nnx.State) -> TrainState:
            return TrainState(
                step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), stats=RunningStats.zeros()
            )

        def init(key: jax.Array) -> TrainState:
            return from_params(nnx.state(runtime.make_model(nnx.Rngs(key))))

        self.graphdef = runtime.graphdef
        abstract = jax.eval_shape(init, jax.random.key(0))
        self.state_sharding = runtime.shardings_of(abstract)
        self.abstract_state = runtime.placed(abstract)
        self._init = jax.jit(init, out_shardings=self.state_sharding)
        # Parameters donated into the state: a params-only start holds the parameters and the
        # new optimizer state (3x the parameters for Adam), never a random state beside them.
        self.from_params = jax.jit(from_params, out_shardings=self.state_sharding, donate_argnums=0)
        self._reset_optimizer = jax.jit(
            lambda s: s.replace(opt_state=mark_reset(self.tx.init(s.params), s.step)),
            out_shardings=self.state_sharding,
            donate_argnums=0,
        )
        self.tokens_sharding = runtime.sharding(("batch", "length"))
        self._use_schedule(self.schedule_record)
        self.flops_per_token = flops_per_token(cfg.model, cfg.stage.seq_len)
        # MFU only against a peak the hardware file states (docs/launching.md): a guessed or
        # measured one would make a number that looks like MFU and is not.
        self.peak_flops = cfg.hardware.peak_flops_per_chip
        log.info(
            "model %s: %s parameters | mesh %s over %d %s device(s) | %d steps of %d x %d tokens",
            cfg.model.name,
            f"{runtime.param_count():,}",
            dict(self.mesh.shape),
            self.mesh.size,
            self.mesh.devices.flat[0].platform,
            self.steps,
            self.batch_size,
            cfg.stage.seq_len,
        )

    def _use_schedule(self, record: list[tuple[int, int]]) -> None:
        """The step function for a schedule record (compiled when `compile_step` is called)."""
        cfg = self.cfg
        self.schedule_record = [tuple(r) for r in record]
        self.schedule = lr_schedule(cfg.optimizer, self.schedule_record[0][1], tuple(self.schedule_record[1:]))
        self._step = jax.jit(
            partial(
                train_step,
                graphdef=self.graphdef,
                tx=self.tx,
                schedule=self.schedule,
                spike=cfg.trainer.spike,
                micro_batches=cfg.trainer.grad_accum_steps,
                rewarm_steps=cfg.trainer.rewarm_steps,
            ),
            out_shardings=(self.state_sharding, None),
            donate_argnums=0,
        )

    def _schedule_for(self, meta: dict | None, step: int) -> list[tuple[int, int]]:
        """The schedule record that continues a checkpoint (`meta`, at `step`) with this
        command's run length (`optimizer.continue_schedule`)."""
        if meta is None:
            return [(0, self.steps)]
        return continue_schedule(self.cfg.optimizer, meta.get("schedule") or [(0, self.steps)], self.steps, step)

    def _note_extension(self, meta: dict | None, step: int, metrics_log: MetricsLog) -> None:
        """Say in one line (and in events.jsonl) what a changed run length does to the rate."""
        before = [tuple(r) for r in (meta or {}).get("schedule") or []]
        if not before or before[-1][1] == self.steps or self.cfg.optimizer.decay_steps:
            return
        now, end = float(self.schedule(step)), self.cfg.optimizer.lr * self.cfg.optimizer.min_lr_ratio
        re_anchored = len(self.schedule_record) > 1 and self.schedule_record[-1][0] == step
        if not re_anchored:
            what = f"still in the warmup; the decay now ends at step {self.steps}"
        elif abs(now - end) <= 1e-6 * end:
            what = f"the schedule had ended; the learning rate stays at its final value {end:.3g}"
        else:
            what = f"the learning rate goes on from {now:.3g}, its value at step {step}, down to {end:.3g} at step {self.steps}"
        log.warning("trainer.steps changes the run from %d to %d steps at step %d: %s", before[-1][1], self.steps, step, what)
        metrics_log.event({"event": "schedule_extended", "step": step, "from_total": before[-1][1], "to_total": self.steps,
                           "learning_rate": now, "end_learning_rate": end})  # fmt: skip

    def fit(self, data: BatchSource, evaluators: tuple = ()) -> dict:
        """Train to `self.steps` on `data` (element i: this host's batch of step i + 1),
        resuming from the newest checkpoint; returns the run summary. `evaluators` run in
        the loop (`xgen.train.evaluation`); with `trainer.eval_every`, the held-out loss of
        `data`'s held-out documents is one of them.

        SIGTERM (a preempted TPU VM, a SLURM time limit) ends the run after the current
        step with a checkpoint, exit code 143; running the command again resumes. Whatever
        ends the loop, an exception included, the checkpoint manager's threads, the metrics
        files and the signal handler are closed and restored. Where the wall time went is
        accounted in goodput.json (`xgen.train.goodput`), across restarts."""
        cfg = self.cfg
        t_start = time.perf_counter()
        primary = jax.process_index() == 0
        goodput = Goodput(self.run_dir, primary=primary)
        self._pending_events, self._allowed_changes = [], {}
        self._data_identity = getattr(data, "identity", None)  # checked on resume: the documents, not only their config
        self._rollbacks_to: dict[int, int] = {}  # checkpoint step -> rollbacks to it in a row
        ckpt_dir = self.run_dir / "checkpoints"
        done = checkpoint.latest_step(ckpt_dir)
        if done is not None and done >= self.steps:
            finished = self._verified_finished(goodput)
            if finished is not None:
                return self._summary(self.steps, None, t_start, t_start)
            done = checkpoint.latest_step(ckpt_dir)
        checkpoint.check_room(ckpt_dir, self.state_bytes())  # before any work: not at the first save
        # The schedule from the newest checkpoint's record, before compiling (a fallback to an
        # older checkpoint with another record recompiles: see below).
        newest_meta = self._newest_meta(done)
        if newest_meta is not None:  # a changed model refused by its keys before compiling or reading arrays
            check_resume(newest_meta.get("config", {}), self.cfg, f"{self.run_dir} at step {done}")
        self._use_schedule(self._schedule_for(newest_meta, done or 0))
        goodput.since_mark("startup")
        with heartbeat("compiling the train step"):
            compiled = self.compile_step(data.dataset[0])
        log.info("compiled the train step in %.1f s", time.perf_counter() - t_start)
        self._check_memory(compiled)
        evaluators = [*self._heldout_evaluator(data), *evaluators]
        goodput.since_mark("compile")
        with contextlib.ExitStack() as cleanup:
            mngr = checkpoint.open_manager(
                ckpt_dir, keep=cfg.trainer.checkpoints_to_keep, keep_every=cfg.trainer.checkpoints_keep_every
            )
            cleanup.callback(mngr.close)  # no orbax threads left behind, whatever happens
            batches = data.iterator()
            cleanup.callback(batches.close)  # grain's read-ahead threads
            # Watched from here: a restore waits on every host and on storage, and hangs with them.
            watchdog = Watchdog(cfg.trainer.step_timeout_minutes, self.run_dir)
            cleanup.callback(watchdog.close)
            state, meta = self._restore(mngr, batches, watchdog)
            with watchdog.paused_for():  # compiles, not steps: the first save would time them
                self._compile_save_checks(state)
            start = int(state.step)
            record = self._schedule_for(meta, start) if meta is not None else self.schedule_record
            if record != self.schedule_record:
                with watchdog.paused_for():
                    self._use_schedule(record)
                    compiled = self.compile_step(data.dataset[0])
            goodput.since_mark("restore" if meta is not None or cfg.trainer.init_from else "startup")  # a fresh init is start-up
            goodput.resumed(start)
            metrics_log = MetricsLog(self.run_dir, trackers=cfg.tracker, config=cfg, resume_step=start, primary=primary)
            cleanup.callback(metrics_log.close)
            trace = SequenceTrace(self.run_dir, jax.process_index(), resume_step=start)
            cleanup.callback(trace.close)
            if self._allowed_changes:
                changes = {k: [a, b] for k, (a, b) in self._allowed_changes.items()}
                log.warning("resuming with changes allowed by trainer.allow_changes: %s", changes)
                self._pending_events.append({"event": "config_change", "step": start, "changes": changes})
            self._flush_events(metrics_log)
            self._note_extension(meta, start, metrics_log)
            if cfg.trainer.spike.policy == "rollback" and meta is None:
                # The policy needs a checkpoint to go back to from its first step on: the start.
                with goodput.timing("checkpoint"):
                    self._save(mngr, state, batches, metrics_log)
            stop = StopRequest()
            cleanup.callback(stop.restore)
            profiler = Profiler(cfg.trainer.profile_steps, self.run_dir / "profile")
            cleanup.callback(profiler.close)
            loop = _LoopParts(data, batches, mngr, metrics_log, stop, goodput, watchdog, trace, evaluators, profiler)
            train_t0 = time.perf_counter()
            step, last, stopped = self._loop(compiled, state, start, train_t0, loop)
            with goodput.timing("checkpoint"), self._writing(step):
                mngr.wait_until_finished()
            goodput.since_mark("other")  # what the loop did not account for itself
            log.info(summary_line(goodput.write(step), len(goodput.attempts)))
        if stopped:
            name = signal.Signals(stop.signum).name
            log.warning("%s: saved a checkpoint at step %d of %d; run the same command to resume", name, step, self.steps)
            raise SystemExit(128 + stop.signum)
        return self._summary(start, last, t_start, train_t0)

    def state_bytes(self) -> int:
        """Bytes of the whole train state (parameters, optimizer moments, statistics): what
        one checkpoint writes, over all hosts."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.abstract_state))

    def _newest_meta(self, step: int | None) -> dict | None:
        """The newest checkpoint's metadata, or None (none, or unreadable: the restore will
        report it and fall back, and the step is compiled again for the one it restores)."""
        if step is None:
            return None
        try:
            return checkpoint.read_meta_at(self.run_dir / "checkpoints", step)
        except ConfigError:
            return None

    def _verified_finished(self, goodput: Goodput) -> int | None:
        """A run whose newest checkpoint is at or past its end is done only if that checkpoint
        restores and passes its checks; a damaged one is moved aside like any other, and the
        run resumes from the newest one that passes (None: there is still work to do)."""
        with checkpoint.open_manager(self.run_dir / "checkpoints", keep=self.cfg.trainer.checkpoints_to_keep) as mngr:
            with goodput.timing("restore"):
                restored = self._restore_latest(mngr, move_damaged=True)
        step = restored[2] if restored is not None else None
        if step is None or step < self.steps:
            return None  # the damage is recorded once the run resumes
        if step > self.steps:  # summary.json stays the run's own
            raise ConfigError(
                f"trainer.steps={self.cfg.trainer.steps} ends this run at step {self.steps}, but its checkpoint in "
                f"{self.run_dir / 'checkpoints'} is already at step {step}: set trainer.steps={step - self.first_step} "
                "or more, or start a new run directory (hydra.run.dir=...)"
            )
        if self._pending_events:
            metrics_log = MetricsLog(self.run_dir, resume_step=step, primary=jax.process_index() == 0)
            self._flush_events(metrics_log)
            metrics_log.close()
        return step

    def _loop(self, compiled, state, start: int, train_t0: float, parts: "_LoopParts") -> tuple[int, dict | None, bool]:
        """Steps from `start` to the end or a stop request; returns (last step, last logged
        metrics, whether it stopped early)."""
        cfg = self.cfg
        data, batches, mngr, metrics_log, stop, goodput = parts.data, parts.batches, parts.mngr, parts.metrics_log, parts.stop, parts.goodput
        window = _Window(start)
        pending: list = []  # (step, data index, outputs) not yet checked for events
        last = None
        step = start
        cadence = SaveCadence(cfg.trainer.checkpoint_every, cfg.trainer.checkpoint_minutes)
        # The data position of the next batch, counted here rather than read from the iterator
        # every step (it drifts from the step only when a rollback skips batches).
        data_index = batches.get_state().get("next_index", 0)
        parts.watchdog.beat(step)
        goodput.since_mark("other")
        while step < self.steps:
            parts.profiler.before(step + 1)
            t0 = time.time()
            local = next(batches)
            goodput.add("data_wait", time.time() - t0)
            ids = local.pop("sequence_ids", None)
            state, out = compiled(state, self._global_batch(local))
            step += 1
            data_index += 1
            if ids is not None:
                parts.trace.write(step, ids)
            stopping = stop.at(step)  # the same step on every process
            pending.append((step, data_index - 1, out))
            window.add(out)
            if cfg.trainer.spike.policy == "rollback" and bool(out["spike"]):
                self._events(metrics_log, pending)
                pending = []
                with goodput.timing("restore"):
                    state, step = self._rollback(mngr, state, step, metrics_log)
                parts.trace.truncate(step)
                window = _Window(step)  # metrics of the discarded steps leave the averages
                parts.watchdog.beat(step)
                if stopping:
                    return step, last, True  # the step rolled back to is the saved one
                continue
            logging_now = step == start + 1 or step % cfg.trainer.log_every == 0 or step == self.steps or stopping
            if logging_now:
                self._events(metrics_log, pending)
                pending = []
                last = self._log_window(window, step, start, train_t0, data, metrics_log)
                window = _Window(step)
            if cadence.due(step) or step == self.steps or stopping:
                with goodput.timing("checkpoint"):
                    self._save(mngr, state, batches, metrics_log)
                cadence.saved()
                goodput.since_mark("productive")
                totals = goodput.write(step)
                if step < self.steps and not stopping:  # the last one is logged after the final save
                    log.info(summary_line(totals, len(goodput.attempts)))
            elif logging_now:
                goodput.since_mark("productive")
                goodput.write(step)
            parts.profiler.after(step, state)
            if not stopping or step == self.steps:  # a stop cuts evaluations short, never the last one
                self._evaluate(state, step, parts)
            parts.watchdog.beat(step)
            if stopping:
                return step, last, step < self.steps
        goodput.since_mark("productive")
        return step, last, False

    def _heldout_evaluator(self, data: BatchSource) -> list:
        """The held-out loss, when `trainer.eval_every` asks for it (compiled now, with the step)."""
        every = self.cfg.trainer.eval_every
        if not every:
            return []
        if not hasattr(data, "heldout_batches"):
            raise ConfigError("trainer.eval_every: this task's data has no held-out documents (pre-training's data_mix has)")
        # Micro-batches, as the step runs them: a step that fits with trainer.grad_accum_steps
        # would not with the whole batch's logits at once.
        rows = self.batch_size // self.cfg.trainer.grad_accum_steps
        batches = data.heldout_batches(self.cfg.trainer.eval_batches, jax.process_index(), jax.process_count(), rows=rows)
        if not batches:
            raise ConfigError(
                f"trainer.eval_every={every}: no source holds out one sequence of {self.cfg.stage.seq_len} tokens at "
                f"data_mix.heldout_share={self.cfg.data_mix.heldout_share}; raise it (data_mix.json counts each source's)"
            )
        missing = [n for n in self.cfg.data_mix.sources if n not in batches]
        if missing:
            log.warning("held-out loss: %s hold(s) out no sequence at data_mix.heldout_share=%s; not evaluated",
                        ", ".join(missing), self.cfg.data_mix.heldout_share)  # fmt: skip
        with heartbeat("compiling the held-out loss"):
            evaluator = HeldoutLoss(every, batches, self)
        tokens = {n: t * jax.process_count() for n, t in evaluator.tokens.items()}  # every host holds as many
        log.info("held-out loss every %d steps over %s tokens: %s", every, f"{sum(tokens.values()):,}",
                 ", ".join(f"{n} {t:,}" for n, t in tokens.items()))  # fmt: skip
        return [evaluator]

    def _evaluate(self, state: TrainState, step: int, parts: "_LoopParts") -> None:
        """The evaluators due at `step` (every `every` steps, and at the last step), on the
        parameters in memory; their numbers go to eval.jsonl and the trackers."""
        due = [e for e in parts.evaluators if e.every and (step % e.every == 0 or step == self.steps)]
        if not due:
            return
        record: dict = {"step": step}
        with parts.goodput.timing("eval"), parts.watchdog.paused_for():  # the first call compiles
            for evaluator in due:
                t0 = time.perf_counter()
                record.update(evaluator(state.params, step))
                record[f"{evaluator.name}_s"] = round(time.perf_counter() - t0, 3)
        parts.metrics_log.write_eval(record)
        shown = [f"{k} {v:.4f}" for k, v in record.items() if k != "step" and not k.endswith(("_s", "_stderr"))]
        log.info("eval at step %d: %s", step, " | ".join(shown))

    def _save(self, mngr, state: TrainState, batches: Batches, metrics_log: MetricsLog) -> None:
        """A checkpoint of a finite state; a non-finite one is never saved (so retention cannot
        rotate the last good checkpoint away), and is an error at the end of the run."""
        step = int(state.step)
        if not checkpoint.all_finite((state.params, state.opt_state)):
            metrics_log.event({"event": "checkpoint_refused", "step": step, "why": "non-finite parameters or optimizer state"})
            newest = checkpoint.latest_step(self.run_dir / "checkpoints")
            message = f"step {step}: the parameters or optimizer moments are not finite; not saved (newest good checkpoint: step {newest})"
            if step >= self.steps:
                raise SystemExit(f"xgen: {message}")
            log.error(message)
            return
        meta = {"config": dataclasses.asdict(self.cfg), "step": step, "schedule": [list(r) for r in self.schedule_record]}
        if self._data_identity is not None:
            meta["data"] = self._data_identity
        with self._writing(step):  # also where an earlier save's failure in the background surfaces
            checkpoint.save(mngr, step, self.runtime.to_disk(state), batches.get_state(), meta)

    @contextlib.contextmanager
    def _writing(self, step: int):
        """A save that fails for the storage's sake (full, read-only, quota) as one line naming
        the path and the cause; the newest committed checkpoint is untouched (orbax writes into
        a temporary directory and renames it only when complete)."""
        try:
            yield
        except Exception as ex:  # noqa: BLE001 - orbax wraps the OSError in its own types
            cause = checkpoint.storage_error(ex)
            if cause is None:
                raise
            newest = checkpoint.latest_step(self.run_dir / "checkpoints")
            raise StorageError(
                f"the checkpoint of step {step} cannot be written: {cause.strerror} ({cause.filename}); the newest "
                f"good checkpoint is step {newest}: free space or fix the mount, then run the same command to resume"
            ) from None

    def _restore_latest(self, mngr, move_damaged: bool = False) -> tuple[TrainState, dict, int, dict] | None:
        """`checkpoint.restore_latest` in the checkpoints' per-layer layout, returned as the
        model holds its layers (stacked when scanned)."""
        restored = checkpoint.restore_latest(
            mngr, self.runtime.on_disk(self.abstract_state), on_damaged=self._damaged, move_damaged=move_damaged
        )
        if restored is None:
            return None
        state, data_state, step, meta = restored
        return self.runtime.from_disk(state, self.state_sharding), data_state, step, meta

    def _flush_events(self, metrics_log: MetricsLog) -> None:
        for event in self._pending_events:
            metrics_log.event(event)
        self._pending_events = []

    def _log_window(
        self, window: _Window, step: int, start: int, train_t0: float, data: BatchSource, metrics_log: MetricsLog
    ) -> dict:
        """One metrics.jsonl record for the steps since the last one, and the progress line."""
        cfg = self.cfg
        now = time.perf_counter()
        tokens_per_s = (step - window.start) * cfg.stage.batch_tokens / (now - window.t0)
        record = {
            "step": step,
            **{k: float(v) for k, v in window.acc.compute().items()},
            "tokens_seen": step * cfg.stage.batch_tokens,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_chip": tokens_per_s / self.mesh.size,
            "mfu": tokens_per_s / self.mesh.size * self.flops_per_token / self.peak_flops if self.peak_flops else None,
            "elapsed_s": now - train_t0,
            "data_epochs": data.epochs(step),
        }
        metrics_log.write(record)
        eta = record["elapsed_s"] / max(step - start, 1) * (self.steps - step)
        log.info(progress_line(record, self.steps, eta))
        return record

    def _compile_save_checks(self, state: TrainState) -> None:
        """Run once the programs every save runs (finiteness, fingerprints), so that they are
        compiled before the loop: under the watchdog, a first save that compiles them on a
        loaded host looked like a hang."""
        checkpoint.all_finite((state.params, state.opt_state))
        checkpoint.fingerprints(self.runtime.to_disk(state))

    def _restore(self, mngr, batches, watchdog: Watchdog) -> tuple[TrainState, dict | None]:
        """This run's newest good checkpoint (with the data position) and its metadata, if the
        command still describes its run; else the stage it starts from (model, optimizer and
        step; its own data chunk from the start); else a fresh init (metadata None for both)."""
        restored = self._restore_latest(mngr, move_damaged=True)
        if restored is not None:
            state, data_state, step, meta = restored
            self._allowed_changes = check_resume(meta.get("config", {}), self.cfg, f"{self.run_dir} at step {step}")
            check_data(meta.get("data"), self._data_identity, self.cfg.trainer.allow_changes, f"{self.run_dir} at step {step}")
            batches.set_state(data_state)
            return state, meta
        if self.cfg.trainer.init_from is None:
            with watchdog.paused_for():  # a fresh init is a compile, not a wait on storage or peers
                return self._start_state(), None
        return self._start_state(), None

    def _start_state(self) -> TrainState:
        if self.cfg.trainer.init_from is None:
            return self._init(jax.random.key(self.cfg.seed))
        source = checkpoint.checkpoints_dir(self.cfg.trainer.init_from)
        if _params_only(self.cfg):  # fine-tuning, or imported weights (task=import_hf)
            params = self.runtime.restore_params(source)
            log.info("starting from the parameters in %s, with a fresh optimizer", source)
            return self.from_params(params)
        with checkpoint.open_manager(source, read_only=True) as init_mngr:
            state, _, step, _ = self._restore_latest(init_mngr)
        log.info("starting from %s at step %d", source, step)
        if self.cfg.trainer.reset_optimizer:
            state = self._reset_optimizer(state)  # the old optimizer state is donated, not kept
        return state

    def _damaged(self, step: int, why: str) -> None:
        self._pending_events.append({"event": "checkpoint_damaged", "step": step, "why": why})

    def _rollback(self, mngr, state: TrainState, step: int, metrics_log: MetricsLog) -> tuple[TrainState, int]:
        """Back to the newest checkpoint's model and optimizer; the data goes on after the spike."""
        with self._writing(step):
            mngr.wait_until_finished()  # the newest save committed, so that it is the one restored
        restored = self._restore_latest(mngr, move_damaged=True)
        if restored is None:  # the run saves its start under this policy: every checkpoint has gone
            raise SystemExit(f"xgen: loss spike at step {step}: no checkpoint to roll back to in {self.run_dir / 'checkpoints'}")
        back, _, back_step, _ = restored
        self._flush_events(metrics_log)
        again = self._rollbacks_to.get(back_step, 0) + 1
        self._rollbacks_to = {back_step: again}
        metrics_log.event({"event": "rollback", "step": step, "to_step": back_step, "times_to_this_checkpoint": again})
        if again > self.cfg.trainer.spike.max_rollbacks:
            raise SystemExit(
                f"xgen: loss spike at step {step}: rolled back to step {back_step} {again} times "
                f"(trainer.spike.max_rollbacks={self.cfg.trainer.spike.max_rollbacks}); the spikes come back "
                "after the skipped batches, so they are not the data's: lower optimizer.lr, or check "
                "trainer.spike's threshold and warmup_steps"
            )
        log.warning("loss spike at step %d: rolled back to step %d; batches of steps %d-%d skipped", step, back_step, back_step + 1, step)
        metrics_log.truncate(back_step)
        return back, back_step

    def _events(self, metrics_log: MetricsLog, pending: list) -> None:
        """Write each spike or non-finite step of the window, with its batch's data position."""
        for step, data_index, out in pending:
            if bool(out["spike"]) or bool(out["nonfinite"]):
                kind = "nonfinite" if bool(out["nonfinite"]) else "spike"
                event = {
                    "event": kind,
                    "step": step,
                    "data_index": data_index,
                    "loss": float(out["loss"]),
                    "grad_norm": float(out["grad_norm"]),
                    "update_applied": not bool(out["skipped"]),
                }
                log.warning("%s at step %d (batch %s): loss %.4f, grad norm %.3f", kind, step, data_index, event["loss"], event["grad_norm"])
                metrics_log.event(event)

    def _summary(self, start: int, last: dict | None, t_start: float, train_t0: float) -> dict:
        cfg = self.cfg
        wall = time.perf_counter() - t_start
        trained = self.steps - start
        summary = {
            "steps": self.steps,
            "steps_this_run": trained,
            "final_loss": last["loss"] if last else None,
            "tokens_per_s": trained * cfg.stage.batch_tokens / (time.perf_counter() - train_t0) if trained else None,
            "wall_s": wall,
        }
        if jax.process_index() == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if trained:
            loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
            log.info(
                "done: %d steps (%d this run), final loss %s, %s tokens/s, wall time %.1f s; run dir %s",
                self.steps, trained, loss, f"{summary['tokens_per_s']:,.0f}", wall, self.run_dir,
            )  # fmt: skip
        else:
            log.info("nothing to do: the checkpoint in %s is already at step %d", self.run_dir, self.steps)
        return summary

    def _check_memory(self, compiled) -> None:
        """Refuse, in one line, a step that cannot fit in device memory (before allocating it)."""
        needed = step_memory_bytes(compiled)
        if needed is None:
            return
        hw = self.cfg.hardware
        available = hw.memory_per_chip_bytes or host_memory_bytes() // hw.num_devices
        log.info("train step memory: %.2f GiB per device of %.1f GiB", needed / 2**30, available / 2**30)
        if needed > available:
            raise ConfigError(
                f"the train step needs {needed / 2**30:.1f} GiB per device but hardware={hw.name} has "
                f"{available / 2**30:.1f} GiB: lower stage.batch_tokens (now {self.cfg.stage.batch_tokens}), "
                "set execution.attention=chunked for long sequences, or use a smaller model"
            )

    def compile_step(self, local_batch: dict | None = None):
        """The train step compiled for the mesh (ahead of time: nothing is allocated). Without a
        batch, for plain `inputs`/`targets` batches of the stage's shape."""
        if local_batch is None:
            shape = (self.batch_size // jax.process_count(), self.cfg.stage.seq_len)
            local_batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("inputs", "targets")}
        local_batch = {k: v for k, v in local_batch.items() if k != "sequence_ids"}  # a trace's, not the model's
        return self._step.lower(self.abstract_state, self._abstract_batch(local_batch)).compile()

    def step_flops(self) -> float:
        """Matmul FLOPs of one step as its program states them (loops times their trip
        counts, remat's recomputation included; Pallas kernels not: xgen.train.counted_flops)."""
        shape = (self.batch_size // jax.process_count(), self.cfg.stage.seq_len)
        local = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("inputs", "targets")}
        return step_flops(self._step, self.abstract_state, self._abstract_batch(local))

    def _abstract_batch(self, local: dict) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch's shapes: hosts' local batches stack along the batch axis."""
        shape = (self.batch_size, self.cfg.stage.seq_len)
        for key, value in local.items():
            if value.shape[1:] != shape[1:] or value.shape[0] * jax.process_count() != shape[0]:
                raise ValueError(f"data batch {key!r} has shape {value.shape}, expected {shape} over all hosts")
        return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.tokens_sharding) for k in local}

    def _global_batch(self, local: dict) -> dict[str, jax.Array]:
        return {
            k: jax.make_array_from_process_local_data(self.tokens_sharding, v.astype("int32")) for k, v in local.items()
        }
