"""The choice of a step's draft length: expected tokens against predicted seconds, and the adaptive controller.

:class:`AdaptiveSpeculation` (``gamma="auto"``) plans each step from its acceptance estimates
(:class:`~batched_specdec.controller.acceptance.AcceptanceEstimates`) and its cost model
(:class:`~batched_specdec.controller.costs.CostModel`): while the batch stays full, the draft length of the most
tokens per second; in its last stretch, the one whose predicted time until every row has finished
(:func:`finish_seconds`) is least. Draft length 0 (a plain target step) unless another beats it by
:data:`MIN_GAIN`.
"""

from __future__ import annotations

import functools
import math
import time

import torch
from torch import Tensor

from batched_specdec.controller.acceptance import AcceptanceEstimates
from batched_specdec.controller.costs import CostModel
from batched_specdec.controller.plan import StepPlan
from batched_specdec.devices import StepClock

FIRST_DRAFT_LEN = 1
"""Draft length of the first step of a new cost model, before anything has been measured (not a tuned rule: it
decides one step per cost model, and cost models are shared between calls)."""
MIN_GAIN = 0.05
"""Speculate only when the predicted tokens per second beat a plain target step by this fraction: near
break-even, prediction errors would otherwise make speculation slower than not speculating. Measured (alternated,
4 rounds, CPU; ``benchmarks/results/controller_rules_cpu.md``): without it chat prompts at batch 1 with the n-gram
drafter ran 1.9% slower (every round), the main job at batch 4 0.8% slower (within noise)."""
COPY_GAMMA_MAX_DEFAULT = 16
"""Largest draft length of ``gamma="auto"`` with a model-free drafter when ``gamma_max`` is not given: its drafts
cost no forward, so only the verify width limits them, and the plan and :meth:`AdaptiveSpeculation.choose_width`
cut that to what each step is worth (drafters with a model keep
:data:`~batched_specdec.checks.GAMMA_MAX_DEFAULT`). Measured: with 8 instead, copy and edit prompts at batch 1 took
167 target forwards instead of 159 and ran 2.3% slower (every round of 4;
``benchmarks/results/controller_rules_cpu.md``)."""
TIMED_PHASES = ("draft", "accept")
"""The step phases whose ends the controller's clock marks (:meth:`AdaptiveSpeculation.mark`). The cost model's
draft seconds run from the step's start to the end of *draft* (plan and draft), its verify seconds from there to
the end of *accept* (verify and accept), and its overhead is the rest of the step (commit and sync)."""
COMPACT_FRACTION_DEFAULT = 0.25
"""The batch's compaction rule a controller assumes when its caller gives none (tests and benchmarks that build a
controller directly): finished rows leave once this fraction of the batch has finished. The decode session passes
the batch's own, :data:`batched_specdec.decode.compaction.COMPACT_FRACTION`, which this equals
(tests/test_controller.py)."""


def expected_tokens(acceptance: Tensor, max_drafts: int) -> Tensor:
    """``(B, max_drafts + 1)``: expected emitted tokens of each row for ``j = 0..max_drafts`` drafts."""
    powers = acceptance[:, None] ** torch.arange(max_drafts + 1, dtype=acceptance.dtype)[None, :]
    return powers.cumsum(dim=1)


def finish_seconds(tokens_per_step: Tensor, remaining: Tensor, caps: Tensor, batch_sizes: Tensor,
                   step_s: Tensor) -> Tensor:
    """``(W,)`` predicted seconds until every live row has finished if each step drafts at most ``j`` tokens per row.

    A fluid model of the batch's last stretch: live row ``b`` (``remaining[b]`` tokens to go, ``(N,)``) emits
    ``tokens_per_step[b, j]`` (``(N, W)``) tokens per step, so it leaves after ``remaining[b] / tokens_per_step[b, j]``
    steps. While rows ``L`` are live, a step verifies ``min(j, max(caps[L]))`` drafts per row (``caps``: ``(N,)``,
    the most a row drafts) in a batch of ``batch_sizes[|L| - 1]`` rows (``(N,)``, finished rows stay until the batch
    is compacted) and costs ``step_s[rows, width]`` seconds (``(max rows + 1, W)``). A row that drafts little sets
    how long the batch lasts, whatever the other rows gain.
    """
    n, w = tokens_per_step.shape
    steps = (remaining.to(torch.float64)[:, None] / tokens_per_step).clamp_min(1.0)
    steps, order = steps.sort(dim=0)
    widest = caps[order].flip(0).cummax(dim=0).values.flip(0)  # widest cap among the rows still live
    width = torch.minimum(widest, torch.arange(w)[None, :])
    live_rows = torch.arange(n, 0, -1)  # while the i-th row to finish is still live
    durations = torch.diff(steps, dim=0, prepend=torch.zeros(1, w, dtype=steps.dtype))
    return (durations * step_s[batch_sizes[live_rows - 1][:, None], width]).sum(dim=0)


