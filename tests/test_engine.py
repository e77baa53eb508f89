"""Engine tests: greedy exactness against a no-cache reference loop, the ragged cache, sampled distributions and
input errors. CPU, float32, tiny random-weight models built here."""

from __future__ import annotations

import math
import random

import pytest
import torch
from scipy import stats as scipy_stats
from tiny_models import greedy_reference, tiny_causal_lm

from batched_specdec import (
    GreedyProcessor,
    MultinomialProcessor,
    TopKNucleusProcessor,
    autoregressive_generate_batch,
    speculative_generate_batch,
)
from batched_specdec.drafting import NGramDrafter
from batched_specdec.forwards import model_forward, prefill, tail_forward
from batched_specdec.ragged_cache import RaggedKVCache


def _ragged_prompts(n: int, vocab: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, max_len] + [rng.randint(1, max_len) for _ in range(n - 2)]
    return [[rng.randrange(vocab) for _ in range(length)] for length in lengths[:n]]


@pytest.fixture(scope="module")
def llama_pair():
    target = tiny_causal_lm("llama", seed=0)
    bad_draft = tiny_causal_lm("llama", seed=1, layers=1)
    return target, bad_draft


@pytest.mark.parametrize("gamma", [1, 2, 5, 8])
def test_greedy_matches_reference_loop_bad_draft_and_self_draft(llama_pair, gamma):
    target, bad_draft = llama_pair
    prompts = _ragged_prompts(7, 96, 64, seed=gamma)
    eos = [5, 17]
    expected = [greedy_reference(target, p, 24, eos) for p in prompts]
    for draft in (bad_draft, target):
        outputs, alpha, stats = speculative_generate_batch(
            prompts, draft, target, gamma=gamma, max_gen_len=24, eos_tokens_id=eos
        )
        assert outputs == expected
        assert len(alpha) == len(prompts)
        assert sum(stats.acceptance_histogram) > 0
    # The target drafting for itself accepts every draft it proposes while a row is live.
    assert stats.acceptance_rate == 1.0


def test_greedy_bad_draft_accepts_little_and_self_draft_accepts_all(llama_pair):
    target, bad_draft = llama_pair
    prompts = _ragged_prompts(5, 96, 20, seed=3)
    _, _, bad = speculative_generate_batch(prompts, bad_draft, target, gamma=4, max_gen_len=30, eos_tokens_id=[])
    _, _, good = speculative_generate_batch(prompts, target, target, gamma=4, max_gen_len=30, eos_tokens_id=[])
    assert bad.acceptance_rate < 0.5
    assert good.acceptance_rate == 1.0
    assert good.tokens_per_target_forward > bad.tokens_per_target_forward
    assert good.generated_tokens == bad.generated_tokens == 5 * 30


def test_eos_mid_way_stops_each_row_on_its_own(llama_pair):
    target, bad_draft = llama_pair
    prompts = _ragged_prompts(7, 96, 30, seed=11)
    free = [greedy_reference(target, p, 20, []) for p in prompts]
    eos = free[0][3]  # row 0 hits EOS at its 4th token; other rows hit it wherever they do
    expected = [greedy_reference(target, p, 20, [eos]) for p in prompts]
    assert len(expected[0]) == 4 and expected[0][-1] == eos
    assert any(len(e) == 20 for e in expected) or any(eos not in e for e in expected)
    outputs, _, _ = speculative_generate_batch(prompts, bad_draft, target, gamma=3, max_gen_len=20, eos_tokens_id=eos)
    assert outputs == expected
    baseline = autoregressive_generate_batch(prompts, target, max_gen_len=20, eos_tokens_id=eos)
    assert baseline == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_matches_reference_across_architectures(arch):
    target = tiny_causal_lm(arch, seed=2)
    draft = tiny_causal_lm(arch, seed=3, layers=1)
    prompts = _ragged_prompts(6, 96, 48, seed=5)
    expected = [greedy_reference(target, p, 16, [7]) for p in prompts]
    outputs, _, _ = speculative_generate_batch(prompts, draft, target, gamma=5, max_gen_len=16, eos_tokens_id=7)
    assert outputs == expected
    assert autoregressive_generate_batch(prompts, target, max_gen_len=16, eos_tokens_id=7) == expected


def test_mistral_sliding_window_matches_reference():
    target = tiny_causal_lm("mistral", seed=4, sliding_window=8)
    draft = tiny_causal_lm("mistral", seed=5, layers=1, sliding_window=8)
    prompts = _ragged_prompts(4, 96, 20, seed=6)
    expected = [greedy_reference(target, p, 12, []) for p in prompts]
    outputs, _, _ = speculative_generate_batch(prompts, draft, target, gamma=3, max_gen_len=12, eos_tokens_id=[])
    assert outputs == expected


