"""Step costs of the adaptive controller: online fits of a step's seconds, and the models shared between calls.

:class:`CostModel` predicts a step's seconds from its rows, draft forwards and verify width, from lines
(:class:`LinearFit`) fitted online to the step timings the engine already takes. :func:`shared_cost_model` keeps one
per (target, drafter, device, compile setting, batch size bucket), so later calls start from earlier measurements.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

COST_DECAY = 0.97
"""Per step, old timing observations keep this weight in the cost fits."""
RIDGE = 0.05
"""Shrinkage of the cost slopes towards 0, relative to the mean x (see :class:`LinearFit`)."""

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

    def __init__(self, draft_ratio: float | None = None) -> None:
        self.draft_ratio = draft_ratio
        self.verify = LinearFit()  # seconds against verified tokens (rows * width)
        self.draft_per_forward = LinearFit()  # seconds per draft forward against rows
        self.overhead = LinearFit()  # everything else, against rows

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
        """Seconds of a verify forward of ``rows`` rows and ``width`` positions."""
        return self.verify(rows * width)

    def step_s(self, rows: Tensor, draft_forwards: Tensor) -> Tensor:
        """``(M, W)`` float64: predicted seconds of a step with ``rows[m]`` rows (``(M,)``), ``draft_forwards[j]``
        draft forwards (``(W,)``) and verify width ``j + 1``."""
        rows = rows.to(torch.float64)[:, None]
        width = torch.arange(1, draft_forwards.shape[0] + 1, dtype=torch.float64)[None, :]
        return (self.draft_s(rows, draft_forwards.to(torch.float64)[None, :]) + self.verify_s(rows, width)
                + self.overhead(rows))

    def add_step(self, rows: int, k: int, width: int, draft_s: float, verify_s: float, total_s: float, *,
                 fit: bool = True, fit_draft: bool = True) -> None:
        """Learn from a measured step of ``rows`` rows, ``k`` draft forwards and ``width`` verified drafts per row
        that took ``draft_s`` (its plan and draft phases), ``verify_s`` (its verify and accept phases) and
        ``total_s`` seconds. ``fit=False`` keeps its times out of the lines (frozen costs, or a step that did
        one-off work), ``fit_draft=False`` its draft time alone."""
        if fit:
            if k and fit_draft:
                self.draft_per_forward.add(rows, draft_s / k)
            self.verify.add(rows * (width + 1), verify_s)
            self.overhead.add(rows, max(total_s - draft_s - verify_s, 0.0))


_SHARED_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_cost_model(target_model, drafter, device: torch.device, draft_ratio: float | None = None, *,
                      compiled: bool = False, rows: int = 1) -> CostModel:
    """The cost model every ``gamma="auto"`` call with this target, drafter, device, ``compile`` setting and batch
    size bucket reads and updates.

    Step costs belong to the (target, drafter, device, compiled, batch size) tuple, not to one call: a program that
    decodes batch after batch (the CLI, an evaluation loop, :func:`~batched_specdec.generate`) measures them once
    and later calls start from those measurements instead of from the prior (no first exploratory step). Batch
    sizes share a model only within a power-of-two bucket of ``rows``: a line fitted on the costs of 16-row steps
    says little about 1-row steps (on a CPU a 1-token verify of the embedded target takes 37 ms and a 4-token one
    58 ms), so a batch-1 run after batch-16 runs starts from its own measurements. Entries go away with the target
    model. :func:`forget_cost_models` starts from the prior again.
    """
    draft = drafter.model
    bucket = 1 << max(rows - 1, 0).bit_length()
    key = (type(drafter).__name__, id(draft) if draft is not None else None, str(device), compiled, bucket)
    models = _SHARED_COSTS.setdefault(target_model, {})
    if key not in models:
        models[key] = CostModel(draft_ratio)
    return models[key]


def forget_cost_models() -> None:
    """Drop every shared cost model, so the next ``gamma="auto"`` calls start from the prior."""
    _SHARED_COSTS.clear()
