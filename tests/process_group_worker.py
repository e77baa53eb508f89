"""Run by tests/test_distributed.py under torchrun: join the process group, gather once, exit.

``--mode context`` wraps the work in ``process_group_torn_down()`` as the CLI does; ``--mode script`` does what a
user's script does (no explicit teardown) and relies on the exit hook that ``process_state()`` registers.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from accelerate.utils import gather_object

from batched_specdec.distributed import process_group_torn_down, process_state


def gather_ranks() -> None:
    state = process_state()
    ranks = gather_object([state.process_index])
    if sorted(ranks) != list(range(state.num_processes)):
        raise RuntimeError(f"gathered {ranks}, expected one entry per process")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["context", "script"], required=True, help="how the group is torn down")
    if parser.parse_args().mode == "context":
        with process_group_torn_down():
            gather_ranks()
    else:
        gather_ranks()
