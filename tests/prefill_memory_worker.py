"""Peak memory of one ragged prefill, measured in a fresh process (run by tests/test_attention.py).

Prints one JSON line: ``{"peak_bytes": ..., "cache_bytes": ...}``, where ``peak_bytes`` is how much the process'
peak resident memory grew during the prefill of B = 32 prompts of 5 to 2,000 tokens on a tiny GQA Llama, and
``cache_bytes`` the size of the KV cache that prefill fills (which any prefill must allocate).

Usage: python tests/prefill_memory_worker.py ATTENTION PREFILL_CHUNK
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny_models import tiny_causal_lm

from batched_specdec.ragged_cache import RaggedKVCache, prefill

ROWS, SHORTEST, LONGEST = 32, 5, 2000


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    attention, chunk = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    model = tiny_causal_lm("llama", vocab_size=128, hidden=64, max_positions=2048, layers=2)
    lengths = torch.linspace(SHORTEST, LONGEST, ROWS).round().long().flip(0).tolist()  # longest first
    tokens = torch.randint(3, 128, (ROWS, LONGEST), generator=torch.Generator().manual_seed(0))
    capacity = LONGEST + 8
    with torch.inference_mode():
        # Warm up the same code on a small batch first, so one-time allocations are not counted.
        warm = RaggedKVCache(model.config, 2, 64, torch.device("cpu"), attention)
        prefill(model, warm, tokens[:2, :40], [40, 20], chunk)
        del warm
        cache = RaggedKVCache(model.config, ROWS, capacity, torch.device("cpu"), attention)
        before = peak_rss()
        prefill(model, cache, tokens, [n - 1 for n in lengths], chunk)
        after = peak_rss()
    cache_bytes = sum(b.numel() * b.element_size() for b in cache.key_buffers + cache.value_buffers)
    print(json.dumps({"peak_bytes": after - before, "cache_bytes": cache_bytes}))


if __name__ == "__main__":
    main()
