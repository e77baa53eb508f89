"""What streaming results costs: the same prompt set decoded with and without ``on_result`` writing each finished
prompt to a JSONL file (what the CLI's ``--no-baseline`` does), alternated and repeated, in one process.

The embedded target with its default draft, greedy, the continuous schedule. Both sides decode the same prompts to
the same tokens; the streaming side also copies each finished row to the host and writes its line (flushed).

    python benchmarks/bench_streaming.py --rounds 3 --markdown benchmarks/results/streaming_cpu.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run(target, drafter, rows, options, batch_size, max_new, out_path: Path | None):
    from batched_specdec.runner import decode_prompt_set

    file = None if out_path is None else out_path.open("w")

    def write(result):
        file.write(json.dumps({"index": result.index, "tokens": result.token_ids,
                               "finish_reason": result.finish_reason}) + "\n")
        file.flush()

    t = time.perf_counter()
    result = decode_prompt_set(target, drafter, rows, [max_new] * len(rows), options, batch_size=batch_size,
                               seed=0, on_result=None if file is None else write)
    seconds = time.perf_counter() - t
    if file is not None:
        file.close()
    return result, result.stats.generated_tokens / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default=str(ROOT / "benchmarks" / "prompts" / "generation40.jsonl"))
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds of both sides [default: 3]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", help="append the table to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from batched_specdec.drafting import as_drafter
    from batched_specdec.model_info import vocab_size
    from batched_specdec.models import load_draft, load_target
    from batched_specdec.options import resolve_options
    from batched_specdec.processors import GreedyProcessor
    from batched_specdec.prompts import encode_prompts

    target, tokenizer = load_target("embedded", device="cpu", quiet=True)
    drafter = as_drafter(load_draft("auto", target), vocab_size(target))
    texts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines()][: args.num_prompts]
    rows = encode_prompts(tokenizer, texts)
    options = resolve_options(target, tokenizer=tokenizer, logits_processor=GreedyProcessor())
    run(target, drafter, rows[:2], options, args.batch_size, 4, None)  # warm-up
    rates = {"without": [], "with": []}
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side in (("without", "with") if r % 2 == 0 else ("with", "without")):
                result, rate = run(target, drafter, rows, options, args.batch_size, args.max_new_tokens,
                                   Path(tmp) / "out.jsonl" if side == "with" else None)
                rates[side].append(rate)
                outputs.setdefault(side, result.outputs)
                print(f"round {r} {side:7s} streaming: {rate:.1f} tok/s", flush=True)
    same = outputs["with"] == outputs["without"]
    ratio = statistics.median(rates["with"]) / statistics.median(rates["without"])
    table = (f"| prompts | batch | rounds | without streaming tok/s | with streaming tok/s | with / without | "
             f"outputs identical |\n|---|---|---|---|---|---|---|\n| {len(rows)} | {args.batch_size} | {args.rounds} | "
             f"{', '.join(f'{x:.1f}' for x in rates['without'])} | {', '.join(f'{x:.1f}' for x in rates['with'])} | "
             f"{ratio:.3f}x (medians) | {same} |\n")
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(table)


if __name__ == "__main__":
    main()
