"""The vocabulary-split path for small batches: the vocabulary of every row is cut into NUM_SPLITS chunks, one program
each, so that a handful of rows still spreads over the whole GPU. Three launches:
  1. (logits only) per-chunk softmax statistics of every position a row can reach (j <= n);
  2. per (row, chunk): merge the statistics, make the accept decisions (every chunk program makes the same
     ones), then run the exponential race over its chunk of the stop position;
  3. per row: merge the chunk winners and write the outputs.
Same Philox counters as the fused kernel, so both paths make the same decisions from the same seed/offset.
Unlike the fused kernel it reads every reachable position's logits, also past a rejection.
"""

import torch
import triton
import triton.language as tl

from batched_specdec.kernels.rejection_sample.common import (
    _onehot_rows,
    _race,
    _row_setup,
    _row_streams,
    _softmax_stats,
    _verify_positions,
    _write_output,
)


@triton.jit
def _split_stats_kernel(
    draft_ptr, target_ptr, num_draft_ptr, temperature_ptr,
    p_stats_ptr,  # [B, K + 1, NUM_SPLITS, 3] fp32: max, sum of exp, argmax (as float, exact below 2**24)
    q_stats_ptr,  # [B, K, NUM_SPLITS, 2] fp32: max, sum of exp
    stride_qb, stride_qk, stride_qv, stride_pb, stride_pk, stride_pv,
    K, V, CHUNK, NUM_SPLITS,
    HAS_DRAFT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    b = pid // (K + 1)
    j = pid % (K + 1)
    rows = b + tl.arange(0, 1).to(tl.int64)
    n, greedy, inv_t = _row_setup(rows, rows >= 0, num_draft_ptr, temperature_ptr, True, 1)
    reach = j <= n  # positions past n are never a stop position
    v_start = split * CHUNK
    v_end = tl.minimum(v_start + CHUNK, V)
    m, s, a = _softmax_stats(target_ptr + rows * stride_pb + j * stride_pk, stride_pv, inv_t, reach,
                             v_start, v_end, 1, BLOCK_V)
    base = ((b * (K + 1) + j) * NUM_SPLITS + split) * 3
    tl.store(p_stats_ptr + base + tl.arange(0, 1), m)
    tl.store(p_stats_ptr + base + 1 + tl.arange(0, 1), s)
    tl.store(p_stats_ptr + base + 2 + tl.arange(0, 1), a.to(tl.float32))
    if HAS_DRAFT:  # noqa: SIM102  (compile-time branch around a runtime one)
        if j < K:
            mq, sq, _ = _softmax_stats(draft_ptr + rows * stride_qb + j * stride_qk, stride_qv, inv_t,
                                       (j < n) & (greedy == 0), v_start, v_end, 1, BLOCK_V)
            qbase = ((b * K + j) * NUM_SPLITS + split) * 2
            tl.store(q_stats_ptr + qbase + tl.arange(0, 1), mq)
            tl.store(q_stats_ptr + qbase + 1 + tl.arange(0, 1), sq)


@triton.jit
def _split_race_kernel(
    draft_tokens_ptr, draft_ptr, target_ptr, num_draft_ptr, temperature_ptr,
    seed_ptr,  # [B] int64: each row's Philox key
    offset_ptr,  # [B] int64: each row's first Philox counter
    onehot_ptr,  # [B] bool
    p_stats_ptr, q_stats_ptr,
    race_ptr,  # [B, NUM_SPLITS, 2] fp32: best_r, best_p of the chunk
    race_tok_ptr,  # [B, NUM_SPLITS, 2] int64: tok_r, tok_p of the chunk
    stop_ptr,  # [B] int64: num accepted
    greedy_tok_ptr,  # [B] int64: argmax of the target at the stop position (logits only)
    stride_db, stride_dk, stride_qb, stride_qk, stride_qv, stride_pb, stride_pk, stride_pv,
    K, V, CHUNK, NUM_SPLITS,
    IS_LOGITS: tl.constexpr,
    HAS_DRAFT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = b + tl.arange(0, 1).to(tl.int64)
    row_mask = rows >= 0
    n, greedy, inv_t = _row_setup(rows, row_mask, num_draft_ptr, temperature_ptr, IS_LOGITS, 1)
    seed, counter_row, p_rows, q_rows = _row_streams(rows, row_mask, seed_ptr, offset_ptr, target_ptr, draft_ptr,
                                                     stride_pb, stride_qb)
    onehot = _onehot_rows(onehot_ptr, rows, row_mask, HAS_DRAFT)

    num_acc, m_p_stop, s_p_stop, a_p_stop, m_q_stop, s_q_stop = _verify_positions(
        rows, row_mask, n, greedy, inv_t, onehot, draft_tokens_ptr, p_rows, q_rows,
        stride_db, stride_dk, stride_pk, stride_pv, stride_qk, stride_qv, seed, counter_row, K, V,
        p_stats_ptr, q_stats_ptr, NUM_SPLITS,
        IS_LOGITS, HAS_DRAFT, True, 1, BLOCK_V, BLOCK_S,
    )  # fmt: skip
    stop = num_acc
    has_q = row_mask & (stop != n)
    d_stop = tl.load(draft_tokens_ptr + rows * stride_db + stop * stride_dk, mask=has_q, other=-1)
    v_start = split * CHUNK
    best_r, tok_r, best_p, tok_p = _race(
        p_rows + stop * stride_pk, q_rows + stop * stride_qk, stride_pv, stride_qv, inv_t,
        m_p_stop, s_p_stop, m_q_stop, s_q_stop, d_stop, has_q, onehot, row_mask & (greedy == 0),
        seed, counter_row + stop * (V + 1), v_start, tl.minimum(v_start + CHUNK, V),
        IS_LOGITS, HAS_DRAFT, 1, BLOCK_V,
    )  # fmt: skip
    base = (b * NUM_SPLITS + split) * 2 + tl.arange(0, 1)
    tl.store(race_ptr + base, best_r)
    tl.store(race_ptr + base + 1, best_p)
    tl.store(race_tok_ptr + base, tok_r)
    tl.store(race_tok_ptr + base + 1, tok_p)
    if split == 0:
        tl.store(stop_ptr + rows, stop)
        tl.store(greedy_tok_ptr + rows, tl.where(greedy, a_p_stop, -1))


@triton.jit
def _split_finish_kernel(
    draft_tokens_ptr, race_ptr, race_tok_ptr, stop_ptr, greedy_tok_ptr, out_tokens_ptr, num_accepted_ptr,
    stride_db, stride_dk, stride_ob, stride_ok,
    B, K, NUM_SPLITS,
    BLOCK_B: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K1: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < B
    sidx = tl.arange(0, BLOCK_S).to(tl.int64)
    mask = row_mask[:, None] & (sidx < NUM_SPLITS)[None, :]
    base = (rows[:, None] * NUM_SPLITS + sidx[None, :]) * 2
    best_r_i = tl.load(race_ptr + base, mask=mask, other=-3.0)
    best_p_i = tl.load(race_ptr + base + 1, mask=mask, other=-3.0)
    tok_r_i = tl.load(race_tok_ptr + base, mask=mask, other=0)
    tok_p_i = tl.load(race_tok_ptr + base + 1, mask=mask, other=0)
    # the winner is the lowest column attaining the best score (chunks are in column order)
    best_r = tl.max(best_r_i, axis=1)
    tok_r = tl.min(tl.where(best_r_i == best_r[:, None], tok_r_i, 9223372036854775807), axis=1)
    best_p = tl.max(best_p_i, axis=1)
    tok_p = tl.min(tl.where(best_p_i == best_p[:, None], tok_p_i, 9223372036854775807), axis=1)
    stop = tl.load(stop_ptr + rows, mask=row_mask, other=0)
    greedy_tok = tl.load(greedy_tok_ptr + rows, mask=row_mask, other=-1)
    token = tl.where(greedy_tok >= 0, greedy_tok, tl.where(best_r >= 0.0, tok_r, tok_p))
    _write_output(
        draft_tokens_ptr, out_tokens_ptr, num_accepted_ptr, rows, row_mask, stop, token,
        stride_db, stride_dk, stride_ob, stride_ok, K, BLOCK_K1,
    )  # fmt: skip


def launch_split(draft_tokens, q, q_strides, target, num_draft, t, seeds, offsets, onehot, is_logits, has_draft, out,
                 num_acc, cfg) -> None:
    """The three launches of the vocabulary-split path on checked inputs; fills ``out`` and ``num_acc``."""
    B, K = draft_tokens.shape
    V = target.shape[2]
    device = draft_tokens.device
    block_v = cfg["BLOCK_V"]
    chunk = triton.cdiv(triton.cdiv(V, cfg["NUM_SPLITS"]), block_v) * block_v
    splits = triton.cdiv(V, chunk)  # every chunk holds at least one column
    block_s = triton.next_power_of_2(splits)
    p_stats = torch.empty((B, K + 1, splits, 3), dtype=torch.float32, device=device)
    q_stats = torch.empty((B, K, splits, 2) if has_draft else (1,), dtype=torch.float32, device=device)
    if is_logits:
        _split_stats_kernel[(B * (K + 1), splits)](
            q, target, num_draft, t, p_stats, q_stats,
            *q_strides, *target.stride(),
            K, V, chunk, splits,
            HAS_DRAFT=has_draft, BLOCK_V=block_v, num_warps=cfg["num_warps"],
        )  # fmt: skip
    race = torch.empty((B, splits, 2), dtype=torch.float32, device=device)
    race_tok = torch.empty((B, splits, 2), dtype=torch.int64, device=device)
    greedy_tok = torch.empty((B,), dtype=torch.int64, device=device)
    _split_race_kernel[(B, splits)](
        draft_tokens, q, target, num_draft, t, seeds, offsets, onehot, p_stats, q_stats,
        race, race_tok, num_acc, greedy_tok,
        draft_tokens.stride(0), draft_tokens.stride(1), *q_strides, *target.stride(),
        K, V, chunk, splits,
        IS_LOGITS=is_logits, HAS_DRAFT=has_draft, BLOCK_V=block_v, BLOCK_S=block_s, num_warps=cfg["num_warps"],
    )  # fmt: skip
    block_b = max(1, min(triton.next_power_of_2(B), 4096 // block_s))
    _split_finish_kernel[(triton.cdiv(B, block_b),)](
        draft_tokens, race, race_tok, num_acc, greedy_tok, out, num_acc,
        draft_tokens.stride(0), draft_tokens.stride(1), out.stride(0), out.stride(1),
        B, K, splits,
        BLOCK_B=block_b, BLOCK_S=block_s, BLOCK_K1=triton.next_power_of_2(K + 1),
    )  # fmt: skip
