"""Seconds of one target forward against its width: the curve the adaptive controller's cost model approximates.

The embedded target (or ``--target``) prefills ``--context`` random tokens into a ragged cache of ``--batch`` rows,
then times one eager :func:`~batched_specdec.forwards.model_forward` of each width (verify tokens per row), the
widths alternated within every repeat; prints the median per width as a markdown table.

    python benchmarks/bench_verify_width.py --threads 2            # quiet machine
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="embedded", help="target model (default: the embedded one)")
    p.add_argument("--widths", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 11, 14, 17])
    p.add_argument("--batch", type=int, default=1, help="rows per forward")
    p.add_argument("--context", type=int, default=150, help="tokens already in each row's cache")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from batched_specdec.forwards import model_forward, prefill
    from batched_specdec.models import load_target
    from batched_specdec.ragged_cache import RaggedKVCache

    torch.set_num_threads(args.threads)
    target, _ = load_target(args.target, device="cpu", quiet=True)
    capacity = args.context + max(args.widths) + 1
    cache = RaggedKVCache(target.config, args.batch, capacity, torch.device("cpu"), "auto")
    tokens = torch.randint(100, 1000, (args.batch, capacity), generator=torch.Generator().manual_seed(0))
    seconds: dict[int, list[float]] = {w: [] for w in args.widths}
    with torch.inference_mode():
        prefill(target, cache, tokens, [args.context] * args.batch)
        for repeat in range(args.repeats + 1):  # the first pass warms up
            for width in args.widths:
                cache.set_lens(torch.full((args.batch,), args.context))
                cache.set_span(args.context + width)
                start = time.perf_counter()
                model_forward(target, cache, tokens[:, args.context : args.context + width])
                if repeat:
                    seconds[width].append(time.perf_counter() - start)
    print(f"| verify tokens ({args.batch} row(s), {args.context} in cache) | "
          + " | ".join(map(str, args.widths)) + " |")
    print("|---|" + "---|" * len(args.widths))
    print("| ms (median) | " + " | ".join(f"{statistics.median(seconds[w]) * 1e3:.1f}" for w in args.widths) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
