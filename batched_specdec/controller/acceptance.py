"""Per-row acceptance estimates of the adaptive controller, kept per evidence id (an original row and a source).

:class:`AcceptanceEstimates` owns the evidence (decaying counts of verified and accepted drafts) and answers the two
questions the policy (:mod:`batched_specdec.controller.policy`) asks: how well a row's drafts will do in the next
step (:meth:`~AcceptanceEstimates.acceptance`), and over the rest of its run
(:meth:`~AcceptanceEstimates.run_acceptance`).
"""

from __future__ import annotations

import torch
from torch import Tensor

ACCEPTANCE_PRIOR = 0.6
"""Prior per-position acceptance of a row with no evidence."""
PRIOR_WEIGHT = 0.5
"""The prior counts as this many verified positions: three rejections in a row bring a row's estimate under 0.1."""
ACCEPTANCE_CAP = 0.9
"""Estimates are capped here: a few accepted steps push an estimate past 0.95, and a long draft priced on it loses a
whole step at the first miss. Measured: without the cap the main job at batch 4 ran 2.7% slower (every round of 4;
``benchmarks/results/controller_rules_cpu.md``)."""
EVIDENCE_DECAY = (0.99, 0.8)
"""Per step, old evidence keeps these weights in a row's long-run and recent estimates. The long-run estimate is
the prior of the recent one: acceptance is bursty (a drafter wrong a moment ago may be right now), so a row whose
drafts were often accepted is tried again soon after a few misses, while one that is rarely accepted stays off."""
EXPLORATION = 0.5
"""How far a row's estimate is lifted back towards the prior, divided by the square root of its decaying long-run
evidence. Steps without drafts bring no evidence, so a row whose drafts missed early (a model repeating a text often
starts with words of its own, where the n-gram drafter's first proposals miss) otherwise waited for that evidence to
decay: 12 to 315 steps after 1 to 30 misses, longer than most outputs; with it 0 to 181 (tests/test_controller.py).
Measured: without it the main job at batch 4 took 94 target forwards instead of 72 and ran 8.7% slower, copy and edit
prompts at batch 1 1.5% slower (``benchmarks/results/controller_rules_cpu.md``)."""
STREAK_ACCEPTANCE = 0.97
"""Next-step per-position acceptance of a row drafting from a copy source (an n-gram match) whose last verified drafts
were all accepted. Its next proposal continues the same match, and on copy and edit prompts such a match runs on for
tens of tokens: pricing it at the row's average acceptance (at most :data:`ACCEPTANCE_CAP`) asked 3 drafts where the
match had 8 or more to give (benchmarks/results/ngram_vs_prompt_lookup_cpu.md). Measured: without it copy and edit
prompts at batch 1 took 170 target forwards instead of 158 and ran 4.9% slower (every round of 4;
``benchmarks/results/controller_rules_cpu.md``)."""


