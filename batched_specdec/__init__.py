"""batched_specdec: lossless batched speculative decoding over ragged prompts for HuggingFace causal LMs."""

from batched_specdec.drafters import Drafter, DraftProposal, ModelDrafter
from batched_specdec.engine import GenerationStats, autoregressive_generate_batch, speculative_generate_batch
from batched_specdec.generation import GenerationResult, generate
from batched_specdec.processors import (
    GreedyProcessor,
    LogitsProcessor,
    MultinomialProcessor,
    NucleusProcessor,
    TopKNucleusProcessor,
    TopKProcessor,
    make_processor,
)

__all__ = [
    "DraftProposal",
    "Drafter",
    "GenerationResult",
    "GenerationStats",
    "GreedyProcessor",
    "LogitsProcessor",
    "ModelDrafter",
    "MultinomialProcessor",
    "NucleusProcessor",
    "TopKNucleusProcessor",
    "TopKProcessor",
    "autoregressive_generate_batch",
    "generate",
    "make_processor",
    "speculative_generate_batch",
]
