"""The capturable decode step: what ``compile=True`` compiles, with which settings, and how graphs are counted.

With ``compile=True`` (``speculative_generate_batch``, ``autoregressive_generate_batch``, ``generate``, the CLI's
``--compile``) every decode-sized forward through a ragged cache (:func:`batched_specdec.ragged_cache.model_forward`:
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
  size, width and span bucket of ``ragged_cache.SPAN_BUCKET`` columns) and replayed after. The KV buffers, lengths
  and per-row buffers are marked static, so replays read and write them in place. The engine marks the start of
  every step (``torch.compiler.cudagraph_mark_step_begin``), so a step's graphs may reuse the memory of the
  previous step's outputs.
* The Triton kernels are torch custom ops (``torch.ops.batched_specdec.*``, with fake implementations), so compiled
  graphs call them as single nodes; on CPU the engine calls their torch references, which are traced and fused.

Exactness: a compiled step computes the same model with fused kernels, so its logits agree with the eager step's
to float rounding (within ~1e-5 in the tests), as the eager verify's already do with target-only decoding's. Tokens
equal the eager run's in every test (greedy and seeded sampled); a greedy argmax or a sampling decision that sits on
a near-tie can go the other way, and either way every token is drawn exactly from the target as computed.

Compilation costs seconds per graph on CPU (tens of seconds for the embedded 135M model); it pays on long runs,
where Python dispatch dominates the step. Off by default everywhere: on CUDA it becomes the default only once
measured faster there (no GPU has run it yet).
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

_compiled: dict[tuple, object] = {}


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
        out = _compiled[key] = torch.compile(fn, **compile_options(device, DYNAMIC_SHAPES))
    return out


def run_compiled(fn, device: torch.device, *args):
    """Call ``fn`` compiled for ``device`` on ``args``, under this module's recompile limit."""
    with torch._dynamo.config.patch(recompile_limit=COMPILE_LIMIT, accumulated_recompile_limit=16 * COMPILE_LIMIT,
                                    fail_on_recompile_limit_hit=True):
        return compiled(fn, device)(*args)


def static(buffer: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Mark ``buffer``, which compiled code reads and writes in place across calls, as static when ``enabled`` on
    CUDA, so CUDA graphs replay on it instead of copying it in and out (a no-op elsewhere). Returns it."""
    if enabled and is_cuda(buffer.device):
        torch._dynamo.mark_static_address(buffer)
    return buffer


def step_begin(device: torch.device) -> None:
    """Mark the start of an engine step for CUDA graphs: outputs of earlier steps' graphs are no longer read."""
    if is_cuda(device):
        torch.compiler.cudagraph_mark_step_begin()


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (every function, every shape): the difference over a call
    is how many that call compiled."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
