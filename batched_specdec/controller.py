"""How many draft tokens a step asks for: a fixed ``gamma``, or an adaptive controller (``gamma="auto"``).

The adaptive controller picks, before each step, the step's draft length ``k`` (0 .. ``gamma_max``), so that the
prompts are done soonest:

* each row's per-position acceptance ``a_b`` is estimated online from the row's own verified drafts (a prior for
  new rows; old evidence decays, so a row that stopped drafting is tried again later). A row proposing ``j``
  drafts emits ``E_b(j) = 1 + a_b + ... + a_b^j`` tokens in expectation (Leviathan et al. 2023). With a drafter
  of several sources (the hybrid: an n-gram match or the model's chain) the estimate is kept per row and source,
  and a step reads, for each row, the one of the source the drafter says the row takes this step
  (:meth:`~batched_specdec.drafting.Drafter.next_sources`, asked before the plan);
* a cost model, fitted online from the step timings the engine already takes: verify seconds as a line in the
  number of verified tokens (rows x width), seconds per draft forward, and a fixed per-step overhead. On CPU the
  phases are timed with ``perf_counter`` (CPU ops are synchronous); on CUDA with events read after the step's one
  host sync, so timing adds no synchronisation.

Every row of a step is verified at the step's width, so every row may accept up to that many of its drafts: a row
that rarely accepts costs the step nothing more than one that often does (the draft forwards and the verify width
are the batch's). While queued prompts refill finished rows (continuous batching) the batch stays full, and the
step's draft length maximises its tokens per second, ``sum_b E_b(k) / cost(k)``, from each row's recent
acceptance. In the batch's last stretch (no prompt waits) the run lasts until its slowest row finishes, so the draft
length minimises the predicted time until every row has finished (:func:`finish_seconds`: each row leaves after
``remaining_b / E_b`` steps, the batch shrinking as rows finish). That prediction spans the rest of each row's run
and the slowest row decides it, so it reads each row's long-run acceptance pooled with the batch's
(:meth:`AdaptiveSpeculation.run_acceptance`): the lowest of several noisy recent estimates is mostly noise. Draft
length 0 is a plain target step. When the drafter's proposal lengths are known on the host without a sync (a model
drafter always proposes ``k``; the n-gram drafter's lengths live on the CPU when it runs there), the verify width is
then cut to what is worth verifying of what was proposed, so a batch with nothing worth verifying costs a one-token
step.

Lossless by construction: every choice for a step depends only on earlier steps (acceptance, timings) and on the
step's proposal lengths, never on the step's own random draws, so each emitted token is still distributed as the
target's whatever the draft length (rows with no draft emit one target token).
"""

from __future__ import annotations

import functools
import math
import time
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from batched_specdec.checks import GAMMA_MAX_DEFAULT, OptionError, check_gamma, check_gamma_max
from batched_specdec.devices import StepClock

ACCEPTANCE_PRIOR = 0.6
"""Prior per-position acceptance of a row with no evidence."""
PRIOR_WEIGHT = 0.5
"""The prior counts as this many verified positions: three rejections in a row bring a row's estimate under 0.1."""
ACCEPTANCE_CAP = 0.9
"""Estimates are capped here: a few accepted steps push an estimate past 0.95, and a long draft priced on it loses a
whole step at the first miss (measured with a bf16 copy of the target as draft)."""
EVIDENCE_DECAY = (0.99, 0.8)
"""Per step, old evidence keeps these weights in a row's long-run and recent estimates. The long-run estimate is
the prior of the recent one: acceptance is bursty (a drafter wrong a moment ago may be right now), so a row whose
drafts were often accepted is tried again soon after a few misses, while one that is rarely accepted stays off."""
EXPLORATION = 0.5
"""How far a row's estimate is lifted back towards the prior, divided by the square root of its decaying long-run
evidence. Steps without drafts bring no evidence, so a row whose drafts missed early (a model repeating a text often
starts with words of its own, where the n-gram drafter's first proposals miss) otherwise waited for that evidence to
decay: 12 to 315 steps after 1 to 30 misses, longer than most outputs. Now 0 to 181 (tests/test_controller.py)."""
FIRST_DRAFT_LEN = 1
"""Draft length of the first step, before anything has been measured."""
COST_DECAY = 0.97
"""Per step, old timing observations keep this weight in the cost fits."""
RIDGE = 0.05
"""Shrinkage of the cost slopes towards 0, relative to the mean x (see :class:`LinearFit`)."""
COMPACT_FRACTION = 0.25
"""A batch drops its finished rows once at least this fraction of it is finished (``RaggedBatch.rows_to_keep``); the
controller's prediction of a batch's last stretch follows the same rule."""
POOL_WEIGHT = 4.0
"""In the last stretch's prediction a row's long-run acceptance is shrunk towards the pooled rate of the batch's live
rows, which counts as this many verified positions (:meth:`AdaptiveSpeculation.run_acceptance`)."""
MIN_GAIN = 0.05
"""Speculate only when the predicted tokens per second beat a plain target step by this fraction: near
break-even, prediction errors would otherwise make speculation slower than not speculating."""
STREAK_ACCEPTANCE = 0.97
"""Next-step per-position acceptance of a row drafting from a copy source (an n-gram match) whose last verified drafts
were all accepted. Its next proposal continues the same match, and on copy and edit prompts such a match runs on for
tens of tokens: pricing it at the row's average acceptance (at most :data:`ACCEPTANCE_CAP`) asked 3 drafts where the
match had 8 or more to give (benchmarks/results/ngram_vs_prompt_lookup_cpu.md)."""
COPY_GAMMA_MAX_DEFAULT = 16
"""Largest draft length of ``gamma="auto"`` with a model-free drafter when ``gamma_max`` is not given: its drafts
cost no forward, so only the verify width limits them, and the plan and :meth:`AdaptiveSpeculation.choose_width`
cut that to what each step is worth (drafters with a model keep
:data:`~batched_specdec.checks.GAMMA_MAX_DEFAULT`)."""


