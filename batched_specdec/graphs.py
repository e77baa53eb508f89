"""Graph replay of decode-sized forwards without inductor (``cuda_graphs=True``).

A decode-sized forward through a ragged cache (target-only steps, verify forwards, a model draft's and a feature
head's forwards, with the hidden states a feature drafter reads; :func:`batched_specdec.forwards.model_forward`)
is recorded once per key and replayed after:

* the key is the forward's shape (rows, width, span bucket, what it returns) and the addresses of every buffer it
  reads or writes in place (the cache's lengths and K/V buffers, the model's weights). A moved buffer is a new key:
  the forward is recorded again, and :data:`COUNTS` says how often that happened (``moved``);
* the tensor inputs (token ids, a feature head's features) are copied into the recording's static input buffers
  before each replay; the session's and drafters' per-row state is updated in place, so replays read it;
* a new key first runs the forward eagerly :attr:`GraphBackend.warmup_runs` times on the static buffers (attention
  backends that plan per shape plan there), then records it, then replays it (the writes into the cache repeat the
  same entries, so they change nothing);
* outputs live in the pool of the graphs of one (model, role): a replay of any graph of a pool may overwrite the
  outputs of the others, so callers consume or copy them before the next forward of the same role. The target's
  graphs and the draft's (``role``) have pools of their own, so they never overwrite each other's outputs;
* prefill chunks, a drafter's catch-up and forwards wider than :data:`MAX_WIDTH` stay eager.

On CUDA a recording is a ``torch.cuda.CUDAGraph`` captured on a side stream into a memory pool shared by the role's
graphs (the pattern of SGLang's ``CudaGraphRunner``: static buffers, warm-up, capture, replay). Elsewhere it is a
:class:`StandInGraph`: it records by running the forward once and replays by running the recorded forward again,
checking that every tensor it reads from outside is at the address it had at recording, copying the results into
the recording's outputs (same tensors, same addresses) and overwriting the outputs of the pool's other recordings
with NaN or -1, as a CUDA replay may. While a stand-in records or replays, any host read (``.item()``,
``.tolist()``, ``.cpu()``, ``nonzero``, ``bool(tensor)``, a copy to the host) raises :class:`HostReadInGraph`. So
the whole decode loop runs through the graph path on a CPU, in tests, with the checks a CUDA capture would make.

Unmeasured: nothing here has run on a GPU yet, so ``cuda_graphs`` is off by default everywhere
(:func:`batched_specdec.options.resolve_options`).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from batched_specdec.devices import is_cuda

MAX_WIDTH = 16
"""Widest forward (queries per row) that is recorded; wider ones (catch-ups after long stretches) run eagerly."""

SPAN_BASE = 64
"""The smallest span bucket; the buckets are ``SPAN_BASE * 2**k`` and ``1.5 * SPAN_BASE * 2**k`` (see
:func:`graph_span`)."""


@dataclass
class GraphCounts:
    """Process-wide counters (a call's are the difference over it): forwards recorded, re-recorded because a buffer
    moved, replayed, and the seconds recording took (warm-up runs included)."""

    recorded: int = 0
    moved: int = 0
    replayed: int = 0
    seconds: float = 0.0

    def snapshot(self) -> GraphCounts:
        return GraphCounts(self.recorded, self.moved, self.replayed, self.seconds)

    def since(self, before: GraphCounts) -> dict:
        """The counts since ``before``, as the stats report them."""
        return {"graphs_recorded": self.recorded - before.recorded,
                "graphs_rerecorded_moved": self.moved - before.moved,
                "graph_replays": self.replayed - before.replayed,
                "graph_recording_s": round(self.seconds - before.seconds, 4)}


COUNTS = GraphCounts()


def graph_span(max_len: int, capacity: int) -> int:
    """The attention span of a recorded forward that reads keys below ``max_len``: the smallest of ``64, 96, 128,
    192, 256, 384, ...`` (powers of two and 1.5 times them, from :data:`SPAN_BASE`) at least ``max_len``, capped at
    ``capacity``. Geometric, so a long run records a few spans per (rows, width), each at most 1.5x what it reads."""
    span = SPAN_BASE
    while span < max_len:
        span = span * 3 // 2 if span & (span - 1) == 0 else span * 4 // 3
    return min(span, capacity)


class HostReadInGraph(RuntimeError):
    """A host read (or a tensor read from a new address) inside a recorded forward: a CUDA capture would fail or
    replay the wrong memory."""


_HOST_READ_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}
_HOST_READ_OPS = {"aten.item.default", "aten._local_scalar_dense.default", "aten.is_nonzero.default",
                  "aten.nonzero.default", "aten.equal.default", "aten.masked_select.default",
                  "aten.allclose.default", "aten.unique_consecutive.default", "aten._unique2.default"}


class _NoHostReads(TorchFunctionMode):
    """Raises :class:`HostReadInGraph` on a tensor method that reads values on the host."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in _HOST_READ_METHODS:
            raise HostReadInGraph(f"host read inside a recorded forward: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


class _ExternalReads(TorchDispatchMode):
    """Collects the storages every op reads that were not made inside the region, and raises
    :class:`HostReadInGraph` on ops that read values on the host (``.item()``, ``nonzero``, boolean indexing)."""

    def __init__(self) -> None:
        super().__init__()
        self.external: dict[int, tuple] = {}
        self._made: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in _HOST_READ_OPS or name.startswith("aten.index.Tensor") and _bool_index(args):
            raise HostReadInGraph(f"host read inside a recorded forward: {name}")
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and (ptr := _storage(t)) and ptr not in self._made:
                self.external.setdefault(ptr, (tuple(t.shape), t.dtype))
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and (ptr := _storage(t)) and ptr not in self.external:
                self._made.add(ptr)
        return out


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _bool_index(args) -> bool:
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1:]))


