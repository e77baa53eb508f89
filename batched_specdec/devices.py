"""Every device query the library makes, in one place: what only a CUDA device does (synchronise, count peak
memory, time with events, pin host memory) and what the CPU does instead.

Code elsewhere asks these functions rather than testing ``device.type == "cuda"`` itself, so each CUDA branch is
written once and is tested on CPU machines with ``torch.cuda`` mocked (tests/test_devices.py).
"""

from __future__ import annotations

import os
import platform
import resource
import time

import torch


def is_cuda(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device (the only kind with CUDA graphs, events and pinned copies here)."""
    return torch.device(device).type == "cuda"


def device_name(device: torch.device) -> str:
    """A readable name: the GPU's (``torch.cuda.get_device_name``), or the CPU's with its cores and torch threads.

    Examples
    --------
    >>> device_name(torch.device("cpu"))  # doctest: +SKIP
    'CPU (x86_64, 2 cores visible, 2 torch threads)'
    """
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
            f"{torch.get_num_threads()} torch threads)")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU, which runs synchronously)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA device (the CPU's peak resident memory cannot be reset)."""
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, kind)``: peak CUDA memory allocated since the last reset, or the process' peak resident memory."""
    if is_cuda(device):
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


def host_copy(state: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Start copying ``state`` to the host without waiting: on CUDA into pinned memory, non-blocking, with an event
    recorded after the copy; elsewhere a plain copy (the device already ran it). Returns ``(host tensor, event or
    None)``; read the tensor only after :func:`host_arrived`."""
    if not is_cuda(state.device):
        return state.cpu(), None
    host = torch.empty(state.shape, dtype=state.dtype, pin_memory=True)
    host.copy_(state, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def host_arrived(host: torch.Tensor, event) -> torch.Tensor:
    """The tensor of :func:`host_copy`, once its copy has finished."""
    if event is not None:
        event.synchronize()
    return host


class StepClock:
    """Named time marks without host syncs: CUDA events (read after the step's one sync) or ``perf_counter``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = is_cuda(device)
        self.marks: dict[str, object] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def seconds(self, a: str, b: str) -> float:
        """Seconds from mark ``a`` to mark ``b`` (0.0 when either is missing)."""
        if a not in self.marks or b not in self.marks:
            return 0.0
        if self.cuda:
            return self.marks[a].elapsed_time(self.marks[b]) / 1e3
        return self.marks[b] - self.marks[a]
