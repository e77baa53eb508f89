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
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from batched_specdec.checks import check_positive_int, check_seed
from batched_specdec.drafting import as_drafter
from batched_specdec.engine import GREEDY
from batched_specdec.model_info import vocab_size
from batched_specdec.options import resolve_options, resolve_prompts, run_seed
from batched_specdec.processors import LogitsProcessor
from batched_specdec.runner import check_schedule, decode_prompt_set


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
                                     schedule: str = "continuous", seed: int | None = None,
                                     max_gen_len: int | list[int] = 40,
                                     logits_processor: LogitsProcessor = GREEDY,
                                     **options) -> tuple[list[list[int]], list[float], list[dict]]:
    """:func:`~batched_specdec.speculative_generate_batch` over a prompt set split across processes.

    Every process must load the models (on ``process_state().device``) and call this with the same prompts. Each
    process decodes its shard with the prompt-set runner (:func:`batched_specdec.runner.decode_prompt_set`); the
    other keyword arguments (``gamma``, ``eos_tokens_id``, ``attention``, ...) are the engine's, checked on every
    process before any compute. Returns the outputs and per-row acceptance in prompt order, and per-process
    summaries (tokens, wall time, tokens/s) ordered by process index. ``schedule`` is the runner's (continuous by
    default). With ``seed=s`` prompt ``i`` of the whole set samples under its own key ``prompt_seed(s, i)``: its
    tokens do not depend on the number of processes, the batch size, the schedule or the other prompts.
    """
    batch_size, schedule = check_positive_int("batch_size", batch_size), check_schedule(schedule)
    seed = run_seed(check_seed(seed), None)  # one seed for every process (None: each would draw its own)
    resolved = resolve_options(target_model, logits_processor=logits_processor, **options)
    request = resolve_prompts(prompts, target_model, max_gen_len)
    drafter = as_drafter(draft_model, vocab_size(target_model), attention=resolved.attention,
                         prefill_chunk=resolved.prefill_chunk, compile=resolved.compile)

    def run_shard(shard: list, indices: list[int]) -> tuple[dict, dict]:
        result = decode_prompt_set(target_model, drafter, shard, [request.max_gen_lens[i] for i in indices], resolved,
                                   batch_size=batch_size, seed=seed, schedule=schedule, prompt_ids=indices)
        stats = result.stats
        return {"outputs": result.outputs, "alpha": stats.acceptance_rates}, {
            "wall_time_s": stats.wall_time_s, "generated_tokens": stats.generated_tokens,
            "tokens_per_s": stats.tokens_per_s}

    merged, per_process = run_on_prompt_shards(request.prompts, run_shard)
    return merged.get("outputs", []), merged.get("alpha", []), per_process
