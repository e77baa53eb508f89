"""Engine inputs and outputs (issue 12): EOS and pad defaults from the model, numpy ids, per-row budgets, stats that
stop at EOS, drafts over a prefix of the target's vocabulary, log-probabilities, and every input error.
CPU, float32, tiny random-weight models built here."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_engine import GOF_ALPHA, _chi_square_pvalue, _exact_first_two, _ragged_prompts
from tiny_models import greedy_reference, tiny_causal_lm

from batched_specdec import (
    GreedyProcessor,
    MultinomialProcessor,
    TopKNucleusProcessor,
    TopKProcessor,
    autoregressive_generate_batch,
    speculative_generate_batch,
)

V = 96


@pytest.fixture(scope="module")
def target():
    return tiny_causal_lm("llama", seed=0)


@pytest.fixture(scope="module")
def draft():
    return tiny_causal_lm("llama", seed=1, layers=1)


def _prefix_copy(model, vocab: int):
    """The model with its embedding and output head cut to the first ``vocab`` ids: a draft that agrees with the
    target wherever the target's choice is in its vocabulary."""
    config = copy.deepcopy(model.config)
    config.vocab_size = vocab
    small = type(model)(config).eval()
    cut = {"model.embed_tokens.weight", "lm_head.weight"}
    small.load_state_dict({k: v[:vocab] if k in cut else v for k, v in model.state_dict().items()})
    return small


# --- EOS from the model ------------------------------------------------------------------------------------------

PROMPTS = _ragged_prompts(6, V, 24, seed=4)
GEN = 16


@pytest.fixture(scope="module")
def free_outputs(target):
    """Greedy outputs with no EOS, from which the tests pick tokens the model really emits mid-row."""
    return [greedy_reference(target, p, GEN, []) for p in PROMPTS]


def _mid_row_eos(free: list[list[int]]) -> tuple[int, int]:
    """``(row, token)``: a token that row emits for the first time at its 5th position, so once it is an EOS the
    row stops mid-way with 5 tokens."""
    for i, row in enumerate(free):
        if row[4] not in row[:4]:
            return i, row[4]
    raise AssertionError("no row emits a new token at position 5")


def test_eos_defaults_to_generation_config_list(target, draft, free_outputs, monkeypatch):
    row, eos = _mid_row_eos(free_outputs)
    ids = [95, eos, 94]  # several ids, one of which the model really emits
    monkeypatch.setattr(target.generation_config, "eos_token_id", ids)
    expected = [greedy_reference(target, p, GEN, ids) for p in PROMPTS]
    assert expected[row] == free_outputs[row][:5]  # stops mid-row, EOS included
    assert any(len(e) == GEN for e in expected)  # and other rows run to the budget
    for i, p in enumerate(PROMPTS):  # the same rule as transformers' generate with that generation config
        ids_ = torch.tensor([p])
        hf = target.generate(ids_, attention_mask=torch.ones_like(ids_), do_sample=False, max_new_tokens=GEN,
                             pad_token_id=0)[0, len(p):]
        assert hf.tolist() == expected[i]
    # no eos / pad arguments
    assert speculative_generate_batch(PROMPTS, draft, target, gamma=3, max_gen_len=GEN)[0] == expected
    assert autoregressive_generate_batch(PROMPTS, target, max_gen_len=GEN) == expected
    # [] means no EOS at all; an explicit id replaces the model's
    assert speculative_generate_batch(PROMPTS, draft, target, gamma=3, max_gen_len=GEN, eos_tokens_id=[])[0] == \
        free_outputs
    assert autoregressive_generate_batch(PROMPTS, target, max_gen_len=GEN, eos_tokens_id=np.int64(95)) == \
        [greedy_reference(target, p, GEN, [95]) for p in PROMPTS]