CPU_MIN_VERIFY_TOKENS = 4
"""A verify forward on CPU carries at least this many tokens (``rows x width``). torch's CPU linear layers stream
their weights once per token below 4 tokens (measured with MKL on the embedded 135M target at batch 1: a 1-, 2-, 3-
and 4-token forward took 40, 60, 75 and 58 ms; its 576 x 49152 output layer alone 7, 14, 21 and 12 ms), so padding
a narrower verify to 4 tokens costs nothing and saves up to a quarter of the step."""


def min_verify_tokens(device) -> int:
    """Fewest tokens a verify forward with drafts carries on ``device`` (the engine pads up to it)."""
    return CPU_MIN_VERIFY_TOKENS if torch.device(device).type == "cpu" else 1


@dataclass
class StepPlan:
    """What a step asks for: ``draft_len`` drafts per row at most. ``remaining`` (host ``(N,)``, the live rows) is
    what the plan was made for: each row's tokens to go when the batch is in its last stretch, None while finished
    rows take queued prompts."""

    draft_len: int
    remaining: Tensor | None = None


class StaticSpeculation:
    """A fixed draft length: every step asks every row for ``gamma`` drafts and verifies ``gamma + 1`` tokens."""

    adaptive = False
    num_sources = 1

    def __init__(self, gamma: int) -> None:
        self.gamma_max = gamma

    def slots(self, row_ids: Tensor, sources: Tensor | None) -> Tensor:
        return row_ids

    def plan(self, row_ids: Tensor, live: Tensor, remaining: Tensor | None = None) -> StepPlan:
        return StepPlan(self.gamma_max)

    def start_step(self) -> None:
        pass

    def mark(self, phase: str) -> None:
        pass

    def choose_width(self, plan: StepPlan, lengths: Tensor | None, row_ids: Tensor, live: Tensor) -> int:
        return plan.draft_len

    def observe(self, *args, **kwargs) -> None:
        pass

    def summary(self) -> dict | None:
        return None


class LinearFit:
    """Weighted least squares ``y = c0 + c1 * x`` with exponential forgetting, the slope shrunk towards 0.

    The shrinkage (a ridge of ``RIDGE * mean(x)**2`` on the slope) makes the fit optimistic where data is thin:
    with one x seen the line is flat, and as old observations at other x fade, wider steps look cheaper again
    until one is tried and measured. A one-off slow step (first use of a new shape) therefore cannot stop
    speculation for the rest of a run.
    """

    def __init__(self, decay: float = COST_DECAY) -> None:
        self.decay = decay
        self.s = [0.0] * 5  # sums of w, w*x, w*y, w*x*x, w*x*y

    def add(self, x: float, y: float) -> None:
        self.s = [v * self.decay for v in self.s]
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            self.s[i] += v

    ridge = RIDGE

    @classmethod
    def line(cls, c0: float, c1: float = 0.0) -> LinearFit:
        """A fit that is exactly ``c0 + c1 * x`` (for fixed cost models)."""
        fit = cls(decay=1.0)
        fit.ridge = 0.0
        fit.add(0.0, c0)
        fit.add(1.0, c0 + c1)
        return fit

    @property
    def empty(self) -> bool:
        return self.s[0] == 0.0

    def coefficients(self) -> tuple[float, float]:
        w, sx, sy, sxx, sxy = self.s
        if w == 0.0:
            return 0.0, 0.0
        spread = max(sxx - sx * sx / w, 0.0)  # weighted sum of squared deviations of x
        ridge = self.ridge * (sx / w) ** 2
        slope = max((sxy - sx * sy / w) / (spread + ridge), 0.0) if spread + ridge > 0 else 0.0
        return max((sy - slope * sx) / w, 0.0), slope

    def __call__(self, x: float) -> float:
        c0, c1 = self.coefficients()
        return c0 + c1 * x


