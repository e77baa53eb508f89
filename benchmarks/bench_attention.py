"""Attention through the ragged cache: the previous dense-mask path against the ragged backends, in one run.

A random-weight Llama with realistic head counts (32 query heads, 8 KV heads: n_rep = 4, as Llama-3-8B; head_dim 32
and 2 layers on CPU so that a run takes minutes) holds B prompts of mixed lengths (uniform in [16, 768], the same
draw for every backend). Two measurements per backend:

* ``verify``: one target forward of ``gamma + 1 = 5`` tokens per row over the filled cache (the verify forward of a
  speculative step; the draft's first forward has the same shape with 2 tokens), repeated from the same state.
  The dense path's K/V repeat per query group is ``2 * L * B * H_q * span * D * elem`` bytes written per forward
  (``repeat_bytes`` column); the ragged backends read the cache in place.
* ``prefill``: writing every prompt into an empty cache. ``dense/one-shot`` is the previous behaviour (all rows
  padded to the longest prompt, one forward, dense masks); the ragged rows use chunks of ``--chunks`` tokens over
  only the rows with prompt left.

Backends: ``dense`` (transformers' sdpa with a dense additive mask, the reference), ``sdpa`` (the default: query
groups folded, or enable_gqa for long chunks on CPU) and ``flex`` (compiled flex_attention with block masks from the
positions; compile time is excluded by a warm-up on the same shapes, and reported separately as ``compile_s``).
The backends alternate inside every repeat so that machine noise hits them alike.

    OMP_NUM_THREADS=1 python benchmarks/bench_attention.py                 # CPU: B 8 32, writes attention_cpu.md
    python benchmarks/bench_attention.py --device cuda --head-dim 128 --layers 4 --max-len 4096   # GPU sizes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import KEY_FIELDS, RESULTS_DIR, append_rows, cpu_note, pick_device, run_key, synchronize

from batched_specdec.forwards import model_forward, prefill
from batched_specdec.ragged_cache import RaggedKVCache

FIELDS = KEY_FIELDS + [
    "measure", "backend", "chunk", "batch", "q_heads", "kv_heads", "head_dim", "layers", "tokens", "span", "dtype",
    "median_ms", "min_ms", "max_ms", "repeats", "compile_s", "repeat_bytes", "speedup_vs_dense", "note",
]  # fmt: skip

VERIFY_WIDTH = 5


def make_model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=args.q_heads * args.head_dim, intermediate_size=args.q_heads * args.head_dim,
        num_hidden_layers=args.layers, num_attention_heads=args.q_heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_len + 64, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False)


def timed(fn, device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def _filled_cache(model, backend, tokens, widths, device):
    cache = RaggedKVCache(model.config, len(widths), max(widths) + VERIFY_WIDTH + 8, device, backend)
    prefill(model, cache, tokens, widths, 512)
    return cache


def bench_batch(model, args, batch, device, dtype) -> list[dict]:
    gen = torch.Generator().manual_seed(batch)
    widths = sorted(torch.randint(16, args.max_len + 1, (batch,), generator=gen).tolist(), reverse=True)
    tokens = torch.randint(0, 512, (batch, max(widths) + VERIFY_WIDTH), generator=gen).to(device)
    step = tokens[:, -VERIFY_WIDTH:]
    caches = {b: _filled_cache(model, b, tokens, widths, device) for b in args.backends}
    span = max(widths) + VERIFY_WIDTH

    def verify(cache):
        cache.set_span(span)
        model_forward(model, cache, step)

    prefills = [("dense", max(widths))] + [(b, c) for b in args.backends for c in args.chunks]

    def run_prefill(backend, chunk):
        cache = RaggedKVCache(model.config, batch, max(widths) + 8, device, backend)
        prefill(model, cache, tokens, widths, chunk)

    compile_s = {}
    for backend in args.backends:  # warm-up: compiles (flex) and first-call costs, excluded from the timings
        compile_s[("verify", backend, 0)] = timed(lambda b=backend: verify(caches[b]), device) / 1e3
    for backend, chunk in prefills:
        compile_s[("prefill", backend, chunk)] = timed(lambda b=backend, c=chunk: run_prefill(b, c), device) / 1e3
    samples: dict[tuple, list[float]] = {}
    for _ in range(args.repeats):
        for backend in args.backends:
            samples.setdefault(("verify", backend, 0), []).append(timed(lambda b=backend: verify(caches[b]), device))
        for backend, chunk in prefills[: len(prefills) if _ < args.prefill_repeats else 0]:
            samples.setdefault(("prefill", backend, chunk), []).append(
                timed(lambda b=backend, c=chunk: run_prefill(b, c), device))
    rows = []
    h_q, d, layers = args.q_heads, args.head_dim, args.layers
    elem = torch.finfo(dtype).bits // 8
    for (measure, backend, chunk), times in samples.items():
        dense_key = (measure, "dense", 0 if measure == "verify" else max(widths))
        med = statistics.median(times)
        repeat = 2 * layers * batch * h_q * (-(-span // 64) * 64) * d * elem if backend == "dense" else 0
        rows.append({
            **run_key(device), "measure": measure, "backend": backend,
            "chunk": ("one-shot" if chunk == max(widths) and backend == "dense" else chunk) if measure == "prefill"
            else "", "batch": batch, "q_heads": h_q, "kv_heads": args.kv_heads, "head_dim": d, "layers": layers,
            "tokens": batch * VERIFY_WIDTH if measure == "verify" else sum(widths), "span": span,
            "dtype": str(dtype).replace("torch.", ""), "median_ms": med, "min_ms": min(times), "max_ms": max(times),
            "repeats": len(times), "compile_s": compile_s[(measure, backend, chunk)] if backend == "flex" else "",
            "repeat_bytes": repeat if measure == "verify" else "",
            "speedup_vs_dense": statistics.median(samples[dense_key]) / med, "note": cpu_note(device),
        })  # fmt: skip
    return rows


def write_markdown(rows: list[dict], path: str, command: str) -> None:
    lines = [
        f"# Attention through the ragged cache: dense-mask path vs ragged backends ({rows[0]['device']})",
        "",
        (f"Command: `{command}`, commit {rows[0]['commit']}, {rows[0]['date']}, {rows[0]['device']}, "
        f"torch {rows[0]['torch']}, transformers {rows[0]['transformers']}. Random-weight Llama, "
        f"{rows[0]['q_heads']} query / {rows[0]['kv_heads']} KV heads, head_dim {rows[0]['head_dim']}, "
        f"{rows[0]['layers']} layers, fp32; prompt lengths uniform in [16, max-len]. Medians of alternated repeats; "
        "flex compile time excluded (column compile s). Rows in `attention.csv`."),
        "",
        "| measure | B | backend | chunk | tokens | span | median ms | min-max ms | speedup vs dense | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] != "" else ""
        lines.append(
            f"| {r['measure']} | {r['batch']} | {r['backend']} | {r['chunk']} | {r['tokens']} | {r['span']} | "
            f"{r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {r['speedup_vs_dense']:.2f}x | "
            f"{compile_s} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="cpu or cuda [default: cuda if available]")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="batch sizes [default: 8 32]")
    p.add_argument("--backends", nargs="+", default=["dense", "sdpa", "flex"], help="[default: dense sdpa flex]")
    p.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512],
                   help="prefill chunks [default: 128 256 512]")
    p.add_argument("--q-heads", type=int, default=32, help="query heads [default: 32]")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads [default: 8]")
    p.add_argument("--head-dim", type=int, default=32, help="[default: 32]")
    p.add_argument("--layers", type=int, default=2, help="[default: 2]")
    p.add_argument("--max-len", type=int, default=768, help="longest prompt [default: 768]")
    p.add_argument("--repeats", type=int, default=7, help="verify repeats per backend [default: 7]")
    p.add_argument("--prefill-repeats", type=int, default=3, help="prefill repeats per setting [default: 3]")
    p.add_argument("--markdown", action="store_true", help="also write benchmarks/results/attention_<device>.md")
    args = p.parse_args()
    device = pick_device(args.device, p)
    if "dense" not in args.backends:
        p.error("--backends must include dense: every speedup is against it")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = make_model(args, device, dtype)
    rows = []
    with torch.inference_mode():
        for batch in args.batches:
            rows += bench_batch(model, args, batch, device, dtype)
            print(f"B={batch} done", flush=True)
    path = append_rows("attention", FIELDS, rows)
    for r in rows:
        print(f"{r['measure']:8s} B={r['batch']:3d} {r['backend']:6s} chunk={r['chunk']!s:9s} "
              f"{r['median_ms']:9.1f} ms  x{r['speedup_vs_dense']:.2f} vs dense")
    print(f"rows appended to {path}")
    if args.markdown:
        md = os.path.join(RESULTS_DIR, f"attention_{device.type}.md")
        write_markdown(rows, md, "python benchmarks/bench_attention.py " + " ".join(sys.argv[1:]))
        print(f"wrote {md}")


if __name__ == "__main__":
    main()
