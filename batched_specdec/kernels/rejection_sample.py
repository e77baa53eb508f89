"""Fused speculative-decoding rejection sampling (Leviathan et al. 2023, Chen et al. 2023).

Per row b with k = num_draft_tokens[b] real draft slots, for j = 0..k-1 the draft token d_j is accepted iff
``u_j * q_j(d_j) < p_j(d_j)`` (strict, so a token with p = 0 is never accepted, even for u = 0). At the first
rejection j the recovered token is sampled from norm(max(0, p_j - q_j)) (falling back to p_j when that is all
zero through rounding); if all k drafts are accepted the bonus token is sampled from p_k.

Randomness. Every random number is a Philox4x32-10 draw keyed by an int64 ``seed`` at the int64 counter
``offset + (key_b * (K + 1) + j) * (V + 1) + c``, with ``key_b = row_keys[b]`` (default ``b``), so a row's draws
follow its key and not its position in the batch: ``c = V`` gives the acceptance uniform of (b, j), ``c = v < V``
the uniform behind the exponential E_v = -log(u_v) of vocabulary entry v at position j. The recovered/bonus
token is the exponential race ``argmax_v r_v / E_v`` over the unnormalised weights r (an exact sample of
r / sum(r); ties go to the lowest index). The kernel uses ``tl.rand``; the reference reproduces its bits with a
pure-torch Philox (same uint32 -> float conversion), so both backends make the same decisions from the same
seed/offset. A call consumes ``(max key + 1) * (K + 1) * (V + 1)`` counters: advance ``offset`` by that much
between calls (or draw a fresh random one, as ``generator=`` does).
With ``generator=`` the seed and offset are drawn from it with torch on the device (no host sync).

Parallelism. The fused kernel (one launch) gives each program BLOCK_B rows and walks their positions in order,
never reading a row's logits past its first rejection. When the batch is too small to fill the GPU that way,
``kernels._launch.rejection_sample_config`` switches to the vocabulary-split path (three launches: per-chunk softmax
statistics, per-chunk decisions and race, merge), which reads every reachable position but spreads each row over
many programs. Both paths draw the same Philox numbers and make the same decisions.

Exactness caveat: ``-log(u)`` and (for logits) ``exp``/the softmax sums are computed by different libraries in
the two backends and can differ in the last bit; a decision can then differ only when two race scores (or
``u * q`` and ``p``) are within ~1e-7 relative of each other.
"""

import torch
import triton
import triton.language as tl

from batched_specdec.kernels._launch import rejection_sample_config, resolve_backend
from batched_specdec.kernels.philox import philox_uniform_reference

