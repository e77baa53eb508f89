"""Decoding a whole prompt set: the schedule, seeds and merged stats, in one place.

:func:`~batched_specdec.generate`, the CLI and the multi-process path
(:func:`~batched_specdec.distributed.speculative_generate_distributed`) all decode their prompts here, with one of
two schedules over ``batch_size`` slots:

* ``"continuous"`` (the default): one :class:`~batched_specdec.decode.session.DecodeSession` of ``batch_size`` rows;
  whenever rows finish, the next queued prompts enter them (their rows only) and the other rows keep their state,
  so every step verifies a full batch while prompts remain. Which prompts enter when, and how (prefilled several
  at a time ahead of their turn, then copied into their rows), is the session's admission
  (:mod:`batched_specdec.decode.admission`). Output lengths vary a lot in real prompt sets; in fixed batches the end
  of every batch runs at a fraction of its width.
* ``"static"``: prompts grouped into batches of similar length, one session per batch, each run to its end.

The seed rule: with ``seed=s`` prompt ``i`` of the set samples under its own Philox key
``options.prompt_seed(s, i)``, at counters that follow its own length, so its tokens are the same whatever the
schedule, the batch size and the other prompts. Results come back in prompt order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from batched_specdec.checks import SCHEDULES, OptionError, check_positive_int, check_seed
from batched_specdec.decode.session import DecodeSession
from batched_specdec.decode.stats import GenerationStats, in_prompt_order, merge_stats
from batched_specdec.drafting.base import Drafter
from batched_specdec.model_info import input_device
from batched_specdec.options import DecodeOptions, DecodeRequest, run_seed

FINISH_REASONS = ("stop", "length")
"""Why a prompt's generation ended: ``stop`` at one of the EOS ids (the last token is that id), ``length`` at its
token budget."""


def finish_reason(tokens: list[int], eos_token_ids) -> str:
    """``"stop"`` when ``tokens`` ends in an EOS id, else ``"length"`` (the budget ran out)."""
    return "stop" if tokens and tokens[-1] in eos_token_ids else "length"


@dataclass
class PromptResult:
    """One prompt's result, handed to ``on_result`` as soon as the prompt finishes.

    Attributes
    ----------
    index : int
        The prompt's index in the decoded list.
    token_ids : list of int
        Its continuation (prompt excluded).
    finish_reason : str
        ``"stop"`` or ``"length"`` (:data:`FINISH_REASONS`).
    logprobs : list of float or None
        With ``return_logprobs``: each emitted token's log-probability under the processed target distribution.
    text : str or None
        The decoded continuation, where the caller has a tokenizer (:func:`~batched_specdec.generate`).
    """

    index: int
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    text: str | None = None


@dataclass
class PromptSetResult:
    """A decoded prompt set.

    Attributes
    ----------
    outputs : list of list of int
        Each prompt's continuation, in prompt order.
    stats : GenerationStats
        The whole set's statistics, per-prompt lists in prompt order.
    batch_stats : list of GenerationStats
        Each session's own stats, in the order they ran (one for the continuous schedule).
    batches : list of list of int
        The prompt indices of each session, in the order they entered it.
    finish_reasons : list of str
        Each prompt's finish reason (:data:`FINISH_REASONS`), in prompt order.
    """

    outputs: list[list[int]]
    stats: GenerationStats
    batch_stats: list[GenerationStats]
    batches: list[list[int]]
    finish_reasons: list[str]


def length_sorted_batches(rows: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped into batches of ``batch_size`` prompts of similar length (shortest first)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def check_schedule(schedule) -> str:
    if schedule not in SCHEDULES:
        raise OptionError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return schedule


@torch.inference_mode()
def decode_prompt_set(target, drafter: Drafter | None, rows: list[list[int]], max_gen_lens: list[int],
                      options: DecodeOptions, *, batch_size: int, seed: int | None = None,
                      schedule: str = "continuous", prompt_ids: list[int] | None = None,
                      on_prompt: Callable[[int, int], None] | None = None,
                      on_result: Callable[[PromptResult], None] | None = None) -> PromptSetResult:
    """Decode checked prompts ``rows`` (token-id lists) with per-prompt budgets ``max_gen_lens``.

    Parameters
    ----------
    drafter : Drafter or None
        Speculative decoding with it, or target-only decoding with None.
    options : DecodeOptions
        As resolved by :func:`~batched_specdec.options.resolve_options`; with ``options.progress`` one bar counts
        finished prompts and generated tokens.
    batch_size : int
        Slots: prompts decoded at the same time.
    seed : int, optional
        Seeds sampling by the seed rule (module docstring); None draws one from torch's default generator.
    schedule : {"continuous", "static"}
        See the module docstring.
    prompt_ids : list of int, optional
        Each prompt's index in the whole prompt set (a process' shard of it): what its random draws are keyed by.
        Default ``0..len(rows)-1``.
    on_prompt : callable, optional
        ``on_prompt(prompts_done, tokens_generated)`` as prompts finish (the CLI's progress display).
    on_result : callable, optional
        ``on_result(PromptResult)`` for every prompt, as soon as it finishes, in finishing order (the continuous
        schedule; the static one hands over each batch's prompts when the batch ends). An exception it raises
        stops the run; the prompts handed over before it are complete.
    """
    batch_size, schedule = check_positive_int("batch_size", batch_size), check_schedule(schedule)
    seed = run_seed(check_seed(seed), None)
    if not rows:  # a process' empty shard of a prompt set smaller than the number of processes
        return PromptSetResult([], merge_stats([], [], 0), [], [], [])
    keys = list(range(len(rows))) if prompt_ids is None else list(prompt_ids)
    device = input_device(target)
    progress = _Progress(options.progress, len(rows), "target-only" if drafter is None else "speculative", on_prompt)
    options = replace(options, progress=False)
    eos_token_ids = frozenset(options.eos_token_ids)
    hand_over = None if on_result is None else \
        (lambda i, tokens, lps: on_result(PromptResult(i, tokens, finish_reason(tokens, eos_token_ids), lps)))
    if schedule == "continuous":
        request = DecodeRequest(rows, max_gen_lens, device, keys)
        session = DecodeSession(target, drafter, request, options, seed, slots=batch_size)
        out, stats = _continuous(session, progress, hand_over)
        batches, outputs, batch_stats = [list(range(len(rows)))], [out], [stats]
    else:
        batches, outputs, batch_stats = length_sorted_batches(rows, batch_size), [], []
        for indices in batches:
            request = DecodeRequest([rows[i] for i in indices], [max_gen_lens[i] for i in indices], device,
                                    [keys[i] for i in indices])
            out, stats = DecodeSession(target, drafter, request, options, seed).run()
            outputs.append(out)
            batch_stats.append(stats)
            progress.done(len(indices), stats.generated_tokens)
            for j, i in enumerate(indices) if hand_over is not None else ():
                hand_over(i, out[j], None if stats.logprobs is None else stats.logprobs[j])
    progress.close()
    merged = merge_stats(batch_stats, batches, len(rows))
    ordered = in_prompt_order(outputs, batches, len(rows))
    return PromptSetResult(ordered, merged, batch_stats, batches, [finish_reason(o, eos_token_ids) for o in ordered])


def _continuous(session: DecodeSession, progress: _Progress, hand_over=None) -> tuple[list[list[int]], GenerationStats]:
    """Step ``session`` until every prompt of its request has been decoded, refilling finished rows from its queue
    after every step (:meth:`~batched_specdec.decode.admission.Admission.refill`); ``hand_over(prompt, tokens,
    logprobs)`` receives each prompt as it finishes. Returns the outputs (prompt order) and the stats."""
    t0, graphs0 = session.start()
    total, admission = len(session.request.prompts), session.admission
    handed: set[int] = set()
    while True:
        refilling = admission.waiting > 0
        done = session.step(refilling)
        if refilling:
            admission.refill()
        view = session.rows.view
        finished = total - admission.waiting - int((~view.finished).sum())  # entered minus still decoding
        if finished != progress.prompts:
            progress.update(finished, view.generated)
            if hand_over is not None:
                handed |= _hand_over_finished(session, hand_over)
        if done and not refilling:
            break
    outputs, stats = session.finish(t0, graphs0)
    for i in range(total) if hand_over is not None else ():
        if i not in handed:  # rows that finished in the last step
            hand_over(i, outputs[i], None if stats.logprobs is None else stats.logprobs[i])
    return outputs, stats


def _hand_over_finished(session: DecodeSession, hand_over) -> set[int]:
    """Copy out the rows that finished since the last call and hand their prompts over (one host read); returns
    the prompts handed over."""
    rows = session.rows
    rows.retire(rows.retirable())
    results = rows.collect()
    for i, (tokens, lps) in results.items():
        hand_over(i, tokens, lps)
    return set(results)


class _Progress:
    """One bar over a prompt set: finished prompts, with the tokens generated so far."""

    def __init__(self, enabled: bool, total: int, desc: str, callback) -> None:
        self.callback, self.prompts, self.tokens = callback, 0, 0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="prompt", leave=False)

    def done(self, prompts: int, tokens: int) -> None:
        self.update(self.prompts + prompts, self.tokens + tokens)

    def update(self, prompts: int, tokens: int) -> None:
        if self.bar is not None:
            self.bar.update(prompts - self.prompts)
            self.bar.set_postfix(tokens=tokens)
        self.prompts, self.tokens = prompts, tokens
        if self.callback is not None:
            self.callback(prompts, tokens)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