def test_compaction_keeps_rows_in_prompt_order(llama_pair):
    target, bad_draft = llama_pair
    prompts = _ragged_prompts(9, 96, 16, seed=8)
    free = [greedy_reference(target, p, 12, []) for p in prompts]
    eos = sorted({t for out in free for t in out[:2]})[:4]  # several rows finish within two tokens
    expected = [greedy_reference(target, p, 12, eos) for p in prompts]
    outputs, _, stats = speculative_generate_batch(prompts, bad_draft, target, gamma=2, max_gen_len=12,
                                                   eos_tokens_id=eos)
    assert outputs == expected
    assert stats.compactions >= 1


@pytest.mark.parametrize("chunk", [128, 4])
def test_the_first_verify_forward_writes_the_prompt_tails(llama_pair, chunk):
    """Prompts within one prefill chunk cost no forward of their own: every target forward is a step's. With a chunk
    of 4 the prefill writes all but each row's last 4 tokens in 3 forwards (prompts of 1..13 tokens), the first step
    writes tails of 1..4 tokens beside its drafts, and outputs equal the reference loop."""
    target, bad_draft = llama_pair
    prompts = _ragged_prompts(6, 96, 13, seed=21)
    expected = [greedy_reference(target, p, 10, []) for p in prompts]
    forwards = []
    handle = target.register_forward_hook(lambda *args: forwards.append(1))
    try:
        for draft in (None, NGramDrafter(), bad_draft):
            forwards.clear()
            if draft is None:
                outputs, stats = autoregressive_generate_batch(prompts, target, max_gen_len=10, eos_tokens_id=[],
                                                               prefill_chunk=chunk, return_stats=True)
            else:
                outputs, _, stats = speculative_generate_batch(prompts, draft, target, gamma=3, max_gen_len=10,
                                                               eos_tokens_id=[], prefill_chunk=chunk)
            assert outputs == expected
            assert len(forwards) == stats.steps + (0 if chunk == 128 else 3)
    finally:
        handle.remove()


def test_a_tail_forward_returns_the_logits_of_a_prefill_and_a_verify(llama_pair):
    """Ragged tails (1, 5 and 3 tokens past cached prefixes of 4, 2 and 0) and 2 drafts in one forward: the logits
    at each tail's last token and the drafts, and the cache entries, equal a prefill up to ``s_b[:-1]`` followed by
    a verify forward over ``[s_b[-1], d_1, d_2]``."""
    target, _ = llama_pair
    tokens = torch.randint(5, 96, (3, 16), generator=torch.Generator().manual_seed(3))
    cached, tails, drafts = [4, 2, 0], [1, 5, 3], torch.randint(5, 96, (3, 2))
    ends = [c + t for c, t in zip(cached, tails)]
    caches = [RaggedKVCache(target.config, 3, 24, torch.device("cpu")) for _ in range(2)]
    with torch.inference_mode():
        prefill(target, caches[0], tokens, cached)
        caches[0].set_span(16)
        logits = tail_forward(target, caches[0], tokens, tails, drafts)
        order = [1, 0, 2]  # prefill wants rows longest first
        prefill(target, caches[1], tokens, [ends[r] - 1 for r in order], rows=torch.tensor(order))
        caches[1].set_span(16)
        last = tokens.gather(1, torch.tensor(ends)[:, None] - 1)
        expected = model_forward(target, caches[1], torch.cat([last, drafts], dim=1))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    for b, end in enumerate(ends):
        for one, other in zip(caches[0].key_buffers, caches[1].key_buffers):
            torch.testing.assert_close(one[b, :, : end + 2], other[b, :, : end + 2], atol=1e-4, rtol=1e-4)


def test_tail_logits_are_right_when_the_output_head_module_is_not_called(monkeypatch):
    """A model whose logits do not come from calling the module ``get_output_embeddings()`` returns (so the hook
    that keeps each row's columns never runs): the first step gathers them from every column instead."""
    target = tiny_causal_lm("llama", seed=0)
    prompts = _ragged_prompts(4, 96, 13, seed=22)
    expected = [greedy_reference(target, p, 6, []) for p in prompts]
    unused = torch.nn.Linear(target.config.hidden_size, target.config.vocab_size, bias=False)
    monkeypatch.setattr(target, "get_output_embeddings", lambda: unused)
    assert autoregressive_generate_batch(prompts, target, max_gen_len=6, eos_tokens_id=[]) == expected
    outputs, _, _ = speculative_generate_batch(prompts, NGramDrafter(), target, gamma=3, max_gen_len=6,
                                               eos_tokens_id=[])
    assert outputs == expected


