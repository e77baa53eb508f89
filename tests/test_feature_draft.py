"""The feature drafter (EAGLE-style, reading the target's hidden states): exactness, its bookkeeping of features
and of its own cache against a no-cache reference, and sampled distributions. CPU, tiny random models."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import GOF_ALPHA, _chi_square_pvalue, _exact_first_two, _ragged_prompts
from tiny_models import greedy_reference, tiny_causal_lm

from batched_specdec import (
    MultinomialProcessor,
    autoregressive_generate_batch,
    speculative_generate_batch,
)
from batched_specdec.controller import StaticSpeculation, StepPlan
from batched_specdec.decode import session as engine
from batched_specdec.drafting import FeatureDrafter
from batched_specdec.drafting.heads import FeatureHeadDraft
from batched_specdec.training.save import draft_config_from_target, init_from_target

VOCAB = 96


def feature_head(target, seed: int = 0, vocab_ids=None) -> FeatureHeadDraft:
    """An untrained one-layer feature head for ``target`` (random layer, fc = embedding + feature)."""
    torch.manual_seed(seed)
    ids = torch.arange(target.config.vocab_size) if vocab_ids is None else vocab_ids
    draft = FeatureHeadDraft(draft_config_from_target(target.config, 1), target, ids)
    init_from_target(draft, target, None)
    return draft.eval().requires_grad_(False)


def bigram_pair(seed: int = 0):
    """A one-layer target whose attention output is zeroed (its next token depends on the current token only),
    and a feature head that is that target shifted by one position: at pair ``(f_i, x_{i+1})`` it reads only
    ``x_{i+1}`` and computes exactly the target's feature at ``i + 1``. It should accept every draft."""
    target = tiny_causal_lm("llama", vocab_size=VOCAB, layers=1, hidden=32, seed=seed, init_std=0.5)
    with torch.no_grad():
        target.model.layers[0].self_attn.o_proj.weight.zero_()
    draft = feature_head(target)
    init_from_target(draft, target, [0])
    width = target.config.hidden_size
    with torch.no_grad():
        draft.fc.weight.copy_(torch.cat([torch.eye(width), torch.zeros(width, width)], dim=1))
    return target, draft


@pytest.fixture(scope="module")
def target():
    return tiny_causal_lm("llama", vocab_size=VOCAB, layers=2, hidden=32, seed=3, init_std=0.5)


@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 8])
def test_untrained_head_is_exact_on_ragged_prompts(target, gamma):
    prompts = _ragged_prompts(6, VOCAB, 24, seed=gamma)
    eos = greedy_reference(target, prompts[1], 20, eos=[])[6]  # row 1 (at least) stops early: rows compact
    expected = [greedy_reference(target, p, 20, eos=[eos]) for p in prompts]
    got, _, stats = speculative_generate_batch(prompts, feature_head(target), target, gamma=gamma,
                                               max_gen_len=20, eos_tokens_id=[eos])
    assert got == expected and len(got[1]) <= 7
    assert sum(stats.proposed) > 0


def test_prompts_within_one_chunk_cost_a_feature_drafter_no_prefill_forward(target):
    """The first step writes the prompt tails and drafts nothing (the head drafts from the hidden states that forward
    writes): every target forward is a step's, and outputs equal the reference loop."""
    prompts = _ragged_prompts(5, VOCAB, 20, seed=4)
    expected = [greedy_reference(target, p, 12, eos=[]) for p in prompts]
    forwards = []
    handle = target.register_forward_hook(lambda *args: forwards.append(1))
    try:
        got, _, stats = speculative_generate_batch(prompts, feature_head(target), target, gamma=3, max_gen_len=12,
                                                   eos_tokens_id=[])
    finally:
        handle.remove()
    assert got == expected
    assert len(forwards) == stats.steps and sum(stats.proposed) > 0


def test_copying_head_accepts_every_draft_and_stops_rows_at_eos():
    target, draft = bigram_pair()
    prompts = _ragged_prompts(5, VOCAB, 30, seed=4)
    free = autoregressive_generate_batch(prompts, target, max_gen_len=40, eos_tokens_id=[])
    eos = free[2][11]  # row 2 stops mid-way (others may too): rows finish at different steps, so rows compact
    expected = autoregressive_generate_batch(prompts, target, max_gen_len=40, eos_tokens_id=[eos])
    got, alpha, stats = speculative_generate_batch(prompts, draft, target, gamma=5, max_gen_len=40,
                                                   eos_tokens_id=[eos])
    assert got == expected
    assert len(got[2]) <= 12 and len({len(g) for g in got}) > 1
    # The one-token prompt (row 0) proposes nothing in its first step (no feature yet); every other draft lands.
    assert stats.acceptance_rate > 0.97, alpha


