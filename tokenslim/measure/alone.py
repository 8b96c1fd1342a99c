"""Timing under torchrun: one rank times, alone on its host, while every other rank waits.

A timing taken while another process computes on the same cores (or the same memory bandwidth)
measures the contention, not the model. So under a process group every timing goes through
:func:`time_alone`: all ranks meet first (none is still computing), rank 0 times with the CPU
threads of all its host's ranks (they are idle), the others wait in a collective for its figures,
and every rank returns the same result. :func:`check_alone` is how :func:`~tokenslim.measure.compare`
refuses a timing taken any other way under torchrun. The figures are rank 0's host's (each
timing records the host it ran on); on GPUs, rank 0's device's.
"""
from __future__ import annotations

import contextvars
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from ..ranks import current, launched_world_size, local_world_size, on_main

T = TypeVar("T")

# True inside time_alone on the timing rank: the one place a timing is allowed under torchrun.
_TURN: contextvars.ContextVar = contextvars.ContextVar("tokenslim_timing_turn", default=False)


def host_threads(threads: int) -> int:
    """The CPU threads the timing rank uses: its own times the ranks on its host, at most the cores
    this process may run on (2 ranks of 1 thread time like 1 process of 2 threads)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(threads * local_world_size(), cores))


def time_alone(fn: Callable[[], T]) -> T:
    """``fn()`` (a timing) run on rank 0 while every other rank waits; every rank returns its value.

    Alone in a process (no torchrun): ``fn()``. Under torchrun: a barrier first, so that no rank is
    still computing; rank 0 then runs ``fn`` with :func:`host_threads` CPU threads (restored
    after); an error there is raised on every rank.
    """
    info = current()
    if info.world_size == 1:
        return fn()
    dist.barrier()

    def timed() -> T:
        before = torch.get_num_threads()
        torch.set_num_threads(host_threads(before))
        token = _TURN.set(True)
        try:
            return fn()
        finally:
            _TURN.reset(token)
            torch.set_num_threads(before)

    return on_main(timed, info)


def check_alone(what: str = "a timing") -> None:
    """Refuse ``what`` under torchrun unless it runs inside :func:`time_alone` (other ranks would
    compute on the same host while it runs, and its figures would measure them).

    Raises:
        RuntimeError: saying to time in one process, or through :func:`time_alone`.
    """
    if launched_world_size() > 1 and not _TURN.get():
        raise RuntimeError(f"{what} under torchrun (world size {launched_world_size()}) would run while the other "
                           "ranks compute on the same host, and would measure them: time in a single process, or "
                           "call it inside tokenslim.measure.alone.time_alone (rank 0 times, the others wait)")


__all__ = ["check_alone", "host_threads", "time_alone"]
