"""The public rejection-sampling functions: input checks, backend choice, randomness, and the references."""

import torch

from batched_specdec.kernels._launch import resolve_backend
from batched_specdec.kernels.rejection_sample.op import rejection_sample_op
from batched_specdec.kernels.rejection_sample.reference import (
    greedy_impl,
    rejection_sample_from_logits_impl,
    rejection_sample_from_probs_impl,
)


def _check_tokens_and_sizes(draft_tokens, target, draft, num_draft_tokens, what):
    if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.dim() != 2 or draft_tokens.dtype != torch.int64:
        got = ((tuple(draft_tokens.shape), draft_tokens.dtype) if isinstance(draft_tokens, torch.Tensor)
               else draft_tokens)
        raise ValueError(f"draft_tokens must be a (B, K) int64 tensor, got {got}")
    B, K = draft_tokens.shape
    if K < 1:
        raise ValueError("draft_tokens must have at least one draft slot (K >= 1), "
                         f"got shape {tuple(draft_tokens.shape)}")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if not isinstance(target, torch.Tensor) or target.dim() != 3 or target.shape[:2] != (B, K + 1):
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else target
        raise ValueError(f"target_{what} must have shape (B, K + 1, V) = ({B}, {K + 1}, V), got {got}")
    if target.dtype not in floats:
        raise ValueError(f"target_{what} must be float32, bfloat16 or float16, got {target.dtype}")
    V = target.shape[2]
    if V < 1:
        raise ValueError(f"target_{what} must have a vocabulary of at least 1, got V = {V}")
    device = draft_tokens.device
    if target.device != device:
        raise ValueError(f"target_{what} is on {target.device} but draft_tokens is on {device}")
    if draft is not None:
        if not isinstance(draft, torch.Tensor) or draft.dim() != 3 or tuple(draft.shape[:2]) != (B, K):
            got = tuple(draft.shape) if isinstance(draft, torch.Tensor) else draft
            raise ValueError(f"draft_{what} must have shape (B, K, V_draft) = ({B}, {K}, <= {V}) or be None, "
                             f"got {got}")
        if draft.shape[2] > V:
            raise ValueError(f"draft_{what} has a vocabulary of {draft.shape[2]}, larger than the target's {V}: "
                             "the draft's vocabulary must be a prefix of the target's (V_draft <= V)")
        if draft.dtype not in floats:
            raise ValueError(f"draft_{what} must be float32, bfloat16 or float16, got {draft.dtype}")
        if draft.device != device:
            raise ValueError(f"draft_{what} is on {draft.device} but draft_tokens is on {device}")
    if num_draft_tokens is None:
        num_draft_tokens = torch.full((B,), K, dtype=torch.int64, device=device)
    elif (
        not isinstance(num_draft_tokens, torch.Tensor)
        or tuple(num_draft_tokens.shape) != (B,)
        or num_draft_tokens.dtype != torch.int64
        or num_draft_tokens.device != device
    ):
        got = (
            (tuple(num_draft_tokens.shape), num_draft_tokens.dtype, num_draft_tokens.device)
            if isinstance(num_draft_tokens, torch.Tensor)
            else num_draft_tokens
        )
        raise ValueError(f"num_draft_tokens must be None or a ({B},) int64 tensor on {device}, got {got}")
    return B, K, V, num_draft_tokens


def _pad_draft_vocab(draft, V, is_logits):
    """A draft over a prefix of the target's vocabulary gives q = 0 to the target-only ids (logits -inf)."""
    if draft is None or draft.shape[2] == V:
        return draft
    fill = float("-inf") if is_logits else 0.0
    return torch.nn.functional.pad(draft, (0, V - draft.shape[2]), value=fill)


