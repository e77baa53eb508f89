"""Batch 1 on chat prompts: where ours stands against transformers' plain ``generate`` (issue 43's chat goal).

The embedded target decodes the first ``--num-prompts`` prompts of benchmarks/prompts/chat.jsonl one at a time,
greedy, exactly ``--max-new-tokens`` tokens each (no EOS stop on either side, so every method generates the same
tokens), with: transformers' ``model.generate``; ours target-only (``autoregressive_generate_batch``); ours with the
n-gram drafter and ``gamma="auto"``. One untimed warm-up pass per method, then ``--rounds`` alternated rounds (order
reversed on odd rounds); the median wall time per method and its ratio to ``generate`` (above 1: faster).

    python benchmarks/bench_b1_chat.py --rounds 3 --threads 2      # quiet machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

PROMPTS = Path(__file__).parent / "prompts" / "chat.jsonl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return p


def methods(target, prompts: list[list[int]], n: int) -> dict:
    """The three ways to decode ``prompts`` one at a time, ``n`` tokens each."""
    from batched_specdec import GreedyProcessor, autoregressive_generate_batch, speculative_generate_batch
    from batched_specdec.drafting import NGramDrafter

    def hf_generate():
        for p in prompts:
            target.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def ours_target_only():
        for p in prompts:
            autoregressive_generate_batch([p], target, GreedyProcessor(), max_gen_len=n, eos_tokens_id=[])

    def ours_ngram_auto():
        for p in prompts:
            speculative_generate_batch([p], NGramDrafter(), target, gamma="auto", max_gen_len=n, eos_tokens_id=[])

    return {"hf_generate": hf_generate, "ours_target_only": ours_target_only, "ours_ngram_auto": ours_ngram_auto}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from batched_specdec.models import load_target
    from batched_specdec.prompts import encode_prompts

    target, tokenizer = load_target("embedded", device="cpu", quiet=True)
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])[: args.num_prompts]
    fns = methods(target, prompts, args.max_new_tokens)
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.rounds):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["hf_generate"])
    for name, runs in times.items():
        print(f"{name:18s} {statistics.median(runs):6.2f} s  runs {[round(x, 2) for x in runs]}  "
              f"speed vs generate {base / statistics.median(runs):.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
