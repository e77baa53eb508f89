"""The two sampling schemes side by side on the embedded pair: acceptance, and speed against target-only decoding.

``--part acceptance``: for every temperature, prompt set (``prompts/chat.jsonl``, ``prompts/copy.jsonl``), draft
(``hybrid``: the shipped feature draft or the n-gram match per row; ``ngram``) and batch size, the same prompts are
decoded speculatively with a fixed draft length under ``rejection`` and ``coupled``; rows report accepted/proposed
drafts and tokens per target forward. A fixed gamma makes the counts a property of the scheme, not of timings.

``--part speed``: per cell, target-only and speculative decoding (gamma auto, the default) under both schemes,
``--rounds`` rounds with the order of the four runs rotated, in one process; rows report tok/s medians and the
speedup of each scheme over its own target-only run. Run it on a quiet machine.

    python benchmarks/bench_sampling_schemes.py --part acceptance --markdown benchmarks/results/sampling_schemes_cpu.md
    python benchmarks/bench_sampling_schemes.py --part speed --sets chat --batch-sizes 4 --rounds 3 --markdown ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SCHEMES = ("rejection", "coupled")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("acceptance", "speed"), default="acceptance", help="[default: acceptance]")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0], help="[default: 0.7 1.0]")
    p.add_argument("--sets", nargs="+", default=["chat", "copy"], help="prompt sets [default: chat copy]")
    p.add_argument("--drafts", nargs="+", default=["hybrid", "ngram"], help="[default: hybrid ngram]")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="[default: 1 4 8]")
    p.add_argument("--gamma", type=int, default=4, help="--part acceptance: the fixed draft length [default: 4]")
    p.add_argument("--max-new-tokens", type=int, default=32, help="[default: 32]")
    p.add_argument("--min-prompts", type=int, default=4, help="prompts per cell: max(this, batch) [default: 4]")
    p.add_argument("--rounds", type=int, default=3, help="--part speed: rounds [default: 3]")
    p.add_argument("--threads", type=int, default=2, help="torch threads [default: 2]")
    p.add_argument("--markdown", help="append the table to this file")
    return p.parse_args(argv)


def decode(target, drafter, rows, options, batch, max_new):
    from batched_specdec.runner import decode_prompt_set

    t = time.perf_counter()
    result = decode_prompt_set(target, drafter, rows, [max_new] * len(rows), options, batch_size=batch, seed=0)
    return result, result.stats.generated_tokens / (time.perf_counter() - t)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from batched_specdec.drafting import as_drafter
    from batched_specdec.model_info import vocab_size
    from batched_specdec.models import load_draft, load_target
    from batched_specdec.options import resolve_options
    from batched_specdec.processors import make_processor
    from batched_specdec.prompts import encode_prompts

    target, tokenizer = load_target("embedded", device="cpu", quiet=True)
    drafters = {d: as_drafter(load_draft(d, target), vocab_size(target)) for d in args.drafts}
    lines = []
    for temperature in args.temperatures:
        for prompt_set in args.sets:
            texts = [json.loads(x)["prompt"]
                     for x in (HERE / "prompts" / f"{prompt_set}.jsonl").read_text().splitlines()]
            for batch in args.batch_sizes:
                rows = encode_prompts(tokenizer, texts[: max(args.min_prompts, batch)])
                for draft in args.drafts:
                    def options(scheme, gamma, temperature=temperature):
                        return resolve_options(target, tokenizer=tokenizer, sampling_scheme=scheme, gamma=gamma,
                                               logits_processor=make_processor(temperature))
                    cell = f"| {temperature} | {prompt_set} | {draft} | {batch} |"
                    if args.part == "acceptance":
                        line = cell + acceptance_cells(target, drafters[draft], rows, options, batch, args)
                    else:
                        line = cell + speed_cells(target, drafters[draft], rows, options, batch, args)
                    print(line, flush=True)
                    lines.append(line)
    header = ("| temperature | prompts | draft | batch | rejection: accepted / proposed | coupled: accepted / proposed "
              "| rejection: tokens per forward | coupled: tokens per forward |" if args.part == "acceptance" else
              "| temperature | prompts | draft | batch | target-only tok/s (rejection, coupled) | speculative tok/s "
              "(rejection, coupled) | speedup rejection | speedup coupled | coupled / rejection |")
    table = header + "\n|" + "---|" * (header.count("|") - 1) + "\n" + "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(table + "\n")


def acceptance_cells(target, drafter, rows, options, batch, args) -> str:
    stats = {s: decode(target, drafter, rows, options(s, args.gamma), batch, args.max_new_tokens)[0].stats
             for s in SCHEMES}
    rate = {s: f"{sum(st.accepted) / max(sum(st.proposed), 1):.1%} ({sum(st.accepted)}/{sum(st.proposed)})"
            for s, st in stats.items()}
    per_forward = {s: f"{st.tokens_per_target_forward:.2f}" for s, st in stats.items()}
    return f" {rate['rejection']} | {rate['coupled']} | {per_forward['rejection']} | {per_forward['coupled']} |"


def speed_cells(target, drafter, rows, options, batch, args) -> str:
    runs = [(s, d) for s in SCHEMES for d in (None, drafter)]
    rates = {(s, d is not None): [] for s, d in runs}
    decode(target, drafter, rows[:1], options("rejection", "auto"), 1, 4)  # warm-up
    for r in range(args.rounds):
        order = runs[r % len(runs):] + runs[: r % len(runs)]
        for scheme, d in order:
            _, rate = decode(target, d, rows, options(scheme, "auto"), batch, args.max_new_tokens)
            rates[(scheme, d is not None)].append(rate)
    med = {k: statistics.median(v) for k, v in rates.items()}
    speedup = {s: med[(s, True)] / med[(s, False)] for s in SCHEMES}
    return (f" {med[('rejection', False)]:.1f}, {med[('coupled', False)]:.1f} | {med[('rejection', True)]:.1f}, "
            f"{med[('coupled', True)]:.1f} | {speedup['rejection']:.2f}x | {speedup['coupled']:.2f}x | "
            f"{speedup['coupled'] / speedup['rejection']:.2f} |")


if __name__ == "__main__":
    main()
