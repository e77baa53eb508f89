"""The CLI's generation mode on a real prompt file: outputs.jsonl streamed as prompts finish, a SIGKILL halfway, and
``--resume``; the outputs must equal an uninterrupted run's and ``generate()``'s on the same prompts.

What it does, with the embedded target (greedy, ``--no-baseline``):

1. an uninterrupted CLI run over ``--prompts`` (default: the 40 prompts with ids of ``prompts/generation40.jsonl``);
2. the same run in a second process, killed with SIGKILL once ``outputs.jsonl`` holds about half the prompts, then
   continued with ``--resume`` (and resumed once more, which must decode nothing);
3. ``generate()`` on the same prompt texts, in this process.

It checks: every id exactly once in both files, each completion equal across the three, and prints one summary line
per check (and ``--json`` writes them). Example::

    python benchmarks/check_resume.py --batch-size 8 --json benchmarks/results/resume_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(out_dir: Path, args, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batched_specdec.main", "--prompts", args.prompts, "--no-baseline",
            "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
            "--output-dir", str(out_dir), *extra]


def lines(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "outputs.jsonl").read_text().splitlines()]


def run_killed(out_dir: Path, args) -> int:
    """Start the CLI, SIGKILL it once outputs.jsonl holds half the prompts; returns the lines it left."""
    proc = subprocess.Popen(cli(out_dir, args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path, target = out_dir / "outputs.jsonl", args.num // 2
    while proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= target:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return path.read_text().count("\n")
        time.sleep(0.05)
    raise SystemExit(f"the run ended (code {proc.returncode}) before it could be killed halfway")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default=str(ROOT / "benchmarks" / "prompts" / "generation40.jsonl"),
                   help="JSONL prompt file with an id per prompt [default: prompts/generation40.jsonl]")
    p.add_argument("--batch-size", type=int, default=8, help="slots [default: 8]")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt at most [default: 64]")
    p.add_argument("--json", help="also write the checks to this JSON file")
    args = p.parse_args()
    records = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    args.num = len(records)
    checks = {"prompts": args.num, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        full, broken = Path(tmp) / "full", Path(tmp) / "broken"
        t = time.perf_counter()
        subprocess.run(cli(full, args), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        checks["uninterrupted_run_s"] = round(time.perf_counter() - t, 1)
        checks["lines_when_killed"] = run_killed(broken, args)
        subprocess.run(cli(broken, args, "--resume"), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        again = subprocess.run(cli(broken, args, "--resume"), cwd=ROOT, check=True, capture_output=True, text=True)
        checks["second_resume_decoded_nothing"] = "nothing to decode" in " ".join(again.stdout.split())
        want, got = lines(full), lines(broken)
    ids = [r["id"] for r in records]
    checks["uninterrupted_every_id_once"] = sorted(r["id"] for r in want) == sorted(ids)
    checks["resumed_every_id_once"] = sorted(r["id"] for r in got) == sorted(ids)
    by_id = {r["id"]: r["completion"] for r in want}
    checks["resumed_equals_uninterrupted"] = all(by_id[r["id"]] == r["completion"] for r in got)
    checks["generate_equals_cli"] = generate_matches(records, by_id, args)
    print(json.dumps(checks, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(checks, indent=2) + "\n")
    if not all(v for k, v in checks.items() if isinstance(v, bool)):
        raise SystemExit("a check failed")


def generate_matches(records: list[dict], by_id: dict[str, str], args) -> bool:
    """``generate()`` on the same texts (greedy, the CLI's defaults) gives the CLI's completions."""
    sys.path.insert(0, str(ROOT))
    from batched_specdec import generate
    from batched_specdec.models import load_target

    target, tokenizer = load_target("embedded", device="cpu", quiet=True)
    result = generate([r["prompt"] for r in records], target, tokenizer=tokenizer, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, do_sample=False)
    return all(text == by_id[r["id"]] for text, r in zip(result.texts, records))


if __name__ == "__main__":
    main()