def test_eos_falls_back_to_the_tokenizer(target, draft, free_outputs, monkeypatch):
    row, eos = _mid_row_eos(free_outputs)
    expected = [greedy_reference(target, p, GEN, [eos]) for p in PROMPTS]
    assert len(expected[row]) == 5
    tokenizer = SimpleNamespace(eos_token_id=eos, pad_token_id=None)  # pad None (Llama-3's) is fine
    monkeypatch.setattr(target.generation_config, "eos_token_id", None)
    out, _, _ = speculative_generate_batch(PROMPTS, draft, target, tokenizer, gamma=3, max_gen_len=GEN,
                                           pad_token_id=tokenizer.pad_token_id)
    assert out == expected
    assert autoregressive_generate_batch(PROMPTS, target, max_gen_len=GEN, tokenizer=tokenizer) == expected
    # neither the model nor a tokenizer names one: no EOS
    assert autoregressive_generate_batch(PROMPTS, target, max_gen_len=GEN) == free_outputs
    # the model's generation config comes first
    monkeypatch.setattr(target.generation_config, "eos_token_id", 95)
    assert autoregressive_generate_batch(PROMPTS, target, max_gen_len=GEN, tokenizer=tokenizer) == \
        [greedy_reference(target, p, GEN, [95]) for p in PROMPTS]


def test_numpy_ids_and_any_pad_give_the_same_tokens(target, draft):
    prompts = [np.array([4, 5, 70], dtype=np.int32), np.array([9], dtype=np.uint8), [np.int64(7), np.int16(3)],
               torch.tensor([11, 12], dtype=torch.int32)]
    lists = [[4, 5, 70], [9], [7, 3], [11, 12]]
    expected = [greedy_reference(target, p, 8, []) for p in lists]
    for pad in (None, 0, 95):  # the pad id fills masked slots only: it never acts as a token
        out, _, _ = speculative_generate_batch(prompts, draft, target, gamma=2, max_gen_len=8, eos_tokens_id=[],
                                               pad_token_id=pad)
        assert out == expected
    assert autoregressive_generate_batch(prompts, target, max_gen_len=8, eos_tokens_id=np.array([], np.int64)) == \
        expected


def test_per_row_max_gen_len(target, draft):
    prompts = _ragged_prompts(4, V, 12, seed=9)
    budgets = [3, 9, 1, 6]
    free = [greedy_reference(target, p, 9, []) for p in prompts]
    expected = [f[:m] for f, m in zip(free, budgets)]
    out, _, stats = speculative_generate_batch(prompts, draft, target, gamma=4, max_gen_len=budgets, eos_tokens_id=[])
    assert out == expected and stats.generated == budgets
    assert stats.compactions >= 1  # the 1-token row finishes first and is compacted away
    assert autoregressive_generate_batch(prompts, target, max_gen_len=tuple(budgets), eos_tokens_id=[]) == expected
    # an EOS still ends a row before its budget
    eos = free[1][2]
    out, _, _ = speculative_generate_batch(prompts, draft, target, gamma=4, max_gen_len=budgets, eos_tokens_id=eos)
    assert out == [greedy_reference(target, p, m, [eos]) for p, m in zip(prompts, budgets)]
    assert len(out[1]) <= 3


def test_per_row_max_gen_len_checks_positions_per_row(target, draft):
    prompts = [[1] * 250, [2]]  # max_position_embeddings = 256
    out, _, _ = speculative_generate_batch(prompts, draft, target, gamma=3, max_gen_len=[6, 20], eos_tokens_id=[])
    assert [len(o) for o in out] == [6, 20]
    with pytest.raises(ValueError, match="prompt 0 has 250 tokens; with max_gen_len=7 it needs 257 positions"):
        speculative_generate_batch(prompts, draft, target, max_gen_len=[7, 20])


# --- stats stop at the row's stop --------------------------------------------------------------------------------