class AcceptanceEstimates:
    """Online per-position acceptance of every evidence id of a batch, and the only thing that changes it.

    An evidence id stands for an original row and one of ``num_sources`` sources it may draft from (a hybrid
    drafter's n-gram match and model), ``row * num_sources + source`` (:meth:`evidence_ids`), so compaction and
    continuous batching keep a row's evidence. ``copy_sources`` are the sources that copy an n-gram match of the
    row's own tokens: a row drafting from one whose last verified drafts were all accepted is priced at
    :data:`STREAK_ACCEPTANCE` for its next step.

    Attributes
    ----------
    successes, trials : Tensor
        ``(2, num_rows * num_sources)`` float64: decaying accepted and verified draft positions per evidence id, ``[0]``
        long-run and ``[1]`` recent (:data:`EVIDENCE_DECAY`).
    copies : Tensor
        ``(num_rows * num_sources,)`` bool: the evidence ids of a copy source.
    streak : Tensor
        ``(num_rows,)`` bool: rows whose last verified drafts were copies, all accepted.
    """

    def __init__(self, num_rows: int, num_sources: int = 1, copy_sources: tuple[int, ...] = ()) -> None:
        self.num_sources = num_sources
        self.successes = torch.zeros(2, num_rows * num_sources, dtype=torch.float64)
        self.trials = torch.zeros(2, num_rows * num_sources, dtype=torch.float64)
        self.copies = torch.zeros(num_rows * num_sources, dtype=torch.bool)
        for source in copy_sources:
            self.copies[source::num_sources] = True
        self.streak = torch.zeros(num_rows, dtype=torch.bool)

    def evidence_ids(self, row_ids: Tensor, sources: Tensor | None) -> Tensor:
        """The evidence ids of original rows ``row_ids`` drafting from ``sources`` (host ``(B,)`` int64 each;
        None: every row's first source, which is all there is with one)."""
        return row_ids * self.num_sources + (0 if sources is None else sources)

    def acceptance(self, evidence: Tensor) -> Tensor:
        """``(N,)`` float64 per-position acceptance estimates of the ``evidence`` ids for the next step: the
        recent estimate, its prior the long-run one (:meth:`_explored`); at least :data:`STREAK_ACCEPTANCE` for a copy
        source's evidence id of a row whose last verified drafts were copies, all accepted."""
        s, t = self.successes[:, evidence], self.trials[:, evidence]
        long_run = (s[0] + ACCEPTANCE_PRIOR * PRIOR_WEIGHT) / (t[0] + PRIOR_WEIGHT)
        recent = (s[1] + long_run * PRIOR_WEIGHT) / (t[1] + PRIOR_WEIGHT)
        estimate = self._explored(recent, t[0])
        streak = self.copies[evidence] & self.streak[evidence // self.num_sources]
        return torch.where(streak, estimate.clamp_min(STREAK_ACCEPTANCE), estimate)

    def run_acceptance(self, evidence: Tensor) -> Tensor:
        """``(N,)`` float64 per-position acceptance the ``evidence`` ids are predicted to keep for the rest of their
        rows' runs, for the last stretch's prediction: each id's long-run rate of accepted over verified positions
        (an id without evidence: the pooled rate of these ids), :meth:`_explored`. One id: its next-step
        estimate (:meth:`acceptance`), since one row's time to its end is its tokens to go over its throughput (the
        two aims agree), and a single row's bursts (the stretches of a copy task) are worth following.

        Shrinking each id's rate towards the pooled one (as if the pool were 4 more verified positions) made the
        main job at batch 8 1.1% slower, in each of 4 alternated rounds
        (``benchmarks/results/controller_rules_cpu.md``), so an id's rate stands on its own evidence."""
        if evidence.numel() == 1:
            return self.acceptance(evidence)
        s, t = self.successes[0, evidence], self.trials[0, evidence]
        pooled = (s.sum() + ACCEPTANCE_PRIOR * PRIOR_WEIGHT) / (t.sum() + PRIOR_WEIGHT)
        return self._explored(torch.where(t > 0, s / t.clamp_min(1e-12), pooled), t)

    @staticmethod
    def _explored(estimate: Tensor, evidence: Tensor) -> Tensor:
        """``estimate`` lifted towards the prior by :data:`EXPLORATION` over the square root of the id's decaying
        long-run ``evidence`` (verified positions): never above the prior, not at all for an id with none, and
        capped at :data:`ACCEPTANCE_CAP`. A row that stopped drafting brings no new evidence, so this is what tries
        it again later."""
        share = (EXPLORATION / torch.sqrt(evidence + PRIOR_WEIGHT)).clamp_max(1.0)
        lift = (ACCEPTANCE_PRIOR - estimate).clamp_min(0.0) * share
        return (estimate + lift * (evidence > 0)).clamp_max(ACCEPTANCE_CAP)

    def update(self, evidence: Tensor, proposed: Tensor, accepted: Tensor, live: Tensor) -> None:
        """Learn from a step: the rows' ``evidence`` ids, proposed and accepted drafts and ``live`` flags (host
        ``(B,)`` each). Old evidence decays (:data:`EVIDENCE_DECAY`); a live row that proposed adds its accepted drafts
        and its verified positions (the accepted ones and the first rejected one); a live row's streak is whether it
        drafted from a copy source and had every proposed draft accepted."""
        decay = torch.tensor(EVIDENCE_DECAY, dtype=torch.float64)[:, None]
        self.successes *= decay
        self.trials *= decay
        seen = live & (proposed > 0)
        ids = evidence[seen]
        self.successes.index_add_(1, ids, accepted[seen].double().expand(2, -1))
        self.trials.index_add_(1, ids, torch.minimum(accepted[seen] + 1, proposed[seen]).double().expand(2, -1))
        live_ids, full = evidence[live], (proposed[live] > 0) & (accepted[live] >= proposed[live])
        self.streak[live_ids // self.num_sources] = self.copies[live_ids] & full