def test_ragged_cache_after_pruning_equals_fresh_forward(llama_pair):
    target, _ = llama_pair
    torch.manual_seed(0)
    lengths = [3, 9, 1, 6]
    seqs = [torch.randint(0, 96, (max(lengths) + 6,)).tolist() for _ in lengths]
    cache = RaggedKVCache(target.config, len(lengths), 32, torch.device("cpu"))
    cache.set_lens(torch.zeros(4, dtype=torch.int64))
    width = max(lengths)
    ids = torch.tensor([s[:width] for s in seqs])
    cache.set_span(width)
    with torch.no_grad():
        model_forward(target, cache, ids)
        cache.set_lens(torch.tensor(lengths))
        # A verify-like forward of 5 tokens, then prune rows back by different amounts (0..5 kept).
        step = torch.tensor([s[n : n + 5] for s, n in zip(seqs, lengths)])
        cache.set_span(width + 5)
        model_forward(target, cache, step)
        kept = torch.tensor([0, 5, 2, 3])
        cache.set_lens(torch.tensor(lengths) + kept)
    for b, s in enumerate(seqs):
        n = lengths[b] + int(kept[b])
        with torch.no_grad():
            fresh = target(torch.tensor([s[:n]]), use_cache=True).past_key_values
        # Same entries up to fp32 rounding (a batched, masked forward sums in another order than a single row).
        for layer in range(target.config.num_hidden_layers):
            for buffers, fresh_layer in ((cache.key_buffers, fresh.layers[layer].keys), (cache.value_buffers,
                                                                                     fresh.layers[layer].values)):
                torch.testing.assert_close(buffers[layer][b, :, :n], fresh_layer[0], atol=1e-4, rtol=1e-4)


def _exact_first_two(model, prompt: list[int], processor) -> torch.Tensor:
    """Exact joint distribution of the first two sampled tokens, by enumeration: ``(V, V)``."""
    with torch.no_grad():
        p1 = processor.probs(model(torch.tensor([prompt])).logits[0, -1])
        v = p1.shape[0]
        seqs = torch.tensor([prompt + [t] for t in range(v)])
        p2 = processor.probs(model(seqs).logits[:, -1])
    return p1[:, None] * p2


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value; cells with small expected counts are merged into one."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        assert obs[-1] == 0, "a token with probability 0 was sampled"
        obs, exp = obs[:-1], exp[:-1]
    return float(scipy_stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


# Each goodness-of-fit test below rejects at p < 1e-4: with fixed seeds the outcome is deterministic, and for a
# correct sampler the chance that a given seed fails is 1e-4 per test (4 tests: under 5e-4 in all).
GOF_ALPHA = 1e-4


@pytest.mark.parametrize(
    "processor", [MultinomialProcessor(1.0), TopKNucleusProcessor(0.8, top_k=6, top_p=0.9)], ids=["plain", "topk-topp"]
)
def test_sampled_first_two_tokens_follow_target_distribution(processor):
    target = tiny_causal_lm("llama", vocab_size=8, seed=20, init_std=0.15)
    draft = tiny_causal_lm("llama", vocab_size=8, seed=21, init_std=0.15, layers=1)
    prompt = [1, 4, 2]
    n = 6000
    exact = _exact_first_two(target, prompt, processor)
    outputs, _, stats = speculative_generate_batch(
        [prompt] * n, draft, target, gamma=2, logits_processor=processor, max_gen_len=2, eos_tokens_id=[], seed=123
    )
    pairs = torch.tensor([o[:2] for o in outputs])
    counts = torch.zeros(8, 8)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(n), accumulate=True)
    assert 0.0 < stats.acceptance_rate < 1.0  # both branches (accept and recover) are exercised
    assert _chi_square_pvalue(counts, exact) > GOF_ALPHA


def test_sampled_distribution_check_detects_a_wrong_distribution():
    """The same check rejects samples drawn from the draft instead of the target: the test above can fail."""
    processor = MultinomialProcessor(1.0)
    target = tiny_causal_lm("llama", vocab_size=8, seed=20, init_std=0.15)
    draft = tiny_causal_lm("llama", vocab_size=8, seed=21, init_std=0.15, layers=1)
    prompt = [1, 4, 2]
    outputs = autoregressive_generate_batch([prompt] * 6000, draft, processor, max_gen_len=2, eos_tokens_id=[],
                                            seed=123)
    pairs = torch.tensor([o[:2] for o in outputs])
    counts = torch.zeros(8, 8)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(len(outputs)), accumulate=True)
    assert _chi_square_pvalue(counts, _exact_first_two(target, prompt, processor)) < GOF_ALPHA


