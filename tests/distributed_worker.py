"""Run by tests/test_distributed.py under `accelerate launch`: tiny models, a fixed prompt set, results as JSON."""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import tiny_causal_lm

from batched_specdec.distributed import process_group_torn_down, process_state, speculative_generate_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="where the main process writes the merged results (JSON)")
    parser.add_argument("--num-prompts", type=int, default=5, help="prompts in the set")
    parser.add_argument("--fail-on-process", type=int, default=-1, help="raise in this process index (test only)")
    args = parser.parse_args()
    with process_group_torn_down():
        run(args)


def run(args: argparse.Namespace) -> None:
    state = process_state()
    if state.process_index == args.fail_on_process:
        raise RuntimeError(f"deliberate failure in process {state.process_index}")
    target = tiny_causal_lm("llama", seed=0)
    draft = tiny_causal_lm("llama", seed=1, layers=1)
    rng = random.Random(0)
    prompts = [[rng.randrange(96) for _ in range(rng.randint(1, 20))] for _ in range(args.num_prompts)]
    outputs, alpha, per_process = speculative_generate_distributed(
        prompts, draft, target, batch_size=2, gamma=3, max_gen_len=12, eos_tokens_id=[]
    )
    if state.is_main_process:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"outputs": outputs, "alpha": alpha, "per_process": per_process}, f)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
