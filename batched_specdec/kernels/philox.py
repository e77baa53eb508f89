"""Philox4x32-10 in pure torch (and numpy on CPU), matching ``triton.language.rand`` bit for bit.

The rejection sampler's reference draws the same random numbers as its Triton kernel from the same seed and
counters (:mod:`kernels.rejection_sample`), and the coupled verification's reference the same four words per
counter as ``tl.randint4x`` (:mod:`kernels.coupled_verify`); this is how.
"""

import numpy as np
import torch

# Philox4x32-10 constants, as in triton/language/random.py.
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_UINT32_TO_UNIFORM = 4.6566127342e-10  # largest scale with (2**31 - 1) * scale < 1 in fp32


def philox_uniform_reference(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, counter)`` in pure torch.

    Parameters
    ----------
    seed : torch.Tensor
        int64 scalar (or broadcastable) tensor, the Philox key.
    counter : torch.Tensor
        int64 tensor of any shape, the 64-bit Philox counter (low word c0, high word c1, c2 = c3 = 0).

    Returns
    -------
    torch.Tensor
        float32 tensor of ``counter``'s shape, uniform in [0, 1).
    """
    x = philox_uint31_reference(seed, counter)
    return x.to(torch.float32) * torch.tensor(_UINT32_TO_UNIFORM, dtype=torch.float32, device=x.device)


def philox_uint31_reference(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """The 31 random bits behind ``tl.rand(seed, counter)``: int64 in ``[0, 2**31)``, of ``counter``'s shape
    (``tl.rand`` is this times 2**-31 in float32, which keeps only 24 of them)."""
    if counter.device.type == "cpu" and not torch.compiler.is_compiling():
        # numpy's uint64 arithmetic is vectorised where torch's int64 CPU ops are not: same bits, ~20x faster.
        # A compiled graph takes the torch words instead (same bits; inductor fuses them into one loop).
        x = torch.from_numpy(_philox_round_words_numpy(seed.cpu().numpy(), counter.numpy()))
    else:
        x = _philox_round_words_torch(seed, counter)
    return torch.where(x < 0, -x - 1, x)  # ~x


def philox_uniform4_reference(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """All four output words of Philox4x32-10 at ``counter`` (``tl.randint4x(seed, counter)``, in its order), each
    made a uniform the way ``tl.rand`` makes its first: ``(*counter.shape, 4)`` float32 in ``[0, 1)``. Word 0 is
    :func:`philox_uniform_reference`'s."""
    if counter.device.type == "cpu" and not torch.compiler.is_compiling():
        # All in numpy: torch's int64 CPU ops would cost more than the rounds themselves.
        words = _philox_words_numpy(seed.cpu().numpy(), counter.numpy())
        scale = np.float32(_UINT32_TO_UNIFORM)
        uniforms = []
        for w in words:
            x = w.astype(np.uint32).view(np.int32)
            uniforms.append(np.where(x < 0, ~x, x).astype(np.float32) * scale)  # ~x == -x - 1
        return torch.from_numpy(np.stack(uniforms, axis=-1))
    x = torch.stack([_int32_torch(w) for w in _philox_words_torch(seed, counter)], dim=-1)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_UINT32_TO_UNIFORM, dtype=torch.float32, device=x.device)


def _philox_round_words_torch(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 on (counter, 0, 0, 0) with key seed; returns the first output word as int32 values (int64)."""
    return _int32_torch(_philox_words_torch(seed, counter)[0])


def _int32_torch(word: torch.Tensor) -> torch.Tensor:
    return torch.where(word >= 2**31, word - 2**32, word)  # bitcast to int32


def _philox_words_torch(seed: torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on (counter, 0, 0, 0) with key seed: the four output words, as uint32 values (int64)."""
    mask = 0xFFFFFFFF
    c0 = counter & mask
    c1 = (counter >> 32) & mask
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = seed & mask
    k1 = (seed >> 32) & mask
    for _ in range(10):
        # 32x32 -> 64-bit products wrap in int64, but the low 64 bits are exact: shift/mask recovers hi and lo.
        prod_b = c2 * _PHILOX_ROUND_B
        prod_a = c0 * _PHILOX_ROUND_A
        new_c0 = ((prod_b >> 32) & mask) ^ c1 ^ k0
        new_c2 = ((prod_a >> 32) & mask) ^ c3 ^ k1
        c1 = prod_b & mask
        c3 = prod_a & mask
        c0, c2 = new_c0, new_c2
        k0 = (k0 + _PHILOX_KEY_A) & mask
        k1 = (k1 + _PHILOX_KEY_B) & mask
    return c0, c1, c2, c3


def _philox_round_words_numpy(seed: np.ndarray, counter: np.ndarray) -> np.ndarray:
    """:func:`_philox_round_words_torch` in numpy uint64 arithmetic (exact: 32x32-bit products fit in 64 bits)."""
    return _int32_numpy(_philox_words_numpy(seed, counter)[0])


def _int32_numpy(word: np.ndarray) -> np.ndarray:
    return word.astype(np.uint32).view(np.int32).astype(np.int64)


def _philox_words_numpy(seed: np.ndarray, counter: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`_philox_words_torch` in numpy uint64 arithmetic (uint64 arrays)."""
    mask = np.uint64(0xFFFFFFFF)
    shift = np.uint64(32)
    counter = counter.astype(np.int64).view(np.uint64)
    seed = np.asarray(seed, dtype=np.int64).view(np.uint64)
    c0 = counter & mask
    c1 = (counter >> shift) & mask
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = seed & mask
    k1 = (seed >> shift) & mask
    round_a, round_b = np.uint64(_PHILOX_ROUND_A), np.uint64(_PHILOX_ROUND_B)
    key_a, key_b = np.uint64(_PHILOX_KEY_A), np.uint64(_PHILOX_KEY_B)
    for _ in range(10):
        prod_b = c2 * round_b
        prod_a = c0 * round_a
        new_c0 = ((prod_b >> shift) & mask) ^ c1 ^ k0
        new_c2 = ((prod_a >> shift) & mask) ^ c3 ^ k1
        c1 = prod_b & mask
        c3 = prod_a & mask
        c0, c2 = new_c0, new_c2
        k0 = (k0 + key_a) & mask
        k1 = (k1 + key_b) & mask
    return c0, c1, c2, c3
