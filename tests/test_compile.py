"""The capturable step on CPU: ``compile=True`` gives the eager run's outputs, compiles whole graphs (no breaks) and
does not recompile within a span bucket; the delayed host read gives the immediate read's outputs.

Compiling costs seconds per graph, so the runs here share shapes (one module-scoped model pair, the same prompts)
and compiled graphs are reused across tests in the process."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import tiny_causal_lm
from torch._dynamo.utils import counters

from batched_specdec import (
    MultinomialProcessor,
    autoregressive_generate_batch,
    capture,
    speculative_generate_batch,
)
from batched_specdec.drafting.ngram import NGramDrafter
from batched_specdec.ragged_cache import RaggedKVCache

VOCAB = 96
EOS = [5]
# Per-row budgets differ and row 4 stops early: rows finish at different steps, so the batch is compacted mid-run.
MAX_GEN = [30, 6, 20, 30, 4, 24]


@pytest.fixture(scope="module")
def models():
    return tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1, layers=1)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in (3, 17, 9, 30, 5, 12)]


def _run(kind, models, prompts, *, compile, sampled=False, **kwargs):
    target, draft = models
    sampling = {"logits_processor": MultinomialProcessor(1.0), "seed": 11} if sampled else {}
    common = {"max_gen_len": MAX_GEN, "eos_tokens_id": EOS, "compile": compile, **sampling, **kwargs}
    if kind == "target-only":
        return autoregressive_generate_batch(prompts, target, return_stats=True, **common)
    drafter = NGramDrafter() if kind == "ngram" else draft
    outputs, _, stats = speculative_generate_batch(prompts, drafter, target, gamma=3, **common)
    return outputs, stats


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", ["target-only", "ngram", "model"])
def test_compiled_outputs_equal_eager(models, prompts, kind, sampled):
    breaks = sum(counters["graph_break"].values())
    eager, eager_stats = _run(kind, models, prompts, compile=False, sampled=sampled)
    compiled, stats = _run(kind, models, prompts, compile=True, sampled=sampled)
    assert compiled == eager
    # Both runs compact; the compiled one only to power-of-two batch sizes (graph-stable buckets), so not at the
    # same steps: every draw is keyed by the row, not its position, so the outputs are the same all the same.
    assert stats.compactions >= 1 and eager_stats.compactions >= 1
    assert sum(counters["graph_break"].values()) == breaks  # fullgraph=True would have raised anyway
    if kind == "target-only":
        assert sum(map(len, eager)) == stats.generated_tokens


def test_no_recompiles_within_a_span_bucket(models, monkeypatch):
    """100 tokens per row: a step whose attention span is the previous step's compiles nothing (dynamic shapes: a
    new span compiles nothing either, but CUDA graphs record one per span bucket), and a second run compiles
    nothing at all."""
    target, _ = models
    seen = []  # ((span, rows), graphs compiled so far) at every decode forward's set_span
    set_span = RaggedKVCache.set_span

    def recording_set_span(cache, max_len):
        set_span(cache, max_len)
        if cache.rows is None:  # not a prefill chunk
            seen.append(((cache.span, cache.batch_size), capture.graphs_compiled()))

    monkeypatch.setattr(RaggedKVCache, "set_span", recording_set_span)
    torch._dynamo.reset()  # count this test's graphs from zero
    rows = [[7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25]]
    common = {"max_gen_len": 100, "eos_tokens_id": [], "compile": True}
    for run in (
        lambda: autoregressive_generate_batch(rows, target, return_stats=True, **common)[1],
        lambda: speculative_generate_batch(rows, NGramDrafter(), target, gamma=3, **common)[2],
    ):
        seen.clear()
        stats = run()
        shapes = [shape for shape, _ in seen]
        assert len({span for span, _ in shapes}) == 2  # 64, then the capacity (6 + 100 + room)
        # step 0 is eager (it writes the prompt tails), so step 1 compiles the forward: compare from step 2 on
        for i in range(3, len(seen)):
            if shapes[i - 1] == shapes[i - 2]:  # step i - 1 ran in the span bucket and batch size of step i - 2
                assert seen[i][1] == seen[i - 1][1], f"step {i - 1} recompiled within span and rows {shapes[i - 1]}"
        # forward, sampler and commit, their batch-of-one specialisations when a compaction leaves one row, and the
        # forward once more at the first change of span (a Python int: dynamo specialises it once, then not)
        assert stats.extra["graphs_compiled"] <= 3 * (1 + stats.compactions) + 1
        seen.clear()
        assert run().extra["graphs_compiled"] == 0
    # The target drafting for itself (no compaction): draft and verify forwards, 25 steps, nothing recompiled after.
    _, _, spec = speculative_generate_batch(rows, target, target, gamma=3, **common)
    assert spec.steps == 25 and spec.compactions == 0
    _, _, again = speculative_generate_batch(rows, target, target, gamma=3, **common)
    assert again.extra["graphs_compiled"] == 0


@pytest.mark.parametrize("kind", ["target-only", "ngram", "model"])
def test_delayed_host_read_equals_immediate(models, prompts, kind):
    for sampled in (False, True):
        immediate, stats = _run(kind, models, prompts, compile=False, sampled=sampled, delayed_host_read=False)
        delayed, delayed_stats = _run(kind, models, prompts, compile=False, sampled=sampled, delayed_host_read=True)
        assert delayed == immediate
        assert delayed_stats.generated == stats.generated
        assert delayed_stats.compactions >= 1
        # The host learns that the last row finished one step late (unless a compaction step read the state at
        # once): at most one more step, whose rows are all frozen.
        assert stats.steps <= delayed_stats.steps <= stats.steps + 1
        assert delayed_stats.tokens_per_target_forward == stats.tokens_per_target_forward


@pytest.mark.parametrize("kind", ["target-only", "self-draft"])
def test_delayed_host_read_at_span_bucket_edges(models, kind):
    """Prompts that end just below a span bucket's edge: the span of the step after the first must cover what the
    first step committed, which the host has not seen yet (a key out of the span changes the logits: compared by
    log-probability, exactly). The target drafting for itself commits gamma + 1 tokens per step."""
    target, _ = models
    for length in range(58, 66):
        rows = [[(7 * i + length) % VOCAB for i in range(length)], [3, 4, 5]]
        kwargs = {"max_gen_len": 8, "eos_tokens_id": [], "return_logprobs": True}
        results = []
        for delayed in (False, True):
            if kind == "target-only":
                out, stats = autoregressive_generate_batch(rows, target, delayed_host_read=delayed, **kwargs)
            else:
                out, _, stats = speculative_generate_batch(rows, target, target, gamma=3, delayed_host_read=delayed,
                                                           **kwargs)
            results.append((out, stats.logprobs))
        assert results[1] == results[0], f"prompt of {length} tokens"


def test_no_buffers_are_allocated_inside_a_compiled_forward(models, monkeypatch):
    """One-token prompts have no prefill (and a draft has nothing to catch up on for prompts of <= 2 tokens): the
    first decode forward allocates the caches' buffers, eagerly. Marking a buffer static inside a compiled graph
    (what happens on CUDA) would fail, so mark every buffer here as CUDA would."""
    target, draft = models
    monkeypatch.setattr(capture, "static", lambda buffer, enabled: torch._dynamo.mark_static_address(buffer) or buffer)
    rows = [[7], [9], [11]]
    kwargs = {"max_gen_len": 6, "eos_tokens_id": []}
    expected = autoregressive_generate_batch(rows, target, **kwargs)
    assert autoregressive_generate_batch(rows, target, compile=True, **kwargs) == expected
    assert speculative_generate_batch(rows, draft, target, gamma=2, compile=True, **kwargs)[0] == expected
    rows = [[7, 8], [9]]  # the target prefills one token; the draft still has nothing to catch up on
    expected = autoregressive_generate_batch(rows, target, **kwargs)
    assert speculative_generate_batch(rows, draft, target, gamma=2, compile=True, **kwargs)[0] == expected


def test_compiled_with_delayed_read_equals_eager_immediate(models, prompts):
    """The CUDA default pairing (compiled step, host one step behind) against the plain eager run."""
    for kind in ("target-only", "model"):
        eager, _ = _run(kind, models, prompts, compile=False, sampled=True, delayed_host_read=False)
        both, stats = _run(kind, models, prompts, compile=True, sampled=True, delayed_host_read=True)
        assert both == eager and stats.compactions >= 1


def test_delayed_host_read_and_compile_refuse_what_they_cannot_do(models, prompts):
    target, draft = models
    with pytest.raises(ValueError, match="integer gamma"):
        speculative_generate_batch(prompts, draft, target, gamma="auto", delayed_host_read=True)
    with pytest.raises(TypeError, match="delayed_host_read must be"):
        autoregressive_generate_batch(prompts, target, delayed_host_read="yes")
    with pytest.raises(TypeError, match="compile must be"):
        autoregressive_generate_batch(prompts, target, compile="yes")


def test_generate_and_the_cli_pass_compile_through(models, prompts, monkeypatch):
    from batched_specdec import capture, generate
    from batched_specdec.main import parse_config

    assert parse_config(["--compile"]).compile is True and parse_config([]).compile is False
    calls = []

    def eager_run_compiled(fn, device, *args):  # count what would run compiled, run it eagerly
        calls.append(fn.__name__)
        return fn(*args)

    monkeypatch.setattr(capture, "run_compiled", eager_run_compiled)
    target, draft = models
    for drafter in (None, draft):
        calls.clear()
        generate(prompts, target, draft=drafter, gamma=2, max_new_tokens=4, compile=True)
        assert "_forward" in calls and "commit_step" in calls
        assert ("verify_drafts" in calls) == (drafter is not None)
    with pytest.raises(TypeError, match="compile must be"):
        generate(prompts, target, compile=1)


def test_compiled_adaptive_speculation_is_exact(models):
    """gamma="auto" under compile: the verify width changes from step to step; outputs stay exact."""
    target, _ = models
    rows = [[3, 4, 5, 6, 3, 4, 5], [9, 8, 7, 9, 8, 7, 9, 8]]
    expected = autoregressive_generate_batch(rows, target, max_gen_len=12, eos_tokens_id=[])
    outputs, _, stats = speculative_generate_batch(rows, NGramDrafter(), target, gamma="auto", gamma_max=5,
                                                   max_gen_len=12, eos_tokens_id=[], compile=True)
    assert outputs == expected
    assert len({w for w, n in enumerate(stats.controller["verify_width_histogram"]) if n}) >= 2