class CheckingFeatureDrafter(FeatureDrafter):
    """Checks at every proposal that the features it holds are the target's no-cache hidden states of the
    committed tokens, and that ``q`` of its first two drafts equals a no-cache draft forward over the real pairs
    (then over its own predicted feature): its feature buffer and ragged cache are bookkept right."""

    def __init__(self, model, target):
        super().__init__(model)
        self.target, self.checked = target, 0

    def propose(self, token_buffer, seq_lens, gamma, logits_processor, max_seq_len, draws=None):
        proposal = super().propose(token_buffer, seq_lens, gamma, logits_processor, max_seq_len, draws)
        for b, n in enumerate(seq_lens.tolist()):
            if n < 2:
                continue
            seq = token_buffer[b, :n][None]
            out = self.target(seq, output_hidden_states=True)
            real = out.hidden_states[-1][0, : n - 1]
            torch.testing.assert_close(self.features[b, : n - 1], real, atol=1e-4, rtol=1e-4)
            pos = torch.arange(n - 1)[None]
            ref = self.model(input_ids=seq[:, 1:], features=real[None], position_ids=pos, use_cache=False)
            q1 = logits_processor.probs(ref.logits[0, -1])
            torch.testing.assert_close(proposal.probs[b, 0], q1, atol=1e-4, rtol=1e-4)
            if gamma > 1:
                hidden = self.model.hidden_states(seq[:, 1:], features=real[None], position_ids=pos, use_cache=False)
                ids = torch.cat([seq[:, 1:], proposal.tokens[b, :1][None]], dim=1)
                feats = torch.cat([real[None], hidden[:, -1:]], dim=1)
                ref2 = self.model(input_ids=ids, features=feats, position_ids=torch.arange(n)[None], use_cache=False)
                q2 = logits_processor.probs(ref2.logits[0, -1])
                torch.testing.assert_close(proposal.probs[b, 1], q2, atol=1e-4, rtol=1e-4)
            self.checked += 1
        return proposal


class AlternatingSpeculation(StaticSpeculation):
    """Plans 3 drafts, then two steps without drafts (plain target steps), and so on."""

    def __init__(self) -> None:
        super().__init__(3)
        self.step = 0

    def plan(self, row_ids, live, remaining=None):
        self.step += 1
        return StepPlan(3 if self.step % 3 == 1 else 0)


@pytest.mark.parametrize("schedule", ["static", "with-target-only-steps"])
def test_features_and_draft_cache_match_a_no_cache_reference(target, schedule, monkeypatch):
    """Sampled (so q is returned), ragged prompts longer than the catch-up chunk, rows finishing at different
    steps (compaction), and steps without drafts that the drafter must catch up on."""
    if schedule != "static":
        monkeypatch.setattr(engine, "make_controller", lambda *args, **kwargs: AlternatingSpeculation())
    prompts = _ragged_prompts(5, VOCAB, 40, seed=9)
    drafter = CheckingFeatureDrafter(feature_head(target, seed=1), target)
    drafter.prefill_chunk = 16  # the prompt catch-up goes in several chunks
    out, _, _ = speculative_generate_batch(prompts, drafter, target, gamma=3,
                                           logits_processor=MultinomialProcessor(1.0),
                                           max_gen_len=[12, 30, 5, 30, 18], eos_tokens_id=[], seed=0, prefill_chunk=16)
    assert [len(o) for o in out] == [12, 30, 5, 30, 18]
    assert drafter.checked > 10


def test_sampled_first_two_tokens_follow_target_distribution():
    processor = MultinomialProcessor(1.0)
    target = tiny_causal_lm("llama", vocab_size=8, seed=20, init_std=0.15)
    prompt = [1, 4, 2]
    n = 6000
    outputs, _, stats = speculative_generate_batch([prompt] * n, feature_head(target, seed=5), target, gamma=2,
                                                   logits_processor=processor, max_gen_len=2, eos_tokens_id=[],
                                                   seed=11)
    pairs = torch.tensor([o[:2] for o in outputs])
    counts = torch.zeros(8, 8)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(n), accumulate=True)
    assert 0.0 < stats.acceptance_rate < 1.0
    assert _chi_square_pvalue(counts, _exact_first_two(target, prompt, processor)) > GOF_ALPHA


