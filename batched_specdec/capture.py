"""The capturable decode step: what ``compile=True`` compiles, with which settings, and how graphs are counted.

With ``compile=True`` (``speculative_generate_batch``, ``autoregressive_generate_batch``, ``generate``, the CLI's
``--compile``) every decode-sized forward through a ragged cache (:func:`batched_specdec.forwards.model_forward`:
verify, draft and target-only forwards) and the step's sampling and commit (:mod:`batched_specdec.engine`) run
through ``torch.compile(fullgraph=True, dynamic=True)``:

* ``fullgraph=True``: a graph break is an error, not a silent fallback to eager code.
* ``dynamic=True`` (:data:`DYNAMIC_SHAPES`): one graph serves every batch size, forward width and attention span (a
  few more where torch specialises sizes 0 and 1). The state a step reads is static, the cache's lengths and the
  batch's buffers are updated in place, so nothing recompiles from step to step. Static shapes compile one graph
  per (batch size, width, span bucket): on CPU several times the graphs, each steps ~15% faster on a tiny model.
  Forwards with flex attention on CPU stay eager (flex compiles itself per shape there; torch 2.13's inductor cannot
  compile it with dynamic shapes for the CPU).
* On CUDA, ``mode="reduce-overhead"``: CUDA graphs, recorded lazily the first time each shape runs (one per batch
  size bucket, width and span bucket of ``ragged_cache.SPAN_BUCKET`` columns) and replayed after. The KV buffers,
  lengths and per-row buffers are marked static, so replays read and write them in place. The engine marks the
  start of every step (``torch.compiler.cudagraph_mark_step_begin``), so a step's graphs may reuse the memory of
  the previous step's outputs.
* Graph-stable state (:data:`BUFFERS`): a recorded CUDA graph replays only on the addresses it was recorded with,
  and cudagraph trees record again (up to a limit, then run without graphs) when a static input moves. So with
  ``compile=True`` the per-row buffers and KV caches come from a pool that keeps them across calls of the same
  shape (capacities are rounded up to :data:`CAPACITY_BUCKET`), and compaction copies the kept rows into the front
  of the same buffers. The batch is compacted only to power-of-two sizes (:func:`batch_bucket`): finished rows stay
  in place, frozen by the commit kernel, until the live rows fit the next smaller power of two, so a run records
  graphs for its first batch size and a few powers of two below it.
* The Triton kernels are torch custom ops (``torch.ops.batched_specdec.*``, with fake implementations), so compiled
  graphs call them as single nodes; on CPU the engine calls their torch references, which are traced and fused.

Exactness: a compiled step computes the same model with fused kernels, so its logits agree with the eager step's
to float rounding (within ~1e-5 in the tests), as the eager verify's already do with target-only decoding's. Tokens
equal the eager run's in every test (greedy and seeded sampled); a greedy argmax or a sampling decision that sits on
a near-tie can go the other way, and either way every token is drawn exactly from the target as computed.

Compilation costs seconds per graph on CPU (tens of seconds for the embedded 135M model); it pays on long runs,
where Python dispatch dominates the step. Off by default everywhere: on CUDA it becomes the default only once
measured faster end to end there (on an H200 a tiny model's compiled step recorded each graph once and replayed it,
whole calls 1.7-2.7x faster than eager; a 7B model's compiled warm-up from a cold inductor cache took 115 s for
target-only decoding and longer for speculative decoding:
``benchmarks/results/gpu_h200.md``).
"""

from __future__ import annotations

import torch

from batched_specdec.devices import is_cuda

COMPILE_LIMIT = 256
"""Graphs one compiled function may hold (torch's default is 8: a few models and static-shape flex forwards reach
it); past the limit a call fails (``fail_on_recompile_limit_hit``) rather than silently running eagerly."""

DYNAMIC_SHAPES = True
"""Compile with dynamic shapes (default): few graphs, each new shape free of compile cost. Set it to False for one
graph per (batch size, width, span bucket): specialised kernels, about 15% faster steps of a tiny model on CPU, at
the cost of a compile (seconds to minutes) for every new shape (``benchmarks/results/step_overhead_cpu.md``)."""

CAPACITY_BUCKET = 256
"""With ``compile=True`` per-row capacities are rounded up to a multiple of this, so calls on prompts of similar
lengths share the pooled buffers (and their CUDA graphs) instead of allocating new ones."""

_compiled: dict[tuple, object] = {}
_configured = False