class CostModel:
    """Predicted seconds of a step with ``rows`` rows, ``k`` draft forwards and verify width ``width``.

    ``draft_ratio`` (a model draft's parameters over the target's) prices a draft forward as that share of a
    one-token verify until draft forwards have been measured, so a draft as large as the target is never tried.
    """

    def __init__(self, draft_ratio: float | None = None, min_verify_tokens: int = 1) -> None:
        self.draft_ratio = draft_ratio
        self.min_verify_tokens = min_verify_tokens  # the engine pads narrower verify forwards (on CPU: 4)
        self.verify = LinearFit()  # seconds against verified tokens (rows * width)
        self.draft_per_forward = LinearFit()  # seconds per draft forward against rows
        self.overhead = LinearFit()  # everything else, against rows
        self.widest = 0  # widest verify (drafts per row) measured so far

    @classmethod
    def fixed(cls, verify_s: tuple[float, float], draft_forward_s: tuple[float, float] = (0.0, 0.0),
              overhead_s: tuple[float, float] = (0.0, 0.0)) -> CostModel:
        """A cost model with given ``(intercept, slope)`` lines: verify seconds against verified tokens, seconds per
        draft forward and per-step overhead against rows. Use with ``frozen_costs=True``."""
        model = cls()
        model.verify, model.draft_per_forward, model.overhead = (
            LinearFit.line(*verify_s), LinearFit.line(*draft_forward_s), LinearFit.line(*overhead_s))
        return model

    @property
    def ready(self) -> bool:
        return not self.verify.empty

    def draft_s(self, rows: Tensor, forwards: Tensor) -> Tensor:
        """Seconds of ``forwards`` draft forwards over ``rows`` rows (float64 tensors that broadcast)."""
        if self.draft_per_forward.empty and self.draft_ratio is not None:
            return forwards * self.draft_ratio * self.verify(rows)
        return forwards * self.draft_per_forward(rows)

    def verify_s(self, rows: Tensor, width: Tensor) -> Tensor:
        """Seconds of a verify forward of ``rows`` rows and ``width`` positions, padded as the engine pads it."""
        tokens = rows * width
        return self.verify(torch.where(width > 1, tokens.clamp_min(self.min_verify_tokens), tokens))

    def step_s(self, rows: Tensor, draft_forwards: Tensor) -> Tensor:
        """``(M, W)`` float64: predicted seconds of a step with ``rows[m]`` rows (``(M,)``), ``draft_forwards[j]``
        draft forwards (``(W,)``) and verify width ``j + 1``."""
        rows = rows.to(torch.float64)[:, None]
        width = torch.arange(1, draft_forwards.shape[0] + 1, dtype=torch.float64)[None, :]
        return (self.draft_s(rows, draft_forwards.to(torch.float64)[None, :]) + self.verify_s(rows, width)
                + self.overhead(rows))


def _best_length(throughput: Tensor) -> int:
    """The draft length of the highest predicted throughput, if it beats draft length 0 by ``MIN_GAIN``."""
    best = int(throughput.argmax())
    return best if throughput[best] > (1.0 + MIN_GAIN) * throughput[0] else 0


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
def compacted_batch_sizes(batch_rows: int, live: int) -> Tensor:
    """``(live,)``: the batch's size while ``n = 1..live`` of its ``batch_rows`` rows are live, finished rows leaving
    once :data:`COMPACT_FRACTION` of the batch has finished (eager decoding). Cached: callers must not write to it."""
    sizes, size = [0] * live, batch_rows
    for n in range(live, 0, -1):
        if size - n >= COMPACT_FRACTION * size:
            size = n
        sizes[n - 1] = size
    return torch.tensor(sizes, dtype=torch.int64)


