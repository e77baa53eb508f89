"""Scale out with accelerate: split a prompt set across processes, gather the results in prompt order.

Run any script that calls these functions with ``accelerate launch --multi_gpu --num_processes N`` (one GPU per
process; on a machine without CUDA the same command starts N CPU processes that talk over gloo) or with
``torchrun --nproc_per_node N``; without a launcher they run in a single process. Note that accelerate's
``--cpu --num_processes N`` starts a single process unless accelerate is configured to use ``mpirun``
(huggingface/accelerate#2741); :func:`process_state` warns when it sees that case. Each
process decodes its shard with the ordinary batched engine; the shards are contiguous ranges of the prompt list
(accelerate's ``split_between_processes``) and uneven splits are fine. A target too large for one GPU can be
loaded with ``device_map="auto"``: the ragged cache keeps each layer's buffers on that layer's device.
"""

from __future__ import annotations

import atexit
import numbers
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from batched_specdec.inputs import batch_seed


def process_state() -> PartialState:
    """accelerate's process state (rank, world size, device); a single process when not launched.

    Without CUDA (or under ``accelerate launch --cpu``) the processes of a torchrun-style launch join a gloo
    group on the CPU.
    """
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true" or not torch.cuda.is_available()
    if use_cpu and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ and "PMI_SIZE" not in os.environ:
        warnings.warn(
            "accelerate launch --cpu started a single process (it needs mpirun for more); to split the prompts "
            "across N CPU processes use `accelerate launch --multi_gpu --num_processes N` or `torchrun`",
            stacklevel=2,
        )
    state = PartialState(cpu=use_cpu)
    if _process_group_initialized():
        # A user script that never tears the group down must still exit cleanly: gloo's threads outliving the
        # interpreter abort the process (SIGABRT, "terminate called without an active exception").
        atexit.unregister(shutdown_process_group)  # once, however often this is called
        atexit.register(shutdown_process_group, wait=False)
    return state


def _process_group_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shutdown_process_group(wait: bool = True) -> None:
    """Destroy the default process group if one exists; a no-op otherwise (single process, or already done).

    ``wait=True`` first waits for every process (the normal end of a run: no rank leaves while another still
    talks to it). A rank on its error path passes ``wait=False``: the others may be inside a different collective,
    so it must not join a barrier; it tears its side down and exits, and the launcher ends the rest.
    """
    if not _process_group_initialized():
        return
    if wait:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@contextmanager
def process_group_torn_down() -> Iterator[None]:
    """Run the body, then tear the default process group down: after a barrier on success, at once on error.

    Wrap the whole multi-process part of a script in it (the CLI and the test worker do); the exception, if any,
    still propagates, so a failing rank ends the launch with a non-zero exit code.
    """
    try:
        yield
    except BaseException:
        shutdown_process_group(wait=False)
        raise
    shutdown_process_group(wait=True)


def run_on_prompt_shards(
    prompts: Sequence, run_shard: Callable[[list, list[int]], tuple[dict[str, list], dict]]
) -> tuple[dict[str, list], list[dict]]:
    """Run ``run_shard`` on this process' contiguous share of ``prompts`` and gather every process' results.

    Parameters
    ----------
    prompts : sequence
        The whole prompt set, identical on every process.
    run_shard : callable
        ``run_shard(shard_prompts, shard_indices) -> (per_prompt, summary)``: ``per_prompt`` maps names to lists
        with one entry per shard prompt (merged back into prompt order); ``summary`` is kept per process.

    Returns
    -------
    merged : dict of str to list
        Per-prompt values of every process, in the original prompt order (available on every process).
    per_process : list of dict
        Each process' other values plus ``process_index`` and ``num_prompts``, ordered by process index.
    """
    state = process_state()
    indices = list(range(len(prompts)))
    with state.split_between_processes(indices) as local:
        local = list(local)
    result = run_shard([prompts[i] for i in local], local)
    gathered = gather_object([(state.process_index, local, result)])
    merged: dict[str, list] = {}
    per_process = []
    for process_index, shard, (per_prompt, summary) in sorted(gathered, key=lambda item: item[0]):
        for key, values in per_prompt.items():
            if len(values) != len(shard):
                raise ValueError(f"run_shard returned {len(values)} values for {key!r} on process {process_index}, "
                                 f"expected one per prompt of its shard ({len(shard)})")
            slot = merged.setdefault(key, [None] * len(prompts))
            for i, v in zip(shard, values):
                slot[i] = v
        per_process.append({"process_index": process_index, "num_prompts": len(shard), **summary})
    return merged, per_process


def speculative_generate_distributed(prompts: Sequence, draft_model, target_model, *, batch_size: int = 16,
                                     **kwargs) -> tuple[list[list[int]], list[float], list[dict]]:
    """:func:`~batched_specdec.speculative_generate_batch` over a prompt set split across processes.

    Every process must load the models (on ``process_state().device``) and call this with the same prompts.
    Returns the outputs and per-row acceptance in prompt order, and per-process summaries (tokens, wall time,
    tokens/s) ordered by process index. With ``seed=s`` each batch samples from its own stream,
    ``batch_seed(s, index of its first prompt)``: batches are not correlated, and a run is reproducible for the same
    prompts, ``batch_size`` and number of processes.
    """
    from batched_specdec.engine import speculative_generate_batch

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")

    seed = kwargs.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an int, got {seed!r}")

    def run_shard(shard: list, indices: list[int]) -> dict:
        outputs, alpha, wall, tokens = [], [], 0.0, 0
        for start in range(0, len(shard), batch_size):
            # One seed for every batch would give identical prompts in different batches identical samples.
            batch_kwargs = kwargs if seed is None else {**kwargs, "seed": batch_seed(seed, indices[start])}
            out, a, stats = speculative_generate_batch(shard[start : start + batch_size], draft_model, target_model,
                                                       **batch_kwargs)
            outputs += out
            alpha += a
            wall += stats.wall_time_s
            tokens += stats.generated_tokens
        return {"outputs": outputs, "alpha": alpha}, {
            "wall_time_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0}

    merged, per_process = run_on_prompt_shards(prompts, run_shard)
    return merged.get("outputs", []), merged.get("alpha", []), per_process
