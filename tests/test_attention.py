"""Ragged attention (batched_specdec.attention), ragged chunked prefill and per-layer compaction.

Greedy equality with transformers' own decoding for every family and backend is in tests/test_families.py; here:
the attention backends against an explicit reference, the no-copy property of verify and draft forwards, the
prefill's memory bound and outputs, compaction's freeing order, and the errors.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import weakref
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_causal_lm
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from batched_specdec import autoregressive_generate_batch, generate, ragged_cache, speculative_generate_batch
from batched_specdec.attention import RAGGED_ATTENTION, RaggedAttentionInputs, ragged_attention_forward
from batched_specdec.drafting.ngram import NGramDrafter
from batched_specdec.forwards import model_forward, prefill
from batched_specdec.ragged_cache import RaggedKVCache

CPU = torch.device("cpu")


def _reference_attention(query, key, value, positions, window, softcap, scaling):
    """Explicit attention: K/V repeated per query group, scores masked per row from the positions."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scores = query @ key.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    keys = torch.arange(key.shape[2])[None, None, :]
    visible = keys <= positions[:, :, None]
    if window is not None:
        visible &= keys > positions[:, :, None] - window
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return (torch.softmax(scores, -1) @ value).transpose(1, 2)


def _attention_case(n_rep: int, queries: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b, h_kv, d, span = 3, 2, 16, 192
    lens = torch.tensor([0, 70, 150])  # row 0 has nothing cached; row 2 reaches into the second key block
    positions = lens[:, None] + torch.arange(queries)[None, :]
    q = torch.randn(b, h_kv * n_rep, queries, d, generator=gen)
    k, v = torch.randn(b, h_kv, span, d, generator=gen), torch.randn(b, h_kv, span, d, generator=gen)
    return q, k, v, positions, span


@pytest.mark.parametrize("backend, n_rep, queries, window, softcap", [
    ("sdpa", 1, 5, None, None),
    ("sdpa", 4, 5, None, None),
    ("sdpa", 4, 5, 9, None),
    ("sdpa", 2, 5, 9, 20.0),
    ("sdpa", 4, 40, 9, None),  # many queries: on CPU the unfolded enable_gqa branch
    ("flex", 4, 5, None, None),
    ("flex", 2, 5, 9, 20.0),
])
def test_backend_matches_the_reference_attention(backend, n_rep, queries, window, softcap):
    q, k, v, positions, span = _attention_case(n_rep, queries)
    scaling = 1 / math.sqrt(q.shape[-1])
    inputs = RaggedAttentionInputs(positions, span, [window], backend)
    out, _ = ragged_attention_forward(SimpleNamespace(layer_idx=0), q, k, v, None, scaling=scaling, softcap=softcap,
                                      ragged_attention=inputs)
    expected = _reference_attention(q, k, v, positions, window, softcap, scaling)
    assert out.shape == expected.shape == (3, queries, q.shape[1], 16)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_flex_block_mask_skips_key_blocks_past_each_row():
    """Row 0 (positions 0..4) lists one key block of 128, row 2 (positions 150..154) two, none of them full."""
    _, _, _, positions, span = _attention_case(1, 5)
    mask = RaggedAttentionInputs(positions, span, [None], "flex").block_mask(None)
    assert mask.kv_num_blocks[:, 0, 0].tolist() == [1, 1, 1]  # partial blocks: the one holding each row's end
    assert mask.full_kv_num_blocks[:, 0, 0].tolist() == [0, 0, 1]  # row 2 sees all of block 0


def test_attention_function_needs_the_cache_forward():
    q, k, v, *_ = _attention_case(1, 1)
    with pytest.raises(RuntimeError, match="model_forward"):
        ragged_attention_forward(SimpleNamespace(layer_idx=0), q, k, v, None)


class KVCopyDetector(TorchDispatchMode):
    """Records every op that reads a KV-cache buffer (or a view of one) and returns a new tensor at least as large
    as one layer's K span: a copy of the keys or values (``repeat_kv``'s expand + reshape, a gather, a clone)."""

    def __init__(self, caches, span: int):
        super().__init__()
        buffers = [b for c in caches for b in c.key_buffers + c.value_buffers if b is not None]
        self.storages = {b.untyped_storage().data_ptr() for b in buffers}
        self.span_numel = min(b[:, :, :span].numel() for b in buffers)
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(t.untyped_storage().data_ptr() in self.storages for t in inputs):
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in self.storages \
                        and o.numel() >= self.span_numel:
                    self.copies.append(f"{func} -> {tuple(o.shape)}")
        return out


def _verify_and_draft_copies(arch: str, attention: str) -> list[str]:
    """KV copies seen in a 5-token verify forward of the target and in 2- and 1-token draft forwards."""
    overrides = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}  # n_rep * Q < head_dim
    target = tiny_causal_lm(arch, vocab_size=128, hidden=64, seed=1, layers=2, **overrides)
    draft = tiny_causal_lm(arch, vocab_size=128, hidden=64, seed=2, layers=1, **overrides)
    tokens = torch.randint(5, 100, (3, 40), generator=torch.Generator().manual_seed(0))
    caches = [RaggedKVCache(m.config, 3, 64, CPU, attention) for m in (target, draft)]
    with torch.inference_mode():
        for model, cache in zip((target, draft), caches):
            prefill(model, cache, tokens, [30, 20, 7])
            cache.set_span(40)
        with KVCopyDetector(caches, 40) as detector:
            model_forward(target, caches[0], tokens[:, 30:35])
            model_forward(draft, caches[1], tokens[:, 30:32], logits_to_keep=2)
            caches[1].advance(2)
            model_forward(draft, caches[1], tokens[:, 32:33], logits_to_keep=1)
    return detector.copies


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: the soft-capped, sliding-window branch
def test_verify_and_draft_forwards_never_copy_the_kv_cache(arch):
    assert _verify_and_draft_copies(arch, "sdpa") == []


