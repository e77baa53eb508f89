"""Continuous against static batching over a prompt set whose answers differ widely in length (issue 28).

The embedded target (SmolLM2-135M-Instruct, fp32) decodes ``benchmarks/prompts/mixed_lengths.jsonl`` (48 prompts:
one-word answers interleaved with long explanations), greedy, up to ``--max-new-tokens`` (128) each, with
target-only decoding and with speculative decoding (``--draft``, default auto), under the static schedule
(length-sorted batches, one after another) and the continuous one (finished rows take the next prompts), at each
``--slots``. Within a slot count the four runs alternate (their order is reversed every round), ``--rounds`` rounds;
the table reports the median tokens/s per cell, the continuous/static ratios of each round, and whether every
output of every run is identical to target-only static decoding.

``--hf`` adds transformers' own continuous batching (``model.generate_batch``, target-only, no speculation) on the
first ``--hf-prompts`` prompts (16) with ``--hf-max-new-tokens`` (96), against ours (target-only continuous) on the
same prompts, alternated.

    OMP_NUM_THREADS=2 python benchmarks/bench_schedule.py --slots 4 8 16 --rounds 2
    OMP_NUM_THREADS=2 python benchmarks/bench_schedule.py --slots 8 --rounds 2 --hf

Rows go to ``benchmarks/results/schedule.csv`` (``--no-save`` skips that).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import KEY_FIELDS, append_rows, cpu_note, run_key

from batched_specdec.drafting import as_drafter
from batched_specdec.model_info import vocab_size
from batched_specdec.models import load_draft, load_target
from batched_specdec.options import resolve_options
from batched_specdec.processors import GreedyProcessor
from batched_specdec.prompts import encode_prompts, read_prompts_file
from batched_specdec.runner import decode_prompt_set

HERE = os.path.dirname(os.path.abspath(__file__))
FIELDS = KEY_FIELDS + ["prompts", "max_new_tokens", "slots", "schedule", "method", "draft", "round", "tokens",
                       "wall_s", "tokens_per_s", "steps", "identical", "note"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default=os.path.join(HERE, "prompts", "mixed_lengths.jsonl"),
                   help="prompt file (text or JSONL) [default: benchmarks/prompts/mixed_lengths.jsonl]")
    p.add_argument("--slots", type=int, nargs="+", default=[4, 8, 16], help="batch sizes (slots) [default: 4 8 16]")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation budget per prompt [default: 128]")
    p.add_argument("--draft", default="auto", help="draft for the speculative runs (load_draft spec) [default: auto]")
    p.add_argument("--rounds", type=int, default=2, help="alternated rounds per slot count [default: 2]")
    p.add_argument("--hf", action="store_true", help="also time transformers' generate_batch against ours")
    p.add_argument("--hf-only", action="store_true", help="only the generate_batch comparison")
    p.add_argument("--hf-prompts", type=int, default=16, help="prompts of the generate_batch comparison [default: 16]")
    p.add_argument("--hf-max-new-tokens", type=int, default=96, help="budget of that comparison [default: 96]")
    p.add_argument("--no-save", action="store_true", help="do not append rows to benchmarks/results/schedule.csv")
    return p.parse_args(argv)


def timed_run(target, drafter, prompts, budget, options, slots, schedule):
    t = time.perf_counter()
    result = decode_prompt_set(target, drafter, prompts, [budget] * len(prompts), options, batch_size=slots,
                               schedule=schedule)
    return result, time.perf_counter() - t


def schedule_rows(args, target, drafter, prompts, options) -> list[dict]:
    """Every (slots, schedule, method) cell, ``args.rounds`` alternated rounds each."""
    cells = [(s, m) for s in ("static", "continuous") for m in ("target-only", "speculative")]
    rows, reference = [], None
    for slots in args.slots:
        for rnd in range(args.rounds):
            for schedule, method in (cells if rnd % 2 == 0 else cells[::-1]):
                result, wall = timed_run(target, drafter if method == "speculative" else None, prompts,
                                         args.max_new_tokens, options[method], slots, schedule)
                reference = reference or result.outputs  # the first run: target-only static at the first slots
                tokens = result.stats.generated_tokens
                rows.append({"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "slots": slots,
                             "schedule": schedule, "method": method, "draft": args.draft if method != "target-only"
                             else "", "round": rnd, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                             "steps": result.stats.steps, "identical": result.outputs == reference})
                print(f"slots {slots:2d} {schedule:10s} {method:11s} round {rnd}: {tokens / wall:6.2f} tok/s "
                      f"({tokens} tokens, {wall:6.1f} s, {result.stats.steps} steps) identical "
                      f"{result.outputs == reference}", flush=True)
    return rows


def hf_rows(args, target, prompts, options) -> list[dict]:
    """transformers' generate_batch against our target-only continuous schedule on the same prompts, alternated."""
    from transformers import GenerationConfig

    prompts = prompts[: args.hf_prompts]
    budget = args.hf_max_new_tokens
    config = GenerationConfig(max_new_tokens=budget, do_sample=False, eos_token_id=list(options.eos_token_ids),
                              pad_token_id=options.pad_token_id)
    rows = []
    for rnd in range(args.rounds):
        for name in (("ours", "generate_batch") if rnd % 2 == 0 else ("generate_batch", "ours")):
            t = time.perf_counter()
            if name == "ours":
                result = decode_prompt_set(target, None, prompts, [budget] * len(prompts), options, batch_size=8)
                outputs = result.outputs
            else:
                with torch.inference_mode():
                    done = target.generate_batch(prompts, generation_config=config, progress_bar=False)
                outputs = [list(done[k].generated_tokens) for k in sorted(done, key=lambda k: int(k.split("_")[-1]))]
            wall = time.perf_counter() - t
            tokens = sum(map(len, outputs))
            rows.append({"prompts": len(prompts), "max_new_tokens": budget, "slots": 8 if name == "ours" else "",
                         "schedule": "continuous", "method": "target-only" if name == "ours" else "hf-generate_batch",
                         "draft": "", "round": rnd, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                         "steps": "", "identical": "", "note": "transformers generate_batch, default config"
                         if name != "ours" else ""})
            print(f"{name:15s} round {rnd}: {tokens / wall:6.2f} tok/s ({tokens} tokens, {wall:6.1f} s)", flush=True)
    return rows


