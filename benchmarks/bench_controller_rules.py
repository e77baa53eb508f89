"""Each rule of the adaptive controller (``gamma="auto"``) against the same runs without it, alternated (issue 42).

A rule is a module constant of :mod:`batched_specdec.controller`; "off" sets it to the value that disables it
(``MIN_GAIN = 0``: draft whenever predicted faster at all; ``ACCEPTANCE_CAP = 1``; ``EXPLORATION = 0``;
``STREAK_ACCEPTANCE = 0``; ``COPY_GAMMA_MAX_DEFAULT = 8``: the model drafters' default). Rules whose measured
effect was noise or a loss are gone from the controller (benchmarks/results/controller_rules_cpu.md lists them).
Each rule runs on the workloads it is for, on the embedded target, greedy, every run in this process after one
untimed warm-up per workload:

- ``copy_b1``: the first 8 prompts of benchmarks/prompts/copy.jsonl one at a time, n-gram drafter, 64 new tokens;
- ``chat_b1``: the first 6 prompts of benchmarks/prompts/chat.jsonl one at a time, n-gram drafter, 64 new tokens;
- ``main_b4``: the main job's defaults (the 8 built-in prompts, none trained on; ``--draft auto``: the shipped draft
  or the n-gram match per row; 64 new tokens) at batch 4 (``main_b8``: at batch 8).

Every round runs the rule on and off (order flipped every round), each run with fresh cost models. Reported per rule
and workload: the median over rounds of the paired ratio ``time off / time on`` (above 1: the rule makes the run
faster), each round's ratio, the target forwards of each variant, and whether both variants' outputs are identical
(greedy: they must be). Verdict: ``keeps`` when the median is at least ``--threshold`` and at least ``rounds - 1``
rounds agree, ``costs`` when the same holds the other way, else ``noise``.

    python benchmarks/bench_controller_rules.py --rounds 4 --threads 2 --out controller_rules.md
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import time
from pathlib import Path

import torch

PROMPTS = Path(__file__).parent / "prompts"
RULES = {  # name: (module, attribute, off value, workloads)
    "MIN_GAIN": ("batched_specdec.controller.policy", "MIN_GAIN", 0.0, ("chat_b1", "main_b4")),
    "ACCEPTANCE_CAP": ("batched_specdec.controller.acceptance", "ACCEPTANCE_CAP", 1.0, ("main_b4",)),
    "EXPLORATION": ("batched_specdec.controller.acceptance", "EXPLORATION", 0.0, ("copy_b1", "main_b4")),
    "STREAK_ACCEPTANCE": ("batched_specdec.controller.acceptance", "STREAK_ACCEPTANCE", 0.0, ("copy_b1",)),
    "COPY_GAMMA_MAX_DEFAULT": ("batched_specdec.controller.choose", "COPY_GAMMA_MAX_DEFAULT", 8, ("copy_b1",)),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", nargs="+", choices=sorted(RULES), default=list(RULES), help="rules to measure")
    p.add_argument("--rounds", type=int, default=4, help="alternated rounds per rule and workload")
    p.add_argument("--threshold", type=float, default=0.01, help="smallest median effect that is not noise")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", help="write the table (markdown) here, and the runs beside it as .json")
    return p


@contextlib.contextmanager
def rule_off(rule: str, off: bool):
    """Rule ``rule`` disabled (its constant at the off value) inside the block when ``off``."""
    module_name, attribute, value, _ = RULES[rule]
    module = importlib.import_module(module_name)
    saved = getattr(module, attribute)
    if off:
        setattr(module, attribute, value)
    try:
        yield
    finally:
        setattr(module, attribute, saved)


def _jsonl(name: str, n: int) -> list[str]:
    lines = (PROMPTS / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()][:n]


def workloads(target, tokenizer) -> dict:
    """Each workload as a function returning its outputs (prompt order)."""
    from batched_specdec.drafting import NGramDrafter, as_drafter
    from batched_specdec.model_info import vocab_size
    from batched_specdec.models import load_draft
    from batched_specdec.options import resolve_options
    from batched_specdec.processors import GreedyProcessor
    from batched_specdec.prompts import builtin_prompts, encode_prompts
    from batched_specdec.runner import decode_prompt_set

    options = resolve_options(target, tokenizer=tokenizer, logits_processor=GreedyProcessor(), gamma="auto")
    ngram = NGramDrafter()
    default = as_drafter(load_draft("auto", target, target_tokenizer=tokenizer), vocab_size(target))
    copy, chat = encode_prompts(tokenizer, _jsonl("copy", 8)), encode_prompts(tokenizer, _jsonl("chat", 6))
    main = encode_prompts(tokenizer, builtin_prompts()[:8])

    def one_at_a_time(prompts):
        return lambda: [decode_prompt_set(target, ngram, [p], [64], options, batch_size=1).outputs[0] for p in prompts]

    def main_job(batch_size):
        budgets = [64] * len(main)
        return lambda: decode_prompt_set(target, default, main, budgets, options, batch_size=batch_size).outputs

    return {"copy_b1": one_at_a_time(copy), "chat_b1": one_at_a_time(chat), "main_b4": main_job(4),
            "main_b8": main_job(8)}


def measure(rule: str, workload: str, fn, counter: list, rounds: int) -> dict:
    """``rounds`` alternated on/off runs of ``fn``: times, target forwards and outputs of each variant."""
    from batched_specdec.controller import forget_cost_models

    runs = {"on": [], "off": []}
    for r in range(rounds):
        for variant in ("on", "off") if r % 2 == 0 else ("off", "on"):
            with rule_off(rule, variant == "off"):
                forget_cost_models()
                counter[0] = 0
                t0 = time.perf_counter()
                outputs = fn()
                runs[variant].append({"s": time.perf_counter() - t0, "forwards": counter[0], "outputs": outputs})
    ratios = [off["s"] / on["s"] for on, off in zip(runs["on"], runs["off"])]
    return {"rule": rule, "workload": workload, "ratios": ratios, "median": statistics.median(ratios),
            "on_s": [x["s"] for x in runs["on"]], "off_s": [x["s"] for x in runs["off"]],
            "on_forwards": [x["forwards"] for x in runs["on"]], "off_forwards": [x["forwards"] for x in runs["off"]],
            "identical": all(x["outputs"] == runs["on"][0]["outputs"] for v in runs.values() for x in v)}


def verdict(cell: dict, threshold: float) -> str:
    """``keeps`` / ``costs`` / ``noise`` (see the module docstring)."""
    ratios, need = cell["ratios"], len(cell["ratios"]) - 1
    if cell["median"] >= 1 + threshold and sum(r > 1 for r in ratios) >= need:
        return "keeps"
    if cell["median"] <= 1 - threshold and sum(r < 1 for r in ratios) >= need:
        return "costs"
    return "noise"


def table(cells: list[dict], threshold: float) -> str:
    header = ("| rule | workload | median time off / on | per round | target forwards on / off (median) | identical "
              "| verdict |")
    lines = [header, "|---|---|---:|---|---:|---|---|"]
    for c in cells:
        fwd = f"{statistics.median(c['on_forwards']):.0f} / {statistics.median(c['off_forwards']):.0f}"
        rounds = " ".join(f"{r:.3f}" for r in c["ratios"])
        lines.append(f"| `{c['rule']}` | {c['workload']} | {c['median']:.3f} | {rounds} | {fwd} | "
                     f"{'yes' if c['identical'] else 'NO'} | {verdict(c, threshold)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from batched_specdec.models import load_target

    target, tokenizer = load_target("embedded", device="cpu", quiet=True)
    counter = [0]
    target.register_forward_hook(lambda *a: counter.__setitem__(0, counter[0] + 1))
    fns = workloads(target, tokenizer)
    needed = {w for rule in args.rules for w in RULES[rule][3]}
    for name in sorted(needed):
        fns[name]()  # warm-up
    cells = []
    for rule in args.rules:
        for workload in RULES[rule][3]:
            cells.append(measure(rule, workload, fns[workload], counter, args.rounds))
            c = cells[-1]
            print(f"{rule:24s} {workload:8s} median {c['median']:.3f} rounds {[round(r, 3) for r in c['ratios']]} "
                  f"forwards {c['on_forwards']} / {c['off_forwards']} identical {c['identical']} "
                  f"-> {verdict(c, args.threshold)}", flush=True)
    text = table(cells, args.threshold)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        runs = [c | {"verdict": verdict(c, args.threshold)} for c in cells]
        Path(args.out).with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
