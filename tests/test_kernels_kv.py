"""Ragged KV scatter, commit of emitted tokens and row compaction: Triton (interpreter) == torch reference."""

import pytest
import torch

from batched_specdec.kernels import (
    PLACEHOLDER_TOKEN_ID,
    commit_emitted_tokens,
    commit_emitted_tokens_reference,
    compact_rows,
    compact_rows_reference,
    scatter_kv_at_offsets,
    scatter_kv_at_offsets_reference,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("B,H,S,Q,D,dtype", [(1, 1, 8, 1, 4, torch.float32), (7, 2, 13, 4, 6, torch.bfloat16),
                                             (33, 3, 20, 2, 8, torch.float16)])  # fmt: skip
def test_scatter_kv_matches_reference(B, H, S, Q, D, dtype):
    g = _gen(B)
    kc = torch.randn(B, H, S, D, generator=g).to(dtype)
    vc = torch.randn(B, H, S, D, generator=g).to(dtype)
    # states as a non-contiguous view (HF transposes (B, Q, H, D) -> (B, H, Q, D)). fp32 states are cast on write
    # for the fp16 cache; bf16 gets bf16 states because the interpreter truncates fp32 -> bf16 (GPUs round).
    state_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    ks = torch.randn(B, Q, H, D, generator=g).to(state_dtype).transpose(1, 2)
    vs = torch.randn(B, Q, H, D, generator=g).to(state_dtype).transpose(1, 2)
    lens = torch.randint(0, S + 1, (B,), generator=g)
    lens[0] = S - 1  # partly past the end: dropped
    lens[-1] = 0
    a, b = (kc.clone(), vc.clone()), (kc.clone(), vc.clone())
    scatter_kv_at_offsets(*a, ks, vs, lens, backend="triton")
    scatter_kv_at_offsets_reference(*b, ks, vs, lens)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for row in range(B):
        n = max(0, min(Q, S - lens[row].item()))
        s0 = lens[row].item()
        assert torch.equal(b[0][row, :, s0 : s0 + n], ks[row, :, :n].to(dtype))
        assert torch.equal(b[1][row, :, :s0], vc[row, :, :s0])  # untouched before the offset


def test_scatter_kv_bad_inputs():
    kc = torch.zeros(2, 1, 4, 3)
    with pytest.raises(ValueError, match="cache_lens"):
        scatter_kv_at_offsets(kc, kc.clone(), kc[:, :, :1], kc[:, :, :1], torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="value_states"):
        scatter_kv_at_offsets(kc, kc.clone(), kc[:, :, :1], kc[:, :, :2], torch.zeros(2, dtype=torch.int64))


def _commit_case():
    # rows: partial accept, EOS in the middle, all accepted, finished, 0 accepted, max_gen_len truncation,
    # EOS as the bonus token, near the buffer end
    out = torch.tensor([
        [5, 6, PLACEHOLDER_TOKEN_ID, PLACEHOLDER_TOKEN_ID],
        [2, 9, 4, PLACEHOLDER_TOKEN_ID],
        [1, 2, 3, 4],
        [7, 7, 7, 7],
        [8, PLACEHOLDER_TOKEN_ID, PLACEHOLDER_TOKEN_ID, PLACEHOLDER_TOKEN_ID],
        [1, 1, 1, 1],
        [3, 3, 3, 100],
        [4, 4, 4, 4],
    ])  # fmt: skip
    num_acc = torch.tensor([1, 2, 3, 3, 0, 3, 3, 3])
    S = 14
    seq = torch.tensor([3, 4, 5, 6, 2, 7, 3, 12])
    gen = torch.tensor([0, 1, 2, 3, 0, 8, 0, 1])
    fin = torch.tensor([False, False, False, True, False, False, False, False])
    buf = torch.randint(0, 50, (8, S), generator=_gen(0))
    return out, num_acc, buf, seq, gen, fin


def test_commit_exact_answers():
    out, num_acc, buf, seq, gen, fin = _commit_case()
    buf0, seq0 = buf.clone(), seq.clone()
    cache = torch.zeros(8, dtype=torch.int64)
    n = commit_emitted_tokens_reference(out, num_acc, buf, seq, gen, fin, cache, torch.tensor([9, 100, 12345]), 10)
    assert n.tolist() == [2, 2, 4, 0, 1, 2, 4, 2]
    assert seq.tolist() == (seq0 + n).tolist()
    assert fin.tolist() == [False, True, False, True, False, True, True, False]
    assert torch.equal(cache, seq - 1)
    for row in range(8):
        s0, k = seq0[row].item(), n[row].item()
        assert torch.equal(buf[row, s0 : s0 + k], out[row, :k])
        assert torch.equal(buf[row, :s0], buf0[row, :s0]) and torch.equal(buf[row, s0 + k :], buf0[row, s0 + k :])


@pytest.mark.parametrize("B,K", [(8, 3), (33, 8), (1, 1)])
def test_commit_matches_reference(B, K):
    g = _gen(B * K)
    if B == 8:
        out, num_acc, buf, seq, gen, fin = _commit_case()
    else:
        num_acc = torch.randint(0, K + 1, (B,), generator=g)
        toks = torch.randint(0, 12, (B, K + 1), generator=g)
        out = torch.where(torch.arange(K + 1)[None, :] <= num_acc[:, None], toks, PLACEHOLDER_TOKEN_ID)
        S = 3 * K + 6
        seq = torch.randint(1, S - K - 1, (B,), generator=g)
        seq[0] = S - 1
        gen = torch.randint(0, 6, (B,), generator=g)
        fin = torch.rand(B, generator=g) < 0.2
        buf = torch.randint(0, 50, (B, S), generator=g)
    states = [[t.clone() for t in (buf, seq, gen, fin)] + [torch.zeros(B, dtype=torch.int64)] for _ in range(2)]
    eos = torch.tensor([9, 100, 11])
    n_t = commit_emitted_tokens(out, num_acc, *states[0], eos, 6, backend="triton")
    n_r = commit_emitted_tokens_reference(out, num_acc, *states[1], eos, 6)
    assert torch.equal(n_t, n_r)
    for a, b in zip(states[0], states[1]):
        assert torch.equal(a, b)
    assert (states[1][1] <= states[1][0].shape[1]).all()  # never past the buffer


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_commit_per_row_budgets_equal_one_shared_limit(backend):
    """Per-row budgets ``m`` with generated counts ``g`` commit what one shared limit ``L`` does with ``g + L - m``."""
    out, num_acc, buf, seq, gen, fin = _commit_case()
    budgets = torch.tensor([3, 5, 2, 4, 1, 9, 6, 2])
    limit, eos = 10, torch.tensor([9, 100, 12345])
    per_row = [t.clone() for t in (buf, seq, gen, fin)] + [torch.zeros(8, dtype=torch.int64)]
    shared = [t.clone() for t in (buf, seq, gen + limit - budgets, fin)] + [torch.zeros(8, dtype=torch.int64)]
    n_rows = commit_emitted_tokens(out, num_acc, *per_row, eos, budgets, backend=backend)
    n_shared = commit_emitted_tokens(out, num_acc, *shared, eos, limit, backend=backend)
    assert torch.equal(n_rows, n_shared)
    assert torch.equal(per_row[2], shared[2] - limit + budgets)
    for i in (0, 1, 3, 4):
        assert torch.equal(per_row[i], shared[i])
    with pytest.raises(ValueError, match="max_gen_len"):
        commit_emitted_tokens(out, num_acc, *per_row, eos, budgets[:3], backend=backend)


def test_commit_bad_inputs():
    out, num_acc, buf, seq, gen, fin = _commit_case()
    cache = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="eos_token_ids"):
        commit_emitted_tokens(out, num_acc, buf, seq, gen, fin, cache, torch.tensor([], dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="finished"):
        commit_emitted_tokens(out, num_acc, buf, seq, gen, fin.long(), cache, torch.tensor([1]), 5)
    with pytest.raises(ValueError, match="max_gen_len"):
        commit_emitted_tokens(out, num_acc, buf, seq, gen, fin, cache, torch.tensor([1]), -1)


def test_compact_rows_matches_reference():
    g = _gen(3)
    B = 7
    tensors = [
        torch.randn(B, 2, 5, 4, generator=g),
        torch.randn(B, 2, 5, 4, generator=g).to(torch.bfloat16),
        torch.randn(B, 4, 5, 2, generator=g).transpose(1, 3),  # non-contiguous
        torch.randint(0, 100, (B, 9), generator=g),
        torch.randint(0, 100, (B,), generator=g),
        torch.rand(B, generator=g) < 0.5,
    ]
    for keep in (torch.tensor([0, 2, 3, 6]), torch.arange(B), torch.tensor([5]), torch.tensor([], dtype=torch.int64)):
        got = compact_rows(tensors, keep, backend="triton")
        ref = compact_rows_reference(tensors, keep)
        for t, a, b in zip(tensors, got, ref):
            assert a.dtype == t.dtype and a.is_contiguous() and a.shape == (keep.numel(), *t.shape[1:])
            assert torch.equal(a, b) and torch.equal(b, t[keep])


def test_compact_rows_bad_inputs():
    with pytest.raises(ValueError, match="keep_rows"):
        compact_rows([torch.zeros(3)], torch.tensor([0, 1], dtype=torch.int32))
