"""The graph path (``cuda_graphs=True``, batched_specdec.graphs) on a CPU, through the stand-in that records by running
and replays by running again with its checks: outputs equal eager decoding for target-only decoding and every
drafter kind, both schedules, compaction and admission, greedy and seeded sampling; no host read inside a recorded
forward; inputs at their recorded addresses; moved buffers recorded again and counted; outputs of one pool
overwritten by its other recordings (as a CUDA replay may), never by the other role's. Also the delayed host read's
ring of pinned buffers (torch.cuda faked). CPU, float32, tiny random-weight models."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from test_continuous import _drafters
from tiny_models import greedy_reference, tiny_causal_lm

from batched_specdec import (
    GreedyProcessor,
    MultinomialProcessor,
    OptionError,
    autoregressive_generate_batch,
    devices,
    graphs,
)
from batched_specdec.drafting import as_drafter
from batched_specdec.graphs import COUNTS, GraphPool, HostReadInGraph, graph_span
from batched_specdec.options import resolve_options
from batched_specdec.runner import decode_prompt_set

VOCAB = 96
KINDS = ["target-only", "ngram", "model", "feature", "hybrid"]


@pytest.fixture(scope="module")
def models():
    return tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1, layers=1)


def _prompt_set(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Prompts of 1-16 tokens with budgets of 1-12: rows finish at different steps (compaction, admission)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, VOCAB) for _ in range(rng.randint(1, 16))] for _ in range(n)]
    return prompts, [rng.randint(1, 12) for _ in range(n)]


def _both(models, kind, prompts, budgets, processor, schedule, slots, seed=0, **options):
    """Eager and graph-path results of one prompt set (fresh drafters for each), and the graph run's counts."""
    target, draft = models
    eager = resolve_options(target, logits_processor=processor, **options)
    results = []
    for opts in (eager, replace(eager, cuda_graphs=True)):
        drafter = _drafters(target, draft)[kind]
        drafter = None if drafter is None else as_drafter(drafter, VOCAB)
        before = COUNTS.snapshot()
        results.append(decode_prompt_set(target, drafter, prompts, budgets, opts, batch_size=slots, seed=seed,
                                         schedule=schedule))
    return results[0], results[1], COUNTS.since(before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("schedule", ["continuous", "static"])
def test_greedy_graph_path_equals_eager_decoding(models, kind, schedule):
    prompts, budgets = _prompt_set(7, seed=4)
    eager, graphed, counts = _both(models, kind, prompts, budgets, GreedyProcessor(), schedule, slots=4,
                                   eos_tokens_id=[7], gamma=3)
    assert graphed.outputs == eager.outputs
    assert eager.outputs[:3] == [greedy_reference(models[0], p, m, [7]) for p, m in zip(prompts[:3], budgets[:3])]
    assert counts["graph_replays"] > counts["graphs_recorded"] > 0
    assert graphed.stats.extra["graph_replays"] == counts["graph_replays"]
    assert graphed.stats.compactions > 0  # rows left the batch (power-of-two buckets) and the graphs followed


@pytest.mark.parametrize("kind", ["target-only", "model", "feature", "hybrid"])
def test_seeded_samples_through_the_graph_path_equal_eager(models, kind):
    prompts, budgets = _prompt_set(5, seed=6)
    eager, graphed, _ = _both(models, kind, prompts, budgets, MultinomialProcessor(1.0), "continuous", slots=3,
                              seed=11, eos_tokens_id=[], gamma=2)
    assert graphed.outputs == eager.outputs
    assert len({tuple(o) for o in graphed.outputs}) > 1


@pytest.mark.parametrize("kind", ["model", "feature"])
def test_coupled_sampling_auto_gamma_and_logprobs_through_the_graph_path(models, kind):
    """gamma auto (the drafts' widths vary step to step), coupled draws and log-probabilities read from the
    recorded verify's logits: tokens equal eager decoding's, log-probabilities to float rounding."""
    prompts, budgets = _prompt_set(5, seed=8)
    eager, graphed, counts = _both(models, kind, prompts, budgets, MultinomialProcessor(0.8), "continuous", slots=3,
                                   seed=3, eos_tokens_id=[], gamma="auto", sampling_scheme="coupled",
                                   return_logprobs=True)
    assert graphed.outputs == eager.outputs and counts["graphs_recorded"] > 0
    for a, b in zip(graphed.stats.logprobs, eager.stats.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)


def test_delayed_host_read_through_the_graph_path(models):
    prompts, budgets = _prompt_set(6, seed=9)
    eager, graphed, _ = _both(models, "model", prompts, budgets, GreedyProcessor(), "static", slots=8,
                              eos_tokens_id=[7], gamma=2, delayed_host_read=True)
    assert graphed.outputs == eager.outputs


def test_a_second_call_replays_the_first_calls_recordings(models):
    """The pooled buffers of a call of the same shape keep their addresses: nothing is recorded again."""
    target, _ = models
    prompts, _ = _prompt_set(5, seed=12)
    kwargs = {"max_gen_len": 10, "eos_tokens_id": [], "cuda_graphs": True, "return_stats": True}
    first, stats1 = autoregressive_generate_batch(prompts, target, **kwargs)
    second, stats2 = autoregressive_generate_batch(prompts, target, **kwargs)
    assert first == second == autoregressive_generate_batch(prompts, target, max_gen_len=10, eos_tokens_id=[])
    assert stats1.extra["graphs_recorded"] >= 1 and stats2.extra["graphs_recorded"] == 0
    # every step but the first, whose forward also writes the prompt tails (eager)
    assert stats2.extra["graph_replays"] == 9 and stats2.extra["graph_recording_s"] == 0


def test_a_host_read_inside_a_recorded_forward_fails(models):
    """A layer that reads a value on the host (a forward hook calling .item()): eager decoding runs, the graph
    path stops at its first recording."""
    target, _ = models

    def reads_a_value(module, args) -> None:
        args[0].sum().item()

    handle = target.model.layers[0].register_forward_pre_hook(reads_a_value)
    try:
        assert autoregressive_generate_batch([[5, 6, 7]], target, max_gen_len=3, eos_tokens_id=[])
        with pytest.raises(HostReadInGraph, match="item"):
            autoregressive_generate_batch([[5, 6, 7]], target, max_gen_len=3, eos_tokens_id=[], cuda_graphs=True)
    finally:
        handle.remove()


@pytest.mark.parametrize("read", [
    lambda x: x.sum().item(), lambda x: x.tolist(), lambda x: x.cpu(), lambda x: x.nonzero(),
    lambda x: bool(x.any()), lambda x: x[x > 0], lambda x: torch.equal(x, x), lambda x: int(x[0]),
])
def test_every_kind_of_host_read_is_caught_while_recording(read):
    pool = GraphPool(torch.device("cpu"))

    def fn(static):
        read(static["x"])
        return (static["x"] + 1,)

    with pytest.raises(HostReadInGraph):
        pool.run(("shape",), (), fn, {"x": torch.arange(4)})


def test_replays_copy_inputs_into_static_buffers_and_check_addresses():
    pool = GraphPool(torch.device("cpu"))
    outside = {"w": torch.full((3,), 2.0)}
    fn = lambda static: (static["x"] * outside["w"],)
    first = pool.run(("a",), (), fn, {"x": torch.ones(3)})[0]
    again = pool.run(("a",), (), fn, {"x": torch.tensor([1.0, 2.0, 3.0])})[0]
    assert again is first and again.tolist() == [2.0, 4.0, 6.0]  # the recorded output, rewritten
    outside["w"].fill_(3.0)  # state updated in place is read by the replay
    assert pool.run(("a",), (), fn, {"x": torch.ones(3)})[0].tolist() == [3.0, 3.0, 3.0]
    kept = outside["w"]
    outside["w"] = torch.full((3,), 2.0)  # a new tensor where the recording read another: not a static input
    with pytest.raises(HostReadInGraph, match="other addresses"):
        pool.run(("a",), (), lambda static: (static["x"] * outside["w"],), {"x": torch.ones(3)})
    assert kept is not outside["w"]


def test_moved_buffers_are_recorded_again_and_counted():
    pool = GraphPool(torch.device("cpu"))
    fn = lambda static: (static["x"] + 1,)
    before = COUNTS.snapshot()
    pool.run(("a",), (1,), fn, {"x": torch.ones(2)})
    pool.run(("a",), (1,), fn, {"x": torch.ones(2)})
    pool.run(("a",), (2,), fn, {"x": torch.ones(2)})
    counts = COUNTS.since(before)
    assert (counts["graphs_recorded"], counts["graphs_rerecorded_moved"], counts["graph_replays"]) == (2, 1, 3)
    assert len(pool.recordings) == 1


def test_outputs_are_overwritten_by_the_pools_other_recordings_not_by_another_roles():
    model = torch.nn.Linear(2, 2)
    target, draft = graphs.pool_for(model, "target", "cpu"), graphs.pool_for(model, "draft", "cpu")
    assert graphs.pool_for(model, "target", "cpu") is target and target is not draft
    fn = lambda static: (static["x"] * 2,)
    verify = target.run(("verify",), (), fn, {"x": torch.ones(2)})[0]
    drafted = draft.run(("draft",), (), fn, {"x": torch.ones(2)})[0]
    assert verify.tolist() == [2.0, 2.0] and drafted.tolist() == [2.0, 2.0]
    target.run(("other width",), (), fn, {"x": torch.ones(3)})
    assert verify.isnan().all() and drafted.tolist() == [2.0, 2.0]


def test_span_buckets_are_geometric():
    assert [graph_span(n, 10_000) for n in (1, 64, 65, 96, 97, 129, 200, 257, 385, 600, 1000)] == \
        [64, 64, 96, 96, 128, 192, 256, 384, 512, 768, 1024]
    assert graph_span(500, 300) == 300
    spans = {graph_span(n, 1 << 20) for n in range(1, 8193)}
    assert len(spans) == 15  # 64 .. 8192: two buckets per doubling


def test_the_option_is_off_by_default_and_refused_with_compile(models):
    target, _ = models
    assert resolve_options(target, logits_processor=GreedyProcessor()).cuda_graphs is False
    assert resolve_options(target, logits_processor=GreedyProcessor(), cuda_graphs=True).cuda_graphs is True
    with pytest.raises(OptionError, match="cuda_graphs=True cannot be combined with compile=True"):
        resolve_options(target, logits_processor=GreedyProcessor(), cuda_graphs=True, compile=True)
    with pytest.raises(OptionError, match="cuda_graphs"):
        resolve_options(target, logits_processor=GreedyProcessor(), cuda_graphs="yes")


class _FakeEvent:
    def __init__(self) -> None:
        self.recorded = self.waited = 0

    def record(self) -> None:
        self.recorded += 1

    def synchronize(self) -> None:
        self.waited += 1


def test_the_delayed_read_ring_pins_two_buffers_once(monkeypatch):
    """On CUDA (faked) the ring allocates one pinned buffer per slot, not one per copy, waits for each copy's event
    before it is read, and refuses a ticket whose slot was reused."""
    empty, pinned = torch.empty, []

    def empty_recording_pins(*args, pin_memory=False, **kwargs):
        pinned.append(pin_memory)
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty_recording_pins)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    ring = devices.HostRing(torch.device("cuda"))
    tickets = [ring.start(torch.arange(6) * step) for step in range(10)]
    assert pinned == [True, True] and ring.allocations == 2
    assert ring.read(tickets[-1]).tolist() == (torch.arange(6) * 9).tolist()
    assert ring.read(tickets[-2]).tolist() == (torch.arange(6) * 8).tolist()
    with pytest.raises(RuntimeError, match="overwritten"):
        ring.read(tickets[-3])
    assert ring.start(torch.arange(4)) == 10 and ring.allocations == 2  # a smaller state (compaction) fits
    assert ring.read(10).tolist() == [0, 1, 2, 3]


