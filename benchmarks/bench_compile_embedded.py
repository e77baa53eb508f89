"""Steady state of ``compile=True`` on the embedded model (SmolLM2-135M): target-only decoding and the n-gram drafter
(gamma 3), the first 4 built-in prompts in one batch, 64 tokens per row, no EOS; eager and compiled alternated
``--repeats`` times after an untimed warm-up of the same calls (which compiles). Prints the medians; the recorded
runs are in ``results/step_overhead_cpu.md``.

    OMP_NUM_THREADS=2 python benchmarks/bench_compile_embedded.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: F401  (puts the repository root on sys.path)

from batched_specdec import autoregressive_generate_batch, speculative_generate_batch
from batched_specdec.drafting.ngram import NGramDrafter
from batched_specdec.models import load_target
from batched_specdec.prompts import builtin_prompts, encode_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode, alternated (default 3)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per row (default 64)")
    args = parser.parse_args()
    model, tokenizer = load_target(None, quiet=True)
    prompts = encode_prompts(tokenizer, builtin_prompts()[:4])
    common_kwargs = {"max_gen_len": args.tokens, "eos_tokens_id": []}

    def target_only(compile: bool):
        return autoregressive_generate_batch(prompts, model, compile=compile, return_stats=True, **common_kwargs)[1]

    def ngram(compile: bool):
        return speculative_generate_batch(prompts, NGramDrafter(), model, gamma=3, compile=compile,
                                          **common_kwargs)[2]

    for name, run in (("target-only", target_only), ("n-gram gamma 3", ngram)):
        t0 = time.perf_counter()
        graphs = run(True).extra["graphs_compiled"]
        print(f"{name}: warm-up compiled {graphs} graphs in {time.perf_counter() - t0:.0f} s", flush=True)
        run(False)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for compile in (False, True):
                t0 = time.perf_counter()
                stats = run(compile)
                times[compile].append(time.perf_counter() - t0)
                if compile and stats.extra["graphs_compiled"]:
                    print(f"  (a timed compiled run compiled {stats.extra['graphs_compiled']} more graphs)")
        eager, compiled = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name}: eager {eager:.2f} s, compiled {compiled:.2f} s, eager / compiled {eager / compiled:.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
