"""Tests of the n-gram (prompt-lookup) drafter: the lookup against a pure-Python reference, exact hand-made
answers, the Drafter protocol, and end-to-end losslessness and acceptance through the engine."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_causal_lm

from batched_specdec.drafting import Drafter
from batched_specdec.drafting.ngram import NGramDrafter, ngram_lookup
from batched_specdec.processors import GreedyProcessor, MultinomialProcessor


def reference_lookup(row: list[int], gamma: int, max_ngram: int, min_ngram: int) -> tuple[list[int], int]:
    """The obvious loop: longest n first, latest earlier occurrence, continuation clipped at the row end."""
    L = len(row)
    for n in range(max_ngram, min_ngram - 1, -1):
        suffix = row[L - n :]
        for i in range(L - n - 1, -1, -1):  # the occurrence must end before the row's last position
            if row[i : i + n] == suffix:
                cont = row[i + n : i + n + gamma]
                return cont + [row[-1]] * (gamma - len(cont)), len(cont)
    return [row[-1]] * gamma, 0


def pack(rows: list[list[int]], width: int | None = None, stale: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(len(r) for r in rows)
    buf = torch.full((len(rows), width), stale, dtype=torch.long)
    for b, r in enumerate(rows):
        buf[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return buf, torch.tensor([len(r) for r in rows], dtype=torch.long)


def lookup(rows, gamma, max_ngram=3, min_ngram=1, width=None, stale=0):
    buf, lens = pack(rows, width, stale)
    prop = NGramDrafter(max_ngram, min_ngram).propose(buf, lens, gamma, GreedyProcessor(), None)
    return prop.tokens.tolist(), prop.num_tokens.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Constructor and protocol


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"min_ngram": 0}, ValueError, "min_ngram must be an int >= 1, got 0"),
        ({"min_ngram": -2, "max_ngram": 3}, ValueError, "min_ngram must be an int >= 1, got -2"),
        ({"max_ngram": 1, "min_ngram": 2}, ValueError, r"max_ngram must be >= min_ngram \(2\), got 1"),
        ({"max_ngram": 2.5}, TypeError, "max_ngram must be an int >= 1, got 2.5"),
        ({"min_ngram": True}, TypeError, "min_ngram must be an int >= 1, got True"),
    ],
)
def test_constructor_rejects_bad_sizes(kwargs, error, match):
    with pytest.raises(error, match=match):
        NGramDrafter(**kwargs)


def test_lookup_rejects_bad_gamma_and_shapes():
    buf, lens = pack([[1, 2, 1, 2]])
    with pytest.raises(ValueError, match="gamma must be an int >= 1, got 0"):
        ngram_lookup(buf, lens, 0)
    with pytest.raises(ValueError, match="token_buffer must be 2-D"):
        ngram_lookup(buf[0], lens, 2)
    with pytest.raises(ValueError, match=r"seq_lens must have shape \(1,\)"):
        ngram_lookup(buf, torch.tensor([4, 4]), 2)


def test_answers_depend_on_committed_tokens_only():
    drafter = NGramDrafter(max_ngram=4, min_ngram=2)
    assert isinstance(drafter, Drafter)
    assert drafter.vocab_size is None
    assert repr(drafter) == "NGramDrafter(max_ngram=4, min_ngram=2)"
    buf, lens = pack([[1, 2, 3, 1, 2], [4, 4]])
    assert drafter.start(buf, lens, 16) is None
    prop = drafter.propose(buf, lens, 3, MultinomialProcessor(1.0))
    assert prop.probs is None
    assert prop.tokens.shape == (2, 3) and prop.tokens.dtype == torch.int64
    assert prop.num_tokens.shape == (2,) and prop.num_tokens.dtype == torch.int64
    assert drafter.keep_rows(torch.tensor([1])) is None
    # After dropping row 0 the remaining row gets the same answer as before.
    again = drafter.propose(buf[1:], lens[1:], 3, GreedyProcessor(), None)
    assert again.tokens.tolist() == prop.tokens[1:].tolist()
    assert again.num_tokens.tolist() == prop.num_tokens[1:].tolist()


def test_sources_are_match_lengths_and_next_sources_keeps_the_lookup():
    """Source ``n - 1`` for a match of ``n`` tokens (0 also without a match); ``next_sources`` (CPU) looks up
    ``gamma_max`` tokens and ``propose`` cuts that lookup to its ``gamma``: the same answer as a fresh lookup."""
    drafter = NGramDrafter(max_ngram=3)
    assert drafter.sources == ("ngram1", "ngram2", "ngram3")
    rows = [[1, 2, 3, 9, 1, 2, 3], [5, 6, 7, 5], [4, 8], [1, 2, 7, 1, 2]]
    buf, lens = pack(rows)
    assert drafter.next_sources(buf, lens, int(lens.max()), 6).tolist() == [2, 0, 0, 1]
    kept = drafter.propose(buf, lens, 2, GreedyProcessor(), int(lens.max()))
    fresh = NGramDrafter(max_ngram=3).propose(buf, lens, 2, GreedyProcessor(), None)
    assert kept.tokens.tolist() == fresh.tokens.tolist() == [[9, 1], [6, 7], [8, 8], [7, 1]]
    assert kept.num_tokens.tolist() == fresh.num_tokens.tolist() == [2, 2, 0, 2]
    assert kept.source.tolist() == fresh.source.tolist() == [2, 0, 0, 1]
    assert drafter.next_sources(buf.to("meta"), lens.to("meta"), 7, 6) is None  # would need a device read


def test_lookup_is_free_of_data_dependent_host_work():
    # Meta tensors have no data: .item(), .tolist(), .nonzero() and boolean-mask indexing all fail on them, so
    # the lookup running on meta proves it never reads values on the host and has data-independent shapes.
    buf = torch.empty(5, 37, dtype=torch.long, device="meta")
    lens = torch.empty(5, dtype=torch.long, device="meta")
    tokens, num = ngram_lookup(buf, lens, 6, max_ngram=4, min_ngram=1)
    assert tokens.device.type == "meta" and tokens.shape == (5, 6) and tokens.dtype == torch.int64
    assert num.device.type == "meta" and num.shape == (5,) and num.dtype == torch.int64


# ----------------------------------------------------------------------------------------------------------------
# Exact answers on hand-made rows


def test_repeated_phrase_proposes_its_continuation():
    # "the cat sat on the mat . the cat" -> "sat on the mat ."
    row = [10, 11, 12, 13, 10, 14, 15, 10, 11]
    assert lookup([row], 4) == ([[12, 13, 10, 14]], [4])


def test_most_recent_occurrence_wins():
    # "7 8" occurs twice before the suffix; the later one is followed by 3, the earlier by 1.
    row = [7, 8, 1, 7, 8, 3, 7, 8]
    assert lookup([row], 2, max_ngram=2, min_ngram=2) == ([[3, 7]], [2])


def test_longest_ngram_wins_over_a_more_recent_shorter_match():
    # Suffix "1 2 3": the 3-gram occurs at the start (followed by 4); the bigram "2 3" occurs later (followed by 9).
    row = [1, 2, 3, 4, 5, 2, 3, 9, 6, 1, 2, 3]
    assert lookup([row], 2, max_ngram=3) == ([[4, 5]], [2])
    assert lookup([row], 2, max_ngram=2) == ([[9, 6]], [2])


def test_continuation_is_clipped_at_the_row_end():
    # Suffix "5 6" matched at position 0; only 2 committed tokens follow the match before the row ends.
    row = [5, 6, 5, 6]
    assert lookup([row], 5, max_ngram=2) == ([[5, 6, 6, 6, 6]], [2])
    # A period-1 row: the latest earlier "4" is the one just before the last token.
    assert lookup([[4, 4, 4]], 3, max_ngram=1) == ([[4, 4, 4]], [1])


def test_stale_entries_past_the_row_end_are_never_read():
    # Past the row end the buffer holds the suffix again and a continuation; reading them would propose 8.
    buf = torch.tensor([[1, 2, 3, 1, 2, 8, 8, 8]])
    lens = torch.tensor([3])
    tokens, num = ngram_lookup(buf, lens, 3, max_ngram=2)
    assert num.tolist() == [0] and tokens.tolist() == [[3, 3, 3]]


def test_no_match_and_very_short_rows_in_one_batch():
    rows = [
        [9],  # length 1: nothing before the suffix
        [4, 4],  # length 2: the 1-gram "4" occurred at position 0
        [4, 5],  # length 2: no match
        [1, 2, 3, 4, 5],  # no repeated token at all
        [1, 2, 1, 2, 1],  # matches with n = 3
    ]
    tokens, num = lookup(rows, 4, width=9, stale=7)
    assert num == [0, 1, 0, 0, 2]
    assert tokens == [[9] * 4, [4] * 4, [5] * 4, [5] * 4, [2, 1, 1, 1]]


def test_min_ngram_excludes_shorter_matches():
    row = [3, 1, 2, 3]  # only a 1-gram match
    assert lookup([row], 2, max_ngram=3, min_ngram=1) == ([[1, 2]], [2])
    assert lookup([row], 2, max_ngram=3, min_ngram=2) == ([[3, 3]], [0])


def test_max_ngram_longer_than_the_buffer():
    assert lookup([[2, 2]], 3, max_ngram=5, min_ngram=1) == ([[2, 2, 2]], [1])
    assert lookup([[2, 2]], 3, max_ngram=5, min_ngram=3) == ([[2, 2, 2]], [0])


# ----------------------------------------------------------------------------------------------------------------
# Property test against the reference


@st.composite
def token_batches(draw):
    vocab = draw(st.integers(2, 4))  # small vocabulary so that matches happen
    batch = draw(st.integers(1, 7))
    width = draw(st.integers(1, 24))
    rows = [draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=width)) for _ in range(batch)]
    max_ngram = draw(st.integers(1, 4))
    min_ngram = draw(st.integers(1, max_ngram))
    gamma = draw(st.integers(1, 8))
    return rows, width, gamma, max_ngram, min_ngram


@settings(derandomize=True, deadline=None, max_examples=300)
@given(token_batches())
def test_lookup_matches_reference(case):
    rows, width, gamma, max_ngram, min_ngram = case
    # Stale entries hold a token id outside the vocabulary so that reading one would show.
    tokens, num = lookup(rows, gamma, max_ngram, min_ngram, width=width, stale=99)
    # The engine passes the longest live length so that only that span is scanned; same answers.
    buf, lens = pack(rows, width, stale=99)
    spanned = NGramDrafter(max_ngram, min_ngram).propose(buf, lens, gamma, GreedyProcessor(), None, max(map(len, rows)))
    assert (spanned.tokens.tolist(), spanned.num_tokens.tolist()) == (tokens, num)
    for b, row in enumerate(rows):
        expected_tokens, expected_num = reference_lookup(row, gamma, max_ngram, min_ngram)
        assert (tokens[b], num[b]) == (expected_tokens, expected_num), (row, gamma, max_ngram, min_ngram)


def test_lookup_with_int32_lens_and_batch_33():
    g = torch.Generator().manual_seed(1)
    buf = torch.randint(0, 3, (33, 50), generator=g)
    lens = torch.randint(1, 51, (33,), generator=g)
    tokens, num = ngram_lookup(buf, lens.int(), 5, max_ngram=3)
    for b in range(33):
        exp_tokens, exp_num = reference_lookup(buf[b, : lens[b]].tolist(), 5, 3, 1)
        assert (tokens[b].tolist(), int(num[b])) == (exp_tokens, exp_num)


# ----------------------------------------------------------------------------------------------------------------
# End to end through the engine (tiny random-weight Llama targets, float32, CPU)


def tiny_llama(vocab: int, seed: int, initializer_range: float = 0.1):
    return tiny_causal_lm("llama", vocab_size=vocab, seed=seed, init_std=initializer_range)


def cycling_llama(vocab: int, successor: dict[int, int], strength: float, seed: int, noise: float = 0.3):
    """A tiny Llama whose next-token distribution favours ``successor[current token]`` by a logit margin of about
    ``strength``: one-hot embeddings, and an lm_head that maps token t to its successor, plus the (small) random
    attention and MLP contributions of a real forward and random noise on the head. Text that follows the
    successor map is what such a model continues; it is the model-side stand-in for "repeat the given text"."""
    model = tiny_llama(vocab, seed, initializer_range=0.02)
    hidden = model.config.hidden_size
    assert vocab <= hidden
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        head = noise * torch.randn(vocab, hidden)
        for t, s in successor.items():
            # The final RMSNorm scales a one-hot residual to sqrt(hidden).
            head[s, t] += strength / hidden**0.5
        model.lm_head.weight.copy_(head)
    return model


@torch.no_grad()
def greedy_no_cache(model, prompt: list[int], max_gen_len: int, eos: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(max_gen_len):
        token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        seq.append(token)
        out.append(token)
        if token == eos:
            break
    return out


def test_greedy_outputs_identical_to_target_only_decoding():
    from batched_specdec.engine import autoregressive_generate_batch, speculative_generate_batch

    vocab = 48
    target = tiny_llama(vocab, seed=0)
    g = torch.Generator().manual_seed(0)
    phrase = torch.randint(2, vocab, (5,), generator=g).tolist()
    prompts = [
        [7],  # length 1: no match at the first step
        [3, 3],  # length 2
        phrase * 4 + phrase[:2],  # repeats a phrase: matches from the first step
        torch.randint(2, vocab, (29,), generator=g).tolist(),  # random: few or no matches
        phrase + [5, 6] + phrase,
        torch.randint(2, 6, (17,), generator=g).tolist(),  # tiny sub-vocabulary: many short matches
    ]
    max_gen_len = 24
    # EOS hit mid-way: the token row 2 emits at step 6 of its (EOS-free) greedy continuation.
    eos = greedy_no_cache(target, prompts[2], 6, eos=-1)[5]
    expected = [greedy_no_cache(target, p, max_gen_len, eos) for p in prompts]
    assert any(len(e) < max_gen_len for e in expected)

    baseline = autoregressive_generate_batch(
        prompts, target, logits_processor=GreedyProcessor(), max_gen_len=max_gen_len, eos_tokens_id=eos
    )
    assert baseline == expected
    for gamma, (max_ngram, min_ngram) in [(1, (3, 1)), (4, (3, 1)), (7, (4, 2)), ("auto", (3, 1))]:
        outputs, alpha, _ = speculative_generate_batch(
            prompts,
            NGramDrafter(max_ngram, min_ngram),
            target,
            gamma=gamma,
            logits_processor=GreedyProcessor(),
            max_gen_len=max_gen_len,
            eos_tokens_id=eos,
        )
        assert outputs == expected, (gamma, max_ngram, min_ngram)
        assert len(alpha) == len(prompts) and all(0.0 <= a <= 1.0 for a in alpha)


def test_acceptance_on_text_the_target_repeats():
    """Prompts state a phrase several times; the target continues it (it follows the successor map) except where
    it prefers otherwise. The n-gram drafter must propose the continuation from the prompt and the engine must
    accept it: acceptance near 1 on those rows, while a row whose prompt never repeats still decodes exactly."""
    from batched_specdec.engine import speculative_generate_batch

    vocab = 32
    cycle = [4, 9, 17, 2, 25, 11]
    successor = {t: cycle[(i + 1) % len(cycle)] for i, t in enumerate(cycle)}
    target = cycling_llama(vocab, successor, strength=12.0, seed=3)
    prompts = [
        cycle * 3 + cycle[:2],
        cycle[2:] + cycle + cycle[:4],
        [30, 29, 28, 27, 26, 24, 23, 22, 21, 20, 19, 18],  # no repetition in the prompt
    ]
    max_gen_len = 30
    expected = [greedy_no_cache(target, p, max_gen_len, eos=1) for p in prompts]
    # The honest precondition: the target really continues the phrase, so correct drafts exist.
    assert expected[0][:6] == cycle[2:] + cycle[:2]
    outputs, alpha, _ = speculative_generate_batch(
        prompts,
        NGramDrafter(max_ngram=3),
        target,
        gamma=5,
        logits_processor=GreedyProcessor(),
        max_gen_len=max_gen_len,
        eos_tokens_id=1,
    )
    assert outputs == expected
    print("alpha", alpha)
    assert alpha[0] > 0.9 and alpha[1] > 0.9, alpha


def test_sampled_outputs_distributed_as_the_target():
    """Joint law of the first two generated tokens over many identical rows vs the exact target law by
    enumeration. Drafts are one-hot and accepted with probability p(draft) in 0.2..0.8 here, so accepted, recovered and
    bonus tokens all occur. Chi-square goodness of fit, false-positive rate 1e-6, fixed seed: never flakes."""
    from scipy.stats import chi2

    from batched_specdec.engine import speculative_generate_batch

    vocab, eos, rows = 12, 1, 3000
    successor = {2: 5, 5: 7, 7: 2}
    target = cycling_llama(vocab, successor, strength=2.0, seed=5, noise=0.1)
    prompt = [2, 5, 7, 2, 5, 7, 2, 5]
    processor = MultinomialProcessor(temperature=1.0)

    with torch.no_grad():
        p1 = processor.probs(target(torch.tensor([prompt])).logits[0, -1]).double()
        second = torch.tensor([prompt + [t] for t in range(vocab)])
        p2 = processor.probs(target(second).logits[:, -1]).double()  # (V, V): row t1 is p(t2 | prompt, t1)
    assert 0.2 < p1[7] < 0.8 and 0.2 < p2[7, 2] < 0.8  # the drafts are neither sure nor hopeless
    exact = {}
    for t1 in range(vocab):
        if t1 == eos:
            exact[(t1,)] = float(p1[t1])
        else:
            for t2 in range(vocab):
                exact[(t1, t2)] = float(p1[t1] * p2[t1, t2])

    outputs, alpha, _ = speculative_generate_batch(
        [list(prompt) for _ in range(rows)],
        NGramDrafter(max_ngram=3),
        target,
        gamma=3,
        logits_processor=processor,
        max_gen_len=3,
        eos_tokens_id=eos,
        seed=1234,
    )
    assert sum(alpha) / rows > 0.1  # drafts were really accepted, not only rejected
    observed = dict.fromkeys(exact, 0)
    for out in outputs:
        key = (out[0],) if out[0] == eos else (out[0], out[1])
        observed[key] += 1  # KeyError here means an impossible outcome

    # Pool the cells with expected count < 5 so the chi-square approximation holds.
    big = [k for k in exact if exact[k] * rows >= 5]
    small = [k for k in exact if exact[k] * rows < 5]
    obs = [observed[k] for k in big] + [sum(observed[k] for k in small)]
    exp = [exact[k] * rows for k in big] + [sum(exact[k] for k in small) * rows]
    statistic = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    p_value = chi2.sf(statistic, df=len(obs) - 1)
    print(f"chi2 {statistic:.1f}, {len(obs)} bins, p-value {p_value:.3g}, mean alpha {sum(alpha) / rows:.3f}")
    assert p_value > 1e-6, (statistic, len(obs), p_value)
