"""The code paths only a CUDA device reaches, run on CPU with ``torch.cuda`` mocked to one device.

Each test forces one branch that a CPU run never takes (device names, synchronisation, peak memory, events, pinned
copies, CUDA-graph settings, the rejection sampler's launch policy) and checks what it calls and returns, so a typo
or a wrong call there fails here instead of on the first GPU run.
"""

from __future__ import annotations

import resource
from types import SimpleNamespace

import pytest
import torch

from batched_specdec import capture, devices
from batched_specdec.decode.batch import RaggedBatch
from batched_specdec.decode.stats import GenerationStats, PhaseTimer
from batched_specdec.options import resolve_delayed_host_read
from batched_specdec.report import Timing, print_report

CUDA = torch.device("cuda")


class _FakeEvent:
    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        self.enable_timing = enable_timing
        self.recorded_at = None
        self.waited = False

    def record(self) -> None:
        _FakeEvent.clock += 0.25  # every event 250 ms after the previous one
        self.recorded_at = _FakeEvent.clock

    def synchronize(self) -> None:
        self.waited = True

    def elapsed_time(self, other: _FakeEvent) -> float:
        assert self.enable_timing and other.enable_timing, "elapsed_time needs events created with enable_timing"
        return (other.recorded_at - self.recorded_at) * 1e3  # milliseconds, as CUDA reports


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` with one fake H200: the functions the library calls, recording each call. Only the functions
    that exist in ``torch.cuda`` are replaced (``raising=True``), so a misspelt call still fails."""
    calls = []

    def record(name, result=None):
        def fn(*args, **kwargs):
            calls.append(name)
            return result
        return fn

    monkeypatch.setattr(torch.cuda, "get_device_name", record("get_device_name", "NVIDIA H200"))
    monkeypatch.setattr(torch.cuda, "synchronize", record("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", record("reset_peak_memory_stats"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", record("max_memory_allocated", 3 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        record("get_device_properties", SimpleNamespace(multi_processor_count=132)))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return calls


def test_device_name_on_cuda_is_the_gpus_name(fake_cuda):
    assert devices.device_name(CUDA) == "NVIDIA H200"
    assert devices.device_name(torch.device("cuda:0")) == "NVIDIA H200"
    assert devices.device_name(torch.device("cpu")).startswith("CPU (")


def test_report_prints_the_gpus_name(fake_cuda):
    from rich.console import Console

    console = Console(record=True, width=200)
    config = SimpleNamespace(no_baseline=False, draft="ngram", gamma=3)
    base, spec = (GenerationStats([0], [0], [10], [10], wall, steps=10, row_steps=10) for wall in (1.0, 0.5))
    print_report(console, config, base, spec, Timing([10.0], [20.0]), CUDA)
    assert "on NVIDIA H200" in console.export_text()


def test_synchronize_and_peak_memory_call_cuda_on_cuda_only(fake_cuda):
    devices.synchronize(CUDA)
    devices.reset_peak_memory(CUDA)
    assert devices.peak_memory(CUDA) == (3 * 2**30, "cuda_max_allocated")
    assert fake_cuda == ["synchronize", "reset_peak_memory_stats", "max_memory_allocated"]
    fake_cuda.clear()
    cpu = torch.device("cpu")
    devices.synchronize(cpu)
    devices.reset_peak_memory(cpu)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peak, kind = devices.peak_memory(cpu)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert kind == "process_max_rss" and 1024 * before <= peak <= 1024 * after  # in bytes
    assert fake_cuda == []


def test_phase_timer_synchronises_cuda_at_every_mark(fake_cuda):
    timer = PhaseTimer(True, CUDA)
    timer.start()
    timer.lap("draft")
    timer.lap("verify")
    assert fake_cuda == ["synchronize"] * 3
    assert set(timer.split) == {"prefill", "plan", "draft", "verify", "accept", "commit", "sync"}


def test_step_clock_reads_cuda_events(fake_cuda):
    clock = devices.StepClock(CUDA)
    clock.mark("start")
    clock.mark("draft")
    clock.mark("verify")
    assert all(isinstance(e, _FakeEvent) for e in clock.marks.values())
    assert clock.seconds("start", "verify") == pytest.approx(0.5)
    assert clock.seconds("start", "missing") == 0.0


def test_host_copy_on_cuda_pins_memory_and_waits_for_its_event(fake_cuda, monkeypatch):
    """CPU torch has no pinned allocator: allocations with ``pin_memory=True`` are recorded and made plain."""
    empty, pinned = torch.empty, []

    def empty_recording_pins(*args, pin_memory=False, **kwargs):
        pinned.append(pin_memory)
        return empty(*args, **kwargs)

    class _OnCuda:  # a tensor that reports a CUDA device
        def __init__(self, t):
            self.t, self.device, self.shape, self.dtype = t, CUDA, t.shape, t.dtype

    monkeypatch.setattr(torch, "empty", empty_recording_pins)
    state = torch.tensor([1, 0, 7, 9])
    wrapped = _OnCuda(state)
    original_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False: original_copy(
        self, src.t if isinstance(src, _OnCuda) else src))
    host, event = devices.host_copy(wrapped)
    assert pinned == [True] and isinstance(event, _FakeEvent) and event.recorded_at is not None
    assert torch.equal(devices.host_arrived(host, event), state) and event.waited


def test_delayed_host_read_defaults_on_for_cuda_with_an_integer_gamma():
    assert resolve_delayed_host_read(None, CUDA, False, 3) is True
    assert resolve_delayed_host_read(None, CUDA, True, "auto") is False
    assert resolve_delayed_host_read(None, torch.device("cpu"), False, 3) is False


def test_cuda_graph_settings_on_cuda(monkeypatch):
    assert capture.compile_options(CUDA, True)["mode"] == "reduce-overhead"
    assert capture.compile_options(torch.device("cpu"), True)["mode"] is None
    begun, marked = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: begun.append(1))
    monkeypatch.setattr(torch._dynamo, "mark_static_address", lambda t: marked.append(t))
    capture.step_begin(CUDA)
    capture.step_begin(torch.device("cpu"))
    assert begun == [1]
    buffer = SimpleNamespace(device=CUDA)
    assert capture.static(buffer, True) is buffer and marked == [buffer]
    capture.static(buffer, False)
    capture.static(torch.zeros(2), True)
    assert marked == [buffer]


def test_rejection_sampler_splits_the_vocabulary_for_small_batches_on_a_gpu(fake_cuda, monkeypatch):
    """On a GPU (not the interpreter) a batch too small to fill the SMs is spread over vocabulary chunks."""
    from batched_specdec.kernels import _launch

    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    _launch._sm_count.cache_clear()
    try:
        small = _launch.rejection_sample_config(1, 151936, CUDA)
        large = _launch.rejection_sample_config(256, 151936, CUDA)
        cpu = _launch.rejection_sample_config(1, 151936, torch.device("cpu"))
    finally:
        _launch._sm_count.cache_clear()
    assert small["NUM_SPLITS"] > 1 and large["NUM_SPLITS"] == 1 and cpu["NUM_SPLITS"] == 1
    assert "get_device_properties" in fake_cuda


def test_ragged_batch_delayed_read_takes_the_cuda_copy_path(fake_cuda, monkeypatch):
    """With the delayed read every sync starts a host copy (into the batch's ring of pinned buffers) and reads the
    previous one after its event."""
    started = []

    class Ring:  # devices.HostRing's interface, recording each copy
        def __init__(self, device):
            self.copies = []

        def start(self, state):
            started.append(state.clone())
            self.copies.append((state.clone(), _FakeEvent()))
            return len(self.copies) - 1

        def read(self, ticket):
            host, event = self.copies[ticket]
            return devices.host_arrived(host, event)

    monkeypatch.setattr("batched_specdec.decode.batch.HostRing", Ring)
    batch = RaggedBatch([[1, 2, 3], [4]], [2, 2], [0, 1], 16, 0, torch.device("cpu"), delayed_host_read=True)
    batch.sync()
    assert batch.view.seq_lens.tolist() == [3, 1]  # nothing arrived yet: the initial view
    batch.seq_lens += 1
    batch.sync()
    assert len(started) == 2 and batch.view.seq_lens.tolist() == [3, 1]  # the first copy, read now
