"""Drafters: what proposes a step's draft tokens.

* :mod:`.base`: the :class:`Drafter` base class and the :class:`DraftProposal` it returns;
* :mod:`.ngram`: model-free prompt lookup; :mod:`.model`: a small causal LM with its own ragged cache;
  :mod:`.feature`: an EAGLE-style head over the target's features; :mod:`.hybrid`: per row, an n-gram match or
  a model draft;
* :mod:`.heads`: the distilled draft architectures and their loading; :mod:`.choose`: the drafter for a caller's
  ``draft`` argument.
"""

from batched_specdec.drafting.base import Drafter, DraftProposal, draft_cost_ratio
from batched_specdec.drafting.choose import as_drafter
from batched_specdec.drafting.feature import FeatureDrafter
from batched_specdec.drafting.hybrid import HybridDrafter
from batched_specdec.drafting.model import ModelDrafter
from batched_specdec.drafting.ngram import NGramDrafter, ngram_lookup, ngram_lookup_with_match

__all__ = [
    "DraftProposal",
    "Drafter",
    "FeatureDrafter",
    "HybridDrafter",
    "ModelDrafter",
    "NGramDrafter",
    "as_drafter",
    "draft_cost_ratio",
    "ngram_lookup",
    "ngram_lookup_with_match",
]