def summary(rows: list[dict]) -> None:
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        cells.setdefault((r["prompts"], r["slots"], r["schedule"], r["method"]), []).append(r["tokens_per_s"])
    print("\n| prompts | slots | schedule | method | tokens/s (median) | runs | all identical |")
    print("|---:|---:|---|---|---:|---:|---|")
    for key, values in cells.items():
        same = all(r["identical"] in (True, "") for r in rows
                   if (r["prompts"], r["slots"], r["schedule"], r["method"]) == key)
        print(f"| {' | '.join(map(str, key))} | {statistics.median(values):.2f} | {len(values)} | {same} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    target, tokenizer = load_target("embedded", device="cpu", quiet=True)
    prompts = encode_prompts(tokenizer, read_prompts_file(args.prompts))
    draft = as_drafter(load_draft(args.draft, target), vocab_size(target))
    common = {"tokenizer": tokenizer, "logits_processor": GreedyProcessor()}
    options = {"target-only": resolve_options(target, **common),
               "speculative": resolve_options(target, gamma="auto", **common)}
    decode_prompt_set(target, draft, prompts[:2], [4, 4], options["speculative"], batch_size=2)  # warm-up, untimed
    rows = [] if args.hf_only else schedule_rows(args, target, draft, prompts, options)
    if args.hf or args.hf_only:
        rows += hf_rows(args, target, prompts, options["target-only"])
    key = run_key(torch.device("cpu"))
    for r in rows:
        r.update(key)
        r.setdefault("note", cpu_note(torch.device("cpu")))
    summary(rows)
    if not args.no_save:
        print("rows appended to", append_rows("schedule", FIELDS, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
