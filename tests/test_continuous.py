"""Continuous batching (runner.decode_prompt_set, schedule="continuous"): finished rows take the next queued prompts
while the other rows keep decoding. Exactness against decoding each prompt alone, seeded samples that follow the
prompt and not the schedule, the target's distribution for prompts that enter late, admission that moves no other
row's KV, and the errors. CPU, float32, tiny random-weight models."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from numerics import assert_equal_to_float32_rounding
from test_engine import GOF_ALPHA, _chi_square_pvalue, _exact_first_two
from test_feature_draft import feature_head
from tiny_models import greedy_reference, tiny_causal_lm

from batched_specdec import GreedyProcessor, HybridDrafter, MultinomialProcessor, NGramDrafter, generate
from batched_specdec.decode.admission import Admission
from batched_specdec.decode.session import DecodeSession
from batched_specdec.drafting import as_drafter
from batched_specdec.options import DecodeRequest, resolve_options
from batched_specdec.runner import decode_prompt_set

VOCAB = 96


@pytest.fixture(scope="module")
def models():
    return tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1, layers=1)


def _prompt_set(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Prompts of 1-30 tokens with budgets of 1-30: rows finish at very different steps."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(n)]
    return prompts, [rng.randint(1, 30) for _ in range(n)]


def _drafters(target, draft):
    return {"target-only": None, "model": draft, "ngram": NGramDrafter(),
            "feature": feature_head(target, seed=3), "hybrid": HybridDrafter(as_drafter(feature_head(target, seed=4),
                                                                                        VOCAB))}


@pytest.mark.parametrize("kind", ["target-only", "model", "ngram", "feature", "hybrid"])
@pytest.mark.parametrize("slots", [1, 3, 7])
def test_greedy_output_of_every_prompt_is_its_output_alone(models, kind, slots):
    target, draft = models
    prompts, budgets = _prompt_set(11, seed=slots)
    eos = [7]
    expected = [greedy_reference(target, p, m, eos) for p, m in zip(prompts, budgets)]
    drafter = _drafters(target, draft)[kind]
    drafter = None if drafter is None else as_drafter(drafter, VOCAB)
    options = resolve_options(target, logits_processor=GreedyProcessor(), eos_tokens_id=eos, gamma=3)
    result = decode_prompt_set(target, drafter, prompts, budgets, options, batch_size=slots, schedule="continuous")
    assert result.outputs == expected
    assert result.stats.generated == [len(o) for o in expected]
    stats = result.stats
    assert stats.tokens_per_target_forward == pytest.approx(stats.generated_tokens / sum(stats.acceptance_histogram))
    if drafter is not None:
        assert sum(result.stats.proposed) > 0


def test_every_step_verifies_a_full_batch_while_prompts_remain(models):
    """With 9 prompts and 3 slots every step until the queue empties runs all 3 rows: no step of the continuous
    schedule runs a smaller batch before the last prompt has entered, where the static schedule's batches shrink."""
    target, _ = models
    prompts, budgets = _prompt_set(9, seed=5)
    seen = []
    original = DecodeSession.step

    def recording_step(self, refilling=False):
        seen.append((self.rows.size, int((~self.rows.view.finished).sum()), refilling))
        return original(self, refilling)

    options = resolve_options(target, logits_processor=GreedyProcessor(), eos_tokens_id=[])
    try:
        DecodeSession.step = recording_step
        decode_prompt_set(target, None, prompts, budgets, options, batch_size=3, schedule="continuous")
    finally:
        DecodeSession.step = original
    queued = [s for s in seen if s[2]]  # steps taken while prompts were queued
    assert queued and all(size == 3 and live == 3 for size, live, _ in queued), queued


@pytest.mark.parametrize("kind", ["target-only", "model", "ngram"])
def test_seeded_samples_follow_the_prompt_not_the_schedule(models, kind):
    """A prompt's seeded tokens are the same under either schedule, any slot count, and with other prompts around
    it: its draws are keyed by its index and its own length."""
    target, draft = models
    prompts, _ = _prompt_set(8, seed=11)
    drafter = _drafters(target, draft)[kind]
    kwargs = {"do_sample": True, "temperature": 1.0, "top_k": 0, "seed": 5, "gamma": 3}
    runs = [generate(prompts, target, draft=drafter, max_new_tokens=12, eos_token_id=[], batch_size=slots,
                     schedule=schedule, **kwargs).token_ids
            for schedule, slots in (("continuous", 1), ("continuous", 3), ("static", 3), ("static", 8))]
    assert all(run == runs[0] for run in runs[1:])
    others = [p[::-1] for p in prompts]  # the same prompt at index 5 among other prompts
    others[5] = prompts[5]
    mixed = generate(others, target, draft=drafter, max_new_tokens=12, eos_token_id=[], batch_size=3, **kwargs)
    assert mixed.token_ids[5] == runs[0][5]
    assert len({tuple(o) for o in runs[0]}) > 1


