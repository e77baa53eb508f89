"""Continuous against static batching over a prompt set whose answers differ widely in length (issue 28).

The embedded target (SmolLM2-135M-Instruct, fp32) decodes ``benchmarks/prompts/mixed_lengths.jsonl`` (48 prompts:
one-word answers interleaved with long explanations), greedy, up to ``--max-new-tokens`` (128) each, with
target-only decoding and with speculative decoding (``--draft``, default auto), under the static schedule
(length-sorted batches, one after another) and the continuous one (finished rows take the next prompts), at each
``--slots``. Within a slot count the four runs alternate (their order is reversed every round), ``--rounds`` rounds;
the table reports the median tokens/s per cell, the continuous/static ratios of each round, and whether every
output of every run is identical to target-only static decoding.

``--hf`` adds transformers' own continuous batching (``model.generate_batch``, target-only, no speculation) on the
first ``--hf-prompts`` prompts (16) with ``--hf-max-new-tokens`` (96), against ours (target-only continuous,
``--hf-slots`` slots, 8) on the same prompts, alternated. generate_batch picks its own concurrency unless
``--hf-requests`` caps its requests per batch (8 matches our 8 slots); ``--hf-processes`` runs every call in a fresh
process after an untimed small call there (in one process, whichever runs second is slower on this machine).

    OMP_NUM_THREADS=2 python benchmarks/bench_schedule.py --slots 4 8 16 --rounds 2
    OMP_NUM_THREADS=2 python benchmarks/bench_schedule.py --slots 8 --rounds 2 --hf
    OMP_NUM_THREADS=2 python benchmarks/bench_schedule.py --hf-only --hf-processes --hf-requests 8 --rounds 4

Rows go to ``benchmarks/results/schedule.csv`` (``--no-save`` skips that).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
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
    p.add_argument("--hf-slots", type=int, default=8, help="our slots in the generate_batch comparison [default: 8]")
    p.add_argument("--hf-requests", type=int, default=None,
                   help="generate_batch's max_requests_per_batch [default: its own choice]")
    p.add_argument("--hf-processes", action="store_true",
                   help="run every call of the generate_batch comparison in a fresh process (after an untimed "
                        "small call there)")
    p.add_argument("--hf-call", choices=["ours", "generate_batch"], help=argparse.SUPPRESS)
    p.add_argument("--methods", nargs="+", choices=["target-only", "speculative"],
                   default=["target-only", "speculative"], help="methods of the schedule cells [default: both]")
    p.add_argument("--processes", action="store_true",
                   help="run every schedule cell in a fresh process (after an untimed small call there)")
    p.add_argument("--cell", nargs=3, metavar=("SCHEDULE", "METHOD", "SLOTS"), help=argparse.SUPPRESS)
    p.add_argument("--hf-max-new-tokens", type=int, default=96, help="budget of that comparison [default: 96]")
    p.add_argument("--no-save", action="store_true", help="do not append rows to benchmarks/results/schedule.csv")
    return p.parse_args(argv)


def outputs_digest(outputs: list[list[int]]) -> str:
    """A short hash of every prompt's output, to compare runs made in different processes."""
    return hashlib.sha256(json.dumps(outputs).encode()).hexdigest()[:16]


