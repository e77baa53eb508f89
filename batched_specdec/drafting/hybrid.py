"""The hybrid drafter: every row, every step, drafts from whichever source its own evidence favours.

Two sources: an n-gram match in the row's own committed tokens (:mod:`batched_specdec.drafting.ngram`: free, and right
for long stretches on copy and edit tasks) and a model draft (a
:class:`~batched_specdec.drafting.feature.FeatureDrafter` over the target's features, or a
:class:`~batched_specdec.drafting.model.ModelDrafter`: useful on free text, where there
is little to copy). All rows are verified in the one verify forward, whatever their source.

Per row the drafter keeps the acceptance it has measured for each source (an exponential average of accepted / verified
drafts over the steps the row drafted from it, as the session reports them), starting from a prior. A row drafts from
its n-gram match when the match is at least ``min_match`` tokens long and the n-gram estimate, raised by ``match_bonus``
per matched token beyond ``min_match`` (longer matches are accepted more), is at least the model's; else from the model.
The choice depends only on committed tokens and on that evidence, never on this step's sampled drafts, so verification
stays exact: greedy output is the target's, and under sampling the n-gram rows are verified with a one-hot q
(``DraftProposal.deterministic_rows``), the model rows with the model's q; under the ``"coupled"`` scheme every row's
drafts are kept iff they equal the target's keyed samples, whatever their source, and the model's drafts are its own
Gumbel-max samples with the target's noise (no q).
When every row drafts from its match and the host knows it without a device read (on CPU), the model's chain does
not run that step (it catches up on the next step it runs). On CPU the drafter names each row's source before the
step is planned (:meth:`HybridDrafter.next_sources`), so ``gamma="auto"`` plans from the acceptance of that source.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batched_specdec.checks import OptionError, check_positive_int
from batched_specdec.drafting.base import Drafter, DraftProposal
from batched_specdec.drafting.ngram import NGramDrafter, ngram_lookup_with_match

NGRAM_PRIOR = 0.5
"""Acceptance assumed for a row's n-gram source before the row has drafted from it."""
MODEL_PRIOR = 0.4
"""Acceptance assumed for a row's model source before the row has drafted from it."""
EVIDENCE_WEIGHT = 0.3
"""Weight of the latest step in a row's acceptance estimate of the source it drafted from."""
SOURCES = ("model", "ngram")
"""The sources of a hybrid proposal, by the index ``DraftProposal.source`` holds."""