def _configure_dynamo() -> None:
    """Raise dynamo's recompile limits to :data:`COMPILE_LIMIT` and make hitting one an error, once per process
    (the settings are process-wide: a limit that is already higher stays)."""
    global _configured
    if _configured:
        return
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, COMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 16 * COMPILE_LIMIT)
    config.fail_on_recompile_limit_hit = True
    _configured = True


def batch_bucket(live_rows: int) -> int:
    """The batch size a compiled run compacts to for ``live_rows`` live rows: the next power of two."""
    return 1 << max(live_rows - 1, 0).bit_length()


def stable_capacity(capacity: int, enabled: bool) -> int:
    """``capacity`` rounded up to :data:`CAPACITY_BUCKET` when ``enabled`` (a compiled run), else unchanged."""
    return -(-capacity // CAPACITY_BUCKET) * CAPACITY_BUCKET if enabled else capacity


class BufferPool:
    """Device buffers that outlive one call, so compiled graphs (CUDA graphs on CUDA) replay on the same addresses.

    A buffer is known by its role (``"target.key.3"``, ``"batch.tokens"``, ...) and device, and kept while later
    calls ask for the same shape and dtype; a request of another shape replaces it, so the pool holds one call's
    state at most. Callers own what :meth:`take` returns until their call ends; two calls that run at the same time
    (threads) must not share a pool. :meth:`release` frees everything.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.allocations = 0

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The pooled buffer of ``role`` on ``device`` with this shape and dtype, allocated (zeros) and marked
        static if there is none yet. A reused buffer keeps an earlier call's values: finite, so entries a cache masks
        out never turn an attention output into NaN (uninitialised memory could)."""
        key = (role, torch.device(device))
        shape = tuple(int(n) for n in shape)
        buffer = self._buffers.get(key)
        if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != dtype:
            self._buffers.pop(key, None)  # let the old one go before the new one is allocated
            buffer = self._buffers[key] = static(torch.zeros(shape, dtype=dtype, device=device), True)
            self.allocations += 1
        return buffer

    def release(self) -> None:
        """Free every pooled buffer (the next compiled call allocates anew)."""
        self._buffers.clear()


BUFFERS = BufferPool()
"""The process' pool of graph-stable buffers (used with ``compile=True``); ``BUFFERS.release()`` frees it."""


def new_buffer(role: str, shape, dtype: torch.dtype, device: torch.device, stable: bool) -> torch.Tensor:
    """A buffer for per-row or cache state: from :data:`BUFFERS` when ``stable`` (a compiled run; an earlier call's
    values, or zeros), else fresh zeros."""
    if stable:
        return BUFFERS.take(role, shape, dtype, device)
    return torch.zeros(tuple(shape), dtype=dtype, device=device)


def compile_options(device: torch.device, dynamic: bool) -> dict:
    """``torch.compile`` keyword arguments of the step on ``device``."""
    mode = "reduce-overhead" if is_cuda(device) else None
    return {"fullgraph": True, "dynamic": dynamic, "mode": mode}


def compiled(fn, device: torch.device):
    """``fn`` compiled for ``device`` (one compiled callable per function, device type and :data:`DYNAMIC_SHAPES`,
    shared by every call)."""
    key = (fn, device.type, DYNAMIC_SHAPES)
    out = _compiled.get(key)
    if out is None:
        _configure_dynamo()
        out = _compiled[key] = torch.compile(fn, **compile_options(device, DYNAMIC_SHAPES))
    return out


def run_compiled(fn, device: torch.device, *args):
    """Call ``fn`` compiled for ``device`` on ``args`` (dynamo configured once, by :func:`compiled`)."""
    return compiled(fn, device)(*args)


def static(buffer: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Mark ``buffer``, which compiled code reads and writes in place across calls, as static when ``enabled`` on
    CUDA, so CUDA graphs replay on it instead of copying it in and out (a no-op elsewhere). Returns it."""
    if enabled and is_cuda(buffer.device):
        torch._dynamo.mark_static_address(buffer)
    return buffer


def copy_to_front(buffer: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Compaction in place: copy ``kept`` (rows gathered from ``buffer`` into new memory, never a view of it: the
    copy overwrites rows that later kept rows came from) into the front of ``buffer``, and return that front view,
    marked static, at ``buffer``'s own address."""
    return static(buffer[: kept.shape[0]].copy_(kept), True)


def step_begin(device: torch.device) -> None:
    """Mark the start of an engine step for CUDA graphs: outputs of earlier steps' graphs are no longer read."""
    if is_cuda(device):
        torch.compiler.cudagraph_mark_step_begin()


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (every function, every shape): the difference over a call
    is how many that call compiled."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
