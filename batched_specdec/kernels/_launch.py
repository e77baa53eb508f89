"""Backend choice and launch-config policy shared by every kernel in this package.

Keeping the policy in one place means a tuning change (tile sizes, warps) is one diff, and the
CPU/interpreter rules are the same for every op.
"""

import functools
import os

import torch
import triton

BACKENDS = ("auto", "triton", "torch")


_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1`` before import).

    Read once, at import: triton reads the variable when it is imported, so a later change would not take effect
    anyway, and the kernels' wrappers call this on every launch (once per layer per forward)."""
    return _INTERPRETING


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` to ``"triton"`` or ``"torch"`` for tensors on ``device``.

    ``"auto"`` sends CUDA tensors to Triton and everything else to the torch reference.
    ``"triton"`` on CPU tensors needs the Triton interpreter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' with tensors on {device} needs TRITON_INTERPRET=1 set before triton is imported; "
            "use backend='torch' or 'auto' on CPU"
        )
    return backend


def _tile_elements() -> int:
    # The interpreter pays a fixed Python cost per program and per op, so it wants few, large tiles;
    # on a GPU ~4K fp32 elements per program keeps registers in check.
    return 1 << 16 if interpreting() else 4096


def num_warps_for(tile_elements: int) -> int:
    """Warps for a program that touches ``tile_elements`` values per loop iteration."""
    if tile_elements >= 4096:
        return 8
    if tile_elements >= 1024:
        return 4
    return 2


def rejection_sample_config(batch: int, vocab: int, device: torch.device) -> dict:
    """Launch config of the rejection sampler: tile over (rows, vocab) and the number of vocabulary splits.

    NUM_SPLITS == 1: the fused kernel, one program owns BLOCK_B rows and loops over the vocabulary (large
    vocabularies get one row per program and a wide vocab block; small ones pack rows). It never reads a row's
    positions past its first rejection.

    NUM_SPLITS > 1: the vocabulary-split path, for batches too small to fill the GPU with one program per row:
    each row's vocabulary is cut into NUM_SPLITS chunks handled by separate programs (three launches). It is
    chosen when the fused kernel would run fewer programs than half the GPU's SMs and the vocabulary spans at
    least two blocks; the splits aim at about two programs per SM. This threshold is a first guess that has not
    been tuned on a GPU yet (benchmarks/bench_rejection.py measures both paths). Never on the interpreter, where
    tests force it through :data:`FORCE_SPLITS`.
    """
    tile = _tile_elements()
    block_v = min(triton.next_power_of_2(vocab), tile // 2 if interpreting() else 2048)
    if FORCE_SPLITS is not None and FORCE_SPLITS > 1:  # blocks small enough for that many chunks
        block_v = max(16, min(block_v, triton.next_power_of_2(triton.cdiv(vocab, FORCE_SPLITS))))
    block_b = max(1, min(tile // block_v, triton.next_power_of_2(batch)))
    if not interpreting():
        block_b = min(block_b, 16)
    max_splits = triton.cdiv(vocab, block_v)
    splits = 1
    if FORCE_SPLITS is not None:
        splits = max(1, min(FORCE_SPLITS, max_splits))
    elif device.type == "cuda" and not interpreting() and vocab < 2**24:
        sms = _sm_count(device)
        if triton.cdiv(batch, block_b) < sms // 2 and max_splits >= 2:
            splits = max(1, min(max_splits, triton.cdiv(2 * sms, batch)))
    return {"BLOCK_B": block_b, "BLOCK_V": block_v, "num_warps": num_warps_for(block_b * block_v),
            "NUM_SPLITS": splits}


def coupled_verify_config(batch: int, vocab: int) -> dict:
    """Tile of the coupled verification kernel: BLOCK_B rows per program, BLOCK_V ids per loop iteration (the
    rejection sampler's fused-kernel tile; no vocabulary split)."""
    tile = _tile_elements()
    block_v = min(triton.next_power_of_2(vocab), tile // 2 if interpreting() else 2048)
    block_b = max(1, min(tile // block_v, triton.next_power_of_2(batch)))
    if not interpreting():
        block_b = min(block_b, 16)
    return {"BLOCK_B": block_b, "BLOCK_V": block_v, "num_warps": num_warps_for(block_b * block_v)}


FORCE_SPLITS: int | None = None
"""Tests and benchmarks set this to force the vocabulary-split path (an int >= 2) or the fused kernel (1)."""


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_block_config(batch: int, width: int) -> dict:
    """Tile (BLOCK_B rows, BLOCK_W columns) for small per-row bookkeeping kernels (commit)."""
    block_w = triton.next_power_of_2(max(width, 1))
    block_b = max(1, min(triton.next_power_of_2(batch), max(1, _tile_elements() // 4 // block_w), 1024))
    return {"BLOCK_B": block_b, "BLOCK_W": block_w, "num_warps": num_warps_for(block_b * block_w)}


def copy_config(row_elements: int) -> dict:
    """Flat block size for row-copy kernels (scatter, compact)."""
    block = min(triton.next_power_of_2(max(row_elements, 1)), _tile_elements() if interpreting() else 4096)
    return {"BLOCK": block, "num_warps": num_warps_for(block)}