def test_self_draft_stats_count_only_drafts_before_eos(target):
    """The target drafting for itself accepts every draft, and every step emits gamma + 1 tokens until the row
    stops. A row of L tokens therefore accepted (L // (g + 1)) * g + L % (g + 1) drafts: the drafts after an EOS
    (or past the budget) in the last step count neither as proposed nor as accepted."""
    g = 3
    prompts = _ragged_prompts(7, V, 20, seed=12)
    free = [greedy_reference(target, p, 21, []) for p in prompts]
    eos = sorted({free[0][5], free[1][2], free[2][9]})
    out, alpha, stats = speculative_generate_batch(prompts, target, target, gamma=g, max_gen_len=21,
                                                   eos_tokens_id=eos)
    assert out == [greedy_reference(target, p, 21, eos) for p in prompts]
    assert any(o[-1] in eos and len(o) % (g + 1) for o in out)  # a row stopped at an EOS in mid-step
    expected = [(len(o) // (g + 1)) * g + len(o) % (g + 1) for o in out]
    assert stats.accepted == expected and stats.proposed == expected
    assert stats.acceptance_rate == 1.0 and alpha == [1.0] * len(prompts)
    histogram = [0] * (g + 1)
    for o in out:
        histogram[g] += len(o) // (g + 1)
        if len(o) % (g + 1):
            histogram[len(o) % (g + 1)] += 1
    assert stats.acceptance_histogram == histogram


# --- a draft over a prefix of the target's vocabulary ------------------------------------------------------------


def test_prefix_vocabulary_draft_greedy_is_exact(target):
    """Drafts over the first 64 and 90 of the target's 96 ids. The target emits ids they lack; the prompts of the
    last row hold some (a draft sees a stand-in id for them)."""
    prompts = _ragged_prompts(6, 90, 20, seed=13) + [[70, 95, 80]]
    expected = [greedy_reference(target, p, 16, []) for p in prompts]
    narrow_random = tiny_causal_lm("llama", seed=1, layers=1, vocab_size=64)
    for d in (narrow_random, _prefix_copy(target, 90)):
        out, alpha, stats = speculative_generate_batch(prompts, d, target, gamma=3, max_gen_len=16, eos_tokens_id=[])
        assert out == expected
    # The cut copy of the target agrees with it until a row holds an id the copy lacks: rows that never do accept
    # every draft, rows that do accept fewer.
    lacking = [any(t >= 90 for t in p + e) for p, e in zip(prompts, expected)]
    assert any(lacking) and not all(lacking)
    assert all(a == 1.0 for a, lack in zip(alpha, lacking) if not lack)
    assert all(a < 1.0 for a, lack in zip(alpha, lacking) if lack)
    assert stats.acceptance_rate > 0.3


@pytest.mark.parametrize(
    "processor", [MultinomialProcessor(1.0), TopKNucleusProcessor(0.8, top_k=6, top_p=0.95)], ids=["plain", "topk-topp"]
)
def test_prefix_vocabulary_draft_sampling_follows_target(processor):
    """The target puts real mass on ids 5..7, which the draft (vocabulary 5) can never propose: they come only
    from recovered and bonus tokens. Same chi-square check and GOF_ALPHA = 1e-4 as tests/test_engine.py (fixed
    seeds: deterministic; a correct sampler fails a given seed with chance 1e-4 per test)."""
    target = tiny_causal_lm("llama", vocab_size=8, seed=20, init_std=0.15)
    draft = tiny_causal_lm("llama", vocab_size=5, seed=21, init_std=0.15, layers=1)
    prompt = [1, 6, 2]
    n = 6000
    exact = _exact_first_two(target, prompt, processor)
    assert exact[5:].sum() > 0.2 and exact[:, 5:].sum() > 0.2
    outputs, _, stats = speculative_generate_batch(
        [prompt] * n, draft, target, gamma=2, logits_processor=processor, max_gen_len=2, eos_tokens_id=[], seed=321
    )
    pairs = torch.tensor(outputs)
    counts = torch.zeros(8, 8)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(n), accumulate=True)
    assert 0.0 < stats.acceptance_rate < 1.0
    assert (pairs >= 5).any(0).all()  # ids the draft lacks at both positions
    assert _chi_square_pvalue(counts, exact) > GOF_ALPHA


# --- log-probabilities -------------------------------------------------------------------------------------------


@torch.no_grad()
def _reference_logprobs(model, prompt: list[int], out: list[int], processor) -> torch.Tensor:
    """log_softmax of the processed logits of one plain no-cache forward over prompt + output, at each output."""
    logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(out)]
    return torch.log_softmax(processor.process(logits), -1).gather(1, torch.tensor(out)[:, None])[:, 0]


def _check_logprobs(model, prompts, outputs, logprobs, processor):
    assert [len(lp) for lp in logprobs] == [len(o) for o in outputs]
    for p, o, lp in zip(prompts, outputs, logprobs):
        torch.testing.assert_close(torch.tensor(lp), _reference_logprobs(model, p, o, processor), atol=1e-4,
                                   rtol=1e-4)


