"""What a decode measured: :class:`GenerationStats` per call or prompt set, merged over batches, and the per-phase
timer and progress bar of a run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from batched_specdec.devices import synchronize
from batched_specdec.glossary import PHASES


@dataclass
class GenerationStats:
    """What a generation call measured: raw counts, and the rates derived from them on read (each defined once,
    here). Per-prompt lists are in prompt order.

    Counts: per prompt ``accepted`` and ``proposed`` drafts (verified drafts; drafts past a row's stop count as
    neither) and ``generated`` tokens; ``acceptance_histogram[j]``, the (row, step) pairs that accepted exactly
    ``j`` drafts (target-only: ``[row_steps]``); ``wall_time_s``; ``steps``, the decode steps, each of which runs
    one target forward (:attr:`target_forwards`; prefill forwards are not counted); ``row_steps``, the (row, step)
    pairs in which a row was live; ``compactions``.

    Rates: :attr:`generated_tokens`, :attr:`tokens_per_s`, :attr:`acceptance_rate` (per prompt:
    :attr:`acceptance_rates`) and :attr:`tokens_per_target_forward`.

    ``peak_memory_bytes`` is the peak CUDA memory allocated on CUDA, and the process' peak resident memory on CPU
    (``peak_memory_kind`` says which). ``time_split`` (seconds per phase, keyed by
    :data:`~batched_specdec.glossary.PHASES`: prefill, which includes the prefills of prompts entering rows under
    the continuous schedule, and each step's plan, draft, verify, accept, commit and sync) is measured only with
    ``collect_stats=True``, which synchronises the device between phases. ``logprobs[i]`` (with
    ``return_logprobs=True``) holds, for every token of output ``i``, the target's log-probability of it under the
    processed distribution it was sampled from. ``controller`` (with ``gamma="auto"``) says which draft lengths
    the controller chose and what it predicted and measured.
    """

    accepted: list[int]
    proposed: list[int]
    generated: list[int]
    acceptance_histogram: list[int]
    wall_time_s: float
    steps: int
    row_steps: int
    peak_memory_bytes: int | None = None
    peak_memory_kind: str = ""
    time_split: dict[str, float] | None = None
    compactions: int = 0
    logprobs: list[list[float]] | None = None
    controller: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def target_forwards(self) -> int:
        """Target forwards of the decode steps: one verify forward per step, so :attr:`steps`."""
        return self.steps

    @property
    def generated_tokens(self) -> int:
        """Tokens generated over every prompt."""
        return sum(self.generated)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time (0.0 without wall time)."""
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted over proposed drafts of every prompt (0.0 when none was proposed)."""
        return sum(self.accepted) / max(sum(self.proposed), 1)

    @property
    def acceptance_rates(self) -> list[float]:
        """Each prompt's accepted over proposed drafts (0.0 where it proposed none)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def tokens_per_target_forward(self) -> float:
        """The mean number of tokens a live row gained per target forward, generated tokens over row-steps
        (accepted drafts + 1 for speculative decoding, 1 for the baseline; 0.0 without steps)."""
        return self.generated_tokens / self.row_steps if self.row_steps else 0.0


def add_counts(into: list[int], counts: list[int]) -> list[int]:
    """Add histogram ``counts`` into ``into`` element-wise, growing it as needed; returns ``into``."""
    if len(counts) > len(into):
        into += [0] * (len(counts) - len(into))
    for j, n in enumerate(counts):
        into[j] += int(n)
    return into


def _sum_histograms(histograms: list[list[int]]) -> list[int]:
    total: list[int] = []
    for h in histograms:
        add_counts(total, h)
    return total


def _merge_controllers(summaries: list[dict | None]) -> dict | None:
    """Draft-length and width histograms summed, step-cost means weighted by steps, the last batch's cost model."""
    summaries = [s for s in summaries if s]
    if not summaries:
        return None
    steps = [s["predicted_steps"] for s in summaries]  # the steps each batch's means are over

    def mean(key: str) -> float | None:
        pairs = [(s[key], n) for s, n in zip(summaries, steps) if s[key] is not None]
        return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs and sum(n for _, n in pairs) else None

    return {
        "draft_length_histogram": _sum_histograms([s["draft_length_histogram"] for s in summaries]),
        "verify_width_histogram": _sum_histograms([s["verify_width_histogram"] for s in summaries]),
        "predicted_step_s_mean": mean("predicted_step_s_mean"),
        "measured_step_s_mean": mean("measured_step_s_mean"),
        "predicted_steps": sum(steps),
        "draft_length_per_step": [k for s in summaries for k in s["draft_length_per_step"]],
        "cost_model": summaries[-1]["cost_model"],
    }


def in_prompt_order(per_batch: list[list], batches: list[list[int]], num_prompts: int) -> list:
    """Per-batch lists (``per_batch[j][r]`` for row ``r`` of batch ``j``) as one list in prompt order."""
    out = [None] * num_prompts
    for values, indices in zip(per_batch, batches):
        for i, v in zip(indices, values):
            out[i] = v
    return out


GRAPH_COUNTS = ("graphs_compiled", "graphs_recorded", "graphs_rerecorded_moved", "graph_replays",
                "graph_recording_s")
"""The ``extra`` counts of compiled and recorded graphs a call reports (summed over a prompt set's batches)."""


def merge_stats(batch_stats: list[GenerationStats], batches: list[list[int]], num_prompts: int, *,
                parallel: bool = False) -> GenerationStats:
    """One :class:`GenerationStats` for parts of a prompt set: batches that ran one after another, or with
    ``parallel=True`` processes that ran at the same time (then the wall time is the longest part's).

    Per-prompt lists are put in prompt order (``batches[j]`` holds the prompt indices of part ``j``'s rows), counts,
    steps, row-steps, times and histograms are summed (the rates follow from the sums), the peak memory is the
    largest, and ``extra["batches"]`` is the number of batches; the graph counts (:data:`GRAPH_COUNTS`) are summed.
    """
    walls = [s.wall_time_s for s in batch_stats]
    splits = [s.time_split for s in batch_stats if s.time_split]
    peaks = [s.peak_memory_bytes for s in batch_stats if s.peak_memory_bytes is not None]
    has_logprobs = all(s.logprobs is not None for s in batch_stats)
    return GenerationStats(
        accepted=in_prompt_order([s.accepted for s in batch_stats], batches, num_prompts),
        proposed=in_prompt_order([s.proposed for s in batch_stats], batches, num_prompts),
        generated=in_prompt_order([s.generated for s in batch_stats], batches, num_prompts),
        steps=sum(s.steps for s in batch_stats),
        row_steps=sum(s.row_steps for s in batch_stats),
        wall_time_s=(max(walls) if parallel else sum(walls)) if walls else 0.0,
        acceptance_histogram=_sum_histograms([s.acceptance_histogram for s in batch_stats]),
        peak_memory_bytes=max(peaks) if peaks else None,
        peak_memory_kind=batch_stats[0].peak_memory_kind if batch_stats else "",
        time_split={k: sum(s[k] for s in splits) for k in splits[0]} if splits else None,
        compactions=sum(s.compactions for s in batch_stats),
        logprobs=in_prompt_order([s.logprobs for s in batch_stats], batches, num_prompts) if has_logprobs else None,
        controller=_merge_controllers([s.controller for s in batch_stats]),
        extra={"batches": sum(s.extra.get("batches", 1) for s in batch_stats),
               **{k: sum(s.extra[k] for s in batch_stats) for k in GRAPH_COUNTS
                  if batch_stats and all(k in s.extra for s in batch_stats)},
               **({"sources": _merge_sources(batch_stats, batches, num_prompts)}
                  if any("sources" in s.extra for s in batch_stats) else {})},
    )


def _merge_sources(batch_stats: list[GenerationStats], batches: list[list[int]], num_prompts: int) -> dict:
    """The parts' per-source counts (``extra["sources"]``) summed, per-prompt lists in prompt order."""
    merged: dict[str, dict] = {}
    for stats, indices in zip(batch_stats, batches):
        for name, c in stats.extra.get("sources", {}).items():
            m = merged.setdefault(name, {"accepted": 0, "proposed": 0, "rows": 0,
                                         "accepted_per_prompt": [0] * num_prompts})
            for key in ("accepted", "proposed", "rows"):
                m[key] += c[key]
            for i, a in zip(indices, c["accepted_per_prompt"]):
                m["accepted_per_prompt"][i] = a
    return merged


class PhaseTimer:
    """Seconds per phase (:data:`~batched_specdec.glossary.PHASES`: prefill and the step's phases), measured only
    when enabled (it synchronises the device between phases). :meth:`lap` adds the time since the last mark to the
    phase that just ended."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device = device
        self.split = dict.fromkeys(PHASES, 0.0)
        self._t = 0.0

    def start(self) -> None:
        if self.enabled:
            synchronize(self.device)
            self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.enabled:
            synchronize(self.device)
            now = time.perf_counter()
            self.split[phase] += now - self._t
            self._t = now


def progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", leave=False)
