"""The Triton kernels as torch custom ops (``torch.ops.batched_specdec.*``): schema and fake implementations pass
``torch.library.opcheck``, and a ``fullgraph=True`` compiled function calls them (the Triton path, run by the
interpreter on CPU) with the same results as the torch references."""

from __future__ import annotations

import pytest
import torch

from batched_specdec.kernels import (
    commit_emitted_tokens,
    commit_emitted_tokens_reference,
    rejection_sample_from_probs,
    rejection_sample_from_probs_reference,
    scatter_kv_at_offsets,
    scatter_kv_at_offsets_reference,
)
from batched_specdec.kernels._launch import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (conftest.py sets it)")

# Everything opcheck tests except autograd (the ops are inference-only, with no backward registered).
OPCHECK = ("test_schema", "test_faketensor", "test_aot_dispatch_static")


def _scatter_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    key_cache = torch.randn(3, 2, 16, 8, generator=g)
    value_cache = torch.randn(3, 2, 16, 8, generator=g)
    key_states = torch.randn(3, 2, 4, 8, generator=g)
    value_states = torch.randn(3, 2, 4, 8, generator=g)
    return key_cache, value_cache, key_states, value_states, torch.tensor([0, 5, 14])  # row 2 runs past S


def _commit_inputs():
    out_tokens = torch.tensor([[4, 9, 2, -1], [7, 5, 1, 3], [8, 8, 8, 8]])
    num_accepted = torch.tensor([2, 3, 3])
    token_buffer = torch.zeros(3, 12, dtype=torch.int64)
    seq_lens = torch.tensor([3, 5, 10])
    gen_lens = torch.tensor([0, 1, 2])
    finished = torch.tensor([False, False, False])
    cache_lens = seq_lens - 1
    eos, max_gen_lens = torch.tensor([5]), torch.full((3,), 6)
    return out_tokens, num_accepted, token_buffer, seq_lens, gen_lens, finished, cache_lens, eos, max_gen_lens


def _rejection_inputs():
    g = torch.Generator().manual_seed(1)
    draft_tokens = torch.randint(0, 10, (4, 3), generator=g)
    draft_probs = torch.softmax(torch.randn(4, 3, 10, generator=g), -1)
    target_probs = torch.softmax(torch.randn(4, 4, 10, generator=g), -1)
    num_draft = torch.tensor([3, 1, 0, 2])
    return draft_tokens, draft_probs, target_probs, num_draft, torch.tensor(123), torch.tensor(456)


def test_ops_pass_opcheck():
    torch.library.opcheck(torch.ops.batched_specdec.scatter_kv_at_offsets, _scatter_inputs(), test_utils=OPCHECK)
    torch.library.opcheck(torch.ops.batched_specdec.commit_emitted_tokens, _commit_inputs(), test_utils=OPCHECK)
    d, q, p, n, seed, offset = _rejection_inputs()
    seeds, offsets = torch.tensor([7, seed, -3, 2**40]), offset + torch.tensor([3, 0, 2, 1]) * 2**20
    onehot = torch.tensor([False, True, False, False])
    torch.library.opcheck(torch.ops.batched_specdec.rejection_sample, (d, q, p, n, None, seeds, offsets, onehot, False),
                          test_utils=OPCHECK)


def test_compiled_graph_calls_the_triton_ops():
    """One fullgraph compiled function runs all three ops on their Triton path; results equal the references."""

    def step(kc, vc, ks, vs, lens, d, q, p, n, seed, offset, buf, seq, gen, fin, cache_lens, eos):
        scatter_kv_at_offsets(kc, vc, ks, vs, lens, backend="triton", validate=False)
        out, acc = rejection_sample_from_probs(d, q, p, num_draft_tokens=n, seed=seed, offset=offset,
                                               backend="triton")
        committed = commit_emitted_tokens(out, acc, buf, seq, gen, fin, cache_lens, eos, 6, backend="triton")
        return out, acc, committed

    def inputs():
        buf, seq = torch.zeros(4, 12, dtype=torch.int64), torch.tensor([3, 5, 10, 1])
        state = (buf, seq, torch.tensor([0, 1, 2, 0]), torch.zeros(4, dtype=torch.bool), seq - 1)
        return (*_scatter_inputs(), *_rejection_inputs(), *state, torch.tensor([5]))

    compiled_args, reference_args = inputs(), inputs()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_args)
    kc, vc, ks, vs, lens, d, q, p, n, seed, offset, buf, seq, gen, fin, cache_lens, eos = reference_args
    scatter_kv_at_offsets_reference(kc, vc, ks, vs, lens)
    out, acc = rejection_sample_from_probs_reference(d, q, p, num_draft_tokens=n, seed=seed, offset=offset)
    committed = commit_emitted_tokens_reference(out, acc, buf, seq, gen, fin, cache_lens, eos, 6)
    for got, expected in zip(compiled, (out, acc, committed)):
        assert torch.equal(got, expected)
    for got, expected in zip(compiled_args, reference_args):  # every in-place update, the KV cache included
        assert torch.equal(got, expected)
