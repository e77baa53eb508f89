"""gamma="auto": the adaptive controller's policy, and exactness while the draft length changes from step to step.

CPU, float32, tiny random-weight models. Plans are forced where the test is about the engine (any plan must stay
lossless), and fixed cost models are used where the test is about the policy (so timings cannot change the
outcome).
"""

from __future__ import annotations

import pytest
import torch
from test_engine import GOF_ALPHA, _chi_square_pvalue, _exact_first_two, _ragged_prompts
from tiny_models import tiny_causal_lm
from torch import Tensor

from batched_specdec import MultinomialProcessor, autoregressive_generate_batch, speculative_generate_batch
from batched_specdec.checks import GAMMA_MAX_DEFAULT
from batched_specdec.controller import (
    ACCEPTANCE_CAP,
    COMPACT_FRACTION_DEFAULT,
    COPY_GAMMA_MAX_DEFAULT,
    EVIDENCE_DECAY,
    STREAK_ACCEPTANCE,
    AdaptiveSpeculation,
    CostModel,
    StaticSpeculation,
    StepPlan,
    compacted_batch_sizes,
    expected_tokens,
    finish_seconds,
    forget_cost_models,
    make_controller,
    shared_cost_model,
)
from batched_specdec.decode.compaction import COMPACT_FRACTION
from batched_specdec.drafting import Drafter, DraftProposal, ModelDrafter, as_drafter
from batched_specdec.drafting.ngram import NGramDrafter
from batched_specdec.options import resolve_options
from batched_specdec.processors import GreedyProcessor
from batched_specdec.runner import decode_prompt_set

CPU = torch.device("cpu")


class ScheduledPlans(AdaptiveSpeculation):
    """Draft lengths from a fixed schedule."""

    def __init__(self, schedule: list[int], num_rows: int) -> None:
        super().__init__(max(schedule), num_rows, CPU, cost_model=CostModel.fixed((1.0, 0.0)), frozen_costs=True)
        self.schedule, self.step = schedule, 0

    def plan(self, row_ids, live, remaining=None) -> StepPlan:
        k = self.schedule[self.step % len(self.schedule)]
        self.step += 1
        return StepPlan(k)

    def choose_width(self, plan, lengths, row_ids, live) -> int:
        return plan.draft_len


