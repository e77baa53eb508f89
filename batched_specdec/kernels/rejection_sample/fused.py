"""The fused rejection-sampling kernel: one launch, each program verifies ``BLOCK_B`` rows end to end."""

import triton
import triton.language as tl

from batched_specdec.kernels.rejection_sample.common import (
    _onehot_rows,
    _race,
    _row_setup,
    _row_streams,
    _verify_positions,
    _write_output,
)


@triton.jit
def _rejection_sample_kernel(
    # pointers
    draft_tokens_ptr,  # [B, K] int64
    draft_ptr,  # [B, K, V] draft probs or logits (not read when HAS_DRAFT is False)
    target_ptr,  # [B, K + 1, V] target probs or logits
    num_draft_ptr,  # [B] int64
    temperature_ptr,  # [B] fp32 (not read when IS_LOGITS is False)
    seed_ptr,  # [B] int64: each row's Philox key
    offset_ptr,  # [B] int64: each row's first Philox counter
    onehot_ptr,  # [B] bool: rows whose q is one-hot at the draft token (not read when HAS_DRAFT is False)
    out_tokens_ptr,  # [B, K + 1] int64
    num_accepted_ptr,  # [B] int64
    # strides
    stride_db,
    stride_dk,
    stride_qb,
    stride_qk,
    stride_qv,
    stride_pb,
    stride_pk,
    stride_pv,
    stride_ob,
    stride_ok,
    # sizes
    B,
    K,
    V,
    # meta-parameters
    IS_LOGITS: tl.constexpr,
    HAS_DRAFT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K1: tl.constexpr,
):
    """One program verifies BLOCK_B rows end to end; a row's later positions are never read once it rejected."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < B
    n, greedy, inv_t = _row_setup(rows, row_mask, num_draft_ptr, temperature_ptr, IS_LOGITS, BLOCK_B)
    seed, counter_row, p_rows, q_rows = _row_streams(rows, row_mask, seed_ptr, offset_ptr, target_ptr, draft_ptr,
                                                     stride_pb, stride_qb)
    onehot = _onehot_rows(onehot_ptr, rows, row_mask, HAS_DRAFT)

    num_acc, m_p_stop, s_p_stop, a_p_stop, m_q_stop, s_q_stop = _verify_positions(
        rows, row_mask, n, greedy, inv_t, onehot, draft_tokens_ptr, p_rows, q_rows,
        stride_db, stride_dk, stride_pk, stride_pv, stride_qk, stride_qv, seed, counter_row, K, V,
        seed_ptr, seed_ptr, 1,  # no partial statistics
        IS_LOGITS, HAS_DRAFT, False, BLOCK_B, BLOCK_V, 1,
    )  # fmt: skip

    # Recovered (stop < n) or bonus (stop == n) token at the stop position.
    stop = num_acc
    has_q = row_mask & (stop != n)
    d_stop = tl.load(draft_tokens_ptr + rows * stride_db + stop * stride_dk, mask=has_q, other=-1)
    best_r, tok_r, _, tok_p = _race(
        p_rows + stop * stride_pk, q_rows + stop * stride_qk, stride_pv, stride_qv, inv_t,
        m_p_stop, s_p_stop, m_q_stop, s_q_stop, d_stop, has_q, onehot, row_mask & (greedy == 0),
        seed, counter_row + stop * (V + 1), 0, V, IS_LOGITS, HAS_DRAFT, BLOCK_B, BLOCK_V,
    )  # fmt: skip
    token = tl.where(greedy, a_p_stop, tl.where(best_r >= 0.0, tok_r, tok_p))
    _write_output(
        draft_tokens_ptr, out_tokens_ptr, num_accepted_ptr, rows, row_mask, stop, token,
        stride_db, stride_dk, stride_ob, stride_ok, K, BLOCK_K1,
    )  # fmt: skip


def launch_fused(draft_tokens, q, q_strides, target, num_draft, t, seeds, offsets, onehot, is_logits, has_draft, out,
                 num_acc, cfg) -> None:
    """Launch :func:`_rejection_sample_kernel` on checked inputs; fills ``out`` ``(B, K + 1)`` and ``num_acc``
    ``(B,)``. ``q``/``t`` are placeholder pointers when ``has_draft``/``is_logits`` is False."""
    B, K = draft_tokens.shape
    V = target.shape[2]
    grid = (triton.cdiv(B, cfg["BLOCK_B"]),)
    _rejection_sample_kernel[grid](
        draft_tokens, q, target, num_draft, t, seeds, offsets, onehot, out, num_acc,
        draft_tokens.stride(0), draft_tokens.stride(1),
        *q_strides,
        *target.stride(),
        out.stride(0), out.stride(1),
        B, K, V,
        IS_LOGITS=is_logits,
        HAS_DRAFT=has_draft,
        BLOCK_B=cfg["BLOCK_B"],
        BLOCK_V=cfg["BLOCK_V"],
        BLOCK_K1=triton.next_power_of_2(K + 1),
        num_warps=cfg["num_warps"],
    )  # fmt: skip
