"""gamma="auto" against every static gamma and target-only decoding, per batch size and prompt set, in one run.

For each prompt set (``chat``: the built-in code/explanation/math/list/chat prompts; ``repeat``: the built-in
prompts that ask to repeat or edit a given text) and each batch size B, the same first ``max(B, --min-prompts)``
prompts are decoded greedily by target-only decoding, by speculative decoding with every static gamma and with
``gamma="auto"``. The methods run interleaved, ``--repeats`` times, in reversed order on odd repeats, so a noisy
machine slows all of them alike; tokens/s is total tokens over total wall time across repeats. Every speculative
output is checked against target-only's, token for token.

Drafts: ``ngram`` (the model-free prompt-lookup drafter) or ``bf16`` (a bfloat16 copy of the target: a real
model draft that costs about half a target forward on CPU and agrees with it on most greedy tokens).

    python benchmarks/bench_adaptive.py --draft ngram                         # CPU table of issue 15
    python benchmarks/bench_adaptive.py --draft bf16 --batch-sizes 1 4
    python benchmarks/bench_adaptive.py --quick                                # a smoke run

Rows go to ``benchmarks/results/adaptive.csv``; ``--plot`` also writes
``benchmarks/results/adaptive_<draft>_<device>.png`` (speedup against batch size, one line per static gamma and
one for auto, one panel per prompt set) and a markdown table with the goals next to the CSV.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import KEY_FIELDS, RESULTS_DIR, append_rows, cpu_note, pick_device, run_key, synchronize

from batched_specdec.drafting.ngram import NGramDrafter
from batched_specdec.engine import autoregressive_generate_batch, speculative_generate_batch
from batched_specdec.model_info import vocab_size
from batched_specdec.models import load_target
from batched_specdec.options import resolve_eos
from batched_specdec.prompts import encode_prompts

FIELDS = KEY_FIELDS + [
    "draft", "prompt_set", "batch", "num_prompts", "method", "max_new_tokens", "repeats", "generated_tokens",
    "wall_s", "tokens_per_s", "speedup", "acceptance_rate", "mean_draft_length", "draft_length_histogram",
    "matches_target_only", "note",
]  # fmt: skip
PROMPT_SETS = {"chat": ("code", "explanation", "math", "list", "chat"), "repeat": ("repeat", "rewriting")}
GOAL_VS_TARGET, GOAL_VS_BEST = 0.97, 0.95


def prompt_set(name: str) -> list[str]:
    from importlib import resources

    lines = resources.files("batched_specdec").joinpath("data/prompts.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r["prompt"] for r in rows if r["category"] in PROMPT_SETS[name]]


def make_draft(name: str, target):
    """``ngram``; ``bf16`` (a bfloat16 copy of the target); ``distilled`` (the feature draft shipped for the
    embedded target) or ``hybrid`` (per row, its n-gram match or the shipped draft), through ``load_draft``."""
    if name == "ngram":
        return NGramDrafter()
    if name == "bf16":
        return copy.deepcopy(target).to(torch.bfloat16)
    if name in ("distilled", "hybrid"):
        from batched_specdec.models import load_draft

        return load_draft(name, target)
    raise SystemExit(f"bench_adaptive.py: error: unknown --draft {name!r}: expected ngram, bf16, distilled or hybrid")


def run_method(method: str, prompts, target, draft, eos, max_new: int, device) -> tuple[list, float, object]:
    synchronize(device)
    t = time.perf_counter()
    if method == "target_only":
        out, stats = autoregressive_generate_batch(prompts, target, max_gen_len=max_new, eos_tokens_id=eos,
                                                   return_stats=True)
    else:
        gamma = "auto" if method == "auto" else int(method.split("=")[1])
        out, _, stats = speculative_generate_batch(prompts, draft, target, gamma=gamma, max_gen_len=max_new,
                                                   eos_tokens_id=eos)
    synchronize(device)
    return out, time.perf_counter() - t, stats


def bench_cell(methods, batches, target, draft, eos, args, device) -> dict[str, dict]:
    """Every method over the same batches, interleaved, ``args.repeats`` times."""
    acc = {m: {"tokens": 0, "wall": 0.0, "accepted": 0, "proposed": 0, "hist": [], "outputs": []} for m in methods}
    for rep in range(args.repeats):
        order = methods if rep % 2 == 0 else methods[::-1]
        for prompts in batches:
            for m in order:
                out, wall, stats = run_method(m, prompts, target, draft, eos, args.max_new_tokens, device)
                a = acc[m]
                a["tokens"] += sum(map(len, out))
                a["wall"] += wall
                a["accepted"] += sum(stats.accepted)
                a["proposed"] += sum(stats.proposed)
                if rep == 0:
                    a["outputs"] += out
                hist = (stats.controller or {}).get("draft_length_histogram") or []
                a["hist"] = [x + y for x, y in zip(a["hist"] + [0] * len(hist), hist + [0] * len(a["hist"]))]
    return acc


def run(args) -> list[dict]:
    device = pick_device(args.device, None)
    torch.set_num_threads(args.threads)
    target, tokenizer = load_target("embedded", device=device, quiet=True)
    draft = make_draft(args.draft, target)
    eos = resolve_eos(None, target, tokenizer, vocab_size(target))
    methods = ["target_only"] + [f"gamma={g}" for g in args.gammas] + ["auto"]
    key, rows = run_key(device), []
    warm = encode_prompts(tokenizer, ["Hello"])
    for m in methods:  # one-time costs out of the timed runs
        run_method(m, warm, target, draft, eos, 2, device)
    for set_name in args.prompt_sets:
        texts = prompt_set(set_name)
        for b in args.batch_sizes:
            n = max(b, args.min_prompts)
            prompts = encode_prompts(tokenizer, [texts[i % len(texts)] for i in range(n)])
            batches = [prompts[i : i + b] for i in range(0, n, b)]
            acc = bench_cell(methods, batches, target, draft, eos, args, device)
            base = acc["target_only"]
            for m in methods:
                a = acc[m]
                hist = a["hist"]
                steps = sum(hist)
                rows.append({
                    **key, "draft": args.draft, "prompt_set": set_name, "batch": b, "num_prompts": n, "method": m,
                    "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "generated_tokens": a["tokens"],
                    "wall_s": a["wall"], "tokens_per_s": a["tokens"] / a["wall"],
                    "speedup": (a["tokens"] / a["wall"]) / (base["tokens"] / base["wall"]),
                    "acceptance_rate": a["accepted"] / a["proposed"] if a["proposed"] else None,
                    "mean_draft_length": sum(k * c for k, c in enumerate(hist)) / steps if steps else None,
                    "draft_length_histogram": " ".join(map(str, hist)) if hist else None,
                    "matches_target_only": a["outputs"] == base["outputs"], "note": cpu_note(device),
                })  # fmt: skip
                print(f"{set_name:6s} B={b:2d} {m:12s} {rows[-1]['tokens_per_s']:7.1f} tok/s "
                      f"{rows[-1]['speedup']:.2f}x", flush=True)
    return rows


def goals_markdown(rows: list[dict], command: str) -> str:
    """The issue's goals per cell: auto >= 0.97x target-only and >= 0.95x the best static gamma."""
    r0 = rows[0]
    setup = (f"Command: `{command}` (commit {r0['commit']}, {r0['date']}). Greedy, {r0['max_new_tokens']} new "
             f"tokens, {r0['repeats']} interleaved repeats. Speedup over target-only in the same run.")
    lines = [f"# gamma auto vs static gamma ({r0['draft']} draft, {r0['device']})", "", setup, "",
             "| prompts | B | best static | auto | auto / target-only | auto / best static | goals met |",
             "|---|---|---|---|---|---|---|"]
    cells = {}
    for r in rows:
        cells.setdefault((r["prompt_set"], r["batch"]), {})[r["method"]] = r
    met_all = True
    for (ps, b), cell in cells.items():
        static = {m: r for m, r in cell.items() if m.startswith("gamma=")}
        best_m = max(static, key=lambda m: static[m]["speedup"])
        auto = cell["auto"]["speedup"]
        vs_best = auto / static[best_m]["speedup"]
        met = auto >= GOAL_VS_TARGET and vs_best >= GOAL_VS_BEST
        met_all &= met
        lines.append(f"| {ps} | {b} | {best_m}: {static[best_m]['speedup']:.2f}x | {auto:.2f}x "
                     f"(mean draft length {cell['auto']['mean_draft_length'] or 0:.2f}) | {auto:.2f} | "
                     f"{vs_best:.2f} | {'yes' if met else 'NO'} |")
    matched = all(r["matches_target_only"] for r in rows)
    lines += ["", f"All cells meet both goals: {'yes' if met_all else 'no'}.",
              f"Every speculative output matched target-only: {'yes' if matched else 'NO'}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["prompt_set"] for r in rows})
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.2), squeeze=False)
    for ax, ps in zip(axes[0], sets):
        methods = sorted({r["method"] for r in rows if r["method"] != "target_only"}, key=lambda m: (m == "auto", m))
        for m in methods:
            pts = sorted((r["batch"], r["speedup"]) for r in rows if r["prompt_set"] == ps and r["method"] == m)
            style = {"color": "black", "linewidth": 2.5} if m == "auto" else {"alpha": 0.6}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, **style)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup over target-only")
        ax.set_title(f"{ps} prompts, {rows[0]['draft']} draft")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{rows[0]['device']}, commit {rows[0]['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", default="ngram",
                        help="ngram, bf16 (a bfloat16 copy of the target), distilled (the shipped feature draft) or "
                        "hybrid (per row, the n-gram match or the shipped draft)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16], help="batch sizes B")
    parser.add_argument("--gammas", type=int, nargs="+", default=list(range(1, 9)), help="static gammas")
    parser.add_argument("--prompt-sets", nargs="+", default=["chat", "repeat"], choices=sorted(PROMPT_SETS),
                        help="built-in prompt sets")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per prompt at most")
    parser.add_argument("--min-prompts", type=int, default=2, help="decode at least this many prompts per cell")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pinned: the CPU is shared)")
    parser.add_argument("--device", help="cpu or cuda [default: cuda when available]")
    parser.add_argument("--plot", action="store_true", help="also write the PNG and the markdown goal table")
    parser.add_argument("--quick", action="store_true", help="smoke run: B 1 2, gammas 1 3, 6 tokens, no CSV")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.gammas, args.max_new_tokens, args.repeats = [1, 2], [1, 3], 6, 1
    rows = run(args)
    if args.quick:
        return
    path = append_rows("adaptive", FIELDS, rows)
    print(f"rows appended to {path}")
    if args.plot:
        device = rows[0]["device"].split(":")[0].replace(" ", "_")
        stem = os.path.join(RESULTS_DIR, f"adaptive_{args.draft}_{device}")
        plot(rows, stem + ".png")
        with open(stem + ".md", "w") as f:
            f.write(goals_markdown(rows, "python " + " ".join(sys.argv)))
        print(f"plot and goal table written to {stem}.png / .md")


if __name__ == "__main__":
    main()