@functools.lru_cache(maxsize=256)
def compacted_batch_sizes(batch_rows: int, live: int, compact_fraction: float) -> Tensor:
    """``(live,)``: the batch's size while ``n = 1..live`` of its ``batch_rows`` rows are live, finished rows leaving
    once ``compact_fraction`` of the batch has finished (eager decoding). Cached: callers must not write to it."""
    sizes, size = [0] * live, batch_rows
    for n in range(live, 0, -1):
        if size - n >= compact_fraction * size:
            size = n
        sizes[n - 1] = size
    return torch.tensor(sizes, dtype=torch.int64)


def _best_length(throughput: Tensor) -> int:
    """The draft length of the highest predicted throughput, if it beats draft length 0 by ``MIN_GAIN``."""
    best = int(throughput.argmax())
    return best if throughput[best] > (1.0 + MIN_GAIN) * throughput[0] else 0


class AdaptiveSpeculation:
    """Per-step draft length from online acceptance estimates and an online cost model (a
    :class:`~batched_specdec.controller.plan.Controller`).

    Parameters
    ----------
    gamma_max : int
        Largest draft length a step may ask for.
    num_rows : int
        Rows of the batch (estimates are kept per original row, so compaction keeps them).
    device : torch.device
        The target's device (chooses the step clock).
    cost_model : CostModel, optional
        A model to start from (tests pass one whose numbers they control, see ``frozen_costs``).
    frozen_costs : bool
        Never update the cost model from timings (tests, reproducible benchmarks of the policy).
    num_sources : int
        Sources a row may draft from (a hybrid drafter's n-gram match and model): acceptance is kept per row and
        source, and the ``row_ids`` the hooks take are evidence ids, ``row * num_sources + source``
        (:meth:`evidence_ids`).
        Default 1.
    copy_sources : tuple of int
        The sources that copy an n-gram match of the row's own tokens, priced at
        :data:`~batched_specdec.controller.acceptance.STREAK_ACCEPTANCE` after a fully accepted copy. Default none.
    compact_fraction : float
        The batch drops its finished rows once this fraction of it has finished: the last stretch's prediction
        follows the same rule (:func:`compacted_batch_sizes`). Default :data:`COMPACT_FRACTION_DEFAULT`.
    """

    adaptive = True

    def __init__(self, gamma_max: int, num_rows: int, device: torch.device, *, cost_model: CostModel | None = None,
                 frozen_costs: bool = False, num_sources: int = 1, copy_sources: tuple[int, ...] = (),
                 compact_fraction: float = COMPACT_FRACTION_DEFAULT) -> None:
        self.gamma_max = gamma_max
        self.num_rows = num_rows
        self.estimates = AcceptanceEstimates(num_rows, num_sources, copy_sources)
        self.costs = cost_model or CostModel()
        self.frozen_costs = frozen_costs
        self.compact_fraction = compact_fraction
        self.clock = StepClock(device)
        self.draft_lengths: list[int] = []
        self.width_histogram = [0] * (gamma_max + 1)
        self.predicted_s = self.measured_s = 0.0
        self.steps = 0
        self._step_t0 = 0.0

    @property
    def num_sources(self) -> int:
        return self.estimates.num_sources

    def evidence_ids(self, row_ids: Tensor, sources: Tensor | None) -> Tensor:
        return self.estimates.evidence_ids(row_ids, sources)

    def start_step(self) -> None:
        self._step_t0 = time.perf_counter()
        self.clock.marks.clear()
        self.clock.mark("start")

    def mark(self, phase: str) -> None:
        if phase in TIMED_PHASES:
            self.clock.mark(phase)

    # --- the plan ----------------------------------------------------------------------------------------------

    def plan(self, row_ids: Tensor, live: Tensor, remaining: Tensor | None = None) -> StepPlan:
        """The next step's draft length. ``row_ids`` (host ``(B,)``) are the batch's rows' evidence ids (their
        original ids, with several sources combined with each row's source of this step: :meth:`evidence_ids`),
        ``live`` (host ``(B,)`` bool) marks the unfinished ones. ``remaining`` (host ``(B,)``): each row's tokens to
        go when no prompt waits for a finished row's place (the batch's last stretch, see :meth:`_speed`); None while
        queued prompts refill the batch."""
        rows = row_ids.shape[0]
        remaining = None if remaining is None else remaining[live]
        if not self.costs.ready:  # first step: one draft per row (a model draft: none, its cost has a prior)
            k = 0 if self.costs.draft_ratio is not None else min(self.gamma_max, FIRST_DRAFT_LEN)
            return StepPlan(k, remaining)
        longest = self.gamma_max
        step_s = self.costs.step_s(torch.arange(rows + 1), torch.arange(longest + 1)).clamp_min(1e-9)
        gains = expected_tokens(self._estimates(row_ids[live], remaining), longest)  # (N, longest + 1)
        caps = torch.full((gains.shape[0],), longest)  # as far as the plan knows, every row proposes k
        return StepPlan(_best_length(self._speed(gains, caps, remaining, step_s)), remaining)

    def choose_width(self, plan: StepPlan, lengths: Tensor | None, row_ids: Tensor, live: Tensor) -> int:
        """Drafts per row to verify once the proposal lengths are known (``lengths``, host ``(B,)``, from a drafter
        that may propose fewer than asked); ``None`` keeps the planned length. The draft forwards already ran, so
        their time is the same for every width but still part of this step's time."""
        if lengths is None or plan.draft_len == 0 or not self.costs.ready:
            return plan.draft_len
        lengths = lengths[live]
        longest = int(lengths.max()) if lengths.numel() else 0
        if longest == 0:
            return 0
        ws = torch.arange(longest + 1)
        gains = expected_tokens(self._estimates(row_ids[live], plan.remaining), longest)
        per_row = gains.gather(1, torch.minimum(lengths[:, None], ws[None, :]))
        sunk = torch.full((longest + 1,), plan.draft_len)  # the draft forwards already ran
        step_s = self.costs.step_s(torch.arange(row_ids.shape[0] + 1), sunk).clamp_min(1e-9)
        return _best_length(self._speed(per_row, lengths, plan.remaining, step_s))

    def _estimates(self, row_ids: Tensor, remaining: Tensor | None) -> Tensor:
        """The acceptance a plan reads: the next step's
        (:meth:`~batched_specdec.controller.acceptance.AcceptanceEstimates.acceptance`) while the batch stays full,
        the rest of the run's (:meth:`~batched_specdec.controller.acceptance.AcceptanceEstimates.run_acceptance`) in
        its last stretch."""
        if remaining is None:
            return self.estimates.acceptance(row_ids)
        return self.estimates.run_acceptance(row_ids)

    def _speed(self, tokens_per_step: Tensor, caps: Tensor, remaining: Tensor | None, step_s: Tensor) -> Tensor:
        """``(W,)``: how fast the batch goes with at most ``j`` drafts per row, from each live row's expected tokens
        per step ``tokens_per_step`` ``(N, W)``, the most it drafts ``caps`` ``(N,)`` and the predicted seconds of a
        step with ``m`` rows and ``j`` drafts, ``step_s`` ``(rows + 1, W)`` (``rows``: the batch's size).

        While finished rows take queued prompts (``remaining`` None) the batch stays full, and the speed is its
        expected tokens per second. In the batch's last stretch (``remaining``: each live row's tokens to go,
        ``(N,)``) the run ends with its slowest row, and the speed is the inverse of :func:`finish_seconds`."""
        rows = step_s.shape[0] - 1
        if remaining is None:
            return tokens_per_step.sum(dim=0) / step_s[rows]
        sizes = compacted_batch_sizes(rows, tokens_per_step.shape[0], self.compact_fraction)
        return 1.0 / finish_seconds(tokens_per_step, remaining, caps, sizes, step_s).clamp_min(1e-12)

    # --- learning from a step ------------------------------------------------------------------------------------

    def observe(self, row_ids: Tensor, proposed: Tensor, accepted: Tensor, live: Tensor, rows: int, k: int,
                width: int, *, draft_timing_usable: bool = True, timing_usable: bool = True) -> None:
        """After the step's host sync: the acceptance estimates learn from the per-row proposed/accepted counts
        (host ``(B,)``), the cost model from the step's timings. ``draft_timing_usable=False`` keeps a draft time
        that includes one-off work (a model drafter catching up after target-only steps) out of the per-forward
        draft cost; ``timing_usable=False`` keeps the whole step's times out of the costs (a step that compiled a
        graph: seconds of one-off work)."""
        self.estimates.update(row_ids, proposed, accepted, live)
        total = time.perf_counter() - self._step_t0
        draft = self.clock.seconds("start", "draft") if k else 0.0
        verify = self.clock.seconds("draft" if k else "start", "accept")
        ready = self.costs.ready
        predicted = float(self.costs.step_s(torch.tensor([rows]), torch.full((width + 1,), k))[0, width]) if ready \
            else math.nan
        self.costs.add_step(rows, k, width, draft, verify, total, fit=not self.frozen_costs and timing_usable,
                            fit_draft=draft_timing_usable)
        self.draft_lengths.append(k)
        self.width_histogram[width] += 1
        if not math.isnan(predicted) and timing_usable:
            self.predicted_s += predicted
            self.measured_s += total
            self.steps += 1

    def summary(self) -> dict:
        v0, v1 = self.costs.verify.coefficients()
        d0, d1 = self.costs.draft_per_forward.coefficients()
        return {
            "draft_length_histogram": torch.bincount(torch.tensor(self.draft_lengths, dtype=torch.int64),
                                                     minlength=self.gamma_max + 1).tolist(),
            "draft_length_per_step": list(self.draft_lengths),
            "verify_width_histogram": list(self.width_histogram),
            "predicted_step_s_mean": self.predicted_s / self.steps if self.steps else None,
            "measured_step_s_mean": self.measured_s / self.steps if self.steps else None,
            "predicted_steps": self.steps,
            "cost_model": {"verify_s": [v0, v1], "draft_forward_s": [d0, d1],
                           "overhead_s": list(self.costs.overhead.coefficients())},
        }
