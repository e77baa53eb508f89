"""The controller a call decodes with, from its ``gamma`` option."""

from __future__ import annotations

import torch

from batched_specdec.checks import GAMMA_MAX_DEFAULT, OptionError, check_gamma, check_gamma_max
from batched_specdec.controller.costs import CostModel
from batched_specdec.controller.plan import Controller, StaticSpeculation
from batched_specdec.controller.policy import COMPACT_FRACTION_DEFAULT, COPY_GAMMA_MAX_DEFAULT, AdaptiveSpeculation


def check_gamma_option(gamma, gamma_max) -> tuple:
    """``(gamma, gamma_max)`` checked: ``gamma`` an int >= 0 or ``"auto"`` (:func:`~batched_specdec.checks.check_gamma`)
    with ``gamma_max`` as :func:`~batched_specdec.checks.check_gamma_max` allows, or a controller instance and no
    ``gamma_max``. Raises :class:`~batched_specdec.checks.OptionError` naming the bad value."""
    if isinstance(gamma, (AdaptiveSpeculation, StaticSpeculation)):
        if gamma_max is not None:
            raise OptionError(f"gamma_max={gamma_max!r} cannot be combined with a controller instance as gamma")
        return gamma, None
    gamma = check_gamma(gamma)
    return gamma, check_gamma_max(gamma_max, gamma)


def make_controller(gamma, gamma_max, num_rows: int, device: torch.device, draft_ratio: float | None = None, *,
                    cost_model: CostModel | None = None, num_sources: int = 1, copy_sources: tuple[int, ...] = (),
                    compact_fraction: float = COMPACT_FRACTION_DEFAULT, fixed_width: bool = False) -> Controller:
    """The controller for ``gamma``: an int (static), ``"auto"`` (adaptive, ``gamma_max`` default
    :data:`~batched_specdec.checks.GAMMA_MAX_DEFAULT`, or :data:`COPY_GAMMA_MAX_DEFAULT` for a model-free drafter
    (``draft_ratio`` None), starting from ``cost_model`` or else a new one with draft costs priced by ``draft_ratio``
    until measured, see :class:`CostModel`; acceptance kept per row and each of ``num_sources`` sources; the last
    stretch predicted for a batch that compacts at ``compact_fraction``), or a controller instance built by the caller
    for ``num_rows`` rows (tests, benchmarks of the policy). ``fixed_width``: an int ``gamma`` verifies ``gamma``
    drafts every step (compiled or recorded forwards), else no more than the longest proposal
    (:class:`StaticSpeculation`).

    The copy sources of the adaptive controller (:data:`~batched_specdec.controller.acceptance.STREAK_ACCEPTANCE`):
    every source of a model-free drafter (the n-gram drafter's match lengths), else ``copy_sources``
    (:attr:`~batched_specdec.drafting.Drafter.copy_sources`: the hybrid drafter's ``"ngram"`` source)."""
    gamma, gamma_max = check_gamma_option(gamma, gamma_max)
    if isinstance(gamma, (AdaptiveSpeculation, StaticSpeculation)):
        if gamma.num_rows is not None and gamma.num_rows != num_rows:
            raise OptionError(f"the controller passed as gamma was built for {gamma.num_rows} rows, but there are "
                              f"{num_rows} prompts")
        return gamma
    if gamma == "auto":
        model_free = draft_ratio is None
        if gamma_max is None:
            gamma_max = COPY_GAMMA_MAX_DEFAULT if model_free else GAMMA_MAX_DEFAULT
        copies = tuple(range(num_sources)) if model_free else tuple(copy_sources)
        return AdaptiveSpeculation(gamma_max, num_rows, device, cost_model=cost_model or CostModel(draft_ratio),
                                   num_sources=num_sources, copy_sources=copies, compact_fraction=compact_fraction)
    return StaticSpeculation(gamma, narrow=not fixed_width)