class SwitchingCosts(AdaptiveSpeculation):
    """The real policy over a cost model whose numbers change every three steps: drafting is free, then dear."""

    def __init__(self, gamma_max: int, num_rows: int) -> None:
        self.models = [CostModel.fixed((1.0, 0.0), (0.0, 0.0)), CostModel.fixed((1.0, 0.2), (5.0, 0.0))]
        super().__init__(gamma_max, num_rows, CPU, cost_model=self.models[0], frozen_costs=True)
        self.step = 0

    def plan(self, row_ids, live, remaining=None) -> StepPlan:
        self.costs = self.models[(self.step // 3) % 2]
        self.step += 1
        return super().plan(row_ids, live, remaining)


class RowCappedDrafter(ModelDrafter):
    """A model drafter whose rows propose different numbers of its drafts: row ``b`` of the batch ``b mod (k + 1)``
    (host lengths, as the n-gram drafter's), with the model's q for all of them."""

    def propose(self, token_buffer, seq_lens, gamma, logits_processor, max_seq_len, draws=None) -> DraftProposal:
        proposal = super().propose(token_buffer, seq_lens, gamma, logits_processor, max_seq_len, draws)
        proposal.num_tokens = torch.arange(token_buffer.shape[0]) % (gamma + 1)
        return proposal


@pytest.fixture(scope="module")
def llama_pair():
    return tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1, layers=1)


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_greedy_identical_while_draft_lengths_switch(llama_pair, drafter):
    target, draft = llama_pair
    draft = RowCappedDrafter(draft) if drafter == "model" else NGramDrafter()
    prompts = _ragged_prompts(7, 96, 24, seed=5)
    expected = autoregressive_generate_batch(prompts, target, max_gen_len=30, eos_tokens_id=[])
    for controller in (ScheduledPlans([0, 3, 0, 0, 5, 1, 2], len(prompts)), SwitchingCosts(6, len(prompts))):
        outputs, _, stats = speculative_generate_batch(prompts, draft, target, gamma=controller, max_gen_len=30,
                                                       eos_tokens_id=[])
        assert outputs == expected
        used = [k for k, n in enumerate(stats.controller["draft_length_histogram"]) if n]
        assert len(used) >= 2 and 0 in used, used  # the run really switched, including target-only steps


def test_self_draft_accepts_everything_across_target_only_steps():
    """The model drafter catches its cache up after steps without drafts: a draft identical to the target must
    still accept every draft (a stale draft cache would propose other tokens)."""
    target = tiny_causal_lm("llama", seed=0)
    twin = tiny_causal_lm("llama", seed=0)
    prompts = _ragged_prompts(5, 96, 16, seed=2)
    expected = autoregressive_generate_batch(prompts, target, max_gen_len=40, eos_tokens_id=[])
    controller = ScheduledPlans([3, 0, 0, 0, 4, 0, 2, 1], len(prompts))
    outputs, _, stats = speculative_generate_batch(prompts, twin, target, gamma=controller, max_gen_len=40,
                                                   eos_tokens_id=[])
    assert outputs == expected
    assert stats.acceptance_rate == 1.0 and sum(stats.proposed) > 0


@pytest.mark.parametrize("schedule", [[0, 2], [2, 0], [1, 3]], ids=["0-then-2", "2-then-0", "1-then-3"])
def test_sampled_first_two_tokens_follow_target_with_switching_plans(schedule):
    """The joint distribution of the first two tokens equals the target's whatever the plan of each step and however
    many drafts each row proposes (rows differ). Rejects at p < GOF_ALPHA (1e-4 per test, fixed seeds)."""
    processor = MultinomialProcessor(1.0)
    target = tiny_causal_lm("llama", vocab_size=8, seed=20, init_std=0.15)
    draft = tiny_causal_lm("llama", vocab_size=8, seed=21, init_std=0.15, layers=1)
    prompt, n = [1, 4, 2], 6000
    controller = ScheduledPlans(schedule, n)
    outputs, _, stats = speculative_generate_batch([prompt] * n, RowCappedDrafter(draft), target, gamma=controller,
                                                   logits_processor=processor, max_gen_len=2, eos_tokens_id=[],
                                                   seed=321)
    pairs = torch.tensor([o[:2] for o in outputs])
    counts = torch.zeros(8, 8)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(n), accumulate=True)
    if max(schedule) > 0:
        assert 0.0 < stats.acceptance_rate < 1.0
    assert _chi_square_pvalue(counts, _exact_first_two(target, prompt, processor)) > GOF_ALPHA


class ConstantDrafter(Drafter):
    """Proposes the same token everywhere: one the target never emits in the test, so never accepted."""

    def __init__(self, token: int) -> None:
        self.token = token

    def propose(self, token_buffer, seq_lens, gamma, logits_processor, max_seq_len, draws=None) -> DraftProposal:
        return DraftProposal(tokens=torch.full((token_buffer.shape[0], gamma), self.token, dtype=torch.int64))



def test_never_accepted_draft_goes_to_target_only_steps(llama_pair):
    """Drafting is nearly free but verifying wider costs; a draft that is never accepted is dropped after the
    first step or two and the run continues at draft length 0."""
    target, _ = llama_pair
    prompts = _ragged_prompts(6, 96, 12, seed=3)
    expected = autoregressive_generate_batch(prompts, target, max_gen_len=40, eos_tokens_id=[])
    never = min(set(range(96)) - {t for row in expected for t in row})
    costs = CostModel.fixed(verify_s=(1.0, 0.02), draft_forward_s=(0.01, 0.0))
    controller = AdaptiveSpeculation(8, len(prompts), CPU, cost_model=costs, frozen_costs=True)
    outputs, _, stats = speculative_generate_batch(prompts, ConstantDrafter(never), target, gamma=controller,
                                                   max_gen_len=40, eos_tokens_id=[])
    assert outputs == expected
    per_step = stats.controller["draft_length_per_step"]
    assert sum(stats.accepted) == 0 and sum(stats.proposed) > 0
    assert 0 in per_step[:4], per_step  # draft length 0 within a few steps
    assert sum(k > 0 for k in per_step) <= 0.2 * len(per_step), per_step  # and drafting stays rare after that


