"""Triton kernels for batched speculative decoding, each with a pure-torch ``*_reference`` of the same signature."""

from batched_specdec.kernels.commit_tokens import commit_emitted_tokens, commit_emitted_tokens_reference
from batched_specdec.kernels.compact_rows import compact_rows, compact_rows_reference
from batched_specdec.kernels.coupled_verify import (
    GUMBEL_COUNTER_BASE,
    GUMBEL_POSITION_STRIDE,
    coupled_verify,
    coupled_verify_reference,
)
from batched_specdec.kernels.rejection_sample import (
    PLACEHOLDER_TOKEN_ID,
    draw_seed_offset,
    rejection_sample_from_logits,
    rejection_sample_from_logits_reference,
    rejection_sample_from_probs,
    rejection_sample_from_probs_reference,
)
from batched_specdec.kernels.scatter_kv import scatter_kv_at_offsets, scatter_kv_at_offsets_reference

__all__ = [
    "GUMBEL_COUNTER_BASE",
    "GUMBEL_POSITION_STRIDE",
    "PLACEHOLDER_TOKEN_ID",
    "commit_emitted_tokens",
    "commit_emitted_tokens_reference",
    "compact_rows",
    "compact_rows_reference",
    "coupled_verify",
    "coupled_verify_reference",
    "draw_seed_offset",
    "rejection_sample_from_logits",
    "rejection_sample_from_logits_reference",
    "rejection_sample_from_probs",
    "rejection_sample_from_probs_reference",
    "scatter_kv_at_offsets",
    "scatter_kv_at_offsets_reference",
]
