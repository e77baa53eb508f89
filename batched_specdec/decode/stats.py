"""What a decode measured: :class:`GenerationStats` per call or prompt set, merged over batches, and the per-phase
timer and progress bar of a run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from batched_specdec.devices import synchronize


@dataclass
class GenerationStats:
    """What a generation call measured. Per-row lists are in prompt order.

    ``tokens_per_target_forward`` is the mean number of tokens a live row gained per target forward
    (accepted drafts + 1 for speculative decoding, 1 for the baseline). ``acceptance_histogram[j]`` counts the
    (row, step) pairs that accepted exactly ``j`` drafts. ``peak_memory_bytes`` is the peak CUDA memory
    allocated on CUDA, and the process' peak resident memory on CPU (``peak_memory_kind`` says which).
    ``time_split`` (seconds in prefill, which includes the prefills of prompts entering rows under the continuous
    schedule, and in each step's draft, verify, sampling and bookkeeping) is measured only with
    ``collect_stats=True``, which synchronises the device between phases. ``logprobs[i]`` (with
    ``return_logprobs=True``) holds, for every token of output ``i``, the target's log-probability of it under the
    processed distribution it was sampled from. ``controller`` (with ``gamma="auto"``) says which draft lengths
    the controller chose and what it predicted and measured.
    """

    accepted: list[int]
    proposed: list[int]
    generated: list[int]
    target_forwards: int
    tokens_per_target_forward: float
    acceptance_histogram: list[int]
    wall_time_s: float
    generated_tokens: int
    tokens_per_s: float
    acceptance_rate: float
    peak_memory_bytes: int | None = None
    peak_memory_kind: str = ""
    time_split: dict[str, float] | None = None
    steps: int = 0
    compactions: int = 0
    logprobs: list[list[float]] | None = None
    controller: dict | None = None
    extra: dict = field(default_factory=dict)


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

    Per-row lists are put in prompt order (``batches[j]`` holds the prompt indices of part ``j``'s rows), counts,
    steps and times are summed, ``tokens_per_target_forward`` and the rates are recomputed from the sums, histograms
    are summed, the peak memory is the largest, and ``extra["batches"]`` is the number of batches; the graph counts
    (:data:`GRAPH_COUNTS`) are summed.
    """
    generated_tokens = sum(s.generated_tokens for s in batch_stats)
    walls = [s.wall_time_s for s in batch_stats]
    wall = (max(walls) if parallel else sum(walls)) if walls else 0.0
    # tokens_per_target_forward = tokens / (row, step) pairs, so the pairs of each batch are tokens / that ratio
    row_steps = sum(s.generated_tokens / s.tokens_per_target_forward for s in batch_stats
                    if s.tokens_per_target_forward > 0)
    accepted = in_prompt_order([s.accepted for s in batch_stats], batches, num_prompts)
    proposed = in_prompt_order([s.proposed for s in batch_stats], batches, num_prompts)
    splits = [s.time_split for s in batch_stats if s.time_split]
    peaks = [s.peak_memory_bytes for s in batch_stats if s.peak_memory_bytes is not None]
    has_logprobs = all(s.logprobs is not None for s in batch_stats)
    return GenerationStats(
        accepted=accepted,
        proposed=proposed,
        generated=in_prompt_order([s.generated for s in batch_stats], batches, num_prompts),
        target_forwards=sum(s.target_forwards for s in batch_stats),
        tokens_per_target_forward=generated_tokens / row_steps if row_steps else 0.0,
        acceptance_histogram=_sum_histograms([s.acceptance_histogram for s in batch_stats]),
        wall_time_s=wall,
        generated_tokens=generated_tokens,
        tokens_per_s=generated_tokens / wall if wall > 0 else 0.0,
        acceptance_rate=sum(accepted) / max(sum(proposed), 1),
        peak_memory_bytes=max(peaks) if peaks else None,
        peak_memory_kind=batch_stats[0].peak_memory_kind if batch_stats else "",
        time_split={k: sum(s[k] for s in splits) for k in splits[0]} if splits else None,
        steps=sum(s.steps for s in batch_stats),
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
    """Seconds per phase of a step, measured only when enabled (it synchronises the device between phases)."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device = device
        self.split = {"prefill": 0.0, "draft": 0.0, "verify": 0.0, "sampling": 0.0, "bookkeeping": 0.0}
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