def test_perfect_cheap_draft_goes_to_gamma_max():
    target = tiny_causal_lm("llama", seed=0)
    twin = tiny_causal_lm("llama", seed=0)
    prompts = _ragged_prompts(4, 96, 12, seed=4)
    costs = CostModel.fixed(verify_s=(1.0, 0.001), draft_forward_s=(0.02, 0.0))
    controller = AdaptiveSpeculation(6, len(prompts), CPU, cost_model=costs, frozen_costs=True)
    _, _, stats = speculative_generate_batch(prompts, twin, target, gamma=controller, max_gen_len=60,
                                             eos_tokens_id=[])
    # 5 from the prior (0.6 per position), then gamma_max once every draft has been accepted; the last step's
    # drafts run past the budget
    assert stats.controller["draft_length_per_step"] == [5] + [6] * 8
    assert stats.acceptance_rate == 1.0


class LowEstimateForRowZero(AdaptiveSpeculation):
    """The real policy over a fixed cost model that favours drafts, with row 0's recent evidence reset to 'never
    accepted' before every plan: for the next step alone the controller expects nothing of it."""

    def __init__(self, num_rows: int) -> None:
        super().__init__(3, num_rows, CPU, cost_model=CostModel.fixed((1.0, 0.01), (0.01, 0.0)), frozen_costs=True)

    def plan(self, row_ids, live, remaining=None) -> StepPlan:
        self.estimates.successes[1, 0], self.estimates.trials[1, 0] = 0.0, 50.0
        return super().plan(row_ids, live, remaining)


def test_every_row_may_accept_up_to_the_step_width():
    """The drafts and the verify width are the batch's: a row the controller expects little from still accepts
    every draft it gets right (here a twin of the target as draft, so all of them). Four prompts in three slots:
    the first steps plan for a full batch, for its tokens per second."""
    target = tiny_causal_lm("llama", seed=0)
    twin = tiny_causal_lm("llama", seed=0)
    prompts = _ragged_prompts(4, 96, 12, seed=4)
    options = resolve_options(target, logits_processor=GreedyProcessor(), eos_tokens_id=[],
                              gamma=LowEstimateForRowZero(4))
    result = decode_prompt_set(target, as_drafter(twin, 96), prompts, [30] * 4, options, batch_size=3)
    assert result.outputs == autoregressive_generate_batch(prompts, target, max_gen_len=30, eos_tokens_id=[])
    stats = result.stats
    assert stats.accepted[0] == stats.proposed[0] > 0 and stats.accepted[0] >= min(stats.accepted[1:3])


def test_the_verify_width_follows_the_proposal_lengths():
    """Once a drafter's proposal lengths are known on the host, the width is the widest worth verifying among the
    live rows: none when no live row proposed anything (a finished row's proposal does not count)."""
    controller = AdaptiveSpeculation(6, 3, CPU, cost_model=CostModel.fixed((1.0, 0.05), (0.05, 0.0)),
                                     frozen_costs=True)
    controller.estimates.successes[:], controller.estimates.trials[:] = 45.0, 50.0
    rows, live = torch.arange(3), torch.tensor([True, True, False])
    plan = controller.plan(rows, live)
    assert plan.draft_len > 2
    assert controller.choose_width(plan, torch.tensor([0, 0, 6]), rows, live) == 0
    assert controller.choose_width(plan, torch.tensor([2, 1, 6]), rows, live) == 2


def test_a_fixed_gamma_verifies_no_wider_than_the_longest_live_proposal():
    """With a fixed gamma and proposal lengths known on the host, positions past every live row's proposal are not
    verified (none can be accepted), but a step keeps one draft position; without lengths (a model drafter) every
    step verifies gamma."""
    controller = StaticSpeculation(10)
    plan, rows, live = controller.plan(torch.arange(3), torch.ones(3, dtype=torch.bool)), torch.arange(3), \
        torch.tensor([True, True, False])
    assert plan.draft_len == 10
    assert controller.choose_width(plan, None, rows, live) == 10
    assert controller.choose_width(plan, torch.tensor([3, 1, 10]), rows, live) == 3
    assert controller.choose_width(plan, torch.tensor([0, 0, 10]), rows, live) == 1  # never 0 (seeded draws)
    assert controller.choose_width(plan, torch.tensor([12, 0, 0]), rows, live) == 10