PLACEHOLDER_TOKEN_ID = -1

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
    seed,
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
        uv = tl.rand(seed, counter_stop[:, None] + cols64[None, :])
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
def _row_streams(rows, row_mask, row_keys_ptr, seed_ptr, offset_ptr, target_ptr, draft_ptr, stride_pb, stride_qb, K, V):
    """(seed, first Philox counter of each row, pointers to each row's target and draft distributions); a row's
    counters follow its key, not its position in the batch."""
    seed = tl.load(seed_ptr)
    keys = tl.load(row_keys_ptr + rows, mask=row_mask, other=0)
    counter_row = tl.load(offset_ptr) + keys * (K + 1) * (V + 1)
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
def _rejection_sample_kernel(
    # pointers
    draft_tokens_ptr,  # [B, K] int64
    draft_ptr,  # [B, K, V] draft probs or logits (not read when HAS_DRAFT is False)
    target_ptr,  # [B, K + 1, V] target probs or logits
    num_draft_ptr,  # [B] int64
    temperature_ptr,  # [B] fp32 (not read when IS_LOGITS is False)
    seed_ptr,  # [] int64
    offset_ptr,  # [] int64
    row_keys_ptr,  # [B] int64
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
    seed, counter_row, p_rows, q_rows = _row_streams(rows, row_mask, row_keys_ptr, seed_ptr, offset_ptr, target_ptr,
                                                     draft_ptr, stride_pb, stride_qb, K, V)
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


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary-split path for small batches: the vocabulary of every row is cut into NUM_SPLITS chunks, one program
# each, so that a handful of rows still spreads over the whole GPU. Three launches:
#   1. (logits only) per-chunk softmax statistics of every position a row can reach (j <= n);
#   2. per (row, chunk): merge the statistics, make the accept decisions (every chunk program makes the same
#      ones), then run the exponential race over its chunk of the stop position;
#   3. per row: merge the chunk winners and write the outputs.
# Same Philox counters as the fused kernel, so both paths make the same decisions from the same seed/offset.
# Unlike the fused kernel it reads every reachable position's logits, also past a rejection.


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


@triton.jit
def _split_race_kernel(
    draft_tokens_ptr, draft_ptr, target_ptr, num_draft_ptr, temperature_ptr, seed_ptr, offset_ptr,
    row_keys_ptr,  # [B] int64
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
    seed, counter_row, p_rows, q_rows = _row_streams(rows, row_mask, row_keys_ptr, seed_ptr, offset_ptr, target_ptr,
                                                     draft_ptr, stride_pb, stride_qb, K, V)
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


# ----------------------------------------------------------------------------------------------------------------
# Input checks and shared preparation.


def _check_tokens_and_sizes(draft_tokens, target, draft, num_draft_tokens, what):
    if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.dim() != 2 or draft_tokens.dtype != torch.int64:
        got = (tuple(draft_tokens.shape), draft_tokens.dtype) if isinstance(draft_tokens, torch.Tensor) else draft_tokens
        raise ValueError(f"draft_tokens must be a (B, K) int64 tensor, got {got}")
    B, K = draft_tokens.shape
    if K < 1:
        raise ValueError(f"draft_tokens must have at least one draft slot (K >= 1), got shape {tuple(draft_tokens.shape)}")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if not isinstance(target, torch.Tensor) or target.dim() != 3 or target.shape[:2] != (B, K + 1):
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else target
        raise ValueError(f"target_{what} must have shape (B, K + 1, V) = ({B}, {K + 1}, V), got {got}")
    if target.dtype not in floats:
        raise ValueError(f"target_{what} must be float32, bfloat16 or float16, got {target.dtype}")
    V = target.shape[2]
    if V < 1:
        raise ValueError(f"target_{what} must have a vocabulary of at least 1, got V = {V}")
    device = draft_tokens.device
    if target.device != device:
        raise ValueError(f"target_{what} is on {target.device} but draft_tokens is on {device}")
    if draft is not None:
        if not isinstance(draft, torch.Tensor) or draft.dim() != 3 or tuple(draft.shape[:2]) != (B, K):
            got = tuple(draft.shape) if isinstance(draft, torch.Tensor) else draft
            raise ValueError(f"draft_{what} must have shape (B, K, V_draft) = ({B}, {K}, <= {V}) or be None, "
                             f"got {got}")
        if draft.shape[2] > V:
            raise ValueError(f"draft_{what} has a vocabulary of {draft.shape[2]}, larger than the target's {V}: "
                             "the draft's vocabulary must be a prefix of the target's (V_draft <= V)")
        if draft.dtype not in floats:
            raise ValueError(f"draft_{what} must be float32, bfloat16 or float16, got {draft.dtype}")
        if draft.device != device:
            raise ValueError(f"draft_{what} is on {draft.device} but draft_tokens is on {device}")
    if num_draft_tokens is None:
        num_draft_tokens = torch.full((B,), K, dtype=torch.int64, device=device)
    elif (
        not isinstance(num_draft_tokens, torch.Tensor)
        or tuple(num_draft_tokens.shape) != (B,)
        or num_draft_tokens.dtype != torch.int64
        or num_draft_tokens.device != device
    ):
        got = (
            (tuple(num_draft_tokens.shape), num_draft_tokens.dtype, num_draft_tokens.device)
            if isinstance(num_draft_tokens, torch.Tensor)
            else num_draft_tokens
        )
        raise ValueError(f"num_draft_tokens must be None or a ({B},) int64 tensor on {device}, got {got}")
    return B, K, V, num_draft_tokens


def _pad_draft_vocab(draft, V, is_logits):
    """A draft over a prefix of the target's vocabulary gives q = 0 to the target-only ids (logits -inf)."""
    if draft is None or draft.shape[2] == V:
        return draft
    fill = float("-inf") if is_logits else 0.0
    return torch.nn.functional.pad(draft, (0, V - draft.shape[2]), value=fill)


def _seed_offset(generator, seed, offset, device):
    """int64 scalar seed and offset on ``device``, drawn with torch when not given (no host sync)."""
    if (seed is None) != (offset is None):
        raise ValueError("seed and offset must be given together (int64 scalar tensors), or neither")
    if seed is not None:
        if generator is not None:
            raise ValueError("give either generator or seed/offset, not both")
        for name, value in (("seed", seed), ("offset", offset)):
            if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.dtype != torch.int64:
                got = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value
                raise ValueError(f"{name} must be a one-element int64 tensor, got {got}")
            if value.device != device:
                raise ValueError(f"{name} is on {value.device} but the inputs are on {device}")
        return seed.reshape(()), offset.reshape(())
    return draw_seed_offset(generator, device)


def draw_seed_offset(generator: torch.Generator | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Philox seed and offset a call with ``generator=`` draws (int64 scalars on ``device``, drawn on the
    generator's device, no host sync): callers that pass ``seed``/``offset`` themselves (a compiled step, which
    cannot take a generator) draw them here to get the same random numbers."""
    gen_device = generator.device if generator is not None else device
    # Offsets below 2**62 leave room for the B * (K + 1) * (V + 1) counters of a call without wrapping.
    so = torch.randint(0, 2**62, (2,), generator=generator, dtype=torch.int64, device=gen_device).to(device)
    return so[0], so[1]


MAX_ROW_KEY = 2**20
"""Row keys are below this, so that ``offset + key * (K + 1) * (V + 1)`` stays far below 2**63."""


def _row_keys(row_keys, B, device):
    """The (B,) int64 row keys (``0..B-1`` when None). Values are not read on the host (no sync): callers pass
    distinct keys in ``[0, MAX_ROW_KEY)``."""
    if row_keys is None:
        return torch.arange(B, dtype=torch.int64, device=device)
    if not isinstance(row_keys, torch.Tensor) or tuple(row_keys.shape) != (B,) or row_keys.dtype != torch.int64:
        got = (tuple(row_keys.shape), row_keys.dtype) if isinstance(row_keys, torch.Tensor) else row_keys
        raise ValueError(f"row_keys must be None or a ({B},) int64 tensor, got {got}")
    if row_keys.device != device:
        raise ValueError(f"row_keys is on {row_keys.device} but the inputs are on {device}")
    return row_keys


def _deterministic_rows(rows, B, device):
    """The (B,) bool one-hot-q flags (all False when None)."""
    if rows is None:
        return torch.zeros(B, dtype=torch.bool, device=device)
    if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (B,) or rows.dtype != torch.bool:
        got = (tuple(rows.shape), rows.dtype) if isinstance(rows, torch.Tensor) else rows
        raise ValueError(f"deterministic_rows must be None or a ({B},) bool tensor, got {got}")
    if rows.device != device:
        raise ValueError(f"deterministic_rows is on {rows.device} but the inputs are on {device}")
    return rows


def _temperature_tensor(temperature, B, device):
    if isinstance(temperature, torch.Tensor):
        if tuple(temperature.shape) not in ((B,), ()) or not temperature.dtype.is_floating_point:
            raise ValueError(
                f"temperature must be a float or a ({B},) float tensor, got {tuple(temperature.shape)} {temperature.dtype}"
            )
        if temperature.device != device:
            raise ValueError(f"temperature is on {temperature.device} but the inputs are on {device}")
        return temperature.to(torch.float32).expand(B).contiguous()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a float >= 0 or a ({B},) tensor, got {temperature!r}")
    return torch.full((B,), float(temperature), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Torch implementation (the reference) and the Triton launch, both on prepared inputs.


def _reference_impl(draft_tokens, draft, target, num_draft, temperature, seed, offset, row_keys, onehot, is_logits):
    B, K = draft_tokens.shape
    V = target.shape[2]
    device = draft_tokens.device
    pos = torch.arange(K + 1, device=device)
    counter_row = offset + row_keys * ((K + 1) * (V + 1))  # [B]

    target = target.to(torch.float32)
    draft = draft.to(torch.float32) if draft is not None else None
    if is_logits:
        greedy = temperature == 0
        inv_t = 1.0 / torch.where(greedy, torch.ones_like(temperature), temperature)
        x_p = target * inv_t[:, None, None]
        m_p = x_p.amax(-1).clamp_min(-_FLT_MAX)
        s_p = torch.exp(x_p - m_p[..., None]).sum(-1)
        a_p = target.argmax(-1)  # (B, K + 1); ties -> lowest index
        if draft is not None:
            x_q = draft * inv_t[:, None, None]
            m_q = x_q.amax(-1).clamp_min(-_FLT_MAX)
            s_q = torch.exp(x_q - m_q[..., None]).sum(-1)
    else:
        greedy = torch.zeros(B, dtype=torch.bool, device=device)

    # acceptance of every slot (slots past the stop are computed but never used); ignored slots may hold
    # anything, so gathers use clamped ids
    d = draft_tokens
    d_safe = d.clamp(0, V - 1)
    if is_logits:
        p_d = torch.exp(x_p[:, :K].gather(2, d_safe[..., None])[..., 0] - m_p[:, :K]) / s_p[:, :K]
    else:
        p_d = target[:, :K].gather(2, d_safe[..., None])[..., 0]
    if draft is None:
        q_d = torch.ones_like(p_d)
    elif is_logits:
        q_d = torch.exp(x_q.gather(2, d_safe[..., None])[..., 0] - m_q) / s_q
    else:
        q_d = draft.gather(2, d_safe[..., None])[..., 0]
    if draft is not None:
        q_d = torch.where(onehot[:, None], torch.ones_like(q_d), q_d)
    u = philox_uniform_reference(seed, counter_row[:, None] + pos[None, :K] * (V + 1) + V)
    accept = u * q_d < p_d
    if is_logits:
        accept = torch.where(greedy[:, None], d == a_p[:, :K], accept)
    accept = accept & (pos[None, :K] < num_draft[:, None])
    num_acc = accept.to(torch.int64).cumprod(1).sum(1)

    stop = num_acc
    is_bonus = stop == num_draft
    if is_logits:
        x_stop = x_p.gather(1, stop[:, None, None].expand(B, 1, V))[:, 0]
        p = torch.exp(x_stop - m_p.gather(1, stop[:, None])) / s_p.gather(1, stop[:, None])
    else:
        p = target.gather(1, stop[:, None, None].expand(B, 1, V))[:, 0]
    stop_q = stop.clamp_max(K - 1)[:, None]
    onehot_q = (torch.arange(V, device=device)[None, :] == d.gather(1, stop_q)).to(torch.float32)
    if draft is None:
        q = onehot_q
    else:
        if is_logits:
            xq_stop = x_q.gather(1, stop_q[..., None].expand(B, 1, V))[:, 0]
            q = torch.exp(xq_stop - m_q.gather(1, stop_q)) / s_q.gather(1, stop_q)
        else:
            q = draft.gather(1, stop_q[..., None].expand(B, 1, V))[:, 0]
        q = torch.where(onehot[:, None], onehot_q, q)
    q = torch.where(is_bonus[:, None], torch.zeros_like(q), q)
    r = torch.clamp_min(p - q, 0.0)
    uv = philox_uniform_reference(
        seed, counter_row[:, None] + stop[:, None] * (V + 1) + torch.arange(V, device=device)[None, :]
    )
    e = -torch.log(uv)
    minus_one = torch.tensor(-1.0, device=device)
    score_r = torch.where(r > 0, r / e, minus_one)
    score_p = torch.where(p > 0, p / e, minus_one)
    best_r = score_r.amax(-1)
    tok_r = score_r.argmax(-1)
    tok_p = score_p.argmax(-1)
    token = torch.where(best_r >= 0, tok_r, tok_p)
    if is_logits:
        token = torch.where(greedy, a_p.gather(1, stop[:, None])[:, 0], token)

    ks = pos[None, :]
    drafts = torch.cat([d, torch.full((B, 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int64, device=device)], 1)
    placeholder = torch.full_like(drafts, PLACEHOLDER_TOKEN_ID)
    out = torch.where(ks < stop[:, None], drafts, torch.where(ks == stop[:, None], token[:, None], placeholder))
    return out, num_acc


def _greedy_reference_impl(draft_tokens, target_logits, num_draft):
    """The reference for an all-greedy call (temperature the number 0): argmax matches only, no softmax and no
    random numbers. Same results as :func:`_reference_impl` on greedy rows, at a fraction of its CPU cost."""
    B, K = draft_tokens.shape
    device = draft_tokens.device
    a_p = target_logits.argmax(-1)  # (B, K + 1); ties -> lowest index
    pos = torch.arange(K + 1, device=device)
    accept = (draft_tokens == a_p[:, :K]) & (pos[None, :K] < num_draft[:, None])
    stop = accept.to(torch.int64).cumprod(1).sum(1)
    drafts = torch.cat([draft_tokens, torch.full((B, 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int64, device=device)], 1)
    token = a_p.gather(1, stop[:, None])
    out = torch.where(pos[None, :] < stop[:, None], drafts,
                      torch.where(pos[None, :] == stop[:, None], token, torch.full_like(drafts, PLACEHOLDER_TOKEN_ID)))
    return out, stop


def _triton_impl(draft_tokens, draft, target, num_draft, temperature, seed, offset, row_keys, onehot, is_logits):
    B, K = draft_tokens.shape
    V = target.shape[2]
    device = draft_tokens.device
    out = torch.empty((B, K + 1), dtype=torch.int64, device=device)
    num_acc = torch.empty((B,), dtype=torch.int64, device=device)
    cfg = rejection_sample_config(B, V, device)
    q = draft if draft is not None else target  # placeholder pointer, never read when HAS_DRAFT is False
    q_strides = draft.stride() if draft is not None else (0, 0, 0)
    t = temperature if temperature is not None else num_draft  # placeholder, never read for probs
    if cfg["NUM_SPLITS"] > 1:
        _triton_split_impl(draft_tokens, q, q_strides, target, num_draft, t, seed, offset, row_keys, onehot,
                           is_logits, draft is not None, out, num_acc, cfg)
        return out, num_acc
    grid = (triton.cdiv(B, cfg["BLOCK_B"]),)
    _rejection_sample_kernel[grid](
        draft_tokens, q, target, num_draft, t, seed, offset, row_keys, onehot, out, num_acc,
        draft_tokens.stride(0), draft_tokens.stride(1),
        *q_strides,
        *target.stride(),
        out.stride(0), out.stride(1),
        B, K, V,
        IS_LOGITS=is_logits,
        HAS_DRAFT=draft is not None,
        BLOCK_B=cfg["BLOCK_B"],
        BLOCK_V=cfg["BLOCK_V"],
        BLOCK_K1=triton.next_power_of_2(K + 1),
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out, num_acc


def _triton_split_impl(draft_tokens, q, q_strides, target, num_draft, t, seed, offset, row_keys, onehot, is_logits,
                       has_draft, out, num_acc, cfg):
    """The three launches of the vocabulary-split path (see the kernels above); fills ``out`` and ``num_acc``."""
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
        draft_tokens, q, target, num_draft, t, seed, offset, row_keys, onehot, p_stats, q_stats,
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


@torch.library.custom_op("batched_specdec::rejection_sample", mutates_args=())
def _rejection_sample_op(draft_tokens: torch.Tensor, draft: torch.Tensor | None, target: torch.Tensor,
                         num_draft: torch.Tensor, temperature: torch.Tensor | None, seed: torch.Tensor,
                         offset: torch.Tensor, row_keys: torch.Tensor, onehot: torch.Tensor,
                         is_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path (fused or vocabulary-split, inputs already checked) as a torch custom op, so compiled graphs
    and CUDA graphs call it as one node."""
    return _triton_impl(draft_tokens, draft, target, num_draft, temperature, seed, offset, row_keys, onehot,
                        is_logits)


@_rejection_sample_op.register_fake
def _(draft_tokens, draft, target, num_draft, temperature, seed, offset, row_keys, onehot, is_logits):
    B, K = draft_tokens.shape
    return draft_tokens.new_empty((B, K + 1)), draft_tokens.new_empty((B,))


def _run(backend, draft_tokens, draft, target, num_draft, temperature, generator, seed, offset, row_keys, onehot,
         is_logits):
    device = draft_tokens.device
    backend = resolve_backend(backend, device)
    seed, offset = _seed_offset(generator, seed, offset, device)
    impl = _rejection_sample_op if backend == "triton" else _reference_impl
    return impl(draft_tokens, draft, target, num_draft, temperature, seed, offset, row_keys, onehot, is_logits)


# ----------------------------------------------------------------------------------------------------------------
# Public API.


def rejection_sample_from_probs(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    *,
    num_draft_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
    deterministic_rows: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify draft tokens against target probabilities with speculative rejection sampling.

    Parameters
    ----------
    draft_tokens : torch.Tensor
        (B, K) int64 draft tokens, each in [0, V) for the real slots.
    draft_probs : torch.Tensor or None
        (B, K, V_draft) float32/bfloat16/float16, the exact distribution each draft token was drawn from, with
        V_draft <= V: a draft whose vocabulary is a prefix of the target's has q = 0 on the other ids (the
        wrapper pads a copy). None means a deterministic drafter (q one-hot at the draft token).
    target_probs : torch.Tensor
        (B, K + 1, V) float32/bfloat16/float16 target distributions; position K is the bonus distribution.
    num_draft_tokens : torch.Tensor, optional
        (B,) int64 in [0, K]: how many draft slots of each row are real; None means K for every row.
        Slots at or past it are never read and never accepted.
    generator : torch.Generator, optional
        Source of the Philox seed and offset (drawn on its device, no host sync).
    seed, offset : torch.Tensor, optional
        One-element int64 tensors on the inputs' device, for CUDA-graph capture. Row ``b`` uses the
        ``(K + 1) * (V + 1)`` Philox counters from ``offset + row_keys[b] * (K + 1) * (V + 1)``.
    row_keys : torch.Tensor, optional
        (B,) int64 in ``[0, 2**20)``, distinct: what each row's random numbers are keyed by (the engines pass each
        row's prompt index), so a row's decisions do not depend on its position in the batch. None: ``0..B-1``.
    deterministic_rows : torch.Tensor, optional
        (B,) bool: rows whose drafts came from a deterministic source (an n-gram match in a batch whose other rows
        drafted from a model): their q is one-hot at the draft token and their ``draft_probs`` rows are ignored.
        No one-hot tensor is built. None: no such row. Ignored when ``draft_probs`` is None (every row one-hot).
    backend : {"auto", "triton", "torch"}
        "auto": Triton for CUDA tensors, the torch reference otherwise.

    Returns
    -------
    output_tokens : torch.Tensor
        (B, K + 1) int64: accepted drafts, one recovered or bonus token, then ``PLACEHOLDER_TOKEN_ID``.
    num_accepted : torch.Tensor
        (B,) int64 in [0, num_draft_tokens[b]].
    """
    B, _, V, num_draft = _check_tokens_and_sizes(draft_tokens, target_probs, draft_probs, num_draft_tokens, "probs")
    draft_probs = _pad_draft_vocab(draft_probs, V, is_logits=False)
    keys = _row_keys(row_keys, B, draft_tokens.device)
    onehot = _deterministic_rows(deterministic_rows, B, draft_tokens.device)
    return _run(backend, draft_tokens, draft_probs, target_probs, num_draft, None, generator, seed, offset, keys,
                onehot, False)


def rejection_sample_from_probs_reference(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    *,
    num_draft_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
    deterministic_rows: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch :func:`rejection_sample_from_probs` (``backend`` is ignored); same arguments and results."""
    return rejection_sample_from_probs(
        draft_tokens, draft_probs, target_probs, num_draft_tokens=num_draft_tokens,
        generator=generator, seed=seed, offset=offset, row_keys=row_keys, deterministic_rows=deterministic_rows,
        backend="torch",
    )  # fmt: skip


def rejection_sample_from_logits(
    draft_tokens: torch.Tensor,
    draft_logits: torch.Tensor | None,
    target_logits: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    num_draft_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
    deterministic_rows: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling on logits, with softmax(logits / temperature) of both sides fused (fp32 math).

    Parameters
    ----------
    draft_tokens : torch.Tensor
        (B, K) int64 draft tokens.
    draft_logits : torch.Tensor or None
        (B, K, V_draft) float32/bfloat16/float16 draft logits (filtered entries -inf), V_draft <= V (the missing
        ids get -inf); None = deterministic drafter.
    target_logits : torch.Tensor
        (B, K + 1, V) float32/bfloat16/float16 target logits (filtered entries -inf).
    temperature : float or torch.Tensor
        float >= 0 or a (B,) float tensor (values must be >= 0; not checked, that would need a host sync).
        A row with temperature 0 is verified greedily: drafts are accepted while they equal argmax(target)
        (ties -> lowest index), then argmax(target) at the stop position is emitted.
    num_draft_tokens, generator, seed, offset, row_keys, deterministic_rows, backend
        As in :func:`rejection_sample_from_probs`.

    Returns
    -------
    output_tokens : torch.Tensor
        (B, K + 1) int64: accepted drafts, one recovered or bonus token, then ``PLACEHOLDER_TOKEN_ID``.
    num_accepted : torch.Tensor
        (B,) int64 in [0, num_draft_tokens[b]].
    """
    B, _, V, num_draft = _check_tokens_and_sizes(draft_tokens, target_logits, draft_logits, num_draft_tokens, "logits")
    draft_logits = _pad_draft_vocab(draft_logits, V, is_logits=True)
    t = _temperature_tensor(temperature, B, draft_tokens.device)
    keys = _row_keys(row_keys, B, draft_tokens.device)
    all_greedy = not isinstance(temperature, torch.Tensor) and temperature == 0
    if all_greedy and resolve_backend(backend, draft_tokens.device) == "torch":
        _seed_offset(generator, seed, offset, draft_tokens.device)  # consume the generator as the kernel path does
        return _greedy_reference_impl(draft_tokens, target_logits, num_draft)
    onehot = _deterministic_rows(deterministic_rows, B, draft_tokens.device)
    return _run(backend, draft_tokens, draft_logits, target_logits, num_draft, t, generator, seed, offset, keys,
                onehot, True)


def rejection_sample_from_logits_reference(
    draft_tokens: torch.Tensor,
    draft_logits: torch.Tensor | None,
    target_logits: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    num_draft_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
    deterministic_rows: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch :func:`rejection_sample_from_logits` (``backend`` is ignored); same arguments and results."""
    return rejection_sample_from_logits(
        draft_tokens, draft_logits, target_logits, temperature, num_draft_tokens=num_draft_tokens,
        generator=generator, seed=seed, offset=offset, row_keys=row_keys, deterministic_rows=deterministic_rows,
        backend="torch",
    )  # fmt: skip