def _seed_offset(generator, seed, offset, B, device):
    """Seed and offset on ``device``, each one element or ``(B,)`` (per row), drawn with torch when not given (no
    host sync)."""
    if (seed is None) != (offset is None):
        raise ValueError("seed and offset must be given together (int64 tensors), or neither")
    if seed is None:
        return draw_seed_offset(generator, device)
    if generator is not None:
        raise ValueError("give either generator or seed/offset, not both")
    for name, value in (("seed", seed), ("offset", offset)):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or \
                not (value.numel() == 1 or tuple(value.shape) == (B,)):
            got = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value
            raise ValueError(f"{name} must be a one-element or a ({B},) int64 tensor, got {got}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the inputs are on {device}")
    return seed, offset


def _row_streams(seed, offset, row_keys, B, K, V, device):
    """Each row's Philox key and first counter, ``(B,)`` int64 each. A one-element ``seed`` keys every row; a
    one-element ``offset`` gives row ``b`` the counters from ``offset + row_keys[b] * (K + 1) * (V + 1)``, a
    ``(B,)`` one is each row's first counter (then ``row_keys`` must be None)."""
    seeds = seed.reshape(1).expand(B).contiguous() if seed.numel() == 1 else seed
    if offset.numel() == 1:
        return seeds, offset.reshape(()) + _row_keys(row_keys, B, device) * ((K + 1) * (V + 1))
    if row_keys is not None:
        raise ValueError("row_keys applies to a one-element offset; a per-row offset is each row's first counter")
    return seeds, offset


