"""Triton device functions shared by the fused kernel (:mod:`.fused`) and the vocabulary-split kernels
(:mod:`.split`): softmax statistics, the accept decision of one position, the exponential race, the output row.

Terms and the Philox counter layout are defined in :mod:`batched_specdec.kernels.rejection_sample`.
"""

import triton
import triton.language as tl

_FLT_MAX = 3.4028234663852886e38
_NEG_FLT_MAX = tl.constexpr(-_FLT_MAX)  # kernels may only read constexpr globals


@triton.jit
def _block_max_first_index(x, cols, BIG: tl.constexpr):
    """Row-wise max of a [BLOCK_B, BLOCK_V] tile and the lowest column index attaining it (torch.argmax ties)."""
    bmax = tl.max(x, axis=1)
    bidx = tl.min(tl.where(x == bmax[:, None], cols[None, :], BIG), axis=1)
    return bmax, bidx


@triton.jit
def _softmax_stats(
    base,  # [BLOCK_B] pointers to (b, j, 0) of logits
    stride_v,
    inv_t,  # [BLOCK_B] fp32, 1 / temperature (1 for greedy rows)
    mask_b,  # [BLOCK_B] rows to read
    v_start,
    v_end,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Online max, sum of exp and first argmax of logits * inv_t over columns [v_start, v_end), in fp32.

    Rows that read nothing get m = -FLT_MAX, s = 0 and argmax 0."""
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_B], _NEG_FLT_MAX, tl.float32)
    s = tl.zeros([BLOCK_B], tl.float32)
    a = tl.zeros([BLOCK_B], tl.int64)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + cols0
        mask = mask_b[:, None] & (cols < v_end)[None, :]
        x = tl.load(base[:, None] + cols[None, :].to(tl.int64) * stride_v, mask=mask, other=-float("inf"))
        x = x.to(tl.float32) * inv_t[:, None]
        bmax, bidx = _block_max_first_index(x, cols, 2147483647)
        m_new = tl.maximum(m, bmax)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        a = tl.where(bmax > m, bidx.to(tl.int64), a)
        m = m_new
    return m, s, a


@triton.jit
def _accept_at(
    j,
    rows,
    verify,  # [BLOCK_B] rows with a real draft at j that are still verifying
    greedy,
    inv_t,
    m_p, s_p, a_p, m_q, s_q,  # softmax statistics of position j (logits only)
    onehot,  # [BLOCK_B] rows whose q is one-hot at their draft token (a deterministic source; HAS_DRAFT only)
    draft_tokens_ptr, p_rows, q_rows,
    stride_db, stride_dk, stride_pk, stride_pv, stride_qk, stride_qv,
    seed,
    counter_row,
    V,
    IS_LOGITS: tl.constexpr,
    HAS_DRAFT: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Whether each row accepts its draft token at position j: ``u * q(d) < p(d)``, or ``d == argmax p`` when greedy."""
    d = tl.load(draft_tokens_ptr + rows * stride_db + j * stride_dk, mask=verify, other=0)
    p_d = tl.load(p_rows + j * stride_pk + d * stride_pv, mask=verify, other=0.0).to(tl.float32)
    if IS_LOGITS:
        # masked rows carry m = -FLT_MAX, s = 0: keep them out of exp/divide (no inf/nan, even unused)
        p_d = tl.exp(tl.where(verify, p_d * inv_t - m_p, -float("inf"))) / tl.where(verify, s_p, 1.0)
    if HAS_DRAFT:
        q_d = tl.load(q_rows + j * stride_qk + d * stride_qv, mask=verify, other=0.0).to(tl.float32)
        if IS_LOGITS:
            q_ok = verify & (greedy == 0)
            q_d = tl.exp(tl.where(q_ok, q_d * inv_t - m_q, -float("inf"))) / tl.where(q_ok, s_q, 1.0)
        q_d = tl.where(onehot, 1.0, q_d)
    else:
        q_d = tl.full([BLOCK_B], 1.0, tl.float32)
    u = tl.rand(seed, counter_row + j * (V + 1) + V)
    return verify & tl.where(greedy, d == a_p, u * q_d < p_d)


@triton.jit
def _race(
    p_stop,  # [BLOCK_B] pointers to (b, stop, 0) of the target
    q_stop,  # [BLOCK_B] pointers to (b, stop, 0) of the draft
    stride_pv,
    stride_qv,
    inv_t,
    m_p_stop, s_p_stop, m_q_stop, s_q_stop,  # softmax statistics at the stop position (logits only)
    d_stop,  # [BLOCK_B] draft token at the stop position, -1 for bonus rows
    has_q,  # [BLOCK_B] rows stopped by a rejection (not bonus)
    onehot,  # [BLOCK_B] rows whose q is one-hot at the draft token (HAS_DRAFT only)
    sample,  # [BLOCK_B] rows that sample (not greedy, in range)
    seed,  # [BLOCK_B] Philox key of each row
    counter_stop,  # [BLOCK_B] Philox counter of column 0 at the stop position
    v_start,
    v_end,
    IS_LOGITS: tl.constexpr,
    HAS_DRAFT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Exponential race over columns [v_start, v_end) of the stop position, for r = max(0, p - q) and for the
    fallback p at once with the same exponentials. Returns (best_r, tok_r, best_p, tok_p); best = -2 when no
    column has weight (ties -> lowest column)."""
    cols0 = tl.arange(0, BLOCK_V)
    best_r = tl.full([BLOCK_B], -2.0, tl.float32)
    best_p = tl.full([BLOCK_B], -2.0, tl.float32)
    tok_r = tl.zeros([BLOCK_B], tl.int64)
    tok_p = tl.zeros([BLOCK_B], tl.int64)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + cols0
        cols64 = cols.to(tl.int64)
        mask = sample[:, None] & (cols < v_end)[None, :]
        if IS_LOGITS:
            x = tl.load(p_stop[:, None] + cols64[None, :] * stride_pv, mask=mask, other=-float("inf"))
            p = tl.exp(x.to(tl.float32) * inv_t[:, None] - m_p_stop[:, None]) / tl.where(sample, s_p_stop, 1.0)[:, None]
        else:
            p = tl.load(p_stop[:, None] + cols64[None, :] * stride_pv, mask=mask, other=0.0).to(tl.float32)
        if HAS_DRAFT:
            mask_q = mask & has_q[:, None]
            if IS_LOGITS:
                xq = tl.load(q_stop[:, None] + cols64[None, :] * stride_qv, mask=mask_q, other=-float("inf"))
                # bonus rows have no draft stats (s = 0): divide by 1 so q is 0, not 0/0 = nan
                s_q_safe = tl.where(has_q & sample, s_q_stop, 1.0)
                q = tl.exp(xq.to(tl.float32) * inv_t[:, None] - m_q_stop[:, None]) / s_q_safe[:, None]
            else:
                q = tl.load(q_stop[:, None] + cols64[None, :] * stride_qv, mask=mask_q, other=0.0).to(tl.float32)
            q = tl.where(onehot[:, None], tl.where(cols64[None, :] == d_stop[:, None], 1.0, 0.0), q)
        else:
            q = tl.where(cols64[None, :] == d_stop[:, None], 1.0, 0.0)
        r = tl.maximum(p - q, 0.0)
        uv = tl.rand(seed[:, None], counter_stop[:, None] + cols64[None, :])
        e = -tl.log(uv)
        score_r = tl.where(r > 0.0, r / e, -1.0)
        score_p = tl.where(p > 0.0, p / e, -1.0)
        br, ir = _block_max_first_index(score_r, cols, 2147483647)
        bp, ip = _block_max_first_index(score_p, cols, 2147483647)
        tok_r = tl.where(br > best_r, ir.to(tl.int64), tok_r)
        best_r = tl.maximum(best_r, br)
        tok_p = tl.where(bp > best_p, ip.to(tl.int64), tok_p)
        best_p = tl.maximum(best_p, bp)
    return best_r, tok_r, best_p, tok_p


@triton.jit
def _write_output(
    draft_tokens_ptr, out_tokens_ptr, num_accepted_ptr,
    rows, row_mask, stop, token,
    stride_db, stride_dk, stride_ob, stride_ok,
    K,
    BLOCK_K1: tl.constexpr,
):
    """Row b of the output: drafts[:stop], token, then -1; and num_accepted[b] = stop."""
    ks = tl.arange(0, BLOCK_K1).to(tl.int64)
    out_mask = row_mask[:, None] & (ks < K + 1)[None, :]
    drafts = tl.load(
        draft_tokens_ptr + rows[:, None] * stride_db + ks[None, :] * stride_dk,
        mask=row_mask[:, None] & (ks[None, :] < stop[:, None]),
        other=-1,
    )
    out = tl.where(ks[None, :] < stop[:, None], drafts, tl.where(ks[None, :] == stop[:, None], token[:, None], -1))
    tl.store(out_tokens_ptr + rows[:, None] * stride_ob + ks[None, :] * stride_ok, out, mask=out_mask)
    tl.store(num_accepted_ptr + rows, stop, mask=row_mask)


@triton.jit
def _row_streams(rows, row_mask, seed_ptr, offset_ptr, target_ptr, draft_ptr, stride_pb, stride_qb):
    """(Philox key and first counter of each row, pointers to each row's target and draft distributions)."""
    seed = tl.load(seed_ptr + rows, mask=row_mask, other=0)
    counter_row = tl.load(offset_ptr + rows, mask=row_mask, other=0)
    return seed, counter_row, target_ptr + rows * stride_pb, draft_ptr + rows * stride_qb


@triton.jit
def _onehot_rows(onehot_ptr, rows, row_mask, HAS_DRAFT: tl.constexpr):
    """Rows whose q is one-hot at their draft token: a deterministic source in a batch that has a draft q."""
    if HAS_DRAFT:
        return tl.load(onehot_ptr + rows, mask=row_mask, other=0) != 0
    return rows < 0


@triton.jit
def _row_setup(rows, row_mask, num_draft_ptr, temperature_ptr, IS_LOGITS: tl.constexpr, BLOCK_B: tl.constexpr):
    """(n, greedy, inv_t) of each row: real draft slots, temperature-0 flag, 1 / temperature (1 when greedy)."""
    n = tl.load(num_draft_ptr + rows, mask=row_mask, other=0)
    if IS_LOGITS:
        t = tl.load(temperature_ptr + rows, mask=row_mask, other=1.0).to(tl.float32)
        greedy = t == 0.0
        inv_t = 1.0 / tl.where(greedy, 1.0, t)
    else:
        greedy = rows < 0
        inv_t = tl.full([BLOCK_B], 1.0, tl.float32)
    return n, greedy, inv_t


@triton.jit
def _verify_positions(
    rows, row_mask, n, greedy, inv_t, onehot,
    draft_tokens_ptr, p_rows, q_rows,
    stride_db, stride_dk, stride_pk, stride_pv, stride_qk, stride_qv,
    seed, counter_row, K, V,
    p_stats_ptr, q_stats_ptr, NUM_SPLITS,  # per-chunk statistics (FROM_PARTIALS only)
    IS_LOGITS: tl.constexpr,
    HAS_DRAFT: tl.constexpr,
    FROM_PARTIALS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Walk positions 0..K of BLOCK_B rows in order until each row rejects or reaches n.

    Softmax statistics (logits only) come from a pass over the vocabulary, or, with FROM_PARTIALS (one row,
    BLOCK_B = 1), from merging the vocabulary-split path's per-chunk statistics. A row's position is never
    touched once the row has stopped. Returns (num_accepted, then m_p, s_p, argmax_p, m_q, s_q at the stop
    position)."""
    live = row_mask  # still verifying: not yet stopped by a rejection or by reaching n
    num_acc = tl.zeros([BLOCK_B], tl.int64)
    m_p_stop = tl.zeros([BLOCK_B], tl.float32)
    s_p_stop = tl.full([BLOCK_B], 1.0, tl.float32)
    a_p_stop = tl.zeros([BLOCK_B], tl.int64)
    m_q_stop = tl.zeros([BLOCK_B], tl.float32)
    s_q_stop = tl.full([BLOCK_B], 1.0, tl.float32)
    b = tl.sum(rows, axis=0)  # the row, when FROM_PARTIALS
    for j in range(K + 1):
        verify = live & (j < n)
        m_p = tl.zeros([BLOCK_B], tl.float32)
        s_p = tl.full([BLOCK_B], 1.0, tl.float32)
        a_p = tl.zeros([BLOCK_B], tl.int64)
        m_q = tl.zeros([BLOCK_B], tl.float32)
        s_q = tl.full([BLOCK_B], 1.0, tl.float32)
        # compile-time branches around runtime ones: they cannot be merged
        if IS_LOGITS:  # noqa: SIM102
            if tl.sum(live.to(tl.int32), axis=0) > 0:
                if FROM_PARTIALS:
                    m_p, s_p, a_p = _merge_stats(p_stats_ptr, (b * (K + 1) + j) * NUM_SPLITS * 3, 3, NUM_SPLITS,
                                                 True, BLOCK_S)
                    if HAS_DRAFT:  # noqa: SIM102
                        if j < K:
                            m_q, s_q, _ = _merge_stats(q_stats_ptr, (b * K + j) * NUM_SPLITS * 2, 2, NUM_SPLITS,
                                                       False, BLOCK_S)
                else:
                    m_p, s_p, a_p = _softmax_stats(
                        p_rows + j * stride_pk, stride_pv, inv_t, live, 0, V, BLOCK_B, BLOCK_V
                    )
                    if HAS_DRAFT:
                        m_q, s_q, _ = _softmax_stats(
                            q_rows + j * stride_qk, stride_qv, inv_t, verify & (greedy == 0), 0, V, BLOCK_B, BLOCK_V
                        )
        accept = _accept_at(
            j, rows, verify, greedy, inv_t, m_p, s_p, a_p, m_q, s_q, onehot, draft_tokens_ptr, p_rows, q_rows,
            stride_db, stride_dk, stride_pk, stride_pv, stride_qk, stride_qv, seed, counter_row, V,
            IS_LOGITS, HAS_DRAFT, BLOCK_B,
        )  # fmt: skip
        stop_now = live & (accept == 0)
        m_p_stop = tl.where(stop_now, m_p, m_p_stop)
        s_p_stop = tl.where(stop_now, s_p, s_p_stop)
        a_p_stop = tl.where(stop_now, a_p, a_p_stop)
        m_q_stop = tl.where(stop_now, m_q, m_q_stop)
        s_q_stop = tl.where(stop_now, s_q, s_q_stop)
        num_acc += accept.to(tl.int64)
        live = accept
    return num_acc, m_p_stop, s_p_stop, a_p_stop, m_q_stop, s_q_stop


@triton.jit
def _merge_stats(ptr, base, stride_split, NUM_SPLITS, HAS_ARGMAX: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge per-chunk (max, sum of exp[, argmax]) into [1]-shaped row statistics."""
    sidx = tl.arange(0, BLOCK_S).to(tl.int64)
    smask = sidx < NUM_SPLITS
    m_i = tl.load(ptr + base + sidx[None, :] * stride_split, mask=smask[None, :], other=_NEG_FLT_MAX)
    s_i = tl.load(ptr + base + sidx[None, :] * stride_split + 1, mask=smask[None, :], other=0.0)
    m = tl.max(m_i, axis=1)
    s = tl.sum(s_i * tl.exp(m_i - m[:, None]), axis=1)
    a = tl.zeros([1], tl.int64)
    if HAS_ARGMAX:
        a_i = tl.load(ptr + base + sidx[None, :] * stride_split + 2, mask=smask[None, :], other=0.0)
        # chunks are in column order and each holds its lowest argmax: the lowest winner is torch.argmax's
        a = tl.min(tl.where(m_i == m[:, None], a_i, 3.0e38), axis=1).to(tl.int64)
    return m, s, a
