"""Logits processors: how a distribution is formed from logits, shared by draft, target and the baseline.

They apply in transformers' order: temperature, then top-k, then top-p. Filtered entries become ``-inf``. The
draft samples from exactly the distribution the processor produces, and verification uses that same
distribution, so any processor keeps speculative decoding lossless with respect to target-only sampling with the
same processor.

Two sampling schemes (:data:`SAMPLING_SCHEMES`) share the processors. ``"rejection"``: tokens are drawn by inverse
CDF from counters that follow a row's committed length (:class:`RowDraws`) and drafts are rejection-sampled.
``"coupled"``: every token is a Gumbel-max sample whose noise is keyed by the row's key and the token's absolute
position (:mod:`batched_specdec.kernels.coupled_verify`), for the target and the draft alike, and a draft is kept
iff it equals the target's sample (:meth:`LogitsProcessor.verify_coupled`), so sampled outputs are those of
target-only sampling with the same seed, whatever the draft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from batched_specdec.checks import (
    SAMPLING_SCHEMES,  # noqa: F401 (re-exported: the schemes the module docstring describes)
    OptionError,
    check_positive_int,
    check_sampling,
    check_temperature,
    check_top_p,
)
from batched_specdec.kernels import coupled_verify, draw_seed_offset
from batched_specdec.kernels.philox import philox_uint31_reference

DRAW_BLOCK = 2**26
"""Philox counters a row owns per committed length: a step's draws of a row start at ``length * DRAW_BLOCK``
under the row's own key (:class:`RowDraws`), so no two steps of a row share a counter and no row shares a key."""
VERIFY_DRAWS = 0
"""Where the rejection sampler's counters start in a row's block: ``(K + 1) * (V + 1)`` of them (< 2**25)."""
DRAFT_DRAWS = 2**25
"""Where a drafter's counters start in a row's block: two per draft token."""
SAMPLE_DRAWS = 2**25 + 2**20
"""Where a plain target sample's two counters sit in a row's block (a step without drafts)."""


@dataclass(frozen=True)
class RowDraws:
    """Where each row's random numbers come from: ``seeds`` ``(B,)`` int64, each row's Philox key (one per
    prompt: :func:`batched_specdec.options.prompt_seed`), and ``offsets`` ``(B,)`` int64, each row's first counter.
    Under the ``"coupled"`` scheme also ``positions`` ``(B,)`` int64, the absolute position of each row's next token
    (its committed length): samples are then Gumbel-max draws keyed by position, not by counter (None: the
    ``"rejection"`` scheme).

    A session builds one per step, ``RowDraws(row_seeds, seq_lens * DRAW_BLOCK[, seq_lens])``, so a row's draws
    depend on its prompt, the run's seed and how far it has got, never on its slot, its batch or the step count:
    seeded samples do not change with the batch size, the schedule or the other prompts."""

    seeds: Tensor
    offsets: Tensor
    positions: Tensor | None = None

    @property
    def coupled(self) -> bool:
        """Whether samples are Gumbel-max draws keyed by position (the ``"coupled"`` scheme)."""
        return self.positions is not None

    def at(self, first: int) -> RowDraws:
        """The same rows' counters from ``first`` on within their blocks (positions unchanged)."""
        return RowDraws(self.seeds, self.offsets + first, self.positions)

    def draft(self, i: int) -> RowDraws:
        """The draws of draft token ``i`` (0-based) of a step: counters ``2 * i`` on, position ``i`` further on."""
        return RowDraws(self.seeds, self.offsets + 2 * i, None if self.positions is None else self.positions + i)

    def to(self, device) -> RowDraws:
        positions = None if self.positions is None else self.positions.to(device)
        return RowDraws(self.seeds.to(device), self.offsets.to(device), positions)


