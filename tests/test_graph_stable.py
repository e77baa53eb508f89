"""Graph-stable decode state (what CUDA graphs need, checked on CPU): with ``compile=True`` the per-row buffers and
KV caches keep their addresses across calls of the same shape and across compaction, compaction happens only to
power-of-two batch sizes with finished rows frozen in place, and compiled functions see only those batch sizes.
Eager runs keep allocating and compacting as before."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_causal_lm

from batched_specdec import MultinomialProcessor, autoregressive_generate_batch, capture, speculative_generate_batch
from batched_specdec.decode.batch import RaggedBatch
from batched_specdec.decode.compaction import rows_to_keep
from batched_specdec.forwards import model_forward, prefill
from batched_specdec.ragged_cache import RaggedKVCache

CPU = torch.device("cpu")
PROMPTS = [[3, 9, 27, 8], [44], [10, 20, 30, 40, 50, 60], [7, 7, 7], [5, 6], [11, 12, 13], [90, 91, 92, 93, 94]]
BUDGETS = [2, 4, 6, 8, 10, 12, 14]  # rows finish one after another: 7 -> 4 -> 2 -> 1 live rows, compiled
SEEDS = list(range(len(PROMPTS)))  # the rows' Philox keys


def test_batch_bucket_and_capacity():
    assert [capture.batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert capture.stable_capacity(10, True) == capture.CAPACITY_BUCKET
    assert capture.stable_capacity(capture.CAPACITY_BUCKET + 1, True) == 2 * capture.CAPACITY_BUCKET
    assert capture.stable_capacity(10, False) == 10


def test_compiled_rows_to_keep_stops_at_powers_of_two_and_keeps_finished_rows_as_fillers():
    batch = RaggedBatch(PROMPTS, BUDGETS, SEEDS, 32, 0, CPU, compile=True)
    finished = torch.tensor([True, True, False, False, False, False, False])
    assert rows_to_keep(finished, batch.stable) is None  # 5 live rows need 8: stay at 7
    finished[2] = True
    assert rows_to_keep(finished, batch.stable).tolist() == [3, 4, 5, 6]  # 4 live rows fill bucket 4
    eager = RaggedBatch(PROMPTS, BUDGETS, SEEDS, 32, 0, CPU)
    assert rows_to_keep(finished, eager.stable).tolist() == [3, 4, 5, 6]


def test_compiled_rows_to_keep_fills_the_bucket():
    batch = RaggedBatch(PROMPTS[:6], BUDGETS[:6], SEEDS[:6], 32, 0, CPU, compile=True)
    finished = torch.tensor([True, False, True, True, False, False])  # 3 live rows: bucket 4, one filler
    assert rows_to_keep(finished, batch.stable).tolist() == [0, 1, 4, 5]


def test_batch_buffers_keep_their_addresses_across_calls_and_compaction():
    capture.BUFFERS.release()
    first = RaggedBatch(PROMPTS, BUDGETS, SEEDS, 32, 0, CPU, compile=True)
    addresses = [t.data_ptr() for t in (first.token_buffer, first.seq_lens, first.num_generated, first.finished)]
    tokens_before = first.token_buffer.clone()
    keep = torch.tensor([1, 3, 4, 6])
    first.keep_rows(keep, keep)
    assert [t.data_ptr() for t in (first.token_buffer, first.seq_lens, first.num_generated, first.finished)] == \
        addresses
    assert torch.equal(first.token_buffer, tokens_before[keep]) and first.size == 4
    allocations = capture.BUFFERS.allocations
    # same shapes: the same buffers
    second = RaggedBatch(PROMPTS[::-1], BUDGETS, SEEDS, 32, 0, CPU, compile=True)
    assert capture.BUFFERS.allocations == allocations
    assert [t.data_ptr() for t in (second.token_buffer, second.seq_lens, second.num_generated, second.finished)] == \
        addresses
    assert second.seq_lens.tolist() == sorted(map(len, PROMPTS), reverse=True)  # refilled, not stale
    eager = RaggedBatch(PROMPTS, BUDGETS, SEEDS, 32, 0, CPU)
    assert eager.token_buffer.data_ptr() not in addresses


def test_cache_compaction_keeps_addresses_and_equals_eager_compaction():
    model = tiny_causal_lm("llama", seed=2)
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]])
    caches = {}
    for compile in (False, True):
        cache = RaggedKVCache(model.config, 3, 16, CPU, compile=compile, role="test")
        prefill(model, cache, tokens, [5, 4, 2])
        caches[compile] = cache
    stable = caches[True]
    addresses = [b.data_ptr() for b in stable.key_buffers + stable.value_buffers] + [stable.lens.data_ptr()]
    keep = torch.tensor([0, 2])
    for cache in caches.values():
        cache.keep_rows(keep)
    assert [b.data_ptr() for b in stable.key_buffers + stable.value_buffers] + [stable.lens.data_ptr()] == addresses
    assert stable.lens.tolist() == caches[False].lens.tolist() == [5, 2]
    for a, b in zip(stable.key_buffers + stable.value_buffers, caches[False].key_buffers + caches[False].value_buffers):
        for row, n in enumerate(stable.lens.tolist()):  # the valid entries; those past a length are never read
            assert torch.equal(a[row, :, :n], b[row, :, :n])
    nxt = torch.tensor([[3], [4]])
    assert torch.equal(model_forward(model, stable, nxt, compile=False), model_forward(model, caches[False], nxt))


@pytest.fixture(scope="module")
def models():
    return tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1, layers=1)


def _record_compiled_shapes(monkeypatch) -> list:
    """Record (function, batch size) of every call that runs compiled, and run it compiled."""
    seen = []
    run_compiled = capture.run_compiled

    def recording(fn, device, *args):
        rows = next(a.shape[0] for a in args if isinstance(a, torch.Tensor))
        seen.append((fn.__name__, rows))
        return run_compiled(fn, device, *args)

    monkeypatch.setattr(capture, "run_compiled", recording)
    return seen


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_compiled_runs_reuse_buffers_see_bucketed_batch_sizes_and_equal_eager(models, monkeypatch, sampled):
    """Two compiled calls of the same shape: the second allocates no buffer and compiles no graph; every compiled
    call runs at the first batch size (7) or a power of two below it; outputs equal the eager run's (seeded samples
    too: draws are keyed by the row, so the different compaction schedule changes nothing)."""
    target, draft = models
    kwargs = {"max_gen_len": BUDGETS, "eos_tokens_id": [], "gamma": 3}
    if sampled:
        kwargs.update(logits_processor=MultinomialProcessor(1.0), seed=3)
    eager, _, eager_stats = speculative_generate_batch(PROMPTS, draft, target, **kwargs)
    seen = _record_compiled_shapes(monkeypatch)
    compiled, _, stats = speculative_generate_batch(PROMPTS, draft, target, compile=True, **kwargs)
    assert compiled == eager
    assert {rows for _, rows in seen} <= {7, 4, 2, 1} and {rows for _, rows in seen} >= {7, 4, 2}
    assert stats.compactions >= 2
    allocations, graphs = capture.BUFFERS.allocations, capture.graphs_compiled()
    again, _, _ = speculative_generate_batch(PROMPTS, draft, target, compile=True, **kwargs)
    assert again == eager
    assert capture.BUFFERS.allocations == allocations and capture.graphs_compiled() == graphs
    assert eager_stats.compactions >= 1


def test_compiled_target_only_reuses_buffers_across_calls(models):
    target, _ = models
    kwargs = {"max_gen_len": BUDGETS, "eos_tokens_id": []}
    expected = autoregressive_generate_batch(PROMPTS, target, **kwargs)
    assert autoregressive_generate_batch(PROMPTS, target, compile=True, **kwargs) == expected
    allocations = capture.BUFFERS.allocations
    assert autoregressive_generate_batch(PROMPTS[::-1], target, compile=True, **kwargs) == \
        autoregressive_generate_batch(PROMPTS[::-1], target, **kwargs)
    assert capture.BUFFERS.allocations == allocations
