"""Which draft to use for the embedded target: n-gram, the shipped feature draft, or both per row (issue 27).

Part 1 runs the main job (``python -m batched_specdec.main``, greedy, gamma auto, 64 new tokens, its alternated
repeats) once per cell: prompt set (``benchmarks/prompts/chat.jsonl``: code, explanations, math, lists, chat;
``copy.jsonl``: texts to repeat or edit), batch size (1, 4, 8, 16; ``max(8, B)`` prompts) and draft (``ngram``,
``distilled``: the shipped feature draft alone, ``hybrid``: per row, the n-gram match or the feature draft). Each
cell's speedup is the main job's own median over its repeats against target-only decoding in the same process.

Part 2 compares batch 1 with transformers' prompt-lookup decoding (``model.generate(prompt_lookup_num_tokens=N)``,
one prompt at a time, the same 8 prompts and budget), in one process, alternated: ours with ``--draft``
(default auto) cold, then after other workloads ran in the same process (batch 16 on chat prompts, batch 4 on
copy prompts), against prompt lookup measured before and after.

    OMP_NUM_THREADS=2 python benchmarks/bench_drafts.py                  # both parts, the table of issue 27
    OMP_NUM_THREADS=2 python benchmarks/bench_drafts.py --part 2         # prompt lookup only

Rows go to ``benchmarks/results/drafts.csv``; the main job's results JSONs to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import KEY_FIELDS, append_rows, cpu_note, run_key

HERE = os.path.dirname(os.path.abspath(__file__))
FIELDS = KEY_FIELDS + ["part", "prompt_set", "batch", "prompts", "draft", "method", "tokens_per_s", "speedup",
                       "speedup_spread", "acceptance_rate", "identical", "sources", "note"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", type=int, choices=(1, 2), nargs="+", default=[1, 2], help="which parts [default: 1 2]")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16], help="[default: 1 4 8 16]")
    p.add_argument("--drafts", nargs="+", default=["ngram", "distilled", "hybrid"], help="[default: all three]")
    p.add_argument("--sets", nargs="+", default=["chat", "copy"], help="prompt sets [default: chat copy]")
    p.add_argument("--max-new-tokens", type=int, default=64, help="[default: 64]")
    p.add_argument("--repeats", type=int, default=3, help="the main job's --repeats [default: 3]")
    p.add_argument("--draft", default="auto", help="part 2's draft [default: auto]")
    p.add_argument("--lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens [default: 10]")
    p.add_argument("--output-dir", default="outputs/bench_drafts", help="the main job's results JSONs")
    p.add_argument("--no-save", action="store_true", help="do not append rows to benchmarks/results/drafts.csv")
    return p.parse_args(argv)


def main_job_cell(args, prompt_set: str, batch: int, draft: str) -> dict:
    """One main-job run; its speedup, spread, acceptance and greedy verdict."""
    out = os.path.join(args.output_dir, f"{prompt_set}-b{batch}-{draft}")
    cmd = [sys.executable, "-m", "batched_specdec.main", "--prompts",
           os.path.join(HERE, "prompts", f"{prompt_set}.jsonl"),
           "--num-prompts", str(max(8, batch)), "--batch-size", str(batch), "--draft", draft, "--max-new-tokens",
           str(args.max_new_tokens), "--repeats", str(args.repeats), "--output-dir", out]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    path = max(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".json"))
    with open(path) as f:
        r = json.load(f)
    spec, timing = r["speculative"], r["timing"]
    row = {"part": 1, "prompt_set": prompt_set, "batch": batch, "prompts": len(r["rows"]), "draft": draft,
           "method": "main job", "tokens_per_s": statistics.median(timing["speculative_tokens_per_s"]),
           "speedup": r["speedup"], "speedup_spread": "-".join(f"{x:.2f}" for x in timing["speedup_spread"]),
           "acceptance_rate": spec["acceptance_rate"],
           "identical": f"{r['identical_rows']}/{len(r['rows'])}", "sources": json.dumps(
               {k: v["accepted"] for k, v in (spec["sources"] or {}).items()}) if spec["sources"] else ""}
    print(f"{prompt_set:5s} B={batch:2d} {draft:9s} speedup {r['speedup']:.2f}x ({row['speedup_spread']}) acceptance "
          f"{spec['acceptance_rate'] or 0:.1%} identical {row['identical']}", flush=True)
    return row


def prompt_lookup_rows(args) -> list[dict]:
    """Part 2: batch 1 on copy prompts, ours (cold, then after other workloads) against transformers' prompt
    lookup, alternated, in one process."""
    from transformers import GenerationConfig

    from batched_specdec import generate
    from batched_specdec.models import load_draft, load_target
    from batched_specdec.prompts import encode_prompts, read_prompts_file

    target, tokenizer = load_target("embedded", device="cpu", quiet=True)
    draft = load_draft(args.draft, target)
    sets = {name: encode_prompts(tokenizer, read_prompts_file(os.path.join(HERE, "prompts", f"{name}.jsonl")))
            for name in ("copy", "chat")}
    copy = sets["copy"][:8]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False)

    def lookup() -> tuple[float, list]:
        t, outs = time.perf_counter(), []
        with torch.inference_mode():
            for ids in copy:
                x = torch.tensor([ids])
                y = target.generate(x, attention_mask=torch.ones_like(x), generation_config=config,
                                    prompt_lookup_num_tokens=args.lookup_tokens)
                outs.append(y[0, len(ids):].tolist())
        return sum(map(len, outs)) / (time.perf_counter() - t), outs

    def ours(prompts, batch) -> tuple[float, list]:
        result = generate(prompts, target, draft=draft, batch_size=batch, max_new_tokens=args.max_new_tokens)
        return result.stats.tokens_per_s, result.token_ids

    ours(copy[:1], 1)  # warm-up of both, untimed
    lookup()
    rows, (pld_before, reference) = [], lookup()
    cold, cold_out = ours(copy, 1)
    ours(sets["chat"][:16], 16)  # other workloads in the same process
    ours(sets["copy"], 4)
    warm, warm_out = ours(copy, 1)
    pld_after, _ = lookup()
    pld = (pld_before + pld_after) / 2
    for method, tps, out in (("prompt lookup (transformers)", pld, reference), ("ours, cold", cold, cold_out),
                             ("ours, after b16 chat and b4 copy", warm, warm_out)):
        rows.append({"part": 2, "prompt_set": "copy", "batch": 1, "prompts": len(copy), "draft": args.draft if "ours"
                     in method else f"prompt_lookup_num_tokens={args.lookup_tokens}", "method": method,
                     "tokens_per_s": tps, "speedup": tps / pld, "identical": out == reference})
        print(f"{method:34s} {tps:6.2f} tok/s  {tps / pld:.2f}x prompt lookup  same tokens {out == reference}",
              flush=True)
    print(f"prompt lookup before / after the other runs: {pld_before:.2f} / {pld_after:.2f} tok/s")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    if 1 in args.part:
        for prompt_set in args.sets:
            for batch in args.batch_sizes:
                for draft in args.drafts:
                    rows.append(main_job_cell(args, prompt_set, batch, draft))
    if 2 in args.part:
        rows += prompt_lookup_rows(args)
    key = run_key(torch.device("cpu"))
    for r in rows:
        r.update(key)
        r.setdefault("note", cpu_note(torch.device("cpu")))
    if not args.no_save:
        print("rows appended to", append_rows("drafts", FIELDS, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
