"""batched_specdec: lossless batched speculative decoding over ragged prompts for Hugging Face causal LMs.

The public names below load on first use, so ``python -m batched_specdec.main --help`` answers without importing
torch and transformers. The words the package uses are defined once, in :mod:`batched_specdec.glossary`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "OptionError": "batched_specdec.checks",
    "SAMPLING_SCHEMES": "batched_specdec.processors",
    "GenerationStats": "batched_specdec.decode.stats",
    "Drafter": "batched_specdec.drafting",
    "DraftProposal": "batched_specdec.drafting",
    "HybridDrafter": "batched_specdec.drafting",
    "ModelDrafter": "batched_specdec.drafting",
    "NGramDrafter": "batched_specdec.drafting",
    "autoregressive_generate_batch": "batched_specdec.engine",
    "speculative_generate_batch": "batched_specdec.engine",
    "GenerationResult": "batched_specdec.generation",
    "generate": "batched_specdec.generation",
    "GreedyProcessor": "batched_specdec.processors",
    "LogitsProcessor": "batched_specdec.processors",
    "MultinomialProcessor": "batched_specdec.processors",
    "NucleusProcessor": "batched_specdec.processors",
    "TopKNucleusProcessor": "batched_specdec.processors",
    "TopKProcessor": "batched_specdec.processors",
    "make_processor": "batched_specdec.processors",
}

__all__ = [
    "SAMPLING_SCHEMES",
    "DraftProposal",
    "Drafter",
    "GenerationResult",
    "GenerationStats",
    "GreedyProcessor",
    "HybridDrafter",
    "LogitsProcessor",
    "ModelDrafter",
    "MultinomialProcessor",
    "NGramDrafter",
    "NucleusProcessor",
    "OptionError",
    "TopKNucleusProcessor",
    "TopKProcessor",
    "autoregressive_generate_batch",
    "generate",
    "make_processor",
    "speculative_generate_batch",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batched_specdec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from batched_specdec.checks import OptionError
    from batched_specdec.decode.stats import GenerationStats
    from batched_specdec.drafting import Drafter, DraftProposal, HybridDrafter, ModelDrafter, NGramDrafter
    from batched_specdec.engine import autoregressive_generate_batch, speculative_generate_batch
    from batched_specdec.generation import GenerationResult, generate
    from batched_specdec.processors import (
        SAMPLING_SCHEMES,
        GreedyProcessor,
        LogitsProcessor,
        MultinomialProcessor,
        NucleusProcessor,
        TopKNucleusProcessor,
        TopKProcessor,
        make_processor,
    )
