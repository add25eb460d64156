"""server/offload.py: jobs in fresh spawned processes, results in order, errors raised here."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from server.offload import Job, plan_workers, run_job, run_jobs


def where_and_threads(tag: str, scale: float = 1.0) -> tuple[str, int, int, float]:
    """A job: who ran it (pid), with how many torch threads, and a computed value."""
    return tag, os.getpid(), torch.get_num_threads(), float(torch.arange(4.0).sum()) * scale


def fails(msg: str) -> None:
    raise ValueError(msg)


def train_tiny(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    x = torch.randn(16, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_plan_workers_gives_each_job_a_core_and_shares_the_cores_out():
    assert plan_workers(0, 2) == (0, 0)
    assert plan_workers(1, 2) == (1, 2)  # one job: every core
    assert plan_workers(2, 2) == (2, 1)
    assert plan_workers(3, 2) == (2, 1)  # more jobs than cores: they queue
    assert plan_workers(2, 16) == (2, 8)
    assert plan_workers(4, 16, max_workers=1) == (1, 16)  # one GPU: one worker


def test_jobs_run_in_other_processes_in_order_with_the_planned_threads():
    out = run_jobs([Job(where_and_threads, ("a",)), Job(where_and_threads, ("b",), {"scale": 2.0})], cpus=2)
    assert [o[0] for o in out] == ["a", "b"] and [o[3] for o in out] == [6.0, 12.0]
    assert all(o[1] != os.getpid() for o in out)
    assert [o[2] for o in out] == [1, 1]  # 2 jobs on 2 cores: one thread each
    tag, pid, threads, _ = run_job(where_and_threads, "solo")
    assert tag == "solo" and pid != os.getpid() and threads >= 1


def test_in_process_runs_here_and_gives_the_same_results():
    here = run_jobs([Job(train_tiny, (3,)), Job(train_tiny, (4,))], in_process=True)
    there = run_jobs([Job(train_tiny, (3,)), Job(train_tiny, (4,))], cpus=2)
    for a, b in zip(here, there):
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not torch.allclose(here[0]["weight"], here[1]["weight"])  # the seeds differ
    assert run_job(where_and_threads, "x", in_process=True)[1] == os.getpid()
    assert run_jobs([]) == []


def test_a_failing_job_raises_here_with_its_message():
    with pytest.raises(ValueError, match="bad value in job 2"):
        run_jobs([Job(where_and_threads, ("ok",)), Job(fails, ("bad value in job 2",))], cpus=2)


def test_jobs_can_be_started_from_a_thread_and_carry_arrays_by_value():
    """The ServerApp runs in a thread of the simulation process: jobs started there work the same."""
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    got: list[object] = []
    th = threading.Thread(target=lambda: got.append(run_job(np.sum, arr)))
    th.start()
    th.join()
    assert got == [66]
