"""Comparisons of tensors that two computations of different shapes produced.

float32 matrix products of different shapes (a prefill of one row against a batch of rows, one chunk against
several) take different kernel paths and summation orders on a CPU, so their results agree to rounding, not bit
for bit; which entries differ changes with the CPU's kernels (AVX2 against AVX-512/AMX builds of oneDNN and BLAS).
A dot product of length n rounds to within about n * eps * sum|x_i * y_i|, so the tolerance here scales with the
magnitude of the tensor compared, not of each entry: an entry near zero that came out of a sum of larger terms
carries the rounding of those terms. Computations of the same shapes are compared with ``torch.equal``.
"""

from __future__ import annotations

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps


def assert_equal_to_float32_rounding(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 64.0) -> None:
    """Assert that two float tensors agree to ``ulps`` float32 rounding units of the largest magnitude compared.

    ``ulps`` = 64 covers the reductions of the tiny test models (hidden sizes 16-64) with room; a real error (a
    wrong row, a stale entry, a shifted position) differs by the size of the values themselves, millions of units.
    """
    scale = max(expected.detach().abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=ulps * FLOAT32_EPS * scale)