def test_a_fixed_gamma_with_the_ngram_drafter_stays_exact_with_fewer_verified_positions():
    """End to end: the n-gram drafter with gamma 8 on a repetitive prompt decodes exactly what target-only decoding
    does, and some steps verify fewer than 8 drafts (rows without a match propose none)."""
    target = tiny_causal_lm(seed=3)
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 3]]
    expected = autoregressive_generate_batch(prompts, target, max_gen_len=24, eos_tokens_id=[])
    widths = []
    hook = target.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]),
                                            with_kwargs=True)
    try:
        out, _, _ = speculative_generate_batch(prompts, NGramDrafter(), target, gamma=8, max_gen_len=24,
                                               eos_tokens_id=[])
    finally:
        hook.remove()
    assert out == expected
    verify_widths = widths[1:]  # after the prefill
    assert max(verify_widths) == 9 and min(verify_widths) < 9


def test_each_source_of_a_row_keeps_its_own_acceptance():
    """With two sources, a row's evidence sits under two evidence ids (``row * 2 + source``): what the row's n-gram
    drafts did says nothing about its model drafts. The same row plans long drafts from its matches and none from the
    model, and evidence observed for one id leaves the other as it was."""
    controller = AdaptiveSpeculation(6, 2, CPU, cost_model=CostModel.fixed((1.0, 0.05), (0.05, 0.0)),
                                     frozen_costs=True, num_sources=2)
    row, live = torch.tensor([1]), torch.tensor([True])
    model, ngram = controller.evidence_ids(row, torch.tensor([0])), controller.evidence_ids(row, torch.tensor([1]))
    assert (model.item(), ngram.item()) == (2, 3)
    controller.estimates.successes[:, ngram], controller.estimates.trials[:, ngram] = 45.0, 50.0
    controller.estimates.successes[:, model], controller.estimates.trials[:, model] = 1.0, 50.0
    assert controller.plan(ngram, live).draft_len > 3
    assert controller.plan(model, live).draft_len == 0
    before = controller.estimates.trials[:, model].clone()
    controller.observe(ngram, torch.tensor([4]), torch.tensor([4]), live, 1, 4, 4)
    decay = torch.tensor(EVIDENCE_DECAY, dtype=torch.float64)[:, None]
    assert torch.equal(controller.estimates.trials[:, model], before * decay)  # decayed, nothing added


def test_a_copy_row_whose_drafts_were_all_accepted_plans_longer_drafts():
    """A row whose last verified drafts were copies of its n-gram match, all accepted, is priced at STREAK_ACCEPTANCE
    for its next copy (the match goes on), so it asks for more drafts than its average acceptance would; a miss, or a
    step drafted by the model, ends that. The row's model source is priced at its estimate (at most ACCEPTANCE_CAP)."""
    costs = CostModel.fixed((0.032, 0.0026), (0.0, 0.0))
    controller = AdaptiveSpeculation(16, 1, CPU, cost_model=costs, frozen_costs=True, num_sources=2,
                                     copy_sources=(1,))
    live = torch.tensor([True])
    model, ngram = torch.tensor([0]), torch.tensor([1])
    controller.estimates.successes[:], controller.estimates.trials[:] = 6.0, 10.0  # 0.6 per position, the prior
    before = controller.plan(ngram, live).draft_len
    for slot in (model, ngram):
        controller.start_step()
        controller.observe(slot, torch.tensor([3]), torch.tensor([3]), live, 1, 3, 3)
    assert controller.estimates.acceptance(ngram).item() >= STREAK_ACCEPTANCE
    assert controller.estimates.acceptance(model).item() <= ACCEPTANCE_CAP
    assert controller.plan(ngram, live).draft_len > max(before, controller.plan(model, live).draft_len)
    controller.start_step()
    controller.observe(model, torch.tensor([3]), torch.tensor([3]), live, 1, 3, 3)  # the model drafted: no streak
    assert controller.estimates.acceptance(ngram).item() < STREAK_ACCEPTANCE
    for slot in (ngram, ngram):
        controller.start_step()
        controller.observe(slot, torch.tensor([8]), torch.tensor([8]), live, 1, 8, 8)
    assert controller.estimates.acceptance(ngram).item() >= STREAK_ACCEPTANCE
    controller.start_step()
    controller.observe(ngram, torch.tensor([8]), torch.tensor([2]), live, 1, 8, 8)  # a miss ends the streak
    assert controller.estimates.acceptance(ngram).item() < STREAK_ACCEPTANCE