def test_baseline_sampling_follows_target_distribution():
    processor = MultinomialProcessor(0.7)
    target = tiny_causal_lm("llama", vocab_size=8, seed=20, init_std=0.15)
    prompt = [3]
    outputs = autoregressive_generate_batch([prompt] * 4000, target, processor, max_gen_len=2, eos_tokens_id=[],
                                            seed=7)
    pairs = torch.tensor(outputs)
    counts = torch.zeros(8, 8)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(len(outputs)), accumulate=True)
    assert _chi_square_pvalue(counts, _exact_first_two(target, prompt, processor)) > GOF_ALPHA


def test_seed_makes_sampling_reproducible(llama_pair):
    target, draft = llama_pair
    prompts = _ragged_prompts(4, 96, 10, seed=1)
    a = speculative_generate_batch(prompts, draft, target, logits_processor=MultinomialProcessor(1.0), seed=5)[0]
    b = speculative_generate_batch(prompts, draft, target, logits_processor=MultinomialProcessor(1.0), seed=5)[0]
    assert a == b


def test_stats_are_consistent(llama_pair):
    target, draft = llama_pair
    prompts = _ragged_prompts(5, 96, 12, seed=2)
    outputs, alpha, stats = speculative_generate_batch(prompts, draft, target, gamma=3, max_gen_len=10,
                                                       eos_tokens_id=[], collect_stats=True)
    assert stats.generated == [len(o) for o in outputs] == [10] * 5
    assert stats.generated_tokens == 50
    assert len(stats.acceptance_histogram) == 4
    assert all(0.0 <= a <= 1.0 for a in alpha)
    assert [a / p for a, p in zip(stats.accepted, stats.proposed)] == alpha
    assert set(stats.time_split) == {"prefill", "plan", "draft", "verify", "accept", "commit", "sync"}
    assert stats.time_split["prefill"] > 0
    assert stats.tokens_per_s == stats.generated_tokens / stats.wall_time_s
    assert sum(stats.time_split.values()) <= stats.wall_time_s  # the phases are parts of the call
    assert math.isclose(stats.tokens_per_target_forward,
                        50 / sum(stats.acceptance_histogram), rel_tol=1e-9)


# --- errors, raised before any compute ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompts": []}, "prompts is empty"),
        ({"prompts": [[1, 2], []]}, "prompt 1 is empty"),
        ({"gamma": 0}, "gamma must be an int >= 1 or 'auto', got 0"),
        ({"max_gen_len": 0}, "max_gen_len must be an int >= 1, got 0"),
        ({"prompts": [[1, 96]]}, r"token id 96, expected an int in \[0, 96\)"),
        ({"prompts": [[1, -1]]}, r"token id -1"),
        ({"prompts": [[1] * 250], "max_gen_len": 10}, "prompt 0 has 250 tokens.*max_position_embeddings=256"),
        ({"eos_tokens_id": [3, 500]}, "eos_tokens_id has 500"),
    ],
)
def test_bad_input_raises_before_compute(llama_pair, kwargs, match):
    target, draft = llama_pair
    args = {"prompts": [[1, 2, 3]], "gamma": 2, "max_gen_len": 5}
    args.update(kwargs)
    prompts = args.pop("prompts")
    with pytest.raises(ValueError, match=match):
        speculative_generate_batch(prompts, draft, target, **args)


def test_vocabulary_mismatch_is_an_error(llama_pair):
    target, _ = llama_pair
    other = tiny_causal_lm("llama", vocab_size=100, seed=3)
    with pytest.raises(ValueError, match="draft vocabulary size 100 is larger than the target's 96"):
        speculative_generate_batch([[1, 2]], other, target)


def test_greedy_processor_is_default_and_prompts_may_be_tensors(llama_pair):
    target, draft = llama_pair
    prompts = [torch.tensor([4, 5, 6]), torch.tensor([9])]
    outputs, _, _ = speculative_generate_batch(prompts, draft, target, logits_processor=GreedyProcessor(),
                                               max_gen_len=6, eos_tokens_id=[])
    assert outputs == [greedy_reference(target, p.tolist(), 6, []) for p in prompts]