def test_a_prompt_that_enters_late_samples_from_the_target():
    """4000 copies of one prompt through 3 slots: nearly every copy enters a row that another copy just left (and
    is keyed by its own index). Its first two tokens follow the target's exact joint distribution."""
    processor = MultinomialProcessor(1.0)
    target = tiny_causal_lm("llama", vocab_size=8, seed=20, init_std=0.15)
    draft = tiny_causal_lm("llama", vocab_size=8, seed=21, init_std=0.15, layers=1)
    prompt, n = [1, 4, 2], 4000
    options = resolve_options(target, logits_processor=processor, eos_tokens_id=[], gamma=2)
    result = decode_prompt_set(target, as_drafter(draft, 8), [prompt] * n, [2] * n, options, batch_size=3, seed=9)
    pairs = torch.tensor([o[:2] for o in result.outputs])
    counts = torch.zeros(8, 8)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(n), accumulate=True)
    assert 0.0 < result.stats.acceptance_rate < 1.0
    assert _chi_square_pvalue(counts, _exact_first_two(target, prompt, processor)) > GOF_ALPHA


def _session_with_two_free_rows(target, drafter=None, prefill_chunk=128):
    prompts, _ = _prompt_set(6, seed=2)
    budgets = [3, 30, 3, 30, 12, 12]
    options = resolve_options(target, logits_processor=GreedyProcessor(), eos_tokens_id=[], gamma=2,
                              prefill_chunk=prefill_chunk)
    session = DecodeSession(target, drafter, DecodeRequest(prompts, budgets, torch.device("cpu")), options, seed=0,
                            slots=4)
    session.start()
    while len(session.free_rows()) < 2:
        session.step(refilling=True)
    return session, prompts


@pytest.mark.parametrize("staged", [False, True])
def test_admission_moves_no_other_rows_kv(models, staged):
    """Prompts entering two rows write those rows only: the other rows' cache entries keep their values and their
    memory (the buffers are not reallocated), whether the prompts were staged (prefilled together ahead) or not."""
    target, _ = models
    session, _ = _session_with_two_free_rows(target)
    free = session.free_rows()[:2]
    others = [r for r in range(4) if r not in free.tolist()]
    keys = session.cache.key_buffers[0]
    before, address = keys[others].clone(), keys.data_ptr()
    if staged:
        session.stage([4, 5])
    session.admit([4, 5])
    assert session.cache.key_buffers[0].data_ptr() == address
    assert torch.equal(session.cache.key_buffers[0][others], before)
    assert sorted(session.rows.host_row_ids[free].tolist()) == [4, 5]


@pytest.mark.parametrize("chunk", [128, 12])  # 12: shorter than prompt 4, a stage of 2 rows
def test_a_staged_prompt_enters_with_the_entries_its_own_prefill_writes(models, chunk):
    """Admitting staged prompts copies into their rows the same KV entries and lengths that prefilling them in their
    rows writes, and gives a feature drafter the same target features; also with prefill chunks shorter than the
    prompts. The stage prefills its prompts in a batch of another shape than a direct prefill does, so the entries
    agree to float32 rounding (tests/numerics.py), not bit for bit."""
    target, _ = models

    def drafter():
        return as_drafter(feature_head(target, seed=3), VOCAB)

    direct, prompts = _session_with_two_free_rows(target, drafter(), chunk)
    staged, _ = _session_with_two_free_rows(target, drafter(), chunk)
    assert max(len(prompts[4]), len(prompts[5])) > chunk + 1 or chunk == 128
    direct.admit([4, 5])
    staged.stage([5, 4])  # staged in another order than they enter
    staged.admit([4, 5])
    rows = [int(r) for r in torch.nonzero(torch.isin(direct.rows.host_row_ids, torch.tensor([4, 5]))).flatten()]
    assert torch.equal(direct.cache.lens[rows], staged.cache.lens[rows])
    for layer in range(len(direct.cache.key_buffers)):
        for r in rows:
            width = len(prompts[int(direct.rows.host_row_ids[r])]) - 1
            for a, b in ((direct.cache.key_buffers, staged.cache.key_buffers),
                         (direct.cache.value_buffers, staged.cache.value_buffers)):
                assert_equal_to_float32_rounding(b[layer][r, :, :width], a[layer][r, :, :width])
    for r in rows:
        width = len(prompts[int(direct.rows.host_row_ids[r])]) - 1
        assert_equal_to_float32_rounding(staged.drafter.features[r, :width], direct.drafter.features[r, :width])
    assert direct.drafter._tokens_behind == staged.drafter._tokens_behind
    assert not staged.is_staged(4) and not staged.is_staged(5)


