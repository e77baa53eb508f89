"""The accept phase of a step: which of the verified tokens each row keeps, and the one token it adds.

Under the ``"rejection"`` scheme a step with drafts rejection-samples them against the verify logits
(:mod:`batched_specdec.kernels.rejection_sample`) and a step without drafts samples one target token per row. Under
the ``"coupled"`` scheme (coupled :class:`~batched_specdec.processors.RowDraws`) both are one coupled verification
(:mod:`batched_specdec.kernels.coupled_verify`): each emitted token is the target's Gumbel-max sample at its
absolute position, a draft is kept iff it equals it. Greedy decoding verifies by argmax under either scheme. Every
draw comes from the row's own Philox key and its counters or positions, so a row's tokens do not depend on its
position in the batch, on the other rows or on the schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batched_specdec import capture
from batched_specdec.kernels import rejection_sample_from_logits, rejection_sample_from_probs
from batched_specdec.processors import SAMPLE_DRAWS, VERIFY_DRAWS, LogitsProcessor, RowDraws


def verify_drafts(processor: LogitsProcessor, draft_tokens: Tensor, draft_probs: Tensor | None, logits: Tensor,
                  num_draft: Tensor | None, seeds: Tensor, offsets: Tensor,
                  deterministic_rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """Rejection-sample one step's drafts (``k >= 1``) against the verify ``logits`` ``(B, k + 1, V)``:
    ``(out_tokens (B, k + 1), num_accepted (B,))``. Compiled with ``compile=True``; its randomness comes in as
    each row's Philox key and first counter ``seeds``/``offsets`` ``(B,)``. ``deterministic_rows`` ``(B,)`` flags
    rows whose q is one-hot although ``draft_probs`` is given (a hybrid drafter's n-gram rows)."""
    if processor.is_greedy:
        return rejection_sample_from_logits(draft_tokens, None, logits, 0.0, num_draft_tokens=num_draft, seed=seeds,
                                            offset=offsets)
    return rejection_sample_from_probs(draft_tokens, draft_probs, processor.probs(logits), num_draft_tokens=num_draft,
                                       seed=seeds, offset=offsets, deterministic_rows=deterministic_rows)


def verify_coupled(processor: LogitsProcessor, draft_tokens: Tensor, logits: Tensor, num_draft: Tensor | None,
                   seeds: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Coupled verification of one step's drafts (``k >= 0``) against the verify ``logits`` ``(B, k + 1, V)``:
    ``(out_tokens (B, k + 1), num_accepted (B,))``. Compiled with ``compile=True``; each row's Philox key ``seeds``
    and the position of its next token ``positions`` ``(B,)`` int64 key the noise."""
    return processor.verify_coupled(draft_tokens, logits, num_draft, seeds, positions)


def accept(processor: LogitsProcessor, draft_tokens: Tensor, draft_probs: Tensor | None, logits: Tensor,
           num_draft: Tensor | None, draws: RowDraws, deterministic_rows: Tensor | None,
           compile: bool) -> tuple[Tensor, Tensor]:
    """The step's emitted tokens ``(B, k + 1)`` and accepted counts ``(B,)``. Coupled ``draws`` with a sampling
    processor: :func:`verify_coupled`, drafts or not. Otherwise a plain target sample when the step has no drafts
    (``k == 0``), else :func:`verify_drafts`. Verification runs compiled with ``compile``. ``draws`` are the rows'
    Philox keys and this step's counters (and positions, coupled: :class:`~batched_specdec.processors.RowDraws`)."""
    if draws.coupled and not processor.is_greedy:
        args = (processor, draft_tokens, logits, num_draft, draws.seeds, draws.positions)
        return capture.run_compiled(verify_coupled, logits.device, *args) if compile else verify_coupled(*args)
    if draft_tokens.shape[1] == 0:
        token, _ = processor.sample(logits[:, 0], draws=draws.at(SAMPLE_DRAWS))
        return token[:, None], torch.zeros_like(token)
    verifying = draws.at(VERIFY_DRAWS)
    args = (processor, draft_tokens, draft_probs, logits, num_draft, verifying.seeds, verifying.offsets,
            deterministic_rows)
    return capture.run_compiled(verify_drafts, logits.device, *args) if compile else verify_drafts(*args)


def emitted_logprobs(logits: Tensor, out_tokens: Tensor, processor: LogitsProcessor) -> Tensor:
    """``(B, W)`` target log-probability of each emitted token under the processed distribution at its position."""
    logp = torch.log_softmax(processor.process(logits), dim=-1)
    return logp.gather(2, out_tokens.clamp_min(0)[:, :, None])[:, :, 0]