def test_model_free_drafters_default_to_longer_drafts_and_copy_sources():
    """gamma="auto" without gamma_max: a model-free drafter (draft_ratio None, the n-gram drafter) may draft up to
    COPY_GAMMA_MAX_DEFAULT, its source a copy source; a model drafter keeps GAMMA_MAX_DEFAULT, and with the hybrid's
    two sources only the n-gram one copies. An explicit gamma_max wins."""
    ngram = make_controller("auto", None, 2, CPU, None)
    assert ngram.gamma_max == COPY_GAMMA_MAX_DEFAULT and ngram.estimates.copies.all()
    assert make_controller("auto", 5, 2, CPU, None).gamma_max == 5
    hybrid = make_controller("auto", None, 2, CPU, 0.1, num_sources=2, copy_sources=(1,))
    assert hybrid.gamma_max == GAMMA_MAX_DEFAULT and hybrid.estimates.copies.tolist() == [False, True, False, True]
    assert not make_controller("auto", None, 2, CPU, 0.1).estimates.copies.any()


def test_expected_tokens_matches_the_closed_form():
    a = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    e = expected_tokens(a, 3)
    assert e[0].tolist() == [1, 1, 1, 1]
    assert e[1].tolist() == [1, 1.5, 1.75, 1.875]
    assert e[2].tolist() == [1, 2, 3, 4]


def test_auto_is_the_same_call_with_timings_and_stats(llama_pair):
    target, draft = llama_pair
    prompts = _ragged_prompts(5, 96, 10, seed=9)
    outputs, _, stats = speculative_generate_batch(prompts, draft, target, gamma="auto", gamma_max=4,
                                                       max_gen_len=20, eos_tokens_id=[])
    assert outputs == autoregressive_generate_batch(prompts, target, max_gen_len=20, eos_tokens_id=[])
    summary = stats.controller
    assert len(summary["draft_length_histogram"]) == 5 and sum(summary["draft_length_histogram"]) == stats.steps
    assert 0 < summary["measured_step_s_mean"] * summary["predicted_steps"] <= stats.wall_time_s
    assert summary["predicted_step_s_mean"] > 0
    assert len(stats.acceptance_histogram) == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": "fast"}, "gamma must be an int >= 1 or 'auto', got 'fast'"),
        ({"gamma": 3, "gamma_max": 4}, "gamma_max 4 only applies with gamma 'auto', got gamma 3"),
        ({"gamma": "auto", "gamma_max": 0}, "gamma_max must be an int >= 1, got 0"),
    ],
)
def test_bad_gamma_settings_raise(llama_pair, kwargs, match):
    target, draft = llama_pair
    with pytest.raises(ValueError, match=match):
        speculative_generate_batch([[1, 2]], draft, target, **kwargs)


def test_a_run_that_never_drafts_never_runs_the_draft_model(llama_pair):
    """The draft's prefill is lazy: with draft length 0 throughout, the draft model is never called."""
    target, draft = llama_pair
    prompts = _ragged_prompts(4, 96, 12, seed=8)
    calls = []
    hook = draft.register_forward_hook(lambda *args: calls.append(1))
    try:
        outputs, _, stats = speculative_generate_batch(prompts, draft, target, gamma=ScheduledPlans([0], len(prompts)),
                                                       max_gen_len=10, eos_tokens_id=[])
    finally:
        hook.remove()
    assert outputs == autoregressive_generate_batch(prompts, target, max_gen_len=10, eos_tokens_id=[])
    assert calls == [] and sum(stats.proposed) == 0


