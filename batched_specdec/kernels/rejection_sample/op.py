"""The Triton path as one torch custom op (``torch.ops.batched_specdec.rejection_sample``), so compiled graphs and
CUDA graphs call it as a single node; it picks the fused kernel or the vocabulary-split path
(``kernels._launch.rejection_sample_config``)."""

import torch

from batched_specdec.kernels._launch import rejection_sample_config
from batched_specdec.kernels.rejection_sample.fused import launch_fused
from batched_specdec.kernels.rejection_sample.split import launch_split


@torch.library.custom_op("batched_specdec::rejection_sample", mutates_args=())
def rejection_sample_op(draft_tokens: torch.Tensor, draft: torch.Tensor | None, target: torch.Tensor,
                        num_draft: torch.Tensor, temperature: torch.Tensor | None, seeds: torch.Tensor,
                        offsets: torch.Tensor, deterministic_rows: torch.Tensor,
                        is_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling of checked inputs on the Triton kernels: ``draft_tokens`` ``(B, K)``, ``draft``
    ``(B, K, V)`` probs or logits or None, ``target`` ``(B, K + 1, V)``, ``num_draft`` ``(B,)``, ``temperature``
    ``(B,)`` (logits only, else None), ``seeds``/``offsets`` ``(B,)`` int64 (each row's Philox key and first
    counter), ``deterministic_rows`` ``(B,)`` bool. Returns ``(output_tokens (B, K + 1), num_accepted (B,))``."""
    B, K = draft_tokens.shape
    V = target.shape[2]
    device = draft_tokens.device
    out = torch.empty((B, K + 1), dtype=torch.int64, device=device)
    num_acc = torch.empty((B,), dtype=torch.int64, device=device)
    cfg = rejection_sample_config(B, V, device)
    q = draft if draft is not None else target  # placeholder pointer, never read when HAS_DRAFT is False
    q_strides = draft.stride() if draft is not None else (0, 0, 0)
    t = temperature if temperature is not None else num_draft  # placeholder, never read for probs
    launch = launch_split if cfg["NUM_SPLITS"] > 1 else launch_fused
    launch(draft_tokens, q, q_strides, target, num_draft, t, seeds, offsets, deterministic_rows, is_logits,
           draft is not None, out, num_acc, cfg)
    return out, num_acc


@rejection_sample_op.register_fake
def _(draft_tokens, draft, target, num_draft, temperature, seeds, offsets, deterministic_rows, is_logits):
    B, K = draft_tokens.shape
    return draft_tokens.new_empty((B, K + 1)), draft_tokens.new_empty((B,))
