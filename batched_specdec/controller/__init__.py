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
(:meth:`AcceptanceEstimates.run_acceptance`): the lowest of several noisy recent estimates is mostly noise. Draft
length 0 is a plain target step. When the drafter's proposal lengths are known on the host without a sync (a model
drafter always proposes ``k``; the n-gram drafter's lengths live on the CPU when it runs there), the verify width is
then cut to what is worth verifying of what was proposed, so a batch with nothing worth verifying costs a one-token
step.

Lossless by construction: every choice for a step depends only on earlier steps (acceptance, timings) and on the
step's proposal lengths, never on the step's own random draws, so each emitted token is still distributed as the
target's whatever the draft length (rows with no draft emit one target token).

Where each piece lives:

* :mod:`~batched_specdec.controller.plan`: :class:`StepPlan`, the :class:`Controller` protocol (the hooks the decode
  session calls, each defined once) and :class:`StaticSpeculation`;
* :mod:`~batched_specdec.controller.acceptance`: :class:`AcceptanceEstimates`, the per-row (and source) acceptance,
  its prior, decay, cap, exploration and copy streaks;
* :mod:`~batched_specdec.controller.costs`: :class:`CostModel` and its :class:`LinearFit` lines, the CPU's narrowest
  verify, and the cost models shared between calls (:func:`shared_cost_model`);
* :mod:`~batched_specdec.controller.policy`: the choice of a draft length (:func:`expected_tokens`,
  :func:`finish_seconds`, :func:`compacted_batch_sizes`) and :class:`AdaptiveSpeculation`;
* :mod:`~batched_specdec.controller.choose`: :func:`make_controller`, the controller of a call's ``gamma``, and
  :func:`check_gamma_option`, the one check of ``gamma`` and ``gamma_max``.
"""

from batched_specdec.controller.acceptance import (
    ACCEPTANCE_CAP,
    ACCEPTANCE_PRIOR,
    EVIDENCE_DECAY,
    EXPLORATION,
    PRIOR_WEIGHT,
    STREAK_ACCEPTANCE,
    AcceptanceEstimates,
)
from batched_specdec.controller.choose import check_gamma_option, make_controller
from batched_specdec.controller.costs import (
    COST_DECAY,
    RIDGE,
    CostModel,
    LinearFit,
    forget_cost_models,
    shared_cost_model,
)
from batched_specdec.controller.plan import Controller, StaticSpeculation, StepPlan
from batched_specdec.controller.policy import (
    COMPACT_FRACTION_DEFAULT,
    COPY_GAMMA_MAX_DEFAULT,
    FIRST_DRAFT_LEN,
    MIN_GAIN,
    AdaptiveSpeculation,
    compacted_batch_sizes,
    expected_tokens,
    finish_seconds,
)

__all__ = [
    "ACCEPTANCE_CAP",
    "ACCEPTANCE_PRIOR",
    "COMPACT_FRACTION_DEFAULT",
    "COPY_GAMMA_MAX_DEFAULT",
    "COST_DECAY",
    "EVIDENCE_DECAY",
    "EXPLORATION",
    "FIRST_DRAFT_LEN",
    "MIN_GAIN",
    "PRIOR_WEIGHT",
    "RIDGE",
    "STREAK_ACCEPTANCE",
    "AcceptanceEstimates",
    "AdaptiveSpeculation",
    "Controller",
    "CostModel",
    "LinearFit",
    "StaticSpeculation",
    "StepPlan",
    "check_gamma_option",
    "compacted_batch_sizes",
    "expected_tokens",
    "finish_seconds",
    "forget_cost_models",
    "make_controller",
    "shared_cost_model",
]