def test_on_cuda_a_recording_warms_up_on_a_side_stream_captures_into_the_pool_and_replays(monkeypatch):
    """The CUDA branch with torch.cuda faked: two eager warm-up runs on the pool's side stream, one capture into
    the pool's memory on that stream, then a replay for every call (the first included); inputs copied before."""
    calls = []

    class Stream:
        def __init__(self, device=None):
            calls.append("stream")

        def wait_stream(self, other):
            calls.append("wait_stream")

    class CUDAGraph:
        def replay(self):
            calls.append("replay")

    class Capture:
        def __init__(self, graph, pool=None, stream=None):
            assert isinstance(graph, CUDAGraph) and pool == "pool handle" and isinstance(stream, Stream)

        def __enter__(self):
            calls.append("capture")

        def __exit__(self, *exc):
            calls.append("captured")

    class OnStream:
        def __init__(self, stream):
            assert isinstance(stream, Stream)

        def __enter__(self):
            calls.append("on side stream")

        def __exit__(self, *exc):
            calls.append("off side stream")

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool handle")
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", OnStream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    pool = GraphPool(torch.device("cuda"))
    assert pool.handle == "pool handle" and pool.warmup_runs == 2

    def fn(static):
        calls.append("forward")
        return (static["x"] * 2,)

    out = pool.run(("a",), (), fn, {"x": torch.ones(2)})
    assert calls == ["stream", "sync", "stream", "wait_stream", "on side stream", "forward", "forward",
                     "off side stream", "stream", "wait_stream", "sync", "capture", "forward", "captured", "sync",
                     "replay"]
    calls.clear()
    x = torch.full((2,), 5.0)
    again = pool.run(("a",), (), fn, {"x": x})
    assert calls == ["replay"] and again is out  # the captured outputs, rewritten by the replay
    assert pool.recordings[("a",)].inputs["x"].tolist() == [5.0, 5.0]