def expected_tokens(acceptance: Tensor, max_drafts: int) -> Tensor:
    """``(B, max_drafts + 1)``: expected emitted tokens of each row for ``j = 0..max_drafts`` drafts."""
    powers = acceptance[:, None] ** torch.arange(max_drafts + 1, dtype=acceptance.dtype)[None, :]
    return powers.cumsum(dim=1)


class AdaptiveSpeculation:
    """Per-step draft length from online acceptance estimates and an online cost model.

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
        source, and the ``row_ids`` the hooks take are evidence slots, ``row * num_sources + source`` (:meth:`slots`).
        Default 1.
    copy_sources : tuple of int
        The sources that copy an n-gram match of the row's own tokens: a row drafting from one whose last verified
        drafts were all accepted is priced at :data:`STREAK_ACCEPTANCE` for its next step (:meth:`acceptance`).
        Default none.
    """

    adaptive = True

    def __init__(self, gamma_max: int, num_rows: int, device: torch.device, *, cost_model: CostModel | None = None,
                 frozen_costs: bool = False, num_sources: int = 1, copy_sources: tuple[int, ...] = ()) -> None:
        self.gamma_max = gamma_max
        self.num_rows = num_rows
        self.num_sources = num_sources
        self.costs = cost_model or CostModel()
        self.frozen_costs = frozen_costs
        # [0]: long-run, [1]: recent; per evidence slot (original row and source)
        self.successes = torch.zeros(2, num_rows * num_sources, dtype=torch.float64)
        self.trials = torch.zeros(2, num_rows * num_sources, dtype=torch.float64)
        self.copies = torch.zeros(num_rows * num_sources, dtype=torch.bool)  # slots of a copy source
        for source in copy_sources:
            self.copies[source::num_sources] = True
        self.streak = torch.zeros(num_rows, dtype=torch.bool)  # rows whose last verified copy drafts were all accepted
        self.clock = StepClock(device)
        self.draft_lengths: list[int] = []
        self.width_histogram = [0] * (gamma_max + 1)
        self.predicted_s = self.measured_s = 0.0
        self.steps = 0
        self._step_t0 = 0.0
        self._pending: tuple[int, int, int, float] | None = None

    # --- estimates -------------------------------------------------------------------------------------------

    def slots(self, row_ids: Tensor, sources: Tensor | None) -> Tensor:
        """The evidence slots of original rows ``row_ids`` drafting from ``sources`` (host ``(B,)`` int64 each;
        None: every row's first source, which is all there is with one)."""
        return row_ids * self.num_sources + (0 if sources is None else sources)

    def acceptance(self, row_ids: Tensor) -> Tensor:
        """``(N,)`` float64 per-position acceptance estimates of the original rows ``row_ids`` for the next step: the
        recent estimate, its prior the long-run one (:meth:`_explored`); at least :data:`STREAK_ACCEPTANCE` for a copy
        source's slot of a row whose last verified drafts were copies, all accepted."""
        s, t = self.successes[:, row_ids], self.trials[:, row_ids]
        long_run = (s[0] + ACCEPTANCE_PRIOR * PRIOR_WEIGHT) / (t[0] + PRIOR_WEIGHT)
        recent = (s[1] + long_run * PRIOR_WEIGHT) / (t[1] + PRIOR_WEIGHT)
        estimate = self._explored(recent, t[0])
        streak = self.copies[row_ids] & self.streak[row_ids // self.num_sources]
        return torch.where(streak, estimate.clamp_min(STREAK_ACCEPTANCE), estimate)

    def run_acceptance(self, row_ids: Tensor) -> Tensor:
        """``(N,)`` float64 per-position acceptance the rows ``row_ids`` are predicted to keep for the rest of their
        runs, for the last stretch's prediction: each row's long-run estimate, shrunk towards the pooled long-run
        rate of these rows (worth :data:`POOL_WEIGHT` verified positions; :meth:`_explored`). The slowest row decides
        that prediction, and the lowest of several noisy few-step estimates is mostly noise; rows share the drafter,
        so the pool is a sound prior. One row: its next-step estimate (:meth:`acceptance`), since one row's time to
        its end is its tokens to go over its throughput (the two aims agree), and a single row's bursts (the
        stretches of a copy task) are worth following."""
        if row_ids.numel() == 1:
            return self.acceptance(row_ids)
        s, t = self.successes[0, row_ids], self.trials[0, row_ids]
        pooled = (s.sum() + ACCEPTANCE_PRIOR * PRIOR_WEIGHT) / (t.sum() + PRIOR_WEIGHT)
        return self._explored((s + pooled * POOL_WEIGHT) / (t + POOL_WEIGHT), t)

    @staticmethod
    def _explored(estimate: Tensor, evidence: Tensor) -> Tensor:
        """``estimate`` lifted towards the prior by :data:`EXPLORATION` over the square root of the row's decaying
        long-run ``evidence`` (verified positions): never above the prior, not at all for a row with none, and
        capped at :data:`ACCEPTANCE_CAP`. A row that stopped drafting brings no new evidence, so this is what tries
        it again later."""
        share = (EXPLORATION / torch.sqrt(evidence + PRIOR_WEIGHT)).clamp_max(1.0)
        lift = (ACCEPTANCE_PRIOR - estimate).clamp_min(0.0) * share
        return (estimate + lift * (evidence > 0)).clamp_max(ACCEPTANCE_CAP)

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
        sizes = compacted_batch_sizes(rows, tokens_per_step.shape[0])
        return 1.0 / finish_seconds(tokens_per_step, remaining, caps, sizes, step_s).clamp_min(1e-12)

    # --- the engine's hooks ----------------------------------------------------------------------------------

    def start_step(self) -> None:
        self._step_t0 = time.perf_counter()
        self.clock.marks.clear()
        self.clock.mark("start")

    def mark(self, phase: str) -> None:
        self.clock.mark(phase)

    def plan(self, row_ids: Tensor, live: Tensor, remaining: Tensor | None = None) -> StepPlan:
        """The next step's draft length. ``row_ids`` (host ``(B,)``) are the batch's rows' evidence slots (their
        original ids, with several sources combined with each row's source of this step: :meth:`slots`),
        ``live`` (host ``(B,)`` bool) marks the unfinished ones. ``remaining`` (host ``(B,)``): each row's tokens to
        go when no prompt waits for a finished row's place (the batch's last stretch, see :meth:`_speed`); None while
        queued prompts refill the batch."""
        rows = row_ids.shape[0]
        remaining = None if remaining is None else remaining[live]
        if not self.costs.ready:  # first step: one draft per row (a model draft: none, its cost has a prior)
            k = 0 if self.costs.draft_ratio is not None else min(self.gamma_max, FIRST_DRAFT_LEN)
            return StepPlan(k, remaining)
        # Widths grow at most twofold past the widest one measured, so an optimistic cost model probes gradually.
        longest = min(self.gamma_max, max(FIRST_DRAFT_LEN, 2 * self.costs.widest))
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
        """The acceptance a plan reads: the next step's (:meth:`acceptance`) while the batch stays full, the rest of
        the run's (:meth:`run_acceptance`) in its last stretch."""
        return self.acceptance(row_ids) if remaining is None else self.run_acceptance(row_ids)

    def observe(self, row_ids: Tensor, proposed: Tensor, accepted: Tensor, live: Tensor, rows: int, k: int,
                width: int, *, draft_timing_usable: bool = True, timing_usable: bool = True) -> None:
        """After the step's host sync: per-row proposed/accepted counts (host ``(B,)``) and the step's timings.
        ``draft_timing_usable=False`` keeps a draft time that includes one-off work (a model drafter catching up
        after target-only steps) out of the per-forward draft cost; ``timing_usable=False`` keeps the whole step's
        times out of the costs (a step that compiled a graph: seconds of one-off work)."""
        decay = torch.tensor(EVIDENCE_DECAY, dtype=torch.float64)[:, None]
        self.successes *= decay
        self.trials *= decay
        seen = live & (proposed > 0)
        ids = row_ids[seen]
        self.successes.index_add_(1, ids, accepted[seen].double().expand(2, -1))
        self.trials.index_add_(1, ids, torch.minimum(accepted[seen] + 1, proposed[seen]).double().expand(2, -1))
        slots, full = row_ids[live], (proposed[live] > 0) & (accepted[live] >= proposed[live])
        self.streak[slots // self.num_sources] = self.copies[slots] & full
        total = time.perf_counter() - self._step_t0
        draft = self.clock.seconds("start", "draft") if k else 0.0
        verify = self.clock.seconds("draft" if k else "start", "verify")
        ready = self.costs.ready
        predicted = float(self.costs.step_s(torch.tensor([rows]), torch.full((width + 1,), k))[0, width]) if ready \
            else math.nan
        if not self.frozen_costs and timing_usable:
            if k and draft_timing_usable:
                self.costs.draft_per_forward.add(rows, draft / k)
            self.costs.verify.add(rows * (width + 1), verify)
            self.costs.overhead.add(rows, max(total - draft - verify, 0.0))
        self.costs.widest = max(self.costs.widest, width)
        self.draft_lengths.append(k)
        if width >= len(self.width_histogram):  # a verify padded past gamma_max (CPU_MIN_VERIFY_TOKENS)
            self.width_histogram += [0] * (width + 1 - len(self.width_histogram))
        self.width_histogram[width] += 1
        if not math.isnan(predicted):
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


_SHARED_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_cost_model(target_model, drafter, device: torch.device, draft_ratio: float | None = None, *,
                      compiled: bool = False, rows: int = 1) -> CostModel:
    """The cost model every ``gamma="auto"`` call with this target, drafter, device, ``compile`` setting and batch
    size bucket reads and updates.

    Step costs belong to the (target, drafter, device, compiled, batch size) tuple, not to one call: a program that
    decodes batch after batch (the CLI, an evaluation loop, :func:`~batched_specdec.generate`) measures them once
    and later calls start from those measurements instead of from the prior (no first exploratory step, no width
    ramp to re-measure). Batch sizes share a model only within a power-of-two bucket of ``rows``: a line fitted on
    the costs of 16-row steps says little about 1-row steps (on a CPU a 1-token verify costs as much as a 4-token
    one), so a batch-1 run after batch-16 runs starts from its own measurements. Entries go away with the target
    model. :func:`forget_cost_models` starts from the prior again.
    """
    draft = drafter.model
    bucket = 1 << max(rows - 1, 0).bit_length()
    key = (type(drafter).__name__, id(draft) if draft is not None else None, str(device), compiled, bucket)
    models = _SHARED_COSTS.setdefault(target_model, {})
    if key not in models:
        models[key] = CostModel(draft_ratio, min_verify_tokens=min_verify_tokens(device))
    return models[key]


def forget_cost_models() -> None:
    """Drop every shared cost model, so the next ``gamma="auto"`` calls start from the prior."""
    _SHARED_COSTS.clear()


def make_controller(gamma, gamma_max, num_rows: int, device: torch.device, draft_ratio: float | None = None, *,
                    cost_model: CostModel | None = None, num_sources: int = 1,
                    copy_sources: tuple[int, ...] = ()):
    """The controller for ``gamma``: an int (static), ``"auto"`` (adaptive, ``gamma_max`` default
    :data:`~batched_specdec.checks.GAMMA_MAX_DEFAULT`, or :data:`COPY_GAMMA_MAX_DEFAULT` for a model-free drafter
    (``draft_ratio`` None), starting from ``cost_model`` or else a new one with draft costs priced by ``draft_ratio``
    until measured, see :class:`CostModel`; acceptance kept per row and each of ``num_sources`` sources), or a
    controller instance built by the caller for ``num_rows`` rows (tests, benchmarks of the policy).

    The copy sources of the adaptive controller (:data:`STREAK_ACCEPTANCE`): every source of a model-free drafter (the
    n-gram drafter's match lengths), else ``copy_sources`` (:attr:`~batched_specdec.drafting.Drafter.copy_sources`:
    the hybrid drafter's ``"ngram"`` source)."""
    if isinstance(gamma, (AdaptiveSpeculation, StaticSpeculation)):
        if gamma_max is not None:
            raise OptionError(f"gamma_max={gamma_max!r} cannot be combined with a controller instance as gamma")
        rows = getattr(gamma, "num_rows", num_rows)
        if rows != num_rows:
            raise OptionError(f"the controller passed as gamma was built for {rows} rows, but there are {num_rows} "
                              "prompts")
        return gamma
    gamma = check_gamma(gamma)
    gamma_max = check_gamma_max(gamma_max, gamma)
    if gamma == "auto":
        model_free = draft_ratio is None
        if gamma_max is None:
            gamma_max = COPY_GAMMA_MAX_DEFAULT if model_free else GAMMA_MAX_DEFAULT
        copies = tuple(range(num_sources)) if model_free else tuple(copy_sources)
        return AdaptiveSpeculation(gamma_max, num_rows, device, cost_model=cost_model or CostModel(draft_ratio),
                                   num_sources=num_sources, copy_sources=copies)
    return StaticSpeculation(gamma)
