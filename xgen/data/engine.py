"""Where `prepare`'s units run: this machine's processes (`local`) or Ray tasks (`ray`).

Both give the same output, because a unit's output depends only on the unit (see
`xgen.data.units`); the engine only decides where and how often it runs. A unit whose
worker dies (killed, out of memory, a preempted node) is run again, up to `retries` times;
an error in the data itself (a `ConfigError`) is not retried: it would fail again.

`local` runs units in spawned processes (safe beside JAX's threads); a dead process
breaks the pool, which is rebuilt and given the unfinished units. `ray` joins the cluster
at `ray_address`, or starts a local Ray for the task and stops it after; at most
`workers` units are in flight (Ray would run every task it is given on an idle cluster), so
`workers` is the parallelism on either engine and the driver's memory does not grow with
the corpus.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Iterator

from xgen.config import ConfigError, PrepareConfig
from xgen.data.units import UnitJob, run_unit

log = logging.getLogger(__name__)


def run_units(jobs: list[UnitJob], opts: PrepareConfig) -> Iterator[dict]:
    """Each job's completion record, in completion order (the caller orders them)."""
    if not jobs:
        return
    if opts.engine == "ray":
        yield from _ray(jobs, opts)
    elif opts.workers == 0:
        for job in jobs:
            yield run_unit(job)
    else:
        yield from _processes(jobs, opts)


def _give_up(job: UnitJob, tries: int, why: str, opts: PrepareConfig) -> ConfigError:
    return ConfigError(
        f"prepare: unit {job.unit.id} ({job.unit.path}, range {job.unit.index + 1} of {job.unit.count}) failed {tries} times "
        f"(prepare.retries={opts.retries}): {why}; the units done are kept: run the same command to go on"
    )


def _processes(jobs: list[UnitJob], opts: PrepareConfig) -> Iterator[dict]:
    todo = list(reversed(jobs))
    tries = {job.unit.id: 0 for job in jobs}
    while todo:
        lost: list[UnitJob] = []
        with ProcessPoolExecutor(min(opts.workers, len(todo)), mp_context=get_context("spawn")) as pool:
            running: dict = {}
            while (todo or running) and not lost:
                while todo and len(running) < 2 * opts.workers:
                    job = todo.pop()
                    running[pool.submit(run_unit, job)] = job
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        lost.append(job)
                        continue
                    yield result
            lost += running.values()  # in flight when the pool broke: their results are gone
        for job in lost:
            tries[job.unit.id] += 1
            if tries[job.unit.id] > opts.retries:
                raise _give_up(job, tries[job.unit.id], "its worker process died", opts)
        if lost:
            log.warning("prepare: a worker process died; %d units in flight are run again", len(lost))
            todo += lost


def _ray_module():
    try:
        import ray
    except ImportError:
        raise ConfigError("prepare.engine=ray needs Ray: pip install 'xgen[ray]'") from None
    return ray


@contextmanager
def engine_session(opts: PrepareConfig) -> Iterator[None]:
    """For `ray`: joins `ray_address`, or starts a local Ray (stopped at the end); for
    `local`, nothing. Several sources' units then share one cluster connection."""
    if opts.engine != "ray":
        yield
        return
    ray = _ray_module()
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if opts.ray_address:
            ray.init(address=opts.ray_address, log_to_driver=False)
        else:
            # address="local": a new Ray of our own, never one `ray start` left on the machine
            ray.init(address="local", num_cpus=max(opts.workers, 1), include_dashboard=False, log_to_driver=False)
            started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _ray(jobs: list[UnitJob], opts: PrepareConfig) -> Iterator[dict]:
    ray = _ray_module()
    with engine_session(opts):
        # A dead worker (system failure) is retried by Ray itself, up to max_retries; an
        # OSError (a storage hiccup) too; a ConfigError (the data) is not.
        task = ray.remote(num_cpus=1, max_retries=opts.retries, retry_exceptions=[OSError])(run_unit)
        todo = list(reversed(jobs))
        running: dict = {}
        limit = max(opts.workers, 1)
        while todo or running:
            while todo and len(running) < limit:  # Ray runs all it is given at once, cluster permitting
                job = todo.pop()
                running[task.remote(job)] = job
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                job = running.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayTaskError as ex:
                    cause = ex.cause if isinstance(getattr(ex, "cause", None), BaseException) else ex
                    if isinstance(cause, ConfigError):
                        raise cause from None
                    raise _give_up(job, opts.retries + 1, f"{type(cause).__name__}: {cause}", opts) from None
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as ex:
                    raise _give_up(job, opts.retries + 1, type(ex).__name__, opts) from None
