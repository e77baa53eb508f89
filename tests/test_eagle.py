"""EAGLE-1 and EAGLE-3 heads in their public layouts: loaded logits equal the layouts' forwards re-implemented in
plain torch, decoding with them is exact (greedy equal to target-only, sampled distributed as the target), and a
checkpoint that does not fit its target, or whose weights do not all load, is refused by name. CPU, tiny random
targets of the Llama and Qwen3 families, checkpoints written by the tests (tests/eagle_checkpoints.py)."""

from __future__ import annotations

import pytest
import torch
from eagle_checkpoints import (
    reference_eagle1,
    reference_eagle3,
    target_features,
    write_eagle1,
    write_eagle3,
)
from test_engine import GOF_ALPHA, _chi_square_pvalue, _exact_first_two, _ragged_prompts
from tiny_models import greedy_reference, tiny_causal_lm

from batched_specdec import MultinomialProcessor, speculative_generate_batch
from batched_specdec.drafting import HybridDrafter, NGramDrafter, as_drafter
from batched_specdec.drafting.eagle import EagleDraft, default_feature_layers, load_eagle_draft
from batched_specdec.models import ModelLoadError, load_draft

VOCAB = 96
LAYERS = 6  # enough for EAGLE-3's default layers (2, 3, 3)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def target(request):
    return tiny_causal_lm(request.param, vocab_size=VOCAB, layers=LAYERS, hidden=32, seed=3, init_std=0.5)


def _weights(path) -> dict:
    from safetensors.torch import load_file

    file = path / "model.safetensors"
    return load_file(str(file)) if file.is_file() else torch.load(path / "pytorch_model.bin", weights_only=True)


@pytest.mark.parametrize("layer_ids", [None, (1, 3, 5)])
@pytest.mark.parametrize("draft_vocab", [VOCAB, 40])
def test_eagle3_logits_equal_the_layouts_forward(target, tmp_path, layer_ids, draft_vocab):
    path = write_eagle3(tmp_path / "e3", target, draft_vocab=draft_vocab, layer_ids=layer_ids, seed=1)
    draft = load_draft(str(path), target)
    assert isinstance(draft, EagleDraft) and draft.layout == "eagle3"
    assert draft.feature_layers == (layer_ids or default_feature_layers(LAYERS))
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = target_features(target, tokens, draft.feature_layers)
        got = draft(input_ids=tokens, features=feats, use_cache=False).logits
        want, prenorm = reference_eagle3(_weights(path), target, tokens, feats)
        # Drafts after the first read the head's own pre-norm output, H wide, without fc.
        own = draft(input_ids=tokens, features=prenorm, use_cache=False).logits
        want_own = _eagle3_on_own(_weights(path), target, tokens, prenorm)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and int((~torch.isinf(got[0, 0])).sum()) == draft_vocab
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(own[~torch.isinf(own)], want_own[~torch.isinf(want_own)], rtol=1e-5, atol=1e-5)


def _eagle3_on_own(w, target, tokens, own):
    """The reference with ``fc`` skipped: the pairs read the head's own features."""
    eye = {**w, "fc.weight": torch.eye(own.shape[-1])}
    return reference_eagle3(eye, target, tokens, own)[0]


