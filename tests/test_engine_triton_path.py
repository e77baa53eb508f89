"""The engine on the code path a GPU takes: every kernel call goes to Triton (here under the interpreter).

On CPU the engine normally uses the kernels' torch references. This test routes ``backend="auto"`` to the Triton
kernels instead, so the engine <-> kernel interface (shapes, dtypes, strides, in-place updates, compaction) is
exercised end to end, and checks that the outputs equal the torch path's token for token, greedy and sampled.
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
from tiny_models import tiny_causal_lm

from batched_specdec import MultinomialProcessor, autoregressive_generate_batch, speculative_generate_batch
from batched_specdec.drafting.ngram import NGramDrafter
from batched_specdec.kernels._launch import interpreting

KERNEL_MODULES = ("rejection_sample.api", "scatter_kv", "commit_tokens", "compact_rows")


def _route_auto_to_triton(monkeypatch) -> Counter:
    """Make ``backend="auto"`` pick Triton for CPU tensors in every kernel module; count the calls per module."""
    calls: Counter = Counter()
    for name in KERNEL_MODULES:
        module = sys.modules[f"batched_specdec.kernels.{name}"]

        def routed(backend, device, _name=name, _original=module.resolve_backend):
            if backend == "auto":
                calls[_name] += 1
                return "triton"
            return _original(backend, device)

        monkeypatch.setattr(module, "resolve_backend", routed)
    return calls


def _decode(target, draft, prompts):
    # Budgets of 3 and 4 end two rows early, so finished rows are compacted away mid-run whatever is sampled.
    common = {"max_gen_len": [12, 3, 12, 4], "eos_tokens_id": [5]}
    return [
        speculative_generate_batch(prompts, draft, target, gamma=3, **common)[0],
        speculative_generate_batch(prompts, draft, target, gamma=3, logits_processor=MultinomialProcessor(0.9),
                                   seed=7, **common)[0],
        speculative_generate_batch(prompts, NGramDrafter(), target, gamma=3, **common)[0],
        autoregressive_generate_batch(prompts, target, **common),
    ]


@pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (conftest.py sets it) to run Triton on CPU")
def test_engine_on_triton_kernels_equals_torch_path(monkeypatch):
    target = tiny_causal_lm("llama", seed=0)
    draft = tiny_causal_lm("llama", seed=1, layers=1)
    # Ragged rows: one that repeats itself (n-gram matches), one of length 1; EOS 5 and the budgets end rows at
    # different steps.
    prompts = [[3, 9, 27, 81, 3, 9, 27, 81, 3, 9], [44], [10, 20, 30, 40, 50, 60], [7, 7, 7, 7]]
    via_torch = _decode(target, draft, prompts)
    calls = _route_auto_to_triton(monkeypatch)
    via_triton = _decode(target, draft, prompts)
    assert all(calls[name] > 0 for name in KERNEL_MODULES), calls
    assert via_triton == via_torch
