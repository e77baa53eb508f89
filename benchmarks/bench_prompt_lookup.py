"""Our n-gram drafting against transformers' prompt lookup and plain ``generate``: target forwards and time.

For each prompt set (``copy``: benchmarks/prompts/copy.jsonl, copy and edit work;
``chat``: benchmarks/prompts/chat.jsonl)
and batch size B, the embedded target decodes the prompts greedily with:

* ``hf_generate``: transformers' ``model.generate`` (batch 1 only, one prompt at a time);
* ``hf_prompt_lookup``: ``model.generate(..., prompt_lookup_num_tokens=N)`` (batch 1 only);
* ``ngram_auto``: ours, :class:`~batched_specdec.drafting.ngram.NGramDrafter`, ``gamma="auto"``;
* ``ngram_g<G>``: ours, the n-gram drafter with a fixed ``gamma`` (``--gammas``);
* ``default_auto``: ours with the default drafter of :func:`batched_specdec.generate` (the hybrid of an n-gram match
  and the shipped draft), ``gamma="auto"`` (``--default-drafter``).

Counts (deterministic for greedy decoding and fixed draft lengths): ``target_forwards`` counts every call of the
target's forward (prefill included: transformers' first forward is the prefill and the first verify at once, and
so is ours for prompts within one prefill chunk; a draft that reads the target's hidden states drafts from step 2),
``decode_forwards`` those that emit tokens (ours: verify steps; transformers: all), tokens per
decode forward and accepted drafts per decode forward. ``gamma="auto"`` picks draft lengths from measured step
times, so its counts move with the machine's load; ``--frozen-costs V0 V1`` prices a verify of ``x`` tokens at
``V0 + V1 * x`` seconds instead (and nothing else), which makes its counts reproducible.

Timing: wall seconds per method and cell, the methods alternated (reversed on odd rounds) over ``--rounds`` rounds,
one warm-up decode per method excluded (with ``--rounds`` above 1). Every output is checked token for token against
plain ``generate``.

    python benchmarks/bench_prompt_lookup.py --sets copy --batch-sizes 1 --rounds 1 --frozen-costs 0.032 0.0026
    python benchmarks/bench_prompt_lookup.py --rounds 5 --threads 2     # the wall-time comparison, quiet machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import KEY_FIELDS, ROOT, append_rows, run_key

FIELDS = KEY_FIELDS + [
    "prompt_set", "batch", "method", "rounds", "prompts", "generated_tokens", "target_forwards", "decode_forwards",
    "tokens_per_decode_forward", "accepted_per_decode_forward", "wall_s", "tokens_per_s", "matches_generate", "note",
]  # fmt: skip
HF_METHODS = ("hf_generate", "hf_prompt_lookup")


def load_prompts(name: str, tokenizer) -> list[list[int]]:
    from batched_specdec.prompts import encode_prompts

    path = os.path.join(ROOT, "benchmarks", "prompts", f"{name}.jsonl")
    with open(path) as f:
        texts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return encode_prompts(tokenizer, texts)


class ForwardCounter:
    """Counts calls of ``model.forward`` (a forward hook)."""

    def __init__(self, model) -> None:
        self.calls = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1


def ours_gamma(method: str, rows: int, drafter, args):
    """``gamma`` for :func:`speculative_generate_batch`: an int, ``"auto"``, or with ``--frozen-costs`` an adaptive
    controller whose verify costs are the given line and never updated."""
    if not method.endswith("auto"):
        return int(method.rsplit("_g", 1)[1])
    if args.frozen_costs is None:
        return "auto"
    from batched_specdec.controller import CostModel, make_controller

    ratio = None if drafter.model is None else 0.1  # only "is there a model" matters to make_controller
    draft_s = 0.0 if drafter.model is None else args.frozen_draft_s  # the n-gram lookup runs no forward
    sources = len(drafter.sources) if drafter.sources else 1
    controller = make_controller("auto", None, rows, torch.device("cpu"), ratio, num_sources=sources,
                                 copy_sources=drafter.copy_sources,
                                 cost_model=CostModel.fixed(tuple(args.frozen_costs), (draft_s, 0.0)))
    controller.frozen_costs = True
    return controller


def run_method(method: str, batches: list[list[list[int]]], target, drafters: dict, counter, args) -> dict:
    """Decode every batch with ``method``; outputs, counts and wall seconds."""
    from batched_specdec.engine import speculative_generate_batch

    outputs, decode, accepted, calls0 = [], 0, 0, counter.calls
    t0 = time.perf_counter()
    for prompts in batches:
        if method in HF_METHODS:
            extra = {"prompt_lookup_num_tokens": args.lookup_tokens} if method == "hf_prompt_lookup" else {}
            before = counter.calls
            ids = torch.tensor([prompts[0]])
            out = target.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, **extra)
            outputs.append(out[0, ids.shape[1]:].tolist())
            decode += counter.calls - before
            continue
        drafter = drafters["ngram" if method.startswith("ngram") else "default"]
        gamma = ours_gamma(method, len(prompts), drafter, args)
        out, _, stats = speculative_generate_batch(prompts, drafter, target, gamma=gamma,
                                                   max_gen_len=args.max_new_tokens)
        outputs += out
        decode += stats.target_forwards
        accepted += sum(stats.accepted)
    wall = time.perf_counter() - t0
    if method in HF_METHODS:  # transformers emits 1 + accepted tokens per forward
        accepted = sum(map(len, outputs)) - decode
    return {"outputs": outputs, "target_forwards": counter.calls - calls0, "decode_forwards": decode,
            "accepted": accepted, "wall": wall}


def bench_cell(methods, batches, target, drafters, counter, args) -> dict[str, dict]:
    """Every method over the same batches, alternated over ``args.rounds`` rounds; counts from the first round."""
    for m in methods if args.rounds > 1 else ():  # warm-up (and the shared cost models' first measurements)
        run_method(m, batches[:1], target, drafters, counter, args)
    acc = {m: None for m in methods}
    for r in range(args.rounds):
        for m in methods if r % 2 == 0 else methods[::-1]:
            res = run_method(m, batches, target, drafters, counter, args)
            if acc[m] is None:
                acc[m] = res
            else:
                acc[m]["wall"] += res["wall"]
    return acc


def result_row(key: dict, name: str, batch: int, method: str, c: dict, reference: list, args) -> dict:
    """The CSV row of one method in one cell (counts from its first round, wall time over all), printed."""
    tokens = sum(map(len, c["outputs"]))
    r = dict(key, prompt_set=name, batch=batch, method=method, rounds=args.rounds, prompts=len(c["outputs"]),
             generated_tokens=tokens, target_forwards=c["target_forwards"], decode_forwards=c["decode_forwards"],
             tokens_per_decode_forward=round(tokens / c["decode_forwards"], 3),
             accepted_per_decode_forward=round(c["accepted"] / c["decode_forwards"], 3), wall_s=round(c["wall"], 3),
             tokens_per_s=round(tokens * args.rounds / c["wall"], 2), matches_generate=c["outputs"] == reference,
             note=f"frozen costs {args.frozen_costs}" if args.frozen_costs else "")
    print(f"{name:5} B={batch:<3} {method:17} fw {r['target_forwards']:4} decode {r['decode_forwards']:4} "
          f"tok/fw {r['tokens_per_decode_forward']:6.2f} acc/fw {r['accepted_per_decode_forward']:5.2f} "
          f"wall {r['wall_s']:7.2f}s match {r['matches_generate']}", flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["copy", "chat"], choices=["copy", "chat"], help="prompt sets")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes of our methods")
    parser.add_argument("--num-prompts", type=int, default=None, help="first N prompts of each set (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (greedy)")
    parser.add_argument("--gammas", type=int, nargs="*", default=[10], help="fixed gammas of ours (n-gram drafter)")
    parser.add_argument("--lookup-tokens", type=int, default=10, help="transformers' prompt_lookup_num_tokens")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="run only these methods (names as in the table; default: all of the cell)")
    parser.add_argument("--default-drafter", action="store_true", help="also ours with generate()'s default drafter")
    parser.add_argument("--frozen-costs", type=float, nargs=2, metavar=("V0", "V1"), default=None,
                        help="gamma auto prices a verify of x tokens at V0 + V1 * x s, never measured (counts repeat)")
    parser.add_argument("--frozen-draft-s", type=float, default=0.008,
                        help="with --frozen-costs: seconds of one draft forward of a drafter with a model (n-gram: 0)")
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds of every method (wall time summed)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-save", action="store_true", help="do not append rows to results/prompt_lookup.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from batched_specdec.drafting.ngram import NGramDrafter
    from batched_specdec.models import load_draft, load_target

    target, tokenizer = load_target("embedded", device="cpu", quiet=True)
    counter = ForwardCounter(target)
    drafters = {"ngram": NGramDrafter()}
    if args.default_drafter:
        drafters["default"] = load_draft("hybrid", target)
    key = run_key(torch.device("cpu"))
    print(f"{key['device']} | torch {key['torch']} | commit {key['commit']} | frozen costs {args.frozen_costs}")
    rows = []
    for name in args.sets:
        prompts = load_prompts(name, tokenizer)[: args.num_prompts]
        reference = None
        for batch in args.batch_sizes:
            methods = (list(HF_METHODS) if batch == 1 else []) + ["ngram_auto"] + [f"ngram_g{g}" for g in args.gammas]
            methods += ["default_auto"] if args.default_drafter else []
            methods = [m for m in methods if args.methods is None or m in args.methods]
            cell = bench_cell(methods, [prompts[i: i + batch] for i in range(0, len(prompts), batch)], target,
                              drafters, counter, args)
            if reference is None:
                reference = cell["hf_generate"]["outputs"] if "hf_generate" in cell else \
                    run_method("hf_generate", [[p] for p in prompts], target, drafters, counter, args)["outputs"]
            for m in methods:
                rows.append(result_row(key, name, batch, m, cell[m], reference, args))
    if not args.no_save:
        print("appended to", os.path.relpath(append_rows("prompt_lookup", FIELDS, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
