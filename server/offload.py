"""The coordinator's model training, each job in a fresh worker process.

Flower's simulation runtime runs the ServerApp in a thread of the ``flwr-simulation`` process,
whose other threads (the Ray driver, the state injector / extractor loops, gRPC) share its GIL;
a classifier's many small steps there wait for it. Measured on 2 idle cores (stop 27): phi_down
on the demo pool took 36-47 s per seed inside ``plan-server demo`` against 22-25 s in a process
of its own with the same 2 torch threads (30-31 s in a second thread of an otherwise idle
process). A job here runs in a spawned process, in its main thread, with torch threads set from
the cores it is given, so several jobs (one per downstream seed) also run side by side.

Arguments and results travel by value (pickled with the standard pickler: no shared memory, no
file descriptors passed), so a job function must be importable at module level and take and
return picklable values. An exception in a job is raised again here.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

LOG = logging.getLogger("plan.offload")


@dataclass(frozen=True)
class Job:
    """One call ``fn(*args, **kwargs)`` to run in a worker process."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None


def usable_cpus() -> int:
    """The cores this process may run on (its affinity where the OS reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def plan_workers(jobs: int, cpus: int, max_workers: int | None = None) -> tuple[int, int]:
    """(worker processes, torch threads each) for ``jobs`` jobs on ``cpus`` cores: one job per core
    up to the jobs there are, the cores shared out evenly among the workers."""
    if jobs < 1:
        return 0, 0
    workers = max(1, min(jobs, cpus, max_workers or jobs))
    return workers, max(1, cpus // workers)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_pickled(blob: bytes) -> bytes:
    job: Job = pickle.loads(blob)
    return pickle.dumps(job.fn(*job.args, **(job.kwargs or {})), protocol=pickle.HIGHEST_PROTOCOL)


def run_jobs(jobs: Sequence[Job], in_process: bool = False, max_workers: int | None = None,
             cpus: int | None = None) -> list[Any]:
    """Each job's result, in the jobs' order; the jobs run in spawned worker processes
    (:func:`plan_workers` of ``cpus``, default the usable cores), or here, one after the other,
    with ``in_process`` (``coordinator.offload`` false)."""
    if not jobs:
        return []
    if in_process:
        return [j.fn(*j.args, **(j.kwargs or {})) for j in jobs]
    workers, threads = plan_workers(len(jobs), cpus or usable_cpus(), max_workers)
    LOG.info("%d job(s) in %d worker process(es), %d torch thread(s) each", len(jobs), workers, threads)
    blobs = [pickle.dumps(j, protocol=pickle.HIGHEST_PROTOCOL) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as ex:
        return [pickle.loads(out) for out in ex.map(_run_pickled, blobs)]


def run_job(fn: Callable[..., Any], *args: Any, in_process: bool = False, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in one fresh worker process with every usable core (:func:`run_jobs`)."""
    return run_jobs([Job(fn, args, kwargs)], in_process=in_process)[0]