def test_a_draft_as_large_as_the_target_is_not_tried():
    """gamma auto prices a model draft by its parameter count until measured: a draft the size of the target
    costs as much as a verify per draft token, so the controller never drafts (and never pays its prefill)."""
    target = tiny_causal_lm("llama", seed=0)
    twin = tiny_causal_lm("llama", seed=0)
    prompts = _ragged_prompts(4, 96, 12, seed=6)
    _, _, stats = speculative_generate_batch(prompts, twin, target, gamma="auto", max_gen_len=16, eos_tokens_id=[])
    assert stats.controller["draft_length_histogram"][0] == stats.steps


def test_auto_calls_share_measured_step_costs_per_target_and_drafter():
    """A second call with the same target and drafter starts from the first call's measured costs: every one of
    its timed steps is planned from a cost model (all but the first, which writes the prompt tails and is not timed;
    a cold call's first two steps have no prediction).
    Another drafter, or forget_cost_models(), starts cold again."""
    target = tiny_causal_lm("llama", seed=4)
    prompts = _ragged_prompts(3, 96, 10, seed=5)
    forget_cost_models()

    def run(drafter):
        _, _, stats = speculative_generate_batch(prompts, drafter, target, gamma="auto", max_gen_len=12,
                                                 eos_tokens_id=[])
        return stats.controller["predicted_steps"], stats.steps

    ngram = NGramDrafter()
    predicted, steps = run(ngram)
    # cold: the first step writes the prompt tails (its timing says nothing about a step's), the second measures
    assert predicted == steps - 2
    costs = shared_cost_model(target, NGramDrafter(), CPU, rows=3)
    assert costs.ready and shared_cost_model(target, ngram, CPU, rows=4) is costs  # one power-of-two bucket
    predicted, steps = run(NGramDrafter())
    assert predicted == steps - 1  # warm: planned from the first call's timings
    draft = tiny_causal_lm("llama", seed=6, layers=1)
    assert shared_cost_model(target, ModelDrafter(draft), CPU, rows=3) is not costs
    forget_cost_models()
    predicted, steps = run(ngram)
    assert predicted == steps - 2


def test_shared_step_costs_are_kept_per_batch_size_bucket():
    """Costs measured at 16 rows do not price 1-row steps: a batch-1 call after a batch-16 call starts from its
    own (cold) cost model, and a second batch-1 call from the first one's."""
    target = tiny_causal_lm("llama", seed=4)
    forget_cost_models()
    assert shared_cost_model(target, NGramDrafter(), CPU, rows=1) is not shared_cost_model(target, NGramDrafter(),
                                                                                           CPU, rows=16)

    def run(n):
        _, _, stats = speculative_generate_batch(_ragged_prompts(n, 96, 10, seed=5), NGramDrafter(), target,
                                                 gamma="auto", max_gen_len=12, eos_tokens_id=[])
        return stats.controller["predicted_steps"], stats.steps

    run(16)
    predicted, steps = run(1)
    # cold at batch 1, although 16 rows were measured (the first step writes the tails, the second measures)
    assert predicted == steps - 2
    predicted, steps = run(1)
    assert predicted == steps - 1  # warm: every timed step
    forget_cost_models()


def _steps_until_drafting_again(misses: int, remaining: Tensor | None = None) -> int:
    """Steps without drafts until rows whose last ``misses`` 3-draft proposals were all rejected draft again: one row,
    or with ``remaining`` (each row's tokens to go) as many rows, planned as a last stretch."""
    n = 1 if remaining is None else remaining.shape[0]
    controller = AdaptiveSpeculation(4, n, CPU, cost_model=CostModel.fixed((1.0, 0.15 / n), (0.0, 0.0)),
                                     frozen_costs=True)
    rows, live, none = torch.arange(n), torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.int64)
    # no evidence: the prior, no optimism
    assert controller.estimates.acceptance(rows).tolist() == pytest.approx([0.6] * n)
    for _ in range(misses):
        controller.start_step()
        controller.observe(rows, torch.full((n,), 3), none, live, n, 3, 3)
    waited = 0
    while controller.plan(rows, live, remaining).draft_len == 0:
        controller.start_step()
        controller.observe(rows, none, none, live, n, 0, 0)  # a step without drafts
        waited += 1
        assert waited < 1000, f"never tried again after {misses} misses"
    return waited


