"""Pure-torch rejection sampling: the ground truth of the Triton kernels, and the CPU path of the engine.

Same decisions as the kernels from the same seed, offset and row keys: every random number is the Philox draw the
kernels make (:func:`batched_specdec.kernels.philox.philox_uniform_reference`, bit for bit), at the counters defined
in :mod:`batched_specdec.kernels.rejection_sample`. Inputs are checked by the public functions, not here.
"""

import torch
from torch import Tensor

from batched_specdec.kernels.philox import philox_uniform_reference

PLACEHOLDER_TOKEN_ID = -1
"""Fills output slots after a row's emitted tokens."""

_FLT_MAX = 3.4028234663852886e38


def _output_rows(draft_tokens: Tensor, stop: Tensor, token: Tensor) -> Tensor:
    """``(B, K + 1)``: ``draft_tokens[:stop]``, then ``token``, then :data:`PLACEHOLDER_TOKEN_ID`."""
    B, K = draft_tokens.shape
    pos = torch.arange(K + 1, device=draft_tokens.device)[None, :]
    placeholder = torch.full((B, 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int64, device=draft_tokens.device)
    drafts = torch.cat([draft_tokens, placeholder], 1)
    return torch.where(pos < stop[:, None], drafts,
                       torch.where(pos == stop[:, None], token[:, None], placeholder.expand_as(drafts)))


def _softmax(logits: Tensor, inv_t: Tensor) -> Tensor:
    """``softmax(logits * inv_t)`` in float32, as the kernels compute it (a row of only ``-inf`` has max
    ``-FLT_MAX``)."""
    x = logits.to(torch.float32) * inv_t[:, None, None]
    m = x.amax(-1).clamp_min(-_FLT_MAX)
    e = torch.exp(x - m[..., None])
    return e / e.sum(-1)[..., None]


def rejection_sample_from_probs_impl(draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
                                     num_draft: Tensor, seeds: Tensor, offsets: Tensor,
                                     deterministic_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rejection sampling of checked inputs.

    ``draft_tokens`` ``(B, K)`` int64; ``draft_probs`` ``(B, K, V)`` or None (every q one-hot); ``target_probs``
    ``(B, K + 1, V)``; ``num_draft`` ``(B,)`` int64; ``seeds``/``offsets`` ``(B,)`` int64, each row's Philox key
    and first counter; ``deterministic_rows`` ``(B,)`` bool (rows whose q is one-hot although ``draft_probs`` is
    given). Returns ``(output_tokens (B, K + 1), num_accepted (B,))``.
    """
    B, K = draft_tokens.shape
    V = target_probs.shape[2]
    device = draft_tokens.device
    pos = torch.arange(K + 1, device=device)
    counter_row, key = offsets, seeds[:, None]
    p_all = target_probs.to(torch.float32)
    q_all = None if draft_probs is None else draft_probs.to(torch.float32)

    # Acceptance of every slot (slots past the stop are computed but never used); ignored slots may hold anything,
    # so gathers use clamped ids.
    d = draft_tokens
    d_safe = d.clamp(0, V - 1)
    p_d = p_all[:, :K].gather(2, d_safe[..., None])[..., 0]
    if q_all is None:
        q_d = torch.ones_like(p_d)
    else:
        q_d = torch.where(deterministic_rows[:, None], 1.0, q_all.gather(2, d_safe[..., None])[..., 0])
    u = philox_uniform_reference(key, counter_row[:, None] + pos[None, :K] * (V + 1) + V)
    accept = (u * q_d < p_d) & (pos[None, :K] < num_draft[:, None])
    stop = accept.to(torch.int64).cumprod(1).sum(1)

    # Recovered token from norm(max(0, p - q)) at the first rejection, or the bonus token from p: an exponential
    # race argmax_v r_v / E_v, with p as the fallback when r is all zero through rounding.
    p = p_all.gather(1, stop[:, None, None].expand(B, 1, V))[:, 0]
    stop_q = stop.clamp_max(K - 1)[:, None]
    onehot_q = (torch.arange(V, device=device)[None, :] == d.gather(1, stop_q)).to(torch.float32)
    if q_all is None:
        q = onehot_q
    else:
        q = torch.where(deterministic_rows[:, None], onehot_q, q_all.gather(1, stop_q[..., None].expand(B, 1, V))[:, 0])
    q = torch.where((stop == num_draft)[:, None], torch.zeros_like(q), q)
    r = torch.clamp_min(p - q, 0.0)
    e = -torch.log(philox_uniform_reference(key, counter_row[:, None] + stop[:, None] * (V + 1) +
                                            torch.arange(V, device=device)[None, :]))
    minus_one = torch.tensor(-1.0, device=device)
    score_r = torch.where(r > 0, r / e, minus_one)
    score_p = torch.where(p > 0, p / e, minus_one)
    token = torch.where(score_r.amax(-1) >= 0, score_r.argmax(-1), score_p.argmax(-1))
    return _output_rows(d, stop, token), stop


def rejection_sample_from_logits_impl(draft_tokens: Tensor, draft_logits: Tensor | None, target_logits: Tensor,
                                      temperature: Tensor, num_draft: Tensor, seeds: Tensor, offsets: Tensor,
                                      deterministic_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rejection sampling of checked logits: ``softmax(logits / temperature)`` of both sides, then
    :func:`rejection_sample_from_probs_impl`; rows with ``temperature`` ``(B,)`` 0 are verified greedily."""
    greedy = temperature == 0
    inv_t = 1.0 / torch.where(greedy, torch.ones_like(temperature), temperature)
    draft_probs = None if draft_logits is None else _softmax(draft_logits, inv_t)
    out, stop = rejection_sample_from_probs_impl(draft_tokens, draft_probs, _softmax(target_logits, inv_t),
                                                 num_draft, seeds, offsets, deterministic_rows)
    greedy_out, greedy_stop = greedy_impl(draft_tokens, target_logits, num_draft)
    return torch.where(greedy[:, None], greedy_out, out), torch.where(greedy, greedy_stop, stop)


def greedy_impl(draft_tokens: Tensor, target_logits: Tensor, num_draft: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy verification: drafts are accepted while they equal ``argmax(target_logits)`` (ties to the lowest
    index), then the argmax at the stop position is emitted. No softmax and no random numbers."""
    K = draft_tokens.shape[1]
    a_p = target_logits.argmax(-1)  # (B, K + 1)
    pos = torch.arange(K, device=draft_tokens.device)
    accept = (draft_tokens == a_p[:, :K]) & (pos[None, :] < num_draft[:, None])
    stop = accept.to(torch.int64).cumprod(1).sum(1)
    return _output_rows(draft_tokens, stop, a_p.gather(1, stop[:, None])[:, 0]), stop
