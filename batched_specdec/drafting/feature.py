"""A feature head as drafter (ours, EAGLE-1, EAGLE-3): it drafts from the target's own hidden states."""

from __future__ import annotations

import torch
from torch import Tensor

from batched_specdec.drafting.base import DraftProposal
from batched_specdec.drafting.model import ModelDrafter
from batched_specdec.forwards import model_forward
from batched_specdec.kernels import compact_rows
from batched_specdec.ragged_cache import PREFILL_CHUNK


class FeatureDrafter(ModelDrafter):
    """A feature head (:class:`~batched_specdec.drafting.heads.FeatureHeadDraft`,
    :class:`~batched_specdec.drafting.eagle.EagleDraft`) as drafter: it drafts from the target's features.

    The session hands it the target's hidden states of every position it runs (the final ones, or the layers of the
    head's ``feature_layers``; prefill chunks, every verify forward: :meth:`observe_features`); it keeps them in a
    ``(B, capacity, F)`` buffer by position, so the features
    of committed positions are always the target's own (positions a verify wrote past what a row committed are
    rewritten by the row's next verify before they are read). Its cache entry at position ``i`` is the draft's
    layer over the pair ``(f_i, x_{i+1})``: row ``b``'s committed pairs are ``i < |s_b| - 1``.

    A step feeds the pairs committed since the last proposal (at most the verify widths seen since, for every row;
    a row with fewer rewrites committed pairs with identical inputs) in one forward, reads the predicted feature
    and ``q`` at each row's last committed pair, and continues for ``gamma - 1`` forwards on its own predicted
    features. A row with no committed pair yet (a one-token prompt before its first step) proposes nothing.
    Lossless as every drafter: ``q`` is exactly the distribution each draft token was sampled from (under the
    ``"coupled"`` scheme its drafts are Gumbel-max samples with the target's noise, verified by equality).
    """

    uses_target_features = True

    def __init__(self, model, attention: str = "auto", prefill_chunk: int = PREFILL_CHUNK) -> None:
        super().__init__(model, attention, prefill_chunk)
        self.feature_layers = model.feature_layers
        self.features: Tensor | None = None

    def start(self, token_buffer: Tensor, seq_lens: Tensor, max_seq_len: int) -> None:
        super().start(token_buffer, seq_lens, max_seq_len)
        batch = token_buffer.shape[0]
        width = int(self.model.feature_size)
        self.features = torch.zeros(batch, max_seq_len, width, dtype=self.model.dtype, device=self.device)
        self._tokens_behind = 0  # the prefill's observations add every committed pair of the prompts

    def observe_features(self, hidden: Tensor, first_position: Tensor | int, rows: int | Tensor | None = None) -> None:
        """Keep the target's hidden states ``hidden`` ``(R, W, F)`` of positions ``first_position[r] + j``
        (``(R,)`` int64, or an int for every row) for rows ``[:rows]``, the rows of an index tensor, or all (None):
        up to ``W`` new committed pairs per row for the next proposal to feed. Also ``forwards.prefill``'s
        ``on_hidden``."""
        r, w, h = hidden.shape
        first = torch.as_tensor(first_position, dtype=torch.int64, device=self.device).expand(r)
        idx = (first[:, None] + torch.arange(w, device=self.device)[None, :])[:, :, None].expand(r, w, h)
        values = hidden.to(device=self.device, dtype=self.features.dtype)
        if isinstance(rows, Tensor):  # a prefill of prompts that entered some rows
            index = rows.to(self.device)
            self.features.index_copy_(0, index, self.features.index_select(0, index).scatter_(1, idx, values))
        else:
            (self.features if rows is None else self.features[:rows]).scatter_(1, idx, values)
        self._tokens_behind += w

    def note_target_only_step(self, width: int = 1) -> None:
        self._missed_steps = True  # its pairs were counted by observe_features (the verify forward's width)

    def admit_rows(self, token_buffer: Tensor, rows: Tensor, prompt_lens: list[int]) -> None:
        self._missed_steps = True  # the new rows' pairs were counted by observe_features during their prefill

    def propose(self, token_buffer, seq_lens, gamma, logits_processor, max_seq_len, draws=None) -> DraftProposal:
        device = self.device
        tokens, pairs = token_buffer.to(device), seq_lens.to(device) - 1
        self.cache.set_span(max_seq_len + gamma)
        # What it missed, but never more pairs than a live row has (``max_seq_len`` bounds them): after a long stretch
        # without drafts (continuous batching: every entering prompt's prefill adds its pairs) the count can exceed
        # the cache's capacity, and feeding from position 0 already rewrites every pair.
        # The regular feed (the pairs of the last verify) is decode-sized; a catch-up (after steps without its drafts,
        # or admissions) is a one-off width and runs eagerly.
        logits, feature = self._feed_pairs(tokens, pairs.clamp_min(1), min(max(self._tokens_behind, 1), max_seq_len),
                                           decode_sized=not self._missed_steps)
        self._tokens_behind = 0
        self.cache.set_lens(pairs.clamp_min(1))

        def next_logits(token: Tensor) -> Tensor:  # the pair (own predicted feature, drafted token)
            nonlocal feature
            logits, hidden = model_forward(self.model, self.cache, token[:, None], logits_to_keep=1,
                                           return_hidden=True, features=feature[:, None])
            feature = hidden[:, 0]
            return logits[:, 0]

        drafted, draft_probs = self._sample_chain(logits, gamma, logits_processor, next_logits, draws)
        return DraftProposal(tokens=drafted, probs=draft_probs, num_tokens=torch.where(pairs > 0, gamma, 0),
                             includes_catch_up=self._caught_up())

    def _feed_pairs(self, tokens: Tensor, ends: Tensor, width: int, decode_sized: bool = True) -> tuple[Tensor, Tensor]:
        """Write the pairs ``[ends - width, ends)`` of every row (from 0 for shorter rows) and return the logits
        ``(B, V)`` and predicted features ``(B, H)`` at each row's pair ``ends - 1``. Wider than ``prefill_chunk``,
        all but the last pair go first, in chunks; columns past a row's last pair repeat it beyond its length.
        Only a ``decode_sized`` feed may be recorded and replayed (``cuda_graphs``)."""
        if width > self.prefill_chunk:
            first = (ends - width).clamp_min(0)
            for start in range(0, width - 1, self.prefill_chunk):
                self._pairs_forward(tokens, first + start, ends - 1, min(self.prefill_chunk, width - 1 - start), False)
            width = 1
        first = (ends - width).clamp_min(0)
        hidden = self._pairs_forward(tokens, first, ends, width, decode_sized)
        col = (ends - 1 - first)[:, None, None]
        feature = hidden.gather(1, col.expand(-1, 1, hidden.shape[-1]))[:, 0]
        return self.model.full_logits(feature), feature

    def _pairs_forward(self, tokens: Tensor, first: Tensor, ends: Tensor, cols: int, decode_sized: bool) -> Tensor:
        """One forward over pairs ``first + j`` (``j < cols``, clamped to ``ends - 1``) at those positions; returns
        the predicted features ``(B, cols, H)`` (recorded and replayed with ``cuda_graphs`` when ``decode_sized``)."""
        self.cache.set_lens(first)
        idx = torch.minimum(first[:, None] + torch.arange(cols, device=first.device)[None, :], ends[:, None] - 1)
        idx = idx.clamp_min(0)  # a row with nothing to write in this forward writes placeholders past its length
        feats = self.features.gather(1, idx[:, :, None].expand(-1, -1, self.features.shape[-1]))
        _, hidden = model_forward(self.model, self.cache, self._draft_ids(tokens.gather(1, idx + 1)),
                                  return_hidden=True, features=feats, compute_logits=False, compile=decode_sized)
        return hidden

    def keep_rows(self, rows: Tensor) -> None:
        super().keep_rows(rows)
        # After the cache (released layer by layer): the peak is this buffer twice, about one target layer's KV.
        (self.features,) = compact_rows([self.features], rows.to(self.device))