def run_in_process(args, *extra: str) -> dict:
    """This script in a fresh process with ``extra`` (``--cell ...`` or ``--hf-call ...``); its last stdout line is
    a JSON object."""
    cmd = [sys.executable, os.path.abspath(__file__), "--prompts", args.prompts, "--draft", args.draft,
           "--max-new-tokens", str(args.max_new_tokens), "--hf-prompts", str(args.hf_prompts),
           "--hf-max-new-tokens", str(args.hf_max_new_tokens), "--hf-slots", str(args.hf_slots), "--no-save", *extra]
    if args.hf_requests is not None:
        cmd += ["--hf-requests", str(args.hf_requests)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def schedule_rows(args, target, drafter, prompts, options) -> list[dict]:
    """Every (slots, schedule, method) cell, ``args.rounds`` alternated rounds each; with ``--processes`` each run
    in a process of its own. "identical" compares every run's outputs with the first run's."""
    cells = [(s, m) for s in ("static", "continuous") for m in args.methods]
    rows, reference = [], None
    for slots in args.slots:
        for rnd in range(args.rounds):
            for schedule, method in (cells if rnd % 2 == 0 else cells[::-1]):
                if args.processes:
                    cell = run_in_process(args, "--cell", schedule, method, str(slots))
                else:
                    cell = timed_cell(target, drafter, prompts, args.max_new_tokens, options[method], slots,
                                      schedule, method)
                reference = reference or cell["digest"]
                same = cell["digest"] == reference
                tokens, wall = cell["tokens"], cell["wall_s"]
                rows.append({"prompts": cell["prompts"], "max_new_tokens": args.max_new_tokens, "slots": slots,
                             "schedule": schedule, "method": method, "draft": args.draft if method != "target-only"
                             else "", "round": rnd, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                             "steps": cell["steps"], "identical": same,
                             "note": "own process" if args.processes else "same process"})
                print(f"slots {slots:2d} {schedule:10s} {method:11s} round {rnd}: {tokens / wall:6.2f} tok/s "
                      f"({tokens} tokens, {wall:6.1f} s, {cell['steps']} steps) identical {same}", flush=True)
    return rows


def timed_cell(target, drafter, prompts, budget, options, slots, schedule, method) -> dict:
    """One timed run of a schedule cell: tokens, seconds, steps and the outputs' digest."""
    t = time.perf_counter()
    result = decode_prompt_set(target, drafter if method == "speculative" else None, prompts,
                               [budget] * len(prompts), options, batch_size=slots, schedule=schedule)
    wall = time.perf_counter() - t
    return {"prompts": len(prompts), "tokens": result.stats.generated_tokens, "wall_s": wall,
            "steps": result.stats.steps, "digest": outputs_digest(result.outputs)}


def cell_main(args) -> int:
    """``--cell SCHEDULE METHOD SLOTS``: an untimed small call, then the cell's timed run; prints it as JSON."""
    schedule, method, slots = args.cell[0], args.cell[1], int(args.cell[2])
    target, prompts, draft, options = load_all(args)
    decode_prompt_set(target, draft if method == "speculative" else None, prompts[:2], [4, 4], options[method],
                      batch_size=2)  # warm-up, untimed
    print(json.dumps(timed_cell(target, draft, prompts, args.max_new_tokens, options[method], slots, schedule,
                                method)))
    return 0


def load_all(args):
    """The embedded target, the prompts, the draft and each method's options."""
    torch.manual_seed(0)
    target, tokenizer = load_target("embedded", device="cpu", quiet=True)
    prompts = encode_prompts(tokenizer, read_prompts_file(args.prompts))
    draft = as_drafter(load_draft(args.draft, target), vocab_size(target))
    common = {"tokenizer": tokenizer, "logits_processor": GreedyProcessor()}
    options = {"target-only": resolve_options(target, **common),
               "speculative": resolve_options(target, gamma="auto", **common)}
    return target, prompts, draft, options


def hf_call(name: str, target, prompts, budget: int, options, slots: int, requests: int | None) -> tuple[int, float]:
    """One timed call of ``name`` ("ours": target-only continuous with ``slots`` slots; "generate_batch": transformers'
    continuous batching, at most ``requests`` requests per batch, None for its own choice). Returns (tokens, s)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    t = time.perf_counter()
    if name == "ours":
        outputs = decode_prompt_set(target, None, prompts, [budget] * len(prompts), options, batch_size=slots).outputs
    else:
        config = GenerationConfig(max_new_tokens=budget, do_sample=False, eos_token_id=list(options.eos_token_ids),
                                  pad_token_id=options.pad_token_id)
        cb = None if requests is None else ContinuousBatchingConfig(max_requests_per_batch=requests)
        with torch.inference_mode():
            done = target.generate_batch(prompts, generation_config=config, progress_bar=False,
                                         continuous_batching_config=cb)
        outputs = [list(done[k].generated_tokens) for k in sorted(done, key=lambda k: int(k.split("_")[-1]))]
    return sum(map(len, outputs)), time.perf_counter() - t


def hf_call_in_process(args, name: str) -> tuple[int, float]:
    """:func:`hf_call` in a fresh Python process (after an untimed small call of the same method there), so that
    neither method runs after the other in one process (on the shared CPU machines the second is slower)."""
    result = run_in_process(args, "--hf-call", name)
    return result["tokens"], result["wall_s"]


def hf_rows(args, target, prompts, options) -> list[dict]:
    """transformers' generate_batch against our target-only continuous schedule on the same prompts, alternated;
    with ``--hf-processes`` each call runs in a process of its own."""
    prompts = None if prompts is None else prompts[: args.hf_prompts]
    budget = args.hf_max_new_tokens
    requests = "its own choice" if args.hf_requests is None else f"max_requests_per_batch={args.hf_requests}"
    rows = []
    for rnd in range(args.rounds):
        for name in (("ours", "generate_batch") if rnd % 2 == 0 else ("generate_batch", "ours")):
            if args.hf_processes:
                tokens, wall = hf_call_in_process(args, name)
            else:
                tokens, wall = hf_call(name, target, prompts, budget, options, args.hf_slots, args.hf_requests)
            where = "own process" if args.hf_processes else "same process"
            rows.append({"prompts": args.hf_prompts, "max_new_tokens": budget,
                         "slots": args.hf_slots if name == "ours" else "", "schedule": "continuous",
                         "method": "target-only" if name == "ours" else "hf-generate_batch", "draft": "",
                         "round": rnd, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "steps": "",
                         "identical": "", "note": f"{where}; " + (f"generate_batch, {requests}" if name != "ours"
                                                                  else f"{args.hf_slots} slots")})
            print(f"{name:15s} round {rnd}: {tokens / wall:6.2f} tok/s ({tokens} tokens, {wall:6.1f} s, {where})",
                  flush=True)
    return rows


def hf_call_main(args) -> int:
    """``--hf-call NAME``: one untimed small call, then the timed one; prints ``{"tokens", "wall_s"}`` as JSON."""
    target, prompts, _, options = load_all(args)
    prompts, options = prompts[: args.hf_prompts], options["target-only"]
    hf_call(args.hf_call, target, prompts[:2], 4, options, args.hf_slots, args.hf_requests)  # warm-up, untimed
    tokens, wall = hf_call(args.hf_call, target, prompts, args.hf_max_new_tokens, options, args.hf_slots,
                           args.hf_requests)
    print(json.dumps({"tokens": tokens, "wall_s": wall}))
    return 0


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
    if args.hf_call:
        return hf_call_main(args)
    if args.cell:
        return cell_main(args)
    hf = args.hf or args.hf_only
    in_process = (not args.hf_only and not args.processes) or (hf and not args.hf_processes)
    target = prompts = draft = options = None
    if in_process:  # else every run loads its own model
        target, prompts, draft, options = load_all(args)
        decode_prompt_set(target, draft, prompts[:2], [4, 4], options["speculative"], batch_size=2)  # warm-up
    rows = [] if args.hf_only else schedule_rows(args, target, draft, prompts, options)
    if hf:
        rows += hf_rows(args, target, prompts, None if options is None else options["target-only"])
    return finish(args, rows)


def finish(args, rows: list[dict]) -> int:
    """Key, summarise and save the rows."""
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
