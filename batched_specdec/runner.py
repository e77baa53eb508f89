"""Decoding a whole prompt set: ordering, batching, seeds and merged stats, in one place.

:func:`~batched_specdec.generate`, the CLI and the multi-process path
(:func:`~batched_specdec.distributed.speculative_generate_distributed`) all decode their prompts here. Prompts are
grouped into batches of similar length (a batch's attention spans and buffers follow its longest row), each batch is
one :class:`~batched_specdec.decode.session.DecodeSession`, and results come back in prompt order.

The seed rule: with ``seed=s`` the batch whose first prompt has index ``i`` in the prompt set samples from
``options.batch_seed(s, i)``, so batches are not correlated and a run is reproducible for the same prompts and
batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from batched_specdec.checks import check_positive_int
from batched_specdec.decode.session import DecodeSession
from batched_specdec.decode.stats import GenerationStats, in_prompt_order, merge_stats
from batched_specdec.drafting.base import Drafter
from batched_specdec.model_info import input_device
from batched_specdec.options import DecodeOptions, DecodeRequest, batch_seed, make_generator


@dataclass
class PromptSetResult:
    """A decoded prompt set.

    Attributes
    ----------
    outputs : list of list of int
        Each prompt's continuation, in prompt order.
    stats : GenerationStats
        All batches merged (:func:`~batched_specdec.decode.stats.merge_stats`).
    batch_stats : list of GenerationStats
        Each batch's own stats, in the order the batches ran.
    batches : list of list of int
        The prompt indices of each batch (its rows, in row order).
    """

    outputs: list[list[int]]
    stats: GenerationStats
    batch_stats: list[GenerationStats]
    batches: list[list[int]]


def length_sorted_batches(rows: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped into batches of ``batch_size`` prompts of similar length (shortest first)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def decode_prompt_set(target, drafter: Drafter | None, rows: list[list[int]], max_gen_lens: list[int],
                      options: DecodeOptions, *, batch_size: int, seed: int | None = None,
                      prompt_ids: list[int] | None = None,
                      on_batch: Callable[[int, int], None] | None = None) -> PromptSetResult:
    """Decode checked prompts ``rows`` (token-id lists) with per-prompt budgets ``max_gen_lens``.

    Parameters
    ----------
    drafter : Drafter or None
        Speculative decoding with it, or target-only decoding with None.
    options : DecodeOptions
        As resolved by :func:`~batched_specdec.options.resolve_options`; with ``options.progress`` one bar counts
        finished prompts and generated tokens.
    batch_size : int
        Prompts decoded together.
    seed : int, optional
        Seeds sampling by the seed rule (module docstring).
    prompt_ids : list of int, optional
        The index of each of ``rows`` in the whole prompt set (a process' shard of it); default ``0..len(rows)-1``.
    on_batch : callable, optional
        ``on_batch(prompts_done, tokens_generated)`` after each batch (the CLI's progress display).
    """
    batch_size = check_positive_int("batch_size", batch_size)
    prompt_ids = list(range(len(rows))) if prompt_ids is None else prompt_ids
    device = input_device(target)
    batches = length_sorted_batches(rows, batch_size)
    session_options = replace(options, progress=False)
    bar = _prompt_bar(options.progress, len(rows), "target-only" if drafter is None else "speculative")
    outputs, batch_stats, done, tokens = [], [], 0, 0
    for indices in batches:
        generator = None if seed is None else make_generator(batch_seed(seed, prompt_ids[indices[0]]), None, device)
        request = DecodeRequest([rows[i] for i in indices], [max_gen_lens[i] for i in indices], device)
        out, stats = DecodeSession(target, drafter, request, session_options, generator).run()
        outputs.append(out)
        batch_stats.append(stats)
        done, tokens = done + len(indices), tokens + stats.generated_tokens
        if bar is not None:
            bar.update(len(indices))
            bar.set_postfix(tokens=tokens)
        if on_batch is not None:
            on_batch(done, tokens)
    if bar is not None:
        bar.close()
    merged = merge_stats(batch_stats, batches, len(rows))
    return PromptSetResult(in_prompt_order(outputs, batches, len(rows)), merged, batch_stats, batches)


def _prompt_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", leave=False)