def draw_seed_offset(generator: torch.Generator | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Philox seed and offset a call with ``generator=`` draws (int64 scalars on ``device``, drawn on the
    generator's device, no host sync): callers that pass ``seed``/``offset`` themselves (a compiled step, which
    cannot take a generator) draw them here to get the same random numbers."""
    gen_device = generator.device if generator is not None else device
    # Offsets below 2**62 leave room for the B * (K + 1) * (V + 1) counters of a call without wrapping.
    so = torch.randint(0, 2**62, (2,), generator=generator, dtype=torch.int64, device=gen_device).to(device)
    return so[0], so[1]


MAX_ROW_KEY = 2**20
"""Row keys are below this, so that ``offset + key * (K + 1) * (V + 1)`` stays far below 2**63."""


def _row_keys(row_keys, B, device):
    """The (B,) int64 row keys (``0..B-1`` when None). Values are not read on the host (no sync): callers pass
    distinct keys in ``[0, MAX_ROW_KEY)``."""
    if row_keys is None:
        return torch.arange(B, dtype=torch.int64, device=device)
    if not isinstance(row_keys, torch.Tensor) or tuple(row_keys.shape) != (B,) or row_keys.dtype != torch.int64:
        got = (tuple(row_keys.shape), row_keys.dtype) if isinstance(row_keys, torch.Tensor) else row_keys
        raise ValueError(f"row_keys must be None or a ({B},) int64 tensor, got {got}")
    if row_keys.device != device:
        raise ValueError(f"row_keys is on {row_keys.device} but the inputs are on {device}")
    return row_keys


def _deterministic_rows(rows, B, device):
    """The (B,) bool one-hot-q flags (all False when None)."""
    if rows is None:
        return torch.zeros(B, dtype=torch.bool, device=device)
    if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (B,) or rows.dtype != torch.bool:
        got = (tuple(rows.shape), rows.dtype) if isinstance(rows, torch.Tensor) else rows
        raise ValueError(f"deterministic_rows must be None or a ({B},) bool tensor, got {got}")
    if rows.device != device:
        raise ValueError(f"deterministic_rows is on {rows.device} but the inputs are on {device}")
    return rows


def _temperature_tensor(temperature, B, device):
    if isinstance(temperature, torch.Tensor):
        if tuple(temperature.shape) not in ((B,), ()) or not temperature.dtype.is_floating_point:
            raise ValueError(
                f"temperature must be a float or a ({B},) float tensor, got {tuple(temperature.shape)} "
                f"{temperature.dtype}"
            )
        if temperature.device != device:
            raise ValueError(f"temperature is on {temperature.device} but the inputs are on {device}")
        return temperature.to(torch.float32).expand(B).contiguous()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a float >= 0 or a ({B},) tensor, got {temperature!r}")
    return torch.full((B,), float(temperature), dtype=torch.float32, device=device)


def _run(backend, draft_tokens, draft, target, num_draft, temperature, generator, seed, offset, row_keys, onehot,
         is_logits):
    B, K = draft_tokens.shape
    device = draft_tokens.device
    seed, offset = _seed_offset(generator, seed, offset, B, device)
    seeds, offsets = _row_streams(seed, offset, row_keys, B, K, target.shape[2], device)
    if resolve_backend(backend, device) == "triton":
        return rejection_sample_op(draft_tokens, draft, target, num_draft, temperature, seeds, offsets, onehot,
                                   is_logits)
    if is_logits:
        return rejection_sample_from_logits_impl(draft_tokens, draft, target, temperature, num_draft, seeds, offsets,
                                                 onehot)
    return rejection_sample_from_probs_impl(draft_tokens, draft, target, num_draft, seeds, offsets, onehot)


def rejection_sample_from_probs(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    *,
    num_draft_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
    deterministic_rows: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify draft tokens against target probabilities with speculative rejection sampling.

    Parameters
    ----------
    draft_tokens : torch.Tensor
        (B, K) int64 draft tokens, each in [0, V) for the real slots.
    draft_probs : torch.Tensor or None
        (B, K, V_draft) float32/bfloat16/float16, the exact distribution each draft token was drawn from, with
        V_draft <= V: a draft whose vocabulary is a prefix of the target's has q = 0 on the other ids (the
        wrapper pads a copy). None means a deterministic drafter (q one-hot at the draft token).
    target_probs : torch.Tensor
        (B, K + 1, V) float32/bfloat16/float16 target distributions; position K is the bonus distribution.
    num_draft_tokens : torch.Tensor, optional
        (B,) int64 in [0, K]: how many draft slots of each row are real; None means K for every row.
        Slots at or past it are never read and never accepted.
    generator : torch.Generator, optional
        Source of the Philox seed and offset (drawn on its device, no host sync).
    seed, offset : torch.Tensor, optional
        int64 tensors on the inputs' device (for CUDA-graph capture, or to key each row's draws yourself). ``seed``
        is the Philox key: one element for every row, or ``(B,)``, each row's own. A one-element ``offset`` gives
        row ``b`` the ``(K + 1) * (V + 1)`` counters from ``offset + row_keys[b] * (K + 1) * (V + 1)``; a ``(B,)``
        ``offset`` is each row's first counter (``row_keys`` must then be None).
    row_keys : torch.Tensor, optional
        (B,) int64 in ``[0, 2**20)``, distinct: what each row's counters are keyed by with a one-element
        ``offset``, so a row's decisions do not depend on its position in the batch. None: ``0..B-1``.
    deterministic_rows : torch.Tensor, optional
        (B,) bool: rows whose drafts came from a deterministic source (an n-gram match in a batch whose other rows
        drafted from a model): their q is one-hot at the draft token and their ``draft_probs`` rows are ignored.
        No one-hot tensor is built. None: no such row. Ignored when ``draft_probs`` is None (every row one-hot).
    backend : {"auto", "triton", "torch"}
        "auto": Triton for CUDA tensors, the torch reference otherwise.

    Returns
    -------
    output_tokens : torch.Tensor
        (B, K + 1) int64: accepted drafts, one recovered or bonus token, then ``PLACEHOLDER_TOKEN_ID``.
    num_accepted : torch.Tensor
        (B,) int64 in [0, num_draft_tokens[b]].
    """
    B, _, V, num_draft = _check_tokens_and_sizes(draft_tokens, target_probs, draft_probs, num_draft_tokens, "probs")
    draft_probs = _pad_draft_vocab(draft_probs, V, is_logits=False)
    keys = None if row_keys is None else _row_keys(row_keys, B, draft_tokens.device)
    onehot = _deterministic_rows(deterministic_rows, B, draft_tokens.device)
    return _run(backend, draft_tokens, draft_probs, target_probs, num_draft, None, generator, seed, offset, keys,
                onehot, False)


def rejection_sample_from_probs_reference(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    *,
    num_draft_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
    deterministic_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch :func:`rejection_sample_from_probs`: the same arguments but ``backend``, the same results."""
    return rejection_sample_from_probs(
        draft_tokens, draft_probs, target_probs, num_draft_tokens=num_draft_tokens,
        generator=generator, seed=seed, offset=offset, row_keys=row_keys, deterministic_rows=deterministic_rows,
        backend="torch",
    )  # fmt: skip


def rejection_sample_from_logits(
    draft_tokens: torch.Tensor,
    draft_logits: torch.Tensor | None,
    target_logits: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    num_draft_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
    deterministic_rows: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling on logits, with softmax(logits / temperature) of both sides fused (fp32 math).

    Parameters
    ----------
    draft_tokens : torch.Tensor
        (B, K) int64 draft tokens.
    draft_logits : torch.Tensor or None
        (B, K, V_draft) float32/bfloat16/float16 draft logits (filtered entries -inf), V_draft <= V (the missing
        ids get -inf); None = deterministic drafter.
    target_logits : torch.Tensor
        (B, K + 1, V) float32/bfloat16/float16 target logits (filtered entries -inf).
    temperature : float or torch.Tensor
        float >= 0 or a (B,) float tensor (values must be >= 0; not checked, that would need a host sync).
        A row with temperature 0 is verified greedily: drafts are accepted while they equal argmax(target)
        (ties -> lowest index), then argmax(target) at the stop position is emitted.
    num_draft_tokens, generator, seed, offset, row_keys, deterministic_rows, backend
        As in :func:`rejection_sample_from_probs`.

    Returns
    -------
    output_tokens : torch.Tensor
        (B, K + 1) int64: accepted drafts, one recovered or bonus token, then ``PLACEHOLDER_TOKEN_ID``.
    num_accepted : torch.Tensor
        (B,) int64 in [0, num_draft_tokens[b]].
    """
    B, _, V, num_draft = _check_tokens_and_sizes(draft_tokens, target_logits, draft_logits, num_draft_tokens, "logits")
    draft_logits = _pad_draft_vocab(draft_logits, V, is_logits=True)
    t = _temperature_tensor(temperature, B, draft_tokens.device)
    keys = None if row_keys is None else _row_keys(row_keys, B, draft_tokens.device)
    all_greedy = not isinstance(temperature, torch.Tensor) and temperature == 0
    if all_greedy and resolve_backend(backend, draft_tokens.device) == "torch":
        _seed_offset(generator, seed, offset, B, draft_tokens.device)  # consume the generator as the kernel path does
        return greedy_impl(draft_tokens, target_logits, num_draft)
    onehot = _deterministic_rows(deterministic_rows, B, draft_tokens.device)
    return _run(backend, draft_tokens, draft_logits, target_logits, num_draft, t, generator, seed, offset, keys,
                onehot, True)


def rejection_sample_from_logits_reference(
    draft_tokens: torch.Tensor,
    draft_logits: torch.Tensor | None,
    target_logits: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    num_draft_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    row_keys: torch.Tensor | None = None,
    deterministic_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch :func:`rejection_sample_from_logits`: the same arguments but ``backend``, the same results."""
    return rejection_sample_from_logits(
        draft_tokens, draft_logits, target_logits, temperature, num_draft_tokens=num_draft_tokens,
        generator=generator, seed=seed, offset=offset, row_keys=row_keys, deterministic_rows=deterministic_rows,
        backend="torch",
    )  # fmt: skip