def test_feature_head_needs_features_of_the_right_shape(target):
    draft = feature_head(target)
    with pytest.raises(ValueError, match="needs features of shape"):
        draft(input_ids=torch.tensor([[1, 2]]), use_cache=False)
    with pytest.raises(ValueError, match="needs features of shape"):
        draft(input_ids=torch.tensor([[1, 2]]), features=torch.zeros(1, 3, 32), use_cache=False)


@pytest.mark.parametrize("kind", ["feature", "eagle3"])
def test_unrolled_training_passes_see_what_the_drafts_of_a_step_see(target, kind):
    """Pass m of the training-time test at pair i must equal the m-th draft of a step whose last committed pair is
    i - m + 1: a no-cache forward over the real pairs up to there, then the head's own predicted features (for an
    EAGLE-3 head, the real pairs' fused features go through its fc, its own do not)."""
    from batched_specdec.training.feature import unrolled_features

    if kind == "eagle3":
        from batched_specdec.training.eagle3 import build_eagle3_draft

        torch.manual_seed(2)
        draft = build_eagle3_draft(target, torch.arange(0, VOCAB, 2), feature_layers=(0, 1, 1))
        with torch.no_grad():
            for p in draft.parameters():
                p.add_(0.1 * torch.randn_like(p))
    else:
        draft = feature_head(target, seed=2)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = target.model(ids, output_hidden_states=True)
        feats = out.last_hidden_state if kind == "feature" else torch.cat([out.hidden_states[i] for i in (0, 1, 1)], -1)
        tokens, inputs = ids[:, 1:], feats[:, :-1]
        passes = list(unrolled_features(draft, tokens, inputs, 3))
        inputs = draft.project_features(inputs)  # in the head's width, as its own predictions
        for m, i in [(2, 5), (3, 7), (3, 12)]:
            c = i - m + 1  # the step's last committed pair
            pair_feats, pair_tokens = [inputs[:, : c + 1]], [tokens[:, : c + 1]]
            for j in range(1, m):
                seq_feats = torch.cat(pair_feats, dim=1)
                out = draft.hidden_states(torch.cat(pair_tokens, dim=1), features=seq_feats, use_cache=False)
                pair_feats.append(out[:, -1:])
                pair_tokens.append(tokens[:, c + j : c + j + 1])
            ref = draft.hidden_states(torch.cat(pair_tokens, dim=1), features=torch.cat(pair_feats, dim=1),
                                      use_cache=False)[:, -1]
            torch.testing.assert_close(passes[m - 1][:, i], ref, atol=1e-4, rtol=1e-4)


class LateSpeculation(StaticSpeculation):
    """No drafts for the first ``quiet`` steps, then 3 every step."""

    def __init__(self, quiet: int) -> None:
        super().__init__(3)
        self.quiet, self.step = quiet, 0

    def plan(self, row_ids, live, remaining=None):
        self.step += 1
        return StepPlan(0 if self.step <= self.quiet else 3)


@pytest.mark.parametrize("kind", ["feature", "model"])
def test_a_long_catch_up_in_continuous_batching_stays_inside_the_draft_cache(target, kind, monkeypatch):
    """Continuous batching with many prompts entering and no drafts for a long stretch: what the drafter has to catch
    up on adds up past the cache's capacity (prefills of every prompt that entered, target-only steps). The first
    proposal after it must write only inside the cache (it once wrote past it: an index error) and stay exact."""
    from batched_specdec.options import resolve_options
    from batched_specdec.processors import GreedyProcessor
    from batched_specdec.runner import decode_prompt_set

    monkeypatch.setattr(engine, "make_controller", lambda *args, **kwargs: LateSpeculation(40))
    prompts = _ragged_prompts(14, VOCAB, 24, seed=5)
    budgets = [6] * len(prompts)
    from batched_specdec.drafting import as_drafter

    model = feature_head(target, seed=2) if kind == "feature" else \
        tiny_causal_lm("llama", vocab_size=VOCAB, layers=1, hidden=32, seed=7)
    drafter = as_drafter(model, VOCAB)
    from batched_specdec import ragged_cache

    scatter = ragged_cache.scatter_kv_at_offsets

    def inside(key_cache, value_cache, key_states, value_states, lens, **kwargs):  # every write lands in the buffer
        assert int((lens + key_states.shape[2]).max()) <= key_cache.shape[2], (lens.tolist(), key_states.shape)
        return scatter(key_cache, value_cache, key_states, value_states, lens, **kwargs)

    monkeypatch.setattr(ragged_cache, "scatter_kv_at_offsets", inside)
    options = resolve_options(target, logits_processor=GreedyProcessor(), gamma=3, eos_tokens_id=[])
    result = decode_prompt_set(target, drafter, prompts, budgets, options, batch_size=2)
    assert result.outputs == [greedy_reference(target, p, 6, eos=[]) for p in prompts]
    assert sum(result.stats.proposed) > 0  # the drafter did propose after the quiet stretch