def test_the_stage_is_sized_by_the_queued_prompts_and_refuses_what_it_cannot_hold(models):
    """A long prompt among the first ones does not shrink the stage (it never enters it); a prompt longer than the
    stage's rows, or more prompts than it has rows, is an error naming them."""
    target, _ = models
    prompts = [[5] * 600, [6] * 10, [7] * 12, [8] * 20, [9] * 9]
    options = resolve_options(target, logits_processor=GreedyProcessor(), eos_tokens_id=[])
    session = DecodeSession(target, None, DecodeRequest(prompts, [4] * 5, torch.device("cpu")), options, seed=0,
                            slots=2)
    assert session.stage_size == 2
    with pytest.raises(ValueError, match="3 prompts to stage, but the stage holds 2"):
        session.stage([2, 3, 4])
    with pytest.raises(ValueError, match="prompt 0 has 600 tokens; the stage holds prompts of at most 20"):
        session.stage([0])


def test_the_stage_is_released_when_the_queue_is_empty(models, monkeypatch):
    target, _ = models
    prompts, budgets = _prompt_set(6, seed=5)
    released = []
    monkeypatch.setattr(Admission, "release_stage", lambda self: released.append(self.staging is not None))
    options = resolve_options(target, logits_processor=GreedyProcessor(), eos_tokens_id=[])
    decode_prompt_set(target, None, prompts, budgets, options, batch_size=2)
    assert released == [True]


@pytest.mark.parametrize("kind", ["target-only", "feature"])
def test_staged_one_token_prompts_enter_with_nothing_to_copy(models, kind):
    """One-token prompts (nothing to prefill) staged among longer ones, and a stage of one-token prompts only:
    outputs are still each prompt's own greedy decoding."""
    target, draft = models
    prompts = [[9], [11], [12, 13, 14, 15, 16], [8], [20, 21], [10], [6]]
    budgets = [2, 3, 4, 2, 4, 3, 2]
    drafter = _drafters(target, draft)[kind]
    drafter = None if drafter is None else as_drafter(drafter, VOCAB)
    options = resolve_options(target, logits_processor=GreedyProcessor(), eos_tokens_id=[], gamma=2)
    result = decode_prompt_set(target, drafter, prompts, budgets, options, batch_size=2)
    assert result.outputs == [greedy_reference(target, p, m, []) for p, m in zip(prompts, budgets)]


def test_the_stage_holds_fewer_prompts_when_they_are_long():
    from batched_specdec.decode.admission import stage_rows

    assert stage_rows(8, 44, 128) == 8
    assert stage_rows(8, 512, 128) == 2
    assert stage_rows(8, 100_000, 128) == 1


def test_progress_counts_prompts_and_tokens(models):
    target, _ = models
    prompts, budgets = _prompt_set(7, seed=4)
    calls = []
    options = resolve_options(target, logits_processor=GreedyProcessor(), eos_tokens_id=[])
    result = decode_prompt_set(target, None, prompts, budgets, options, batch_size=2,
                               on_prompt=lambda done, tokens: calls.append((done, tokens)))
    assert calls[-1] == (7, sum(budgets)) == (7, result.stats.generated_tokens)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(calls))


def test_a_prompt_that_cannot_fit_is_an_error_before_compute(models, monkeypatch):
    target, _ = models
    monkeypatch.setattr("batched_specdec.decode.session.prefill", None)  # any compute would fail differently
    prompts = [[5] * 10, [6] * 250, [7] * 4]
    with pytest.raises(ValueError, match="prompt 1 has 250 tokens; with max_gen_len=10 it needs 260 positions"):
        generate(prompts, target, draft=None, max_new_tokens=10, batch_size=2)
    with pytest.raises(ValueError, match="schedule must be one of continuous, static, got 'fifo'"):
        generate(prompts[:1], target, draft=None, max_new_tokens=10, schedule="fifo")


def test_time_split_counts_every_prefill_including_admissions(models, monkeypatch):
    """With collect_stats, the prompts that enter freed rows are timed as prefill (one lap per prefill, staged or
    not, and per admission), not left out of the split."""
    from batched_specdec.decode import stats as stats_module

    target, _ = models
    prompts, budgets = _prompt_set(5, seed=6)
    laps, admitted, staged = [], [], []
    lap, admit, stage = stats_module.PhaseTimer.lap, Admission.admit, Admission.stage
    monkeypatch.setattr(stats_module.PhaseTimer, "lap", lambda self, phase: (laps.append(phase), lap(self, phase)))
    monkeypatch.setattr(Admission, "admit", lambda self, queued: (admitted.append(len(queued)), admit(self, queued)))
    monkeypatch.setattr(Admission, "stage", lambda self, queued: (staged.append(len(queued)), stage(self, queued)))
    options = resolve_options(target, logits_processor=GreedyProcessor(), eos_tokens_id=[], collect_stats=True)
    result = decode_prompt_set(target, None, prompts, budgets, options, batch_size=2)
    assert sum(admitted) == sum(staged) == 3  # every later prompt was staged, then admitted
    assert laps.count("prefill") == 1 + len(staged) + len(admitted)  # the first two prompts, stages, admissions
    split = result.stats.time_split
    assert split["prefill"] > 0 and sum(split.values()) <= result.stats.wall_time_s