def test_a_row_whose_drafts_missed_is_tried_again_later_the_more_it_missed():
    """Steps without drafts bring no evidence, so without optimism a row that missed early (a model repeating a text
    often starts with words of its own) waits for its evidence to decay to the prior: 12, 99, 215 and 315 steps
    after 1, 3, 10 and 30 misses (EXPLORATION = 0), longer than most outputs. With it: 0, 5, 82 and 181."""
    waits = [_steps_until_drafting_again(m) for m in (1, 3, 10, 30)]
    assert waits[0] <= 1 and waits[1] < waits[2] < waits[3], waits


def test_a_last_stretch_whose_drafts_missed_tries_again_later():
    """A last stretch of several rows plans from their long-run rates, lifted the same way: one batch (a last
    stretch from its first step) whose drafts all missed early drafts again later, the sooner the fewer it missed:
    36 and 153 steps after 3 and 10 misses (never, within 1000 steps, after 3 without the lift)."""
    waits = [_steps_until_drafting_again(m, torch.tensor([500, 500])) for m in (3, 10)]
    assert waits[0] < 64 and waits[0] < waits[1], waits


# --- the batch's last stretch ---------------------------------------------------------------------------------


def test_finish_seconds_follows_the_rows_that_are_still_live():
    """Two rows with 10 tokens to go, one accepting every draft and one none; a step costs 1 s plus 1 s per
    verified token. Without drafts both take 10 steps of 2 rows (3 s each): 30 s. With one draft the first leaves
    after 5 steps of 2 rows at width 2 (5 s each), then the second goes on alone without drafts (its cap is 0) for 5
    steps of 2 s: 35 s."""
    step_s = torch.tensor([[1.0 + rows * width for width in (1, 2)] for rows in range(3)], dtype=torch.float64)
    seconds = finish_seconds(torch.tensor([[1.0, 2.0], [1.0, 1.0]], dtype=torch.float64), torch.tensor([10, 10]),
                             torch.tensor([1, 0]), compacted_batch_sizes(2, 2, COMPACT_FRACTION), step_s)
    assert seconds.tolist() == [30.0, 35.0]


def test_compacted_batch_sizes_follow_the_compaction_rule():
    """Finished rows stay in the batch until a quarter of it has finished (``COMPACT_FRACTION``)."""
    assert COMPACT_FRACTION_DEFAULT == COMPACT_FRACTION  # a controller built without the batch's rule assumes it
    assert compacted_batch_sizes(8, 8, COMPACT_FRACTION).tolist() == [1, 2, 3, 4, 6, 6, 8, 8]
    assert compacted_batch_sizes(8, 5, COMPACT_FRACTION).tolist() == [1, 2, 3, 5, 5]  # 3 rows finished, not compacted


def test_in_the_last_stretch_a_few_recent_misses_do_not_stop_the_batch():
    """Eight rows that accepted 5 drafts in 6 over their runs so far, one of which just missed eight times: for the
    next step alone that row looks poor, but over the tokens it has to go its long-run rate decides, and the batch
    keeps drafting. A row alone plans from its next-step estimate."""
    controller = AdaptiveSpeculation(4, 8, CPU, cost_model=CostModel.fixed((1.0, 0.05), (0.05, 0.0)),
                                     frozen_costs=True)
    controller.estimates.successes[:] = torch.tensor([[50.0], [5.0]])  # long-run and recent horizons (EVIDENCE_DECAY)
    controller.estimates.trials[:] = torch.tensor([[60.0], [6.0]])
    rows, live = torch.arange(8), torch.ones(8, dtype=torch.bool)
    for _ in range(8):
        controller.start_step()
        controller.observe(rows, torch.tensor([3] + [0] * 7), torch.zeros(8, dtype=torch.int64), live, 8, 3, 3)
    assert controller.estimates.acceptance(rows)[0] < 0.25 and controller.estimates.run_acceptance(rows)[0] > 0.7
    assert controller.plan(rows, live, torch.full((8,), 64)).draft_len > 0
    assert controller.estimates.run_acceptance(rows[:1]).tolist() == controller.estimates.acceptance(rows[:1]).tolist()