def test_greedy_logprobs_equal_a_plain_forward_and_agree_across_engines(target, draft):
    prompts = _ragged_prompts(5, V, 16, seed=14)
    budgets = [12, 5, 12, 9, 1]
    free = [greedy_reference(target, p, 12, []) for p in prompts]
    eos = free[2][6]
    base, base_stats = autoregressive_generate_batch(prompts, target, max_gen_len=budgets, eos_tokens_id=eos,
                                                     return_logprobs=True)
    _check_logprobs(target, prompts, base, base_stats.logprobs, GreedyProcessor())
    for gamma in (3, "auto"):
        out, _, stats = speculative_generate_batch(prompts, draft, target, gamma=gamma, max_gen_len=budgets,
                                                   eos_tokens_id=eos, return_logprobs=True)
        assert out == base
        _check_logprobs(target, prompts, out, stats.logprobs, GreedyProcessor())
        for a, b in zip(stats.logprobs, base_stats.logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-4)
    assert autoregressive_generate_batch(prompts, target, max_gen_len=budgets, eos_tokens_id=eos,
                                         return_stats=True)[1].logprobs is None


def test_sampled_logprobs_are_under_the_processed_distribution(target, draft):
    prompts = _ragged_prompts(4, V, 10, seed=15)
    processor = TopKProcessor(0.7, top_k=5)
    out, _, stats = speculative_generate_batch(prompts, draft, target, gamma=3, logits_processor=processor,
                                               max_gen_len=10, eos_tokens_id=[], seed=3, return_logprobs=True)
    _check_logprobs(target, prompts, out, stats.logprobs, processor)
    base, base_stats = autoregressive_generate_batch(prompts, target, processor, max_gen_len=10, eos_tokens_id=[],
                                                     seed=3, return_logprobs=True)
    _check_logprobs(target, prompts, base, base_stats.logprobs, processor)
    # not the raw distribution's values: the test tells the two apart
    with torch.no_grad():
        raw = torch.log_softmax(target(torch.tensor([prompts[0] + out[0]])).logits[0, len(prompts[0]) - 1], -1)
    assert abs(float(raw[out[0][0]]) - stats.logprobs[0][0]) > 1e-2


# --- errors, raised before any compute ---------------------------------------------------------------------------


