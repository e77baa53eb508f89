"""The capturable decode step: what ``compile=True`` compiles, with which settings, and how graphs are counted.

With ``compile=True`` (``speculative_generate_batch``, ``autoregressive_generate_batch``, ``generate``, the CLI's
``--compile``) every decode-sized forward through a ragged cache (:func:`batched_specdec.ragged_cache.model_forward`:
verify, draft and target-only forwards) and the step's sampling and commit (:mod:`batched_specdec.engine`) run
through ``torch.compile(fullgraph=True, dynamic=False)``:

* ``fullgraph=True``: a graph break is an error, not a silent fallback to eager code.
* ``dynamic=False``: one graph per shape. Shapes depend only on (rows, draft length, span bucket): the cache's
  lengths are updated in place and its attention span moves in steps of ``ragged_cache.SPAN_BUCKET`` columns, so a
  run compiles one graph per span bucket and batch size (compaction changes the batch size) and per distinct
  forward width, and never within a bucket.
* On CUDA, ``mode="reduce-overhead"``: CUDA graphs, captured lazily the first time each shape runs, replayed after.
  The KV buffers and lengths are marked static, so replays read and write them in place. The engine marks the start
  of every step (``torch.compiler.cudagraph_mark_step_begin``), so a step's graphs may reuse the memory of the
  previous step's outputs.
* The Triton kernels are torch custom ops (``torch.ops.batched_specdec.*``, with fake implementations), so compiled
  graphs call them as single nodes; on CPU the engine calls their torch references, which are traced and fused.

Compilation costs seconds per graph on CPU; it pays on long runs and small models, where Python dispatch dominates.
Off by default everywhere: on CUDA it becomes the default only once measured faster there (no GPU has run it yet).
"""

from __future__ import annotations

import torch

COMPILE_LIMIT = 256
"""Graphs one compiled function may hold. torch's default of 8 would soon be reached by a run with a few batch
sizes, widths and span buckets; past the limit a call fails (``fail_on_recompile_limit_hit``) rather than silently
running eagerly."""

_compiled: dict[tuple, object] = {}


def compile_options(device: torch.device) -> dict:
    """``torch.compile`` keyword arguments of the step on ``device``."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    return {"fullgraph": True, "dynamic": False, "mode": mode}


def compiled(fn, device: torch.device):
    """``fn`` compiled for ``device`` (one compiled callable per function and device type, shared by calls)."""
    key = (fn, device.type)
    out = _compiled.get(key)
    if out is None:
        out = _compiled[key] = torch.compile(fn, **compile_options(device))
    return out


def run_compiled(fn, device: torch.device, *args):
    """Call the compiled ``fn`` on ``args`` under this module's recompile limit."""
    with torch._dynamo.config.patch(recompile_limit=COMPILE_LIMIT, accumulated_recompile_limit=16 * COMPILE_LIMIT,
                                    fail_on_recompile_limit_hit=True):
        return compiled(fn, device)(*args)


def static(buffer: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Mark ``buffer``, which compiled code reads and writes in place across calls, as static when ``enabled`` on
    CUDA, so CUDA graphs replay on it instead of copying it in and out (a no-op elsewhere). Returns it."""
    if enabled and buffer.device.type == "cuda":
        torch._dynamo.mark_static_address(buffer)
    return buffer


def step_begin(device: torch.device) -> None:
    """Mark the start of an engine step for CUDA graphs: outputs of earlier steps' graphs are no longer read."""
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (every function, every shape): the difference over a call
    is how many that call compiled."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
