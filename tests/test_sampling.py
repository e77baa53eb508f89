"""processors.sample_from_probs: one token per row on the device from two row-keyed Philox draws (inverse CDF in
float64). Exact answers on one-hot rows, never a zero-probability token, a goodness-of-fit test at a stated
false-positive rate (fixed seeds: it never flakes), and row keys that make a row's token independent of its
position in the batch."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from batched_specdec.kernels import draw_seed_offset
from batched_specdec.processors import MultinomialProcessor, TopKProcessor, sample_from_probs


def test_one_hot_rows_and_zero_probabilities():
    probs = torch.zeros(5, 7)
    probs[torch.arange(5), torch.tensor([0, 6, 3, 3, 1])] = 1.0
    for seed in range(20):
        got = sample_from_probs(probs, torch.tensor(seed), torch.tensor(3 * seed))
        assert got.tolist() == [0, 6, 3, 3, 1]
    sparse = torch.tensor([[0.0, 0.2, 0.0, 0.0, 0.8, 0.0]]).expand(4000, 6).contiguous()
    drawn = sample_from_probs(sparse, torch.tensor(1), torch.tensor(0))
    assert set(drawn.tolist()) == {1, 4}


def test_goodness_of_fit_against_the_distribution():
    """Chi-square at significance 1e-3 with a fixed seed: a correct sampler fails it with probability 0.001 on a
    random seed, and deterministically passes or fails on this one."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(111, generator=gen) * 2, -1)
    n = 60000
    seed, offset = draw_seed_offset(torch.Generator().manual_seed(1), torch.device("cpu"))
    drawn = sample_from_probs(p.expand(n, -1).contiguous(), seed, offset)
    counts = torch.bincount(drawn, minlength=111).double()
    expected = p.double() * n
    keep = expected >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    assert chisquare(observed.numpy(), exp.numpy() * observed.sum().item() / exp.sum().item()).pvalue > 1e-3


def test_row_keys_not_positions_decide_a_rows_token():
    gen = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(6, 50, generator=gen), -1)
    keys = torch.tensor([9, 2, 40, 0, 7, 13])
    perm = torch.tensor([3, 5, 0, 2, 4, 1])
    seed, offset = torch.tensor(5), torch.tensor(77)
    a = sample_from_probs(probs, seed, offset, keys)
    b = sample_from_probs(probs[perm], seed, offset, keys[perm])
    assert torch.equal(a[perm], b)
    assert torch.equal(sample_from_probs(probs, seed, offset), sample_from_probs(probs, seed, offset, torch.arange(6)))


def test_processor_sample_is_seeded_and_keyed():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    for processor in (MultinomialProcessor(0.8), TopKProcessor(1.0, 5)):
        keys = torch.tensor([3, 1, 0, 2])
        first, probs = processor.sample(logits, torch.Generator().manual_seed(4), keys)
        again, _ = processor.sample(logits, torch.Generator().manual_seed(4), keys)
        assert torch.equal(first, again) and probs.shape == (4, 30)
        assert (probs.gather(1, first[:, None]) > 0).all()
        flipped, _ = processor.sample(logits.flip(0), torch.Generator().manual_seed(4), keys.flip(0))
        assert torch.equal(flipped, first.flip(0))
