"""Per-step overhead of the decode loop, eager against ``compile=True``: dispatched ops, host reads, wall time.

A 100-token run per row of a tiny random-weight Llama (synthetic: 2 layers, hidden 64, vocab 512; the point is the
per-step cost outside the model's arithmetic, which dominates at this size), batch 4, greedy, for target-only
decoding, the n-gram drafter and a 1-layer model draft (gamma 3). Per path and mode:

* ``aten_ops_per_step``: ``aten::`` events the profiler records per engine step (nested calls included), i.e. ops
  dispatched through torch's dispatcher. A compiled graph's fused kernels dispatch none; its extern calls (matmuls)
  and the eager glue between graphs do.
* ``host_reads_per_step``: reads of engine state by the host per step (``RaggedBatch.sync``, counted by wrapping
  it; with the delayed read it waits on nothing), and ``scalar_reads_per_step``: ``aten::_local_scalar_dense``
  events (``.item()``/``int()`` of a tensor, host tensors included) per step, and ``scalar_read_sites``: the
  Python frames they come from, most frequent first (on CUDA a read of a device tensor waits for the device).
* ``wall_s``: median wall time of the whole call (prefill included) over ``--repeats`` runs, eager and compiled
  alternated; compilation happens in an untimed warm-up run.
* On CUDA (compiled steps run as CUDA graphs): ``cudagraph_recordings_warmup`` (graphs recorded by the warm-up
  run), ``cudagraph_recordings_timed`` (recorded during the profiled and timed runs: 0 when the decode state's
  buffers keep their addresses across calls, as :mod:`batched_specdec.capture` promises) and ``cudagraph_skips``
  (compiled graphs run without CUDA graphs). Empty on CPU, where there are no CUDA graphs.

    OMP_NUM_THREADS=1 python benchmarks/bench_step_overhead.py            # CPU, torch threads = 1
    python benchmarks/bench_step_overhead.py --quick --no-save            # CI size
    python benchmarks/bench_step_overhead.py --eager-only                 # an older tree without compile=
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import KEY_FIELDS, CudaGraphCounts, append_rows, cpu_note, pick_device, run_key
from transformers import LlamaConfig, LlamaForCausalLM

from batched_specdec import autoregressive_generate_batch, speculative_generate_batch
from batched_specdec.decode import batch as ragged_batch
from batched_specdec.drafting.ngram import NGramDrafter

FIELDS = KEY_FIELDS + ["path", "mode", "batch", "tokens_per_row", "steps", "aten_ops_per_step", "host_reads_per_step",
                       "scalar_reads_per_step", "scalar_read_sites", "wall_s", "wall_s_p20", "wall_s_p80",
                       "graphs_compiled",
                       "cudagraph_recordings_warmup", "cudagraph_recordings_timed", "cudagraph_skips", "note"]


def tiny_llama(layers: int, seed: int, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval().to(device)


def make_run(path: str, target, draft, prompts, tokens: int, compile: bool | None):
    extra = {} if compile is None else {"compile": compile}
    common = {"max_gen_len": tokens, "eos_tokens_id": [], **extra}
    if path == "target-only":
        return lambda: autoregressive_generate_batch(prompts, target, return_stats=True, **common)[1]
    drafter = NGramDrafter() if path == "ngram" else draft
    return lambda: speculative_generate_batch(prompts, drafter, target, gamma=3, **common)[2]


def count(run) -> dict:
    """Profile one call: aten events, scalar reads and host reads per step."""
    reads = [0]
    sync = ragged_batch.RaggedBatch.sync

    def counting_sync(self, *args, **kwargs):
        reads[0] += 1
        return sync(self, *args, **kwargs)

    ragged_batch.RaggedBatch.sync = counting_sync
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
            stats = run()
    finally:
        ragged_batch.RaggedBatch.sync = sync
    events = prof.events()
    names = [e.name for e in events]
    steps = stats.steps
    sites = collections.Counter(read_site(e) for e in events if e.name == "aten::_local_scalar_dense")
    return {"steps": steps, "aten_ops_per_step": sum(n.startswith("aten::") for n in names) / steps,
            "scalar_reads_per_step": names.count("aten::_local_scalar_dense") / steps,
            "host_reads_per_step": reads[0] / steps,
            "scalar_read_sites": "; ".join(f"{n / steps:.2f}/step {site}" for site, n in sites.most_common(6))}


SKIPPED_FRAMES = ("torch/profiler", "torch/autograd", "torch/utils/_contextlib", "<built-in", "torch/_tensor.py")


def read_site(event) -> str:
    """Where a scalar read came from: the two innermost Python frames above it (the profiler records them as
    enclosing events, ``path(line): function``), outside torch's profiler and dispatch plumbing; a compiled graph's
    wrapper shows as a file under inductor's cache directory."""
    frames = []
    while event is not None and len(frames) < 2:
        name = event.name
        if "(" in name and "): " in name and not any(skip in name for skip in SKIPPED_FRAMES):
            frames.append(name.split("site-packages/")[-1])
        event = event.cpu_parent
    return " <- ".join(frames) or "unknown"