@pytest.mark.parametrize("fmt,bias", [("bin", True), ("safetensors", False)])
def test_eagle1_logits_equal_the_layouts_forward(target, tmp_path, fmt, bias):
    path = write_eagle1(tmp_path / "e1", target, fmt=fmt, bias=bias, seed=2)
    draft = load_draft(str(path), target)
    assert isinstance(draft, EagleDraft) and draft.layout == "eagle1" and draft.feature_layers is None
    tokens = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = target_features(target, tokens)
        got = draft(input_ids=tokens, features=feats, use_cache=False).logits
        want, _ = reference_eagle1(_weights(path), target, tokens, feats)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_eagle3_head_with_its_own_embedding_reads_it(target, tmp_path):
    path = write_eagle3(tmp_path / "e3", target, embed=True, seed=4)
    draft = load_eagle_draft(target, path)
    weights = _weights(path)
    assert torch.equal(draft.get_input_embeddings().weight, weights["embed_tokens.weight"])
    tokens = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = target_features(target, tokens, draft.feature_layers)
        got = draft(input_ids=tokens, features=feats, use_cache=False).logits
    reference = target.get_input_embeddings().weight.data.clone()
    try:  # the reference reads the target's embedding: give it the head's
        target.get_input_embeddings().weight.data.copy_(weights["embed_tokens.weight"])
        want, _ = reference_eagle3(weights, target, tokens, feats)
    finally:
        target.get_input_embeddings().weight.data.copy_(reference)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["eagle1", "eagle3"])
@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_eagle_heads_decode_greedy_exactly(target, tmp_path, layout, gamma):
    write = write_eagle3 if layout == "eagle3" else write_eagle1
    draft = load_draft(str(write(tmp_path / layout, target, seed=gamma)), target)
    prompts = _ragged_prompts(6, VOCAB, 20, seed=gamma)
    eos = greedy_reference(target, prompts[1], 16, eos=[])[5]
    expected = [greedy_reference(target, p, 16, eos=[eos]) for p in prompts]
    got, _, stats = speculative_generate_batch(prompts, draft, target, gamma=gamma, max_gen_len=16,
                                               eos_tokens_id=[eos])
    assert got == expected
    assert sum(stats.proposed) > 0


def test_an_eagle3_head_in_continuous_batching_and_as_the_hybrids_model_source(target, tmp_path):
    """More prompts than rows (staged prefills, admissions: the fused features of entering prompts) and the hybrid
    drafter, which hands the target's layers through to the head."""
    from batched_specdec.options import resolve_options
    from batched_specdec.processors import GreedyProcessor
    from batched_specdec.runner import decode_prompt_set

    draft = load_draft(str(write_eagle3(tmp_path / "e3", target, draft_vocab=64, seed=7)), target)
    prompts = _ragged_prompts(9, VOCAB, 20, seed=9)
    expected = [greedy_reference(target, p, 10, eos=[]) for p in prompts]
    for drafter in (as_drafter(draft, VOCAB, prefill_chunk=8),
                    HybridDrafter(as_drafter(draft, VOCAB, prefill_chunk=8), NGramDrafter(max_ngram=3))):
        assert drafter.target_hidden == draft.feature_layers
        options = resolve_options(target, logits_processor=GreedyProcessor(), gamma=3, eos_tokens_id=[])
        result = decode_prompt_set(target, drafter, prompts, [10] * len(prompts), options, batch_size=3)
        assert result.outputs == expected
        assert sum(result.stats.proposed) > 0


def test_eagle3_sampled_first_two_tokens_follow_the_target(tmp_path):
    target = tiny_causal_lm("llama", vocab_size=8, layers=LAYERS, seed=20, init_std=0.15)
    draft = load_draft(str(write_eagle3(tmp_path / "e3", target, draft_vocab=5, seed=3, std=0.2)), target)
    processor = MultinomialProcessor(1.0)
    prompt, n = [1, 4, 2], 6000
    outputs, _, stats = speculative_generate_batch([prompt] * n, draft, target, gamma=2, logits_processor=processor,
                                                   max_gen_len=2, eos_tokens_id=[], seed=11)
    pairs = torch.tensor([o[:2] for o in outputs])
    counts = torch.zeros(8, 8).index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(n), accumulate=True)
    assert 0.0 < stats.acceptance_rate < 1.0
    assert _chi_square_pvalue(counts, _exact_first_two(target, prompt, processor)) > GOF_ALPHA


def _refusal(tmp_path, target, write, match, **kwargs):
    path = write(tmp_path / "bad", target, **kwargs)
    with pytest.raises(ModelLoadError, match=match):
        load_draft(str(path), target)


