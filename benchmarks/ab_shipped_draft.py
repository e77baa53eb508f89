"""The main job with two candidates for the shipped draft, alternated: which one should ship.

Each run is ``python -m batched_specdec.main`` with its defaults (``--draft auto``: per row, the shipped draft or the
n-gram match; gamma auto; greedy; the first 8 built-in prompts, none of them trained on) in a fresh process whose
shipped-draft directory (``batched_specdec.drafting.heads.DEFAULT_DRAFT_DIR``) is the candidate's; each run times
target-only and speculative decoding alternated ``--repeats`` times and reports the median speedup. The candidates
alternate, their order flipping every round, at every ``--batch-sizes`` entry.

    python benchmarks/ab_shipped_draft.py --candidates old=batched_specdec/drafting/drafts/smollm2-135m-instruct \\
        new=RUN/draft --batch-sizes 1 4 8 --rounds 2 --json benchmarks/results/ab_shipped_draft_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = ("import sys; from pathlib import Path; import batched_specdec.drafting.heads as heads; "
       "heads.DEFAULT_DRAFT_DIR = Path(sys.argv[1]); from batched_specdec.main import main; "
       "sys.exit(main(sys.argv[2:]))")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", nargs=2, required=True, metavar="NAME=DIR", help="two shipped-draft directories")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4])
    p.add_argument("--rounds", type=int, default=2, help="alternated rounds (the order flips every round)")
    p.add_argument("--repeats", type=int, default=3, help="target-only/speculative repeats inside each run")
    p.add_argument("--json", help="write every run's numbers here")
    return p


def one_run(directory: str, batch_size: int, repeats: int) -> dict:
    """One main-job run with ``directory`` as the shipped draft: its median speedup, acceptance, identical rows."""
    with tempfile.TemporaryDirectory() as out:
        argv = ["--batch-size", str(batch_size), "--repeats", str(repeats), "--output-dir", out]
        subprocess.run([sys.executable, "-c", RUN, directory, *argv], check=True, stdout=subprocess.DEVNULL)
        (result,) = Path(out).glob("results_*.json")
        data = json.loads(result.read_text())
    spec = data["speculative"]
    return {"speedup": data["speedup"], "speedups": data["timing"]["speedups"],
            "acceptance": spec["acceptance_rate"], "accepted": spec["accepted"], "proposed": spec["proposed"],
            "identical_rows": data["identical_rows"], "rows": len(data["rows"]),
            "baseline_tokens_per_s": data["baseline"]["tokens_per_s"], "tokens_per_s": spec["tokens_per_s"]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    candidates = [c.split("=", 1) for c in args.candidates]
    runs = []
    for batch_size in args.batch_sizes:
        for r in range(args.rounds):
            for name, directory in candidates if r % 2 == 0 else candidates[::-1]:
                run = {"candidate": name, "batch_size": batch_size, "round": r, **one_run(directory, batch_size,
                                                                                          args.repeats)}
                runs.append(run)
                print(f"B={batch_size} round {r} {name}: {run['speedup']:.2f}x, acceptance {run['acceptance']:.3f} "
                      f"({run['accepted']}/{run['proposed']}), identical {run['identical_rows']}/{run['rows']}",
                      flush=True)
    print("\ncandidate  B  speedups (per run)  median")
    for batch_size in args.batch_sizes:
        for name, _ in candidates:
            got = [x["speedup"] for x in runs if x["candidate"] == name and x["batch_size"] == batch_size]
            print(f"{name:9s} {batch_size:2d}  {', '.join(f'{s:.2f}x' for s in got)}  {statistics.median(got):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"candidates": dict(candidates), "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
