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
from xgen.config import ConfigError, XGenConfig
from xgen.config.validate import mesh_shape
from xgen.data.batches import Batches, BatchSource
from xgen.runtime import Runtime
from xgen.train.counted_flops import step_flops
from xgen.train.metrics import MetricsLog, TrainMetrics, progress_line
from xgen.train.optimizer import lr_schedule, make_optimizer, mark_reset
from xgen.train.preemption import StopRequest
from xgen.train.resume import check_resume
from xgen.train.step import RunningStats, TrainState, train_step
from xgen.train.throughput import flops_per_token, measure_matmul_peak

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
        if cfg.stage.init_from_stage:
            log.warning(
                "stage %s starts from stage %s in the report; set trainer.init_from=<its run dir> "
                "(task=pretrain_all does) to continue it; starting from scratch",
                cfg.stage.name, cfg.stage.init_from_stage,
            )  # fmt: skip
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
        self.schedule = lr_schedule(cfg.optimizer, self.steps)
        self.tx = make_optimizer(cfg.optimizer)

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
        self.flops_per_token = flops_per_token(cfg.model, cfg.stage.seq_len)
        self.peak_flops = cfg.hardware.peak_flops_per_chip
        if self.peak_flops is None:
            self.peak_flops = measure_matmul_peak(str(runtime.dtype))
            log.info("measured peak: %.1f GFLOP/s per device (%s matmul)", self.peak_flops / 1e9, runtime.dtype)
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

    def fit(self, data: BatchSource) -> dict:
        """Train to `self.steps` on `data` (element i: this host's batch of step i + 1),
        resuming from the newest checkpoint; returns the run summary.

        SIGTERM (a preempted TPU VM, a SLURM time limit) ends the run after the current
        step with a checkpoint, exit code 143; running the command again resumes. Whatever
        ends the loop, an exception included, the checkpoint manager's threads, the metrics
        files and the signal handler are closed and restored."""
        cfg = self.cfg
        t_start = time.perf_counter()
        done = checkpoint.latest_step(self.run_dir / "checkpoints")
        if done is not None and done >= self.steps:
            return self._summary(self.steps, None, t_start, t_start)
        compiled = self.compile_step(data.dataset[0])
        log.info("compiled the train step in %.1f s", time.perf_counter() - t_start)
        self._check_memory(compiled)
        with contextlib.ExitStack() as cleanup:
            mngr = checkpoint.open_manager(
                self.run_dir / "checkpoints", keep=cfg.trainer.checkpoints_to_keep, keep_every=cfg.trainer.checkpoints_keep_every
            )
            cleanup.callback(mngr.close)  # no orbax threads left behind, whatever happens
            batches = data.iterator()
            cleanup.callback(batches.close)  # grain's read-ahead threads
            self._pending_events, self._allowed_changes = [], {}
            state = self._restore(mngr, batches)
            start = int(state.step)
            metrics_log = MetricsLog(
                self.run_dir, tensorboard=cfg.trainer.tensorboard, resume_step=start, primary=jax.process_index() == 0
            )
            cleanup.callback(metrics_log.close)
            if self._allowed_changes:
                changes = {k: [a, b] for k, (a, b) in self._allowed_changes.items()}
                log.warning("resuming with changes allowed by trainer.allow_changes: %s", changes)
                self._pending_events.append({"event": "config_change", "step": start, "changes": changes})
            self._flush_events(metrics_log)
            stop = StopRequest()
            cleanup.callback(stop.restore)
            train_t0 = time.perf_counter()
            step, last, stopped = self._loop(compiled, state, start, train_t0, data, batches, mngr, metrics_log, stop)
            mngr.wait_until_finished()
        if stopped:
            name = signal.Signals(stop.signum).name
            log.warning("%s: saved a checkpoint at step %d of %d; run the same command to resume", name, step, self.steps)
            raise SystemExit(128 + stop.signum)
        return self._summary(start, last, t_start, train_t0)

    def _loop(
        self, compiled, state, start: int, train_t0: float, data: BatchSource, batches: Batches, mngr, metrics_log, stop
    ) -> tuple[int, dict | None, bool]:
        """Steps from `start` to the end or a stop request; returns (last step, last logged
        metrics, whether it stopped early)."""
        cfg = self.cfg
        window = _Window(start)
        pending: list = []  # (step, data index, outputs) not yet checked for events
        last = None
        step = start
        # The data position of the next batch, counted here rather than read from the iterator
        # every step (it drifts from the step only when a rollback skips batches).
        data_index = batches.get_state().get("next_index", 0)
        while step < self.steps:
            state, out = compiled(state, self._global_batch(next(batches)))
            step += 1
            data_index += 1
            stopping = stop.at(step)  # the same step on every process
            pending.append((step, data_index - 1, out))
            window.add(out)
            if cfg.trainer.spike.policy == "rollback" and bool(out["spike"]):
                self._events(metrics_log, pending)
                pending = []
                state, step = self._rollback(mngr, state, step, metrics_log)
                window = _Window(step)  # metrics of the discarded steps leave the averages
                if stopping:
                    return step, last, True  # the step rolled back to is the saved one
                continue
            if step == start + 1 or step % cfg.trainer.log_every == 0 or step == self.steps or stopping:
                self._events(metrics_log, pending)
                pending = []
                last = self._log_window(window, step, start, train_t0, data, metrics_log)
                window = _Window(step)
            if step == self.steps or stopping or (cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0):
                self._save(mngr, state, batches, metrics_log)
            if stopping:
                return step, last, step < self.steps
        return step, last, False

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
        meta = {"config": dataclasses.asdict(self.cfg), "step": step}
        checkpoint.save(mngr, step, self.runtime.to_disk(state), batches.get_state(), meta)

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
            "mfu": tokens_per_s / self.mesh.size * self.flops_per_token / self.peak_flops,
            "elapsed_s": now - train_t0,
            "data_epochs": data.epochs(step),
        }
        metrics_log.write(record)
        eta = record["elapsed_s"] / max(step - start, 1) * (self.steps - step)
        log.info(progress_line(record, self.steps, eta))
        return record

    def _restore(self, mngr, batches) -> TrainState:
        """This run's newest good checkpoint (with the data position), if the command still
        describes its run; else the stage it starts from (model, optimizer and step; its own
        data chunk from the start); else a fresh init."""
        restored = self._restore_latest(mngr, move_damaged=True)
        if restored is not None:
            state, data_state, step, meta = restored
            self._allowed_changes = check_resume(meta.get("config", {}), self.cfg, f"{self.run_dir} at step {step}")
            batches.set_state(data_state)
            return state
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
        mngr.wait_until_finished()  # the newest save committed, so that it is the one restored
        restored = self._restore_latest(mngr, move_damaged=True)
        if restored is None:
            log.warning("loss spike at step %d: no checkpoint to roll back to; the update was skipped", step)
            return state, step
        back, _, back_step, _ = restored
        self._flush_events(metrics_log)
        log.warning("loss spike at step %d: rolled back to step %d; batches of steps %d-%d skipped", step, back_step, back_step + 1, step)
        metrics_log.event({"event": "rollback", "step": step, "to_step": back_step})
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
            log.info(
                "done: %d steps (%d this run), final loss %.4f, %s tokens/s, wall time %.1f s; run dir %s",
                self.steps, trained, summary["final_loss"], f"{summary['tokens_per_s']:,.0f}", wall, self.run_dir,
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
