"""What a controller is to the decode session: the step's plan, the hooks every controller implements, and the
fixed draft length.

:class:`Controller` defines each hook once; :class:`StaticSpeculation` (a fixed ``gamma``) and
:class:`~batched_specdec.controller.policy.AdaptiveSpeculation` (``gamma="auto"``) implement it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass
class StepPlan:
    """What a step asks for: ``draft_len`` drafts per row at most. ``remaining`` (host ``(N,)``, the live rows) is
    what the plan was made for: each row's tokens to go when the batch is in its last stretch, None while finished
    rows take queued prompts."""

    draft_len: int
    remaining: Tensor | None = None


class Controller(Protocol):
    """The draft length of every step, as the decode session asks for it.

    Attributes
    ----------
    adaptive : bool
        Whether the controller learns from the steps: the session then reads each row's proposed and accepted counts
        at the step's sync, passes each row's tokens to go to :meth:`plan` in a batch's last stretch, and calls
        :meth:`observe`.
    num_sources : int
        Sources a row may draft from whose acceptance the controller keeps apart (with more than one, the session
        asks the drafter which source each row takes this step before :meth:`evidence_ids`).
    gamma_max : int
        Largest draft length a step may ask for (the session sizes its buffers by it).
    num_rows : int or None
        Rows (prompts) the controller keeps state for; None: any number (it keeps none).

    A step calls the hooks in this order: :meth:`start_step`, :meth:`evidence_ids`, :meth:`plan`, the draft and
    :meth:`choose_width` (steps with drafts), ``mark("draft")``, the verify and acceptance, ``mark("verify")``, the
    sync, then :meth:`observe` (adaptive controllers only). :meth:`summary` goes into the run's stats.
    """

    adaptive: bool
    num_sources: int
    gamma_max: int
    num_rows: int | None

    def evidence_ids(self, row_ids: Tensor, sources: Tensor | None) -> Tensor:
        """Host ``(B,)`` int64: where the controller keeps the acceptance of original rows ``row_ids`` drafting from
        ``sources`` (host ``(B,)`` int64 each; None: every row's first source). The hooks below take these ids
        as ``row_ids``."""

    def plan(self, row_ids: Tensor, live: Tensor, remaining: Tensor | None = None) -> StepPlan:
        """The step's plan, before any draft, for the rows' evidence ids ``row_ids`` (host ``(B,)``), ``live`` (host
        ``(B,)`` bool: the unfinished rows) and ``remaining`` (host ``(B,)``: each row's tokens to go in the batch's
        last stretch, None while queued prompts refill the batch)."""

    def start_step(self) -> None:
        """A step begins (a controller that times steps starts its clock)."""

    def mark(self, phase: str) -> None:
        """The step's ``phase`` (one of :data:`~batched_specdec.glossary.STEP_PHASES`) has ended."""

    def choose_width(self, plan: StepPlan, lengths: Tensor | None, row_ids: Tensor, live: Tensor) -> int:
        """Drafts per row to verify once the drafter has proposed: ``lengths`` (host ``(B,)``) are the rows'
        proposal lengths when the host knows them without a sync, else None."""

    def observe(self, row_ids: Tensor, proposed: Tensor, accepted: Tensor, live: Tensor, rows: int, k: int,
                width: int, *, draft_timing_usable: bool = True, timing_usable: bool = True) -> None:
        """After the step's host sync: the rows' ``proposed`` and ``accepted`` drafts and ``live`` flags before the
        step (host ``(B,)`` each), the batch's ``rows``, the planned draft length ``k`` and the verified ``width``
        (drafts per row, as padded for the verify forward). ``draft_timing_usable=False``: the draft time includes
        one-off work (a model drafter catching up after target-only steps); ``timing_usable=False``: the whole
        step's time does (a step that compiled or recorded a graph)."""

    def summary(self) -> dict | None:
        """What the run's stats report of the controller (``GenerationStats.controller``); None: nothing."""


class StaticSpeculation:
    """A fixed draft length: every step asks every row for ``gamma`` drafts and verifies ``gamma + 1`` tokens, fewer
    with ``narrow`` when a drafter that may propose less (the n-gram drafter) says so without a device read and no
    live row proposed ``gamma`` (:meth:`choose_width`). A :class:`Controller` that learns nothing, for any number of
    rows unless ``num_rows`` is given; ``narrow=False`` keeps every verify at one width (compiled or recorded
    forwards)."""

    adaptive = False
    num_sources = 1

    def __init__(self, gamma: int, num_rows: int | None = None, *, narrow: bool = True) -> None:
        self.gamma_max = gamma
        self.num_rows = num_rows
        self.narrow = narrow

    def evidence_ids(self, row_ids: Tensor, sources: Tensor | None) -> Tensor:
        return row_ids

    def plan(self, row_ids: Tensor, live: Tensor, remaining: Tensor | None = None) -> StepPlan:
        return StepPlan(self.gamma_max)

    def start_step(self) -> None:
        pass

    def mark(self, phase: str) -> None:
        pass

    def choose_width(self, plan: StepPlan, lengths: Tensor | None, row_ids: Tensor, live: Tensor) -> int:
        """``gamma``, or with known proposal lengths the longest live row's, at least 1: a verify position past
        every row's proposal can never be accepted. Never 0: a step without drafts draws a row's token from other
        Philox counters than a verify does, and a row's seeded samples must not depend on the other rows'
        proposals."""
        if lengths is None or plan.draft_len == 0 or not self.narrow:
            return plan.draft_len
        lengths = lengths[live]
        return max(1, min(plan.draft_len, int(lengths.max()) if lengths.numel() else 0))

    def observe(self, row_ids: Tensor, proposed: Tensor, accepted: Tensor, live: Tensor, rows: int, k: int,
                width: int, *, draft_timing_usable: bool = True, timing_usable: bool = True) -> None:
        pass

    def summary(self) -> dict | None:
        return None