@pytest.mark.parametrize("case,kwargs,match", [
    ("missing weight", {"drop": ("norm.weight",)}, r"missing \['norm.weight'\]"),
    ("unexpected weight", {"add": {"extra.weight": torch.zeros(2)}}, r"unexpected \['extra.weight'\]"),
    ("wrong shape", {"add": {"midlayer.hidden_norm.weight": torch.ones(7)}}, r"layers.0.hidden_norm.weight \(7,\)"),
    ("layers outside", {"layer_ids": (1, 3, 6)}, r"reads target layers \[1, 3, 6\]; this target has 6 layers"),
    ("d2t shape", {"draft_vocab": 40, "add": {"d2t": torch.zeros(39, dtype=torch.int64)}}, r"d2t of shape \(39,\)"),
    ("d2t range", {"draft_vocab": 40, "add": {"d2t": torch.full((40,), 90, dtype=torch.int64)}}, "outside 0..95"),
])
def test_an_eagle3_checkpoint_that_does_not_load_is_refused_by_name(target, tmp_path, case, kwargs, match):
    _refusal(tmp_path, target, write_eagle3, match, **kwargs)


def test_an_eagle1_checkpoint_with_an_input_norm_is_refused_not_half_loaded(target, tmp_path):
    _refusal(tmp_path, target, write_eagle1, r"unexpected \['layers.0.input_layernorm.weight'\]",
             add={"layers.0.input_layernorm.weight": torch.ones(32)})


@pytest.mark.parametrize("other,match", [
    ({"vocab_size": 120}, "vocab_size=96 and hidden_size=32; this target has vocab_size=120"),
    ({"hidden": 48}, "hidden_size=32; this target has vocab_size=96 and hidden_size=48"),
])
def test_a_head_made_for_another_target_names_what_differs(tmp_path, other, match):
    made_for = tiny_causal_lm("llama", vocab_size=VOCAB, layers=LAYERS, hidden=32, seed=3)
    path = write_eagle3(tmp_path / "e3", made_for)
    kwargs = {"vocab_size": VOCAB, "hidden": 32, **other}
    other_target = tiny_causal_lm("llama", layers=LAYERS, seed=5, **kwargs)
    with pytest.raises(ModelLoadError, match=match):
        load_draft(str(path), other_target)


def test_an_eagle_directory_without_weights_or_target_is_an_error(target, tmp_path):
    path = write_eagle3(tmp_path / "e3", target)
    with pytest.raises(ModelLoadError, match="is a draft head: it needs the target model"):
        load_draft(str(path), None)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match="is unreadable"):
        load_draft(str(path), target)


@pytest.mark.parametrize("layout", ["eagle1", "eagle3"])
def test_the_drafter_keeps_the_targets_features_of_the_heads_layers(target, tmp_path, layout):
    """The features the session hands the drafter (prefill chunks, verify forwards) are the target's own: for every
    committed position, equal to a plain HF forward's final hidden state (EAGLE-1) or its fused layers (EAGLE-3)."""
    write = write_eagle3 if layout == "eagle3" else write_eagle1
    draft = load_draft(str(write(tmp_path / layout, target, seed=5)), target)
    drafter = as_drafter(draft, VOCAB, prefill_chunk=4)
    prompt = _ragged_prompts(1, VOCAB, 11, seed=3)[0] + [5, 6, 7]
    out, _, stats = speculative_generate_batch([prompt], drafter, target, gamma=3, max_gen_len=12, eos_tokens_id=[])
    seq = torch.tensor([prompt + out[0]])
    with torch.no_grad():
        want = target_features(target, seq, draft.feature_layers)[0, : seq.shape[1] - 1]
    assert sum(stats.proposed) > 0 and drafter.features.shape[-1] == draft.feature_size
    torch.testing.assert_close(drafter.features[0, : seq.shape[1] - 1], want, rtol=1e-5, atol=1e-5)