def _poison(t: Tensor | None) -> None:
    if t is not None:
        t.fill_(float("nan") if t.is_floating_point() else -1)


class StandInGraph:
    """The CPU stand-in of ``torch.cuda.CUDAGraph`` (see the module docstring): :meth:`record` runs ``fn`` once and
    keeps it, its outputs and the addresses it read; :meth:`replay` runs it again, checks those addresses and
    copies the results into the recorded outputs."""

    def __init__(self) -> None:
        self.fn: Callable | None = None
        self.outputs: tuple = ()
        self.external: dict[int, tuple] = {}

    def record(self, fn: Callable, pool) -> tuple:
        self.fn = fn
        reads = _ExternalReads()
        with _NoHostReads(), reads:
            self.outputs = fn()
        self.external = reads.external
        return self.outputs

    def replay(self) -> None:
        reads = _ExternalReads()
        with _NoHostReads(), reads:
            results = self.fn()
        if reads.external.keys() != self.external.keys():
            moved = sorted(set(reads.external) ^ set(self.external))[:4]
            raise HostReadInGraph(f"a replay read tensors at other addresses than its recording (e.g. "
                                  f"{[reads.external.get(p, self.external.get(p)) for p in moved]}): an input that is "
                                  "not a static buffer")
        for kept, new in zip(self.outputs, results, strict=True):
            if kept is not None:
                if new.shape != kept.shape or new.dtype != kept.dtype:
                    raise HostReadInGraph(f"a replay returned {tuple(new.shape)} {new.dtype}, recorded "
                                          f"{tuple(kept.shape)} {kept.dtype}")
                kept.copy_(new)


class CudaGraph:
    """A ``torch.cuda.CUDAGraph`` with :class:`StandInGraph`'s interface: captured on the pool's side stream into the
    pool's memory."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.outputs: tuple = ()

    def record(self, fn: Callable, pool) -> tuple:
        with torch.cuda.graph(self.graph, pool=pool.handle, stream=pool.stream):
            self.outputs = fn()
        return self.outputs

    def replay(self) -> None:
        self.graph.replay()


@dataclass
class _Recording:
    addresses: tuple
    inputs: dict[str, Tensor]
    graph: object
    outputs: tuple = ()


@dataclass
class GraphPool:
    """The recordings of one (model, role) on one device, sharing one memory pool (CUDA) and one side stream."""

    device: torch.device
    recordings: dict[tuple, _Recording] = field(default_factory=dict)
    handle: object = None
    stream: object = None

    def __post_init__(self) -> None:
        self.cuda = is_cuda(self.device)
        if self.cuda:
            self.handle = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(self.device)
        self.warmup_runs = 2 if self.cuda else 1

    def run(self, shape: tuple, addresses: tuple, fn: Callable[[dict], tuple], inputs: dict[str, Tensor]) -> tuple:
        """``fn(static inputs)``'s outputs, recorded for ``(shape, addresses)`` the first time, replayed after, with
        ``inputs`` copied into the recording's static inputs first. The outputs are the recording's own tensors: read
        or copy them before the pool's next forward."""
        rec = self.recordings.get(shape)
        if rec is None or rec.addresses != addresses:
            COUNTS.moved += rec is not None
            self.recordings.pop(shape, None)  # its graph read buffers that have moved: never replayed again
            rec = self.recordings[shape] = self._record(addresses, fn, inputs)
        else:
            for name, value in inputs.items():
                rec.inputs[name].copy_(value)
        if not self.cuda:
            for other in self.recordings.values():
                if other is not rec:
                    for t in other.outputs:
                        _poison(t)
        rec.graph.replay()
        COUNTS.replayed += 1
        return rec.outputs

    def _record(self, addresses: tuple, fn: Callable[[dict], tuple], inputs: dict[str, Tensor]) -> _Recording:
        t0 = time.perf_counter()
        static = {name: value.clone() for name, value in inputs.items()}  # outside the pool: they outlive replays
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for _ in range(self.warmup_runs):
                    fn(static)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            torch.cuda.synchronize(self.device)
        else:
            for _ in range(self.warmup_runs):
                fn(static)
        graph = CudaGraph() if self.cuda else StandInGraph()
        outputs = graph.record(lambda: fn(static), self)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        COUNTS.recorded += 1
        COUNTS.seconds += time.perf_counter() - t0
        return _Recording(addresses, static, graph, outputs)


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pool_for(model, role: str, device: torch.device) -> GraphPool:
    """The :class:`GraphPool` of ``model``'s forwards through caches of ``role`` on ``device`` (kept while the model
    lives, across calls: a later call on the same pooled buffers replays without recording)."""
    pools = _POOLS.setdefault(model, {})
    key = (role, str(device))
    pool = pools.get(key)
    if pool is None:
        pool = pools[key] = GraphPool(torch.device(device))
    return pool


def release() -> None:
    """Drop every recording (and, on CUDA, the memory its pools hold once nothing else refers to it)."""
    _POOLS.clear()