def _mixed_rows_controller() -> AdaptiveSpeculation:
    """8 rows: row 0 never accepted (about 0.04), rows 1-7 accepted 5 times in 6; a step costs mostly its fixed
    part (1 s, plus 0.05 s per verified token and per draft forward)."""
    controller = AdaptiveSpeculation(4, 8, CPU, cost_model=CostModel.fixed((1.0, 0.05), (0.05, 0.0)),
                                     frozen_costs=True)
    controller.estimates.successes[:, 1:], controller.estimates.trials[:, 1:] = 50.0, 60.0
    controller.estimates.trials[:, 0] = 60.0
    return controller


def test_in_the_last_stretch_the_row_with_most_to_go_decides():
    """A batch that stays full (prompts queued) drafts for the 7 good rows. In its last stretch, with every row
    64 tokens from its end, the row that never accepts sets the run's length and drafting would only make its steps
    dearer: plain steps. Once that row is nearly done, the other rows' drafts shorten the run again."""
    controller, rows, live = _mixed_rows_controller(), torch.arange(8), torch.ones(8, dtype=torch.bool)
    full = controller.plan(rows, live)
    assert full.draft_len > 0 and full.remaining is None
    assert controller.plan(rows, live, torch.full((8,), 64)).draft_len == 0
    nearly_done = controller.plan(rows, live, torch.tensor([3] + [64] * 7))
    assert nearly_done.draft_len > 0
    assert nearly_done.remaining.tolist() == [3] + [64] * 7


@pytest.mark.parametrize("acceptance", [0.05, 0.3, 0.5, 0.7, 0.95])
def test_one_row_plans_the_same_for_a_full_batch_and_its_last_stretch(acceptance):
    """With one row, the time to its end is its tokens to go over its tokens per second: both aims agree (far
    from the row's end, where no step can emit more than it needs)."""
    controller = AdaptiveSpeculation(6, 1, CPU, cost_model=CostModel.fixed((1.0, 0.15), (0.05, 0.0)),
                                     frozen_costs=True)
    controller.estimates.successes[:], controller.estimates.trials[:] = 60.0 * acceptance, 60.0
    row, live = torch.arange(1), torch.ones(1, dtype=torch.bool)
    assert controller.plan(row, live, torch.tensor([200])).draft_len == controller.plan(row, live).draft_len


class RecordingRemaining(AdaptiveSpeculation):
    """The real policy, recording what each plan was made for (None: a batch kept full)."""

    def __init__(self, num_rows: int) -> None:
        super().__init__(3, num_rows, CPU, cost_model=CostModel.fixed((1.0, 0.01), (0.01, 0.0)), frozen_costs=True)
        self.seen = []

    def plan(self, row_ids, live, remaining=None) -> StepPlan:
        plan = super().plan(row_ids, live, remaining)
        self.seen.append(None if plan.remaining is None else plan.remaining.tolist())
        return plan


def test_the_session_plans_for_the_last_stretch_once_no_prompt_waits(llama_pair):
    """Continuous batching: 5 prompts in 2 slots plan for a full batch while prompts are queued, then for the last
    stretch with each live row's budget less what it generated. One batch of all prompts is one last stretch from
    its first step, whose rows each have their whole budget to go."""
    target, draft = llama_pair
    prompts = _ragged_prompts(5, 96, 12, seed=6)
    budgets = [4, 12, 4, 6, 6]
    controller = RecordingRemaining(5)
    options = resolve_options(target, logits_processor=GreedyProcessor(), eos_tokens_id=[], gamma=controller)
    result = decode_prompt_set(target, as_drafter(draft, 96), prompts, budgets, options, batch_size=2)
    assert result.outputs == autoregressive_generate_batch(prompts, target, max_gen_len=budgets, eos_tokens_id=[])
    seen = controller.seen
    last_stretch = seen.index(next(s for s in seen if s is not None))
    assert last_stretch > 0 and all(s is None for s in seen[:last_stretch])
    assert all(s is not None and 1 <= min(s) and max(s) <= 12 for s in seen[last_stretch:])
    one_batch = RecordingRemaining(5)
    options = resolve_options(target, logits_processor=GreedyProcessor(), eos_tokens_id=[], gamma=one_batch)
    decode_prompt_set(target, as_drafter(draft, 96), prompts, budgets, options, batch_size=5)
    assert sorted(one_batch.seen[0]) == sorted(budgets) and None not in one_batch.seen