def cudagraph_fields(device, warm: CudaGraphCounts, timed: CudaGraphCounts) -> dict:
    """The CUDA-graph columns; empty on CPU. ``timed`` accumulated over the profiled and timed runs."""
    if device.type != "cuda":
        return {}
    return {"cudagraph_recordings_warmup": warm.recordings, "cudagraph_recordings_timed": timed.recordings,
            "cudagraph_skips": warm.skips + timed.skips}


def cudagraph_text(row: dict) -> str:
    if row.get("cudagraph_recordings_warmup") is None:
        return ""
    return (f"  CUDA graphs recorded: warm-up {row['cudagraph_recordings_warmup']}, timed runs "
            f"{row['cudagraph_recordings_timed']}; cudagraph skips {row['cudagraph_skips']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="cuda when available, else cpu")
    parser.add_argument("--tokens", type=int, default=100, help="tokens generated per row (default 100)")
    parser.add_argument("--batch", type=int, default=4, choices=range(1, 5), help="rows, 1-4 (default 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mode, alternated (default 5)")
    parser.add_argument("--eager-only", action="store_true", help="no compile= argument (a tree from before it)")
    parser.add_argument("--quick", action="store_true", help="CI size: 20 tokens, 2 repeats")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the shared CPU machines oversubscribe badly with more)")
    parser.add_argument("--no-save", action="store_true", help="print only, append nothing to the CSV")
    args = parser.parse_args()
    device = pick_device(args.device, parser)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.repeats = 20, 2
    target, draft = tiny_llama(2, 0, device), tiny_llama(1, 1, device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (12, 20, 7, 16)[: args.batch]]
    has_compile = "compile" in inspect.signature(speculative_generate_batch).parameters
    modes = [None] if args.eager_only or not has_compile else [False, True]
    rows = []
    for path in ("target-only", "ngram", "model"):
        runs = {m: make_run(path, target, draft, prompts, args.tokens, m) for m in modes}
        graphs, warm_cg = {}, {}
        for m in modes:  # warm-up (compiles, records CUDA graphs), untimed
            t0 = time.perf_counter()
            with CudaGraphCounts() as cg:
                graphs[m] = runs[m]().extra.get("graphs_compiled", 0)
            warm_cg[m] = cg
            print(f"  warm-up {path} {'compiled' if m else 'eager'}: {time.perf_counter() - t0:.1f} s", flush=True)
        timed_cg = {m: CudaGraphCounts() for m in modes}
        counts, times = {}, {m: [] for m in modes}
        for m in modes:
            with timed_cg[m]:
                counts[m] = count(runs[m])
        for _ in range(args.repeats):  # alternated
            for m in modes:
                with timed_cg[m]:
                    t0 = time.perf_counter()
                    runs[m]()
                    times[m].append(time.perf_counter() - t0)
        for m in modes:
            q = statistics.quantiles(times[m], n=5, method="inclusive")
            row = {**run_key(device), "path": path, "mode": "compiled" if m else "eager", "batch": len(prompts),
                   "tokens_per_row": args.tokens, **counts[m], "wall_s": statistics.median(times[m]),
                   "wall_s_p20": q[0], "wall_s_p80": q[3], "graphs_compiled": graphs[m],
                   **cudagraph_fields(device, warm_cg[m], timed_cg[m]),
                   "note": "synthetic tiny random Llama; " + cpu_note(device)}
            rows.append(row)
            print(f"{path:12s} {row['mode']:9s} steps {row['steps']:4d}  aten ops/step {row['aten_ops_per_step']:7.1f}"
                  f"  host reads/step {row['host_reads_per_step']:.2f}  scalar reads/step "
                  f"{row['scalar_reads_per_step']:.2f}  wall {row['wall_s'] * 1e3:7.1f} ms  "
                  f"(graphs compiled in warm-up: {graphs[m]}){cudagraph_text(row)}")
            print(f"{'':12s} scalar reads from: {row['scalar_read_sites']}")
        if len(modes) == 2:
            print(f"{'':12s} eager / compiled wall time: "
                  f"{statistics.median(times[False]) / statistics.median(times[True]):.2f}x")
    if not args.no_save:
        print("saved to", append_rows("step_overhead", FIELDS, rows))


if __name__ == "__main__":
    main()