class HybridDrafter(Drafter):
    """Per-row choice between an n-gram match and a model draft (see the module docstring).

    Parameters
    ----------
    model_drafter : FeatureDrafter or ModelDrafter
        The model source. It proposes for every row each step (one batched forward chain); rows that take their
        n-gram match ignore its tokens.
    ngram : NGramDrafter, optional
        The n-gram source's sizes (default ``NGramDrafter()``: n = 3 down to 1).
    min_match : int
        Shortest n-gram match a row drafts from (default 2: one-token matches are too often wrong).
    match_bonus : float
        Added to a row's n-gram estimate per matched token beyond ``min_match``.
    """

    sources = SOURCES

    def __init__(self, model_drafter, ngram: NGramDrafter | None = None, min_match: int = 2,
                 match_bonus: float = 0.1) -> None:
        check_positive_int("min_match", min_match)
        self.model_drafter = model_drafter
        self.ngram = ngram or NGramDrafter()
        if min_match > self.ngram.max_ngram:
            raise OptionError(f"min_match {min_match} is longer than the n-gram source's max_ngram "
                             f"{self.ngram.max_ngram}: no match could qualify")
        self.min_match = min_match
        self.match_bonus = float(match_bonus)
        self.vocab_size = model_drafter.vocab_size
        self.uses_target_features = model_drafter.uses_target_features
        self.feature_layers = model_drafter.feature_layers
        self.model = model_drafter.model  # the draft forwards drafting costs
        self._evidence: dict[str, Tensor] = {}
        # next_sources' choice for this step: (tokens, num, use_ngram) for gamma_max, and the seq_lens it was for
        self._choice: tuple[Tensor, ...] | None = None

    def start(self, token_buffer: Tensor, seq_lens: Tensor, max_seq_len: int) -> None:
        self.model_drafter.start(token_buffer, seq_lens, max_seq_len)
        self._choice = None
        batch, device = seq_lens.shape[0], seq_lens.device
        self._evidence = {
            "ngram": torch.full((batch,), NGRAM_PRIOR, device=device),
            "model": torch.full((batch,), MODEL_PRIOR, device=device),
            "used_ngram": torch.zeros(batch, dtype=torch.bool, device=device),
        }

    def use_graphs(self, enabled: bool) -> None:
        self.model_drafter.use_graphs(enabled)

    def observe_features(self, hidden: Tensor, first_position, rows: int | Tensor | None = None) -> None:
        self.model_drafter.observe_features(hidden, first_position, rows)

    def admit_rows(self, token_buffer: Tensor, rows: Tensor, prompt_lens: list[int]) -> None:
        self.model_drafter.admit_rows(token_buffer, rows, prompt_lens)
        self._choice = None
        ev, index = self._evidence, rows.to(self._evidence["ngram"].device)
        ev["ngram"].index_fill_(0, index, NGRAM_PRIOR)
        ev["model"].index_fill_(0, index, MODEL_PRIOR)

    def note_target_only_step(self, width: int = 1) -> None:
        self.model_drafter.note_target_only_step(width)

    def _choose(self, token_buffer, seq_lens, gamma: int, max_seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's n-gram proposal of up to ``gamma`` tokens ``(B, gamma)``, its length ``(B,)``, and whether the
        row drafts from it this step ``(B,)`` bool (from its match and the sources' evidence)."""
        scan = token_buffer[:, : max(1, min(int(max_seq_len), token_buffer.shape[1]))]
        ng_tokens, ng_num, match = ngram_lookup_with_match(scan, seq_lens, gamma, self.ngram.max_ngram,
                                                           self.ngram.min_ngram)  # fmt: skip
        ev = self._evidence
        ngram_score = ev["ngram"] + self.match_bonus * (match - self.min_match).clamp_min(0)
        return ng_tokens, ng_num, (ng_num > 0) & (match >= self.min_match) & (ngram_score >= ev["model"])

    def next_sources(self, token_buffer, seq_lens, max_seq_len, gamma_max):
        """Each row's source this step, host ``(B,)`` (on CPU; None elsewhere, where it would take a device read).
        The choice (a lookup of ``gamma_max`` tokens) is kept for :meth:`propose`, which cuts it to its ``gamma``:
        a match's proposal does not depend on how many tokens are asked for."""
        if token_buffer.device.type != "cpu":
            return None
        self._choice = (*self._choose(token_buffer, seq_lens, gamma_max, max_seq_len), seq_lens.clone())
        return self._choice[2].to(torch.int64)  # index into SOURCES

    def propose(self, token_buffer, seq_lens, gamma, logits_processor, max_seq_len, draws=None) -> DraftProposal:
        choice, self._choice = self._choice, None
        if choice is None or choice[0].shape[1] < gamma or not torch.equal(choice[3], seq_lens):
            choice = self._choose(token_buffer, seq_lens, gamma, max_seq_len)
        ng_tokens, ng_num, use_ngram = choice[0][:, :gamma], choice[1].clamp_max(gamma), choice[2]
        ev = self._evidence
        ev["used_ngram"] = use_ngram
        source = use_ngram.to(torch.int64)  # index into SOURCES
        if use_ngram.device.type == "cpu" and bool(use_ngram.all()):
            # Every row drafts from its match, and the host knows it without a device read: skip the model chain.
            self.model_drafter.note_target_only_step(gamma + 1)
            return DraftProposal(tokens=ng_tokens, num_tokens=ng_num, source=source)
        model = self.model_drafter.propose(token_buffer, seq_lens, gamma, logits_processor, max_seq_len, draws)
        device = model.tokens.device
        use = use_ngram.to(device)
        tokens = torch.where(use[:, None], ng_tokens.to(device), model.tokens)
        model_num = model.num_tokens if model.num_tokens is not None else torch.full_like(ng_num, gamma)
        num = torch.where(use_ngram, ng_num, model_num.to(ng_num.device))
        return DraftProposal(tokens=tokens, probs=model.probs, num_tokens=num,
                             deterministic_rows=use if model.probs is not None else None,
                             includes_catch_up=model.includes_catch_up, source=source.to(device))

    def observe_verified(self, proposed: Tensor, accepted: Tensor) -> None:
        """Fold the step's acceptance (``accepted / proposed`` per row that verified drafts) into the estimate of
        the source each row drafted from."""
        ev = self._evidence
        drafted = proposed.to(ev["ngram"].device) > 0
        rate = accepted.to(drafted.device).float() / proposed.to(drafted.device).clamp_min(1).float()
        for source, rows in (("ngram", drafted & ev["used_ngram"]), ("model", drafted & ~ev["used_ngram"])):
            updated = (1 - EVIDENCE_WEIGHT) * ev[source] + EVIDENCE_WEIGHT * rate
            ev[source] = torch.where(rows, updated, ev[source])

    def keep_rows(self, rows: Tensor) -> None:
        self.model_drafter.keep_rows(rows)
        self._choice = None
        self._evidence = {k: v.index_select(0, rows.to(v.device)) for k, v in self._evidence.items()}