def test_the_copy_detector_sees_the_dense_paths_repeat_kv():
    """The control: the previous dense-mask path repeats K and V per query group in the same forwards."""
    copies = _verify_and_draft_copies("llama", "dense")
    assert copies and all("(3, 4," in c for c in copies), copies  # (B, H_q, span, D): K/V repeated to 4 heads


PREFILL_BOUND_BYTES = 256 * 2**20
"""Peak live-tensor bytes a prefill of 32 prompts of 5..2,000 tokens may add beyond its 33 MB KV cache (tiny GQA
Llama)."""


def _prefill_peak(attention: str, chunk: int) -> dict:
    worker = os.path.join(os.path.dirname(__file__), "prefill_memory_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, worker, attention, str(chunk)], capture_output=True, text=True, env=env,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_prefill_of_long_ragged_prompts_stays_under_its_memory_bound():
    """Peak bytes of live tensors during the prefill, in a fresh process, beyond the KV cache (deterministic; the
    process' peak RSS growth read low once under page reclaim). Measured: about 16 MB with the default chunk of
    128, 87 MB with 512; the old one-shot dense prefill about 610 MB (its RSS grew by 756-880 MB)."""
    measured = _prefill_peak("auto", ragged_cache.PREFILL_CHUNK)
    assert measured["peak_bytes"] - measured["cache_bytes"] < PREFILL_BOUND_BYTES, measured


def test_prefill_memory_bound_catches_a_one_shot_dense_prefill():
    """The control: the previous path (dense masks, the whole prompt in one forward) breaks the same bound."""
    measured = _prefill_peak("dense", 2048)
    assert measured["peak_bytes"] - measured["cache_bytes"] > PREFILL_BOUND_BYTES, measured


def test_ragged_prefill_in_chunks_decodes_like_one_prompt_at_a_time():
    """32 prompts of 5..2,000 tokens (shuffled), chunks of 300 over ever fewer rows: every output equals the
    prompt decoded alone in one chunk."""
    model = tiny_causal_lm("llama", vocab_size=128, hidden=32, max_positions=2048, layers=2, seed=3)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.linspace(5, 2000, 32).round().long()[torch.randperm(32, generator=gen)].tolist()
    prompts = [torch.randint(5, 128, (n,), generator=gen).tolist() for n in lengths]
    batched = autoregressive_generate_batch(prompts, model, max_gen_len=4, eos_tokens_id=[], prefill_chunk=300)
    alone = [autoregressive_generate_batch([p], model, max_gen_len=4, eos_tokens_id=[], prefill_chunk=4096)[0]
             for p in prompts]
    assert batched == alone
    spec, _, _ = speculative_generate_batch(prompts, NGramDrafter(), model, gamma=3, max_gen_len=4, eos_tokens_id=[],
                                            prefill_chunk=300)
    assert spec == alone


def test_prefill_needs_rows_longest_first():
    model = tiny_causal_lm("llama")
    cache = RaggedKVCache(model.config, 2, 16, CPU)
    with pytest.raises(ValueError, match=r"longest first, got widths \[3, 5\]"):
        prefill(model, cache, torch.zeros(2, 5, dtype=torch.int64), [3, 5])


def test_compaction_frees_each_layer_before_compacting_the_next(monkeypatch):
    model = tiny_causal_lm("llama", layers=3)
    cache = RaggedKVCache(model.config, 4, 32, CPU)
    with torch.inference_mode():
        prefill(model, cache, torch.randint(0, 96, (4, 10)), [9, 8, 5, 2])
    old = [weakref.ref(b) for b in cache.key_buffers + cache.value_buffers]
    alive_at_call = []
    real = ragged_cache.compact_rows

    def spy(tensors, rows):
        alive_at_call.append(sum(ref() is not None for ref in old))
        return real(tensors, rows)

    monkeypatch.setattr(ragged_cache, "compact_rows", spy)
    cache.keep_rows(torch.tensor([0, 2]))
    assert alive_at_call == [6, 4, 2]  # K and V of the layers not yet compacted, nothing more
    assert all(ref() is None for ref in old)
    assert cache.lens.tolist() == [9, 5] and cache.key_buffers[0].shape[0] == 2


def test_model_forward_leaves_the_models_attention_setting_as_it_was():
    model = tiny_causal_lm("llama")
    cache = RaggedKVCache(model.config, 1, 16, CPU)
    with torch.inference_mode():
        model_forward(model, cache, torch.tensor([[1, 2, 3]]))
        assert model.config._attn_implementation == "sdpa"
        with pytest.raises(Exception):  # noqa: B017 - any failure inside the forward
            model_forward(model, cache, torch.tensor([[1000]]))  # id past the vocabulary
    assert model.config._attn_implementation == "sdpa" != RAGGED_ATTENTION


@pytest.mark.parametrize("kwargs, match", [
    ({"attention": "flash"}, "unknown attention backend 'flash'"),
    ({"prefill_chunk": 0}, "prefill_chunk must be an int >= 1.*got 0"),
    ({"prefill_chunk": 2.5}, "prefill_chunk must be an int >= 1.*got 2.5"),
])
def test_bad_attention_settings_are_errors_before_compute(kwargs, match, monkeypatch):
    model = tiny_causal_lm("llama")
    monkeypatch.setattr("batched_specdec.decode.session.prefill", None)  # any compute would fail differently
    with pytest.raises(ValueError, match=match):
        speculative_generate_batch([[1, 2]], NGramDrafter(), model, **kwargs)
    with pytest.raises(ValueError, match=match):
        autoregressive_generate_batch([[1, 2]], model, **kwargs)
    with pytest.raises(ValueError, match=match):
        generate([[1, 2]], model, **kwargs)


def _sdpa_in_cuda_layout(monkeypatch):
    """Make SDPA return what CUDA's memory-efficient kernel returns for a masked call: the same values, stored in a
    ``(B, M, H, K)`` memory layout (axes 1 and 2 transposed in memory), which a merging ``view`` cannot take."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def transposed_layout(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        calls.append(out.shape)
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", transposed_layout)
    return calls


@pytest.mark.parametrize("attention", ["sdpa", "dense"])
def test_gqa_decodes_exactly_when_sdpa_returns_cudas_memory_layout(monkeypatch, attention):
    """A grouped-query model (4 query heads over 2 KV heads) decodes greedily token for token as a no-cache
    reference, target-only and speculative, while SDPA hands back its output in CUDA's transposed layout. (The flex
    backend calls no SDPA; its output is made contiguous whatever its layout.)"""
    from tiny_models import greedy_reference

    target = tiny_causal_lm("llama", seed=3, layers=2)
    draft = tiny_causal_lm("llama", seed=4, layers=1)
    assert target.config.num_attention_heads // target.config.num_key_value_heads == 2
    prompts = [[5, 9, 13, 2, 7], [3], [8, 8, 1, 4, 11, 6, 20, 30, 40]]
    expected = [greedy_reference(target, p, 12, []) for p in prompts]
    calls = _sdpa_in_cuda_layout(monkeypatch)
    base = autoregressive_generate_batch(prompts, target, max_gen_len=12, eos_tokens_id=[], attention=attention)
    spec, _, _ = speculative_generate_batch(prompts, draft, target, gamma=3, max_gen_len=12, eos_tokens_id=[],
                                            attention=attention)
    assert base == expected
    assert spec == expected
    assert calls, "the patched SDPA was never called"
