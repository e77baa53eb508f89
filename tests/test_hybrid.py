"""The hybrid drafter: rows drafting from n-gram matches and rows drafting from a model in one batch stay exact."""

from __future__ import annotations

import pytest
import torch
from test_engine import GOF_ALPHA, _chi_square_pvalue, _exact_first_two, _ragged_prompts
from test_feature_draft import feature_head
from tiny_models import tiny_causal_lm

from batched_specdec import (
    GreedyProcessor,
    MultinomialProcessor,
    autoregressive_generate_batch,
    speculative_generate_batch,
)
from batched_specdec.drafting import FeatureDrafter, ModelDrafter
from batched_specdec.drafting.hybrid import HybridDrafter
from batched_specdec.drafting.ngram import NGramDrafter

VOCAB = 96


def _copy_and_free_prompts(n: int) -> list[list[int]]:
    """Half the rows repeat a phrase (their n-gram matches are long), half are random (no match)."""
    free = _ragged_prompts(n - n // 2, VOCAB, 30, seed=4)
    phrase = [5, 17, 33, 8, 61, 2, 40, 9]
    return [p if i % 2 else (phrase * 3)[: 10 + i] for i, p in enumerate(free + free[: n // 2])][:n]


@pytest.mark.parametrize("source", ["feature", "model"])
def test_hybrid_greedy_output_is_the_targets(source):
    target = tiny_causal_lm("llama", vocab_size=VOCAB, seed=3, init_std=0.3)
    model = (FeatureDrafter(feature_head(target, seed=1)) if source == "feature"
             else ModelDrafter(tiny_causal_lm("llama", vocab_size=VOCAB, seed=7, layers=1)))  # fmt: skip
    drafter = HybridDrafter(model, NGramDrafter(max_ngram=3))
    prompts = _copy_and_free_prompts(6)
    budgets = [24, 9, 30, 16, 24, 5]
    expected = autoregressive_generate_batch(prompts, target, GreedyProcessor(), max_gen_len=budgets, eos_tokens_id=[])
    rows = {"ngram": 0, "model": 0}
    for gamma in (3, "auto"):
        got, _, stats = speculative_generate_batch(prompts, drafter, target, gamma=gamma, max_gen_len=budgets,
                                                   logits_processor=GreedyProcessor(), eos_tokens_id=[])
        assert got == expected, gamma
        sources = stats.extra["sources"]
        assert sum(s["accepted"] for s in sources.values()) == sum(stats.accepted)
        assert sum(s["proposed"] for s in sources.values()) == sum(stats.proposed)
        for name in rows:
            rows[name] += sources[name]["rows"]
    assert rows["ngram"] > 0 and rows["model"] > 0, rows


def test_hybrid_sampled_rows_of_both_sources_follow_the_target():
    """One batch: rows whose prompt repeats (n-gram drafts, one-hot q) and rows that do not (model drafts, the
    model's q). The first two tokens of each prompt follow the target's exact joint law."""
    processor = MultinomialProcessor(1.0)
    target = tiny_causal_lm("llama", vocab_size=8, seed=20, init_std=0.15)
    drafter = HybridDrafter(ModelDrafter(tiny_causal_lm("llama", vocab_size=8, seed=21, init_std=0.15, layers=1)))
    copy, free = [1, 4, 2, 6, 1, 4, 2, 6, 1, 4], [3, 5, 0]
    n = 4000
    outputs, _, stats = speculative_generate_batch([copy, free] * n, drafter, target, gamma=2,
                                                   logits_processor=processor, max_gen_len=2, eos_tokens_id=[],
                                                   seed=5)  # fmt: skip
    sources = stats.extra["sources"]
    assert sources["ngram"]["rows"] >= n and sources["model"]["rows"] >= n, sources
    assert 0.0 < stats.acceptance_rate < 1.0
    for k, prompt in enumerate((copy, free)):
        pairs = torch.tensor([o[:2] for o in outputs[k::2]])
        observed = torch.zeros(8, 8)
        observed.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(n), accumulate=True)
        assert _chi_square_pvalue(observed, _exact_first_two(target, prompt, processor)) > GOF_ALPHA, prompt


def test_hybrid_rejects_a_match_length_no_ngram_can_have():
    model = ModelDrafter(tiny_causal_lm("llama", vocab_size=8, seed=21, layers=1))
    with pytest.raises(ValueError, match="min_match 4 is longer than the n-gram source's max_ngram 3"):
        HybridDrafter(model, NGramDrafter(max_ngram=3), min_match=4)
    with pytest.raises(ValueError, match="min_match must be an int >= 1, got 0"):
        HybridDrafter(model, min_match=0)


def test_next_sources_names_each_rows_source_and_propose_keeps_to_it():
    """``next_sources`` (before the plan) says which rows draft from their match; ``propose`` then proposes exactly
    what it proposes without being asked first, for any draft length up to the one the choice was made for."""
    model = ModelDrafter(tiny_causal_lm("llama", vocab_size=VOCAB, seed=7, layers=1))
    prompts = _copy_and_free_prompts(4)
    width = max(len(p) for p in prompts) + 8  # room for the drafts
    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    lens = torch.tensor([len(p) for p in prompts])
    for gamma in (1, 3, 5):
        plain, asked = HybridDrafter(model), HybridDrafter(model)
        for drafter in (plain, asked):
            drafter.start(tokens, lens, width)
        sources = asked.next_sources(tokens, lens, width, 5)
        assert sources.tolist() == [1, 0, 1, 0]  # the repeating rows take their match (SOURCES: model, ngram)
        a = plain.propose(tokens, lens, gamma, GreedyProcessor(), width)
        b = asked.propose(tokens, lens, gamma, GreedyProcessor(), width)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.num_tokens, b.num_tokens)
        assert torch.equal(a.source, b.source) and b.source.tolist() == sources.tolist()
    stale, fresh = HybridDrafter(model), HybridDrafter(model)
    for drafter in (stale, fresh):
        drafter.start(tokens, lens, width)
    stale.next_sources(tokens, lens, width, 5)  # a choice for these lengths, not for the ones proposed from below
    longer = lens + torch.tensor([0, 1, 0, 0])
    assert torch.equal(stale.propose(tokens, longer, 3, GreedyProcessor(), width).tokens,
                       fresh.propose(tokens, longer, 3, GreedyProcessor(), width).tokens)


def test_gamma_auto_keeps_acceptance_per_source(monkeypatch):
    """With a hybrid drafter, gamma auto plans each step from the acceptance of the source each row drafts from:
    the controller's evidence ids are (row, source), and a row's n-gram and model steps fill different ones.
    (Every step drafts 3 here, whatever the plan's costs say, so that both sources are seen.)"""
    from batched_specdec.controller import AdaptiveSpeculation, StepPlan

    seen = []
    original = AdaptiveSpeculation.observe

    def observe(self, row_ids, proposed, accepted, *args, **kwargs):
        seen.append((self.num_sources, row_ids.clone(), proposed.clone()))
        return original(self, row_ids, proposed, accepted, *args, **kwargs)

    monkeypatch.setattr(AdaptiveSpeculation, "observe", observe)
    monkeypatch.setattr(AdaptiveSpeculation, "plan", lambda self, row_ids, live, remaining=None: StepPlan(3, None))
    target = tiny_causal_lm("llama", vocab_size=VOCAB, seed=3, init_std=0.3)
    drafter = HybridDrafter(ModelDrafter(tiny_causal_lm("llama", vocab_size=VOCAB, seed=7, layers=1)))
    prompts = _copy_and_free_prompts(4)
    expected = autoregressive_generate_batch(prompts, target, GreedyProcessor(), max_gen_len=24, eos_tokens_id=[])
    got, _, stats = speculative_generate_batch(prompts, drafter, target, gamma="auto", max_gen_len=24,
                                               logits_processor=GreedyProcessor(), eos_tokens_id=[])
    assert got == expected
    assert seen and all(n == 2 for n, _, _ in seen)
    drafted = torch.cat([ids[p > 0] for _, ids, p in seen])
    by_source = torch.bincount(drafted % 2, minlength=2).tolist()  # SOURCES: model (0), n-gram (1)
    assert by_source == [stats.extra["sources"]["model"]["rows"], stats.extra["sources"]["ngram"]["rows"]]
    assert min(by_source) > 0 and set((drafted // 2).tolist()) <= set(range(len(prompts)))
