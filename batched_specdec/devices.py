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


class HostRing:
    """Non-blocking copies of small device tensors to the host without an allocation per copy: on CUDA a ring of
    ``slots`` pinned buffers, each with an event recorded after its copy (a pinned allocation costs far more than
    the copy); elsewhere a plain copy.

    :meth:`start` returns a ticket; :meth:`read` waits for that copy and returns the slot's contents, valid until
    ``slots`` later copies reuse the slot (the delayed host read has one copy in flight and reads it at the next
    step: two slots suffice). A slot grows (one new pinned buffer) only when a copy is larger than any before.
    """

    def __init__(self, device: torch.device, slots: int = 2) -> None:
        self.cuda = is_cuda(device)
        self.slots: list[list] = [[None, None, None] for _ in range(slots)]  # per slot: buffer, event, host view
        self.copies = 0
        self.allocations = 0

    def start(self, state: torch.Tensor) -> int:
        """Start copying ``state`` (1-D) to the host; returns the ticket :meth:`read` takes."""
        ticket = self.copies
        self.copies += 1
        slot = self.slots[ticket % len(self.slots)]
        if not self.cuda:
            slot[2] = state.cpu()
            return ticket
        if slot[1] is not None:
            slot[1].synchronize()  # its last copy was read long ago; never overwrite one in flight
        if slot[0] is None or slot[0].numel() < state.numel() or slot[0].dtype != state.dtype:
            slot[0] = torch.empty(state.numel(), dtype=state.dtype, pin_memory=True)
            self.allocations += 1
        host = slot[0][: state.numel()]
        host.copy_(state, non_blocking=True)
        if slot[1] is None:
            slot[1] = torch.cuda.Event()
        slot[1].record()
        slot[2] = host
        return ticket

    def read(self, ticket: int) -> torch.Tensor:
        """The host copy of ticket ``ticket``, once it has arrived."""
        if ticket < self.copies - len(self.slots):
            raise RuntimeError(f"host copy {ticket} was overwritten: the ring holds the last {len(self.slots)}")
        _, event, host = self.slots[ticket % len(self.slots)]
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