class LogitsProcessor:
    """Base class. ``temperature == 0`` means greedy decoding (argmax, exact match verification)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def process(self, logits: Tensor) -> Tensor:
        """Return float32 logits of the sampling distribution (temperature applied, filtered entries ``-inf``).

        Parameters
        ----------
        logits : Tensor
            ``(..., V)`` float logits of any float dtype.
        """
        return self._filter(logits.float() / self.temperature)

    def probs(self, logits: Tensor) -> Tensor:
        """``(..., V)`` float32 probabilities of the sampling distribution."""
        return torch.softmax(self.process(logits), dim=-1)

    def _filter(self, scaled_logits: Tensor) -> Tensor:
        return scaled_logits

    def sample(self, logits: Tensor, generator: torch.Generator | None = None, row_keys: Tensor | None = None,
               draws: RowDraws | None = None) -> tuple[Tensor, Tensor | None]:
        """Draw one token per row of ``logits`` (``(B, V)``) on its device, with no host read
        (:func:`sample_from_probs`, from ``draws``, or from a seed and offset drawn from ``generator``).

        Parameters
        ----------
        logits : Tensor
            ``(B, V)`` float logits.
        generator : torch.Generator, optional
            The run's seeded stream (on the logits' device); None uses torch's default generator.
        row_keys : Tensor, optional
            ``(B,)`` int64: what each row's draws from ``generator`` are keyed by, so a row's token does not depend
            on its position in the batch. None: the positions ``0..B-1``.
        draws : RowDraws, optional
            Each row's Philox key and counters (the session's); then ``generator`` and ``row_keys`` are not used.
            Coupled draws (``draws.coupled``) take each row's Gumbel-max sample at ``draws.positions``
            (:meth:`verify_coupled` with no drafts).

        Returns
        -------
        tokens : Tensor
            ``(B,)`` int64.
        probs : Tensor or None
            ``(B, V)`` float32, the exact distribution the tokens were drawn from; ``None`` when greedy or coupled
            (coupled verification reads no draft distribution).
        """
        if self.is_greedy:
            return logits.argmax(dim=-1), None
        if draws is not None and draws.coupled:
            empty = torch.zeros(logits.shape[0], 0, dtype=torch.int64, device=logits.device)
            out, _ = self.verify_coupled(empty, logits[:, None], None, draws.seeds.to(logits.device),
                                         draws.positions.to(logits.device))
            return out[:, 0], None
        probs = self.probs(logits)
        if draws is not None:
            return sample_from_probs(probs, draws.seeds, draws.offsets), probs
        seed, offset = draw_seed_offset(generator, probs.device)
        return sample_from_probs(probs, seed, offset, row_keys), probs

    def verify_coupled(self, draft_tokens: Tensor, logits: Tensor, num_draft: Tensor | None, seeds: Tensor,
                       positions: Tensor) -> tuple[Tensor, Tensor]:
        """Coupled verification (:func:`batched_specdec.kernels.coupled_verify`) of ``draft_tokens`` ``(B, K)``
        against ``logits`` ``(B, K + 1, V)`` under this processor: each row's token at position ``positions[b] + j``
        is the Gumbel-max sample of the processed distribution there, keyed by ``seeds[b]``; drafts are kept while
        they equal it. A processor that only scales by its temperature has that fused into the kernel; one that
        filters (top-k, top-p) processes the logits in torch first. Returns ``(out_tokens (B, K + 1), num_accepted
        (B,))``; ``num_draft`` ``(B,)`` int64 or None (``K`` per row)."""
        if self.is_greedy:
            return coupled_verify(draft_tokens, logits, 0.0, num_draft_tokens=num_draft, seed=seeds,
                                  positions=positions)
        cls = type(self)
        if cls.process is LogitsProcessor.process and cls._filter is LogitsProcessor._filter:
            return coupled_verify(draft_tokens, logits, self.temperature, num_draft_tokens=num_draft, seed=seeds,
                                  positions=positions)
        return coupled_verify(draft_tokens, self.process(logits), 1.0, num_draft_tokens=num_draft, seed=seeds,
                              positions=positions)

    def describe(self) -> str:
        """What the processor samples with, in words (``"greedy"``, ``"sampling at temperature 0.7, top-k 50"``)."""
        if self.is_greedy:
            return "greedy"
        parts = [f"temperature {self.temperature:g}"]
        if self.top_k is not None:
            parts.append(f"top-k {self.top_k}")
        if self.top_p is not None:
            parts.append(f"top-p {self.top_p:g}")
        return "sampling at " + ", ".join(parts)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def sample_from_probs(probs: Tensor, seed: Tensor, offset: Tensor, row_keys: Tensor | None = None) -> Tensor:
    """One token per row drawn from ``probs`` (``(B, V)``, rows need not be normalised), entirely on its device.

    Inverse-CDF sampling in float64: row ``b`` takes the first token whose cumulative probability exceeds
    ``u_b * sum(probs[b])``, where ``u_b`` is a uniform of 62 random bits from the two Philox draws at counters
    ``o_b`` and ``o_b + 1`` under the row's seed, ``o_b = offset + 2 * row_keys[b]`` (or ``offset[b]`` for a
    per-row offset)
    (:func:`kernels.philox.philox_uint31_reference`, ``tl.rand``'s bits). Two random numbers per row, not ``V``:
    an exponential race would need one Philox draw per vocabulary entry, several times a CPU forward's sampling
    cost at V = 49152. A token of probability 0 is never drawn. No host read, no ``torch.multinomial`` (which
    reads the device twice per call on CUDA).

    Parameters
    ----------
    probs : Tensor
        ``(B, V)`` float, non-negative, each row with positive mass.
    seed, offset : Tensor
        int64 on ``probs``' device: scalars (:func:`kernels.draw_seed_offset`), or ``(B,)``, each row's own Philox
        key and first counter (:class:`RowDraws`).
    row_keys : Tensor, optional
        ``(B,)`` int64 >= 0 on ``probs``' device, with a scalar offset: row ``b``'s draws depend on ``row_keys[b]``,
        never on ``b``. None: ``0..B-1``.

    Returns
    -------
    Tensor
        ``(B,)`` int64 token ids.

    Examples
    --------
    >>> p = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    >>> seed, offset = torch.tensor(7), torch.tensor(0)
    >>> sample_from_probs(p, seed, offset)[0].item()
    1
    """
    b = probs.shape[0]
    if offset.dim() == 1:
        first = offset
    else:
        first = offset + 2 * (torch.arange(b, device=probs.device) if row_keys is None else row_keys)
    counters = first[:, None] + torch.arange(2, device=probs.device)[None, :]
    key = seed[:, None] if seed.dim() == 1 else seed
    words = philox_uint31_reference(key, counters).double()  # (B, 2), 31 random bits each
    u = (words[:, 0] + words[:, 1] * 2.0**-31) * 2.0**-31  # in [0, 1]: 1 only by rounding, clamped below
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1]
    # Below the total, so some token of positive probability always has cdf > x (u * total may round up to it).
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x[:, None], right=True)[:, 0]


def _check_temperature(temperature: float) -> float:
    """A sampling processor's temperature: > 0 (temperature 0 is :class:`GreedyProcessor`)."""
    if check_temperature(temperature) == 0:
        raise OptionError(f"temperature must be a float > 0 (use GreedyProcessor for 0), got {temperature!r}")
    return float(temperature)


def _top_k_filter(scaled_logits: Tensor, top_k: int) -> Tensor:
    top_k = min(top_k, scaled_logits.shape[-1])
    kth = torch.topk(scaled_logits, top_k, dim=-1).values[..., -1:]
    return scaled_logits.masked_fill(scaled_logits < kth, float("-inf"))


def _top_p_filter(scaled_logits: Tensor, top_p: float) -> Tensor:
    # Same rule as transformers' TopPLogitsWarper: drop the ascending-sorted prefix whose mass is <= 1 - top_p,
    # always keeping the most likely token.
    sorted_logits, sorted_idx = torch.sort(scaled_logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1.0 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return scaled_logits.masked_fill(remove, float("-inf"))


class GreedyProcessor(LogitsProcessor):
    """Argmax decoding. Verification accepts a draft token exactly when it equals the target's argmax."""

    def __init__(self) -> None:
        self.temperature = 0.0

    def process(self, logits: Tensor) -> Tensor:
        return logits.float()


class MultinomialProcessor(LogitsProcessor):
    """Sample from ``softmax(logits / temperature)``."""

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _check_temperature(temperature)


class TopKProcessor(LogitsProcessor):
    """Temperature, then keep the ``top_k`` largest logits."""

    def __init__(self, temperature: float = 1.0, top_k: int = 50) -> None:
        self.temperature = _check_temperature(temperature)
        self.top_k = check_positive_int("top_k", top_k)

    def _filter(self, scaled_logits: Tensor) -> Tensor:
        return _top_k_filter(scaled_logits, self.top_k)


class NucleusProcessor(LogitsProcessor):
    """Temperature, then keep the smallest set of tokens whose probability mass reaches ``top_p``."""

    def __init__(self, temperature: float = 1.0, top_p: float = 0.9) -> None:
        self.temperature = _check_temperature(temperature)
        self.top_p = check_top_p(top_p)

    def _filter(self, scaled_logits: Tensor) -> Tensor:
        return _top_p_filter(scaled_logits, self.top_p)


class TopKNucleusProcessor(LogitsProcessor):
    """Temperature, then top-k, then top-p (transformers' order)."""

    def __init__(self, temperature: float = 1.0, top_k: int = 50, top_p: float = 0.9) -> None:
        self.temperature = _check_temperature(temperature)
        self.top_k = check_positive_int("top_k", top_k)
        self.top_p = check_top_p(top_p)

    def _filter(self, scaled_logits: Tensor) -> Tensor:
        return _top_p_filter(_top_k_filter(scaled_logits, self.top_k), self.top_p)


def make_processor(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> LogitsProcessor:
    """The processor for sampling settings: temperature 0 is greedy (top_k / top_p are then ignored, as
    ``model.generate`` ignores them without ``do_sample``); top_k / top_p of None are off."""
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return GreedyProcessor()
    if top_k is not None and top_p is not None:
        return TopKNucleusProcessor(temperature, top_k, top_p)
    if top_k is not None:
        return TopKProcessor(temperature, top_k)
    if top_p is not None:
        return NucleusProcessor(temperature, top_p)
    return MultinomialProcessor(temperature)
