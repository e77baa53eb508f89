"""Peak memory of one ragged prefill, measured in a fresh process (run by tests/test_attention.py).

Prints one JSON line: ``{"peak_bytes": ..., "rss_growth_bytes": ..., "cache_bytes": ...}`` for the prefill of
B = 32 prompts of 5 to 2,000 tokens on a tiny GQA Llama. ``peak_bytes`` is the peak of the bytes held by live
tensors created during the prefill (every op's new outputs counted when made and released when their tensor is
freed; deterministic), ``rss_growth_bytes`` how much the process' peak resident memory grew (what the OS saw; it
can read low when the kernel reclaims pages), ``cache_bytes`` the KV cache that prefill fills (any prefill must).

Usage: python tests/prefill_memory_worker.py ATTENTION PREFILL_CHUNK
"""

from __future__ import annotations

import json
import os
import resource
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny_models import tiny_causal_lm

from batched_specdec.forwards import prefill
from batched_specdec.ragged_cache import RaggedKVCache

ROWS, SHORTEST, LONGEST = 32, 5, 2000


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensors alive at once among those the ops inside the mode create (views add nothing)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _release(self, ptr: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t._base is None:
                ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if ptr not in self.seen and nbytes:
                    self.seen.add(ptr)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._release, ptr, nbytes)
        return out


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
        with LiveTensorBytes() as tracker:
            prefill(model, cache, tokens, [n - 1 for n in lengths], chunk)
        after = peak_rss()
    cache_bytes = sum(b.numel() * b.element_size() for b in cache.key_buffers + cache.value_buffers)
    print(json.dumps({"peak_bytes": tracker.peak, "rss_growth_bytes": after - before, "cache_bytes": cache_bytes}))


if __name__ == "__main__":
    main()