class _NotATokenizer:
    pass


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompts": torch.tensor([[1, 2]])}, TypeError, "prompts must be a list of token-id lists .* got Tensor"),
        ({"prompts": "hello"}, TypeError, "prompts must be a list of token-id lists or 1-D tensors, got str"),
        ({"prompts": ["hello"]}, TypeError, "prompt 0 must be a list of token ids, got str .*batched_specdec.generate"),
        ({"prompts": [[1], 7]}, TypeError, "prompt 1 must be a list of token ids, got int"),
        ({"prompts": [np.array([1.0, 2.0])]}, ValueError,
         r"prompt 0 must be a 1-D integer tensor or array, got shape \(2,\) and dtype float64"),
        ({"prompts": [torch.tensor([[1, 2]])]}, ValueError,
         r"prompt 0 must be a 1-D integer tensor or array, got shape \(1, 2\) and dtype torch.int64"),
        ({"prompts": [[1, 2.0]]}, ValueError, r"prompt 0 has token id 2.0, expected an int in \[0, 96\)"),
        ({"prompts": [[True]]}, ValueError, r"prompt 0 has token id True"),
        ({"prompts": [np.array([3, 96])]}, ValueError, r"prompt 0 has token id 96"),
        ({"max_gen_len": [4, 4]}, ValueError, r"max_gen_len has 2 entries, expected one per prompt \(3\)"),
        ({"max_gen_len": [4, 0, 4]}, ValueError, r"max_gen_len\[1\] must be an int >= 1, got 0"),
        ({"max_gen_len": [4, 2.5, 4]}, ValueError, r"max_gen_len\[1\] must be an int >= 1, got 2.5"),
        ({"max_gen_len": True}, ValueError, "max_gen_len must be an int >= 1, got True"),
        ({"pad_token_id": 96}, ValueError, r"pad_token_id must be None or an int in \[0, 96\), got 96"),
        ({"pad_token_id": -1}, ValueError, r"pad_token_id must be None or an int in \[0, 96\), got -1"),
        ({"pad_token_id": "0"}, ValueError, r"pad_token_id must be None or an int in \[0, 96\), got '0'"),
        ({"eos_tokens_id": [3, 96]}, ValueError, r"eos_tokens_id has 96, expected ints in \[0, 96\)"),
        ({"eos_tokens_id": "2"}, ValueError, r"eos_tokens_id has '2'"),
        ({"tokenizer": 5}, TypeError, r"tokenizer must be a tokenizer or None, got int 5; did you mean gamma=5\?"),
        ({"tokenizer": _NotATokenizer()}, TypeError,
         r"tokenizer must be a tokenizer \(with eos_token_id\) or None, got _NotATokenizer"),
        ({"logits_processor": 0.7}, TypeError, "logits_processor must be a LogitsProcessor, got float"),
        ({"seed": 1, "generator": torch.Generator()}, ValueError, "give either seed or generator, not both"),
        ({"seed": "1"}, ValueError, "seed must be an int, got '1'"),
        ({"generator": 3}, TypeError, "generator must be a torch.Generator or None, got int"),
    ],
)
@pytest.mark.parametrize("engine", ["speculative", "target-only"])
def test_bad_input_raises_with_a_clear_message(target, draft, kwargs, error, match, engine):
    args = {"prompts": [[1, 2, 3], [4], [5, 6]], "max_gen_len": 4}
    args.update(kwargs)
    prompts = args.pop("prompts")
    with pytest.raises(error, match=match):
        if engine == "speculative":
            speculative_generate_batch(prompts, draft, target, gamma=2, **args)
        else:
            autoregressive_generate_batch(prompts, target, **args)


def test_model_eos_out_of_range_names_where_it_came_from(target, draft, monkeypatch):
    monkeypatch.setattr(target.generation_config, "eos_token_id", [2, 500])
    with pytest.raises(ValueError, match=r"eos_tokens_id \(from the target's generation_config.eos_token_id\) has 500"):
        speculative_generate_batch([[1, 2]], draft, target)
    monkeypatch.setattr(target.generation_config, "eos_token_id", None)
    with pytest.raises(ValueError, match=r"eos_tokens_id \(from tokenizer.eos_token_id\) has -1"):
        autoregressive_generate_batch([[1, 2]], target, tokenizer=SimpleNamespace(eos_token_id=-1))


def test_tokenizer_passed_as_the_fourth_argument_suggests_gamma(target, draft):
    """The seed API had gamma 4th; now it is the tokenizer, so the likely slip names gamma=."""
    with pytest.raises(TypeError, match=r"did you mean gamma=5\? \(pass gamma by keyword\)"):
        speculative_generate_batch([[1, 2]], draft, target, 5)
    with pytest.raises(TypeError, match=r"got str 'auto'; did you mean gamma='auto'\?"):
        speculative_generate_batch([[1, 2]], draft, target, "auto")
    with pytest.raises(TypeError, match="logits_processor must be a LogitsProcessor, got int"):
        autoregressive_generate_batch([[1, 2]], target, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": "fast"}, "gamma must be an int >= 1 or 'auto', got 'fast'"),
        ({"gamma": 3, "gamma_max": 4}, "gamma_max 4 only applies with gamma 'auto', got gamma 3"),
        ({"gamma": "auto", "gamma_max": 0}, "gamma_max must be an int >= 1, got 0"),
    ],
)
def test_bad_gamma_raises(target, draft, kwargs, match):
    with pytest.raises(ValueError, match=match):
        speculative_generate_batch([[1, 2]], draft, target, **kwargs)


def test_draft_vocabulary_larger_than_the_target_is_an_error(target):
    wide = tiny_causal_lm("llama", vocab_size=100, seed=3)
    with pytest.raises(ValueError, match="draft vocabulary size 100 is larger than the target's 96; the draft's "
                                         "vocabulary must be the target's or a prefix of it"):
        speculative_generate_batch([[1, 2]], wide, target)