class ScriptedSpeculation(StaticSpeculation):
    """Plans the draft lengths of ``script`` in turn (then 0)."""

    def __init__(self, script: list[int]) -> None:
        super().__init__(max(script + [1]))
        self.script, self.step = script, 0

    def plan(self, row_ids, live, remaining=None):
        self.step += 1
        return StepPlan(self.script[self.step - 1] if self.step <= len(self.script) else 0)


@pytest.mark.parametrize("kind", ["feature", "model", "hybrid", "ngram"])
@settings(derandomize=True, deadline=None, max_examples=12)
@given(runs=st.lists(st.tuples(st.integers(0, 15), st.integers(1, 4)), min_size=1, max_size=6), slots=st.integers(1, 3),
       lens=st.lists(st.integers(1, 30), min_size=2, max_size=10), budget=st.integers(1, 8), period=st.integers(0, 4))
def test_any_plan_sequence_in_continuous_batching_is_exact_and_writes_inside_the_caches(runs, slots, lens, budget,
                                                                                       period, kind):
    """Random draft-length sequences (stretches of up to 15 steps without drafts, then a draft of 1-4) while prompts
    pass through the slots, for every kind of drafter (feature draft, draft model, the hybrid of a feature draft and
    n-grams, n-grams alone): outputs equal greedy decoding and every KV write of the target and the draft lands inside
    its buffer. Prompts repeat a pattern of ``period`` tokens (0: none), so that the n-gram source finds matches."""
    script = [k for quiet, length in runs for k in [0] * quiet + [length]]
    from batched_specdec import ragged_cache
    from batched_specdec.options import resolve_options
    from batched_specdec.processors import GreedyProcessor
    from batched_specdec.runner import decode_prompt_set

    target = _property_target()
    g = torch.Generator().manual_seed(sum(lens))
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lens]
    if period:
        prompts = [(p[:period] * n)[:n] for p, n in zip(prompts, lens)]
    drafter = _property_drafter(target, kind)
    scatter = ragged_cache.scatter_kv_at_offsets

    def inside(key_cache, value_cache, key_states, value_states, lens, **kwargs):
        assert int((lens + key_states.shape[2]).max()) <= key_cache.shape[2], (lens.tolist(), key_states.shape)
        return scatter(key_cache, value_cache, key_states, value_states, lens, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ragged_cache, "scatter_kv_at_offsets", inside)
        mp.setattr(engine, "make_controller", lambda *args, **kwargs: ScriptedSpeculation(script))
        # Prefill and catch-up chunks of 8 positions: a catch-up wider than a chunk takes the chunked path.
        options = resolve_options(target, logits_processor=GreedyProcessor(), gamma=max(script + [1]),
                                  eos_tokens_id=[], prefill_chunk=8)
        result = decode_prompt_set(target, drafter, prompts, [budget] * len(prompts), options, batch_size=slots)
    assert result.outputs == [greedy_reference(target, p, budget, eos=[]) for p in prompts]


def _property_drafter(target, kind: str):
    """A fresh drafter of ``kind`` for the property test (prefill and catch-up chunks of 8 positions)."""
    from batched_specdec.drafting import HybridDrafter, NGramDrafter, as_drafter

    if kind == "ngram":
        return NGramDrafter(max_ngram=3)
    model = _property_draft() if kind == "model" else feature_head(target, seed=2)
    drafter = as_drafter(model, VOCAB, prefill_chunk=8)
    return HybridDrafter(drafter, NGramDrafter(max_ngram=3)) if kind == "hybrid" else drafter


@functools.cache
def _property_target():
    return tiny_causal_lm("llama", vocab_size=VOCAB, layers=2, hidden=32, seed=3, init_std=0.5)


@functools.cache
def _property_draft():
    return tiny_causal_lm("llama", vocab_size=VOCAB, layers=1, hidden=32, seed=7)
