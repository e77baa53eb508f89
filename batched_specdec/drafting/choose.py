"""The drafter for whatever a caller passes as the draft: a drafter instance, a draft model, a feature draft."""

from __future__ import annotations

from batched_specdec.checks import OptionError
from batched_specdec.drafting.base import Drafter
from batched_specdec.drafting.feature import FeatureDrafter
from batched_specdec.drafting.model import ModelDrafter
from batched_specdec.ragged_cache import PREFILL_CHUNK


def as_drafter(draft_model, target_vocab: int, attention: str = "auto", prefill_chunk: int = PREFILL_CHUNK,
               compile: bool = False) -> Drafter:
    """A drafter for ``draft_model``: a :class:`Drafter` as it is, a feature draft (``kind == "feature"``) as a
    :class:`FeatureDrafter`, any other HF causal LM as a :class:`ModelDrafter` with the session's ``attention``
    backend, ``prefill_chunk`` and ``compile``. Its vocabulary must be a prefix of the target's
    (``V_draft <= V_target``).

    Raises
    ------
    OptionError
        Something that is neither a drafter nor a causal LM; a draft vocabulary larger than the target's;
        ``compile=True`` with a feature draft (its forwards return hidden states, which compiled forwards do not).
    """
    if isinstance(draft_model, Drafter):
        drafter = draft_model
    elif getattr(draft_model, "kind", None) == "feature":
        if compile:
            raise OptionError("compile=True does not support feature drafts (kind 'feature') yet: their forwards "
                              "return the decoder's hidden states, which compiled forwards do not; use compile=False")
        drafter = FeatureDrafter(draft_model, attention, prefill_chunk)
    elif hasattr(draft_model, "config") and hasattr(draft_model, "get_input_embeddings"):
        drafter = ModelDrafter(draft_model, attention, prefill_chunk, compile)
    else:
        raise OptionError(f"draft_model must be an HF causal LM or a batched_specdec.Drafter (subclass it and define "
                          f"propose), got {type(draft_model).__name__}")
    if drafter.vocab_size is not None and drafter.vocab_size > target_vocab:
        raise OptionError(
            f"draft vocabulary size {drafter.vocab_size} is larger than the target's {target_vocab}; the draft's "
            "vocabulary must be the target's or a prefix of it (ids the draft lacks get draft probability 0)"
        )
    return drafter
