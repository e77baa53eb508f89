"""Drafters: what proposes the draft tokens of a step.

A drafter sees the committed tokens of every row and proposes up to ``gamma`` draft tokens per row. The engine
verifies them with the target; nothing a drafter does can change the output distribution, only the speed.

* :class:`ModelDrafter` wraps a small HF causal LM whose vocabulary is the target's or a prefix of it. It
  keeps its own ragged KV cache and samples each draft token from the processed draft distribution ``q``, which
  it returns so that verification uses exactly the distribution each token was drawn from.
* :class:`FeatureDrafter` wraps a :class:`~batched_specdec.draft_model.FeatureHeadDraft` (EAGLE-style): it
  drafts from the target's own final hidden states, which the engine hands it from every target forward.
* Model-free drafters (``batched_specdec.ngram.NGramDrafter``) return deterministic proposals (``probs=None``,
  q one-hot) and may propose fewer than ``gamma`` tokens for some rows (``num_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from batched_specdec.inputs import vocab_size
from batched_specdec.kernels import compact_rows
from batched_specdec.ragged_cache import PREFILL_CHUNK, RaggedKVCache, model_forward


@dataclass
class DraftProposal:
    """The draft tokens of one step.

    Attributes
    ----------
    tokens : Tensor
        ``(B, gamma)`` int64. Slots at or past ``num_tokens[b]`` are ignored but must hold valid token ids.
    probs : Tensor or None
        ``(B, gamma, V)`` float32: the exact distribution each draft token was drawn from. ``None`` for
        deterministic drafters (q is one-hot at the draft token).
    num_tokens : Tensor or None
        ``(B,)`` int64 in ``0..gamma``: real draft tokens per row. ``None`` means ``gamma`` for every row.
    deterministic_rows : Tensor or None
        ``(B,)`` bool, with ``probs``: rows whose tokens came from a deterministic source (q one-hot at the draft
        token; their ``probs`` rows are ignored), as a hybrid drafter's n-gram rows. ``None``: no such row.
    """

    tokens: Tensor
    probs: Tensor | None = None
    num_tokens: Tensor | None = None
    deterministic_rows: Tensor | None = None


@runtime_checkable
class Drafter(Protocol):
    """What the engine needs from a drafter.

    The engine owns the committed tokens: ``token_buffer`` is ``(B, S)`` int64 and row ``b``'s committed tokens
    (prompt + emitted) are ``token_buffer[b, :seq_lens[b]]``; entries past ``seq_lens[b]`` are stale. ``seq_lens``
    is ``(B,)`` int64 on the same device. Every method is called with the engine's current (possibly compacted)
    batch. With ``gamma="auto"`` the engine asks for a different ``gamma`` (1..gamma_max) each step, may verify
    only a prefix of a proposal, and runs steps with no drafts without calling ``propose``; a drafter whose state
    follows the steps may define ``note_target_only_step()`` to hear of those (``ModelDrafter`` does).

    A drafter that reads the target's hidden states sets ``uses_target_features = True`` and defines
    ``observe_features(hidden, first_position, rows=None)`` (:class:`FeatureDrafter`): the engine then hands it the
    target's final hidden states of every prefill chunk and of every verify forward (all ``k + 1`` positions; which
    of them a row commits, the next step's ``seq_lens`` says), with no extra host sync. Other drafters define
    neither.

    Losslessness needs one rule from a drafter that proposes fewer tokens than asked: a row's proposal length may
    depend on committed tokens and on the drafter's own state, never on the draft tokens it sampled in this step
    (the engine may cut a proposal to a width chosen from the lengths). Both built-in drafters keep it.
    """

    vocab_size: int | None
    """Size of the vocabulary the drafter proposes from, or None when it proposes ids it saw (n-gram)."""

    def start(self, token_buffer: Tensor, seq_lens: Tensor, max_seq_len: int) -> None:
        """Called once before the first step with the prompts; ``max_seq_len`` bounds every row's length."""

    def propose(
        self,
        token_buffer: Tensor,
        seq_lens: Tensor,
        gamma: int,
        logits_processor,
        generator: torch.Generator | None,
        max_seq_len: int,
        row_keys: Tensor | None = None,
    ) -> DraftProposal:
        """Propose up to ``gamma`` draft tokens per row. Must not synchronise with the host.

        ``max_seq_len`` is the largest ``seq_lens`` of a live row (known on the host), for sizing attention spans.
        ``row_keys`` (``(B,)`` int64, the rows' prompt indices) keys a sampling drafter's random draws
        (``logits_processor.sample(logits, generator, row_keys)``), so a row's drafts do not depend on its position
        in the batch.
        """

    def keep_rows(self, rows: Tensor) -> None:
        """Drop finished rows: keep ``rows`` (``(N,)`` int64, ascending) of the current batch, in that order."""


class ModelDrafter:
    """A small HF causal LM as drafter, with its own ragged KV cache.

    Cache invariant (DESIGN.md): at the start of a drafting step the draft cache holds at least ``s_b[:-2]``, so
    the first draft forward feeds the last two committed tokens (one for a one-token row) and each later forward
    feeds the previous draft token. After verification the engine's ``seq_lens`` alone tells the next step where
    the draft cache's valid entries end (``max(|s_b| - 2, 0)``): pruning moves no bytes. What the cache has not
    seen (the prompts, before the first drafting step; one token per target-only step since the last one) is fed
    in one forward at the start of the next drafting step, so a run that never drafts never runs the draft.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM whose vocabulary is the target's or a prefix of it.
    attention : str
        Attention backend of its forwards (:mod:`batched_specdec.attention`).
    prefill_chunk : int
        Columns per forward when it catches up on many tokens at once (its lazy prompt prefill).
    """

    def __init__(self, model, attention: str = "auto", prefill_chunk: int = PREFILL_CHUNK, compile: bool = False) -> None:
        self.model = model
        self.attention = attention
        self.prefill_chunk = prefill_chunk
        self.compile = compile  # its decode-sized forwards run compiled (ragged_cache.model_forward)
        self.vocab_size = vocab_size(model)  # the width of its logits, so of the q it returns
        embeddings = model.get_input_embeddings()
        self._max_input_id = int(getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]) - 1
        self.cache = None
        self._generator: torch.Generator | None = None
        self._tokens_behind = 0

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def start(self, token_buffer: Tensor, seq_lens: Tensor, max_seq_len: int) -> None:
        batch, _ = token_buffer.shape
        self._generator = None
        # The prompts are fed lazily, by the first propose: a run where the engine never drafts (gamma auto on a
        # workload where drafting cannot pay) never pays the draft's prefill.
        self._tokens_behind = max(int(token_buffer.shape[1]) - 2, 0)  # committed tokens before s[:-2] not yet fed
        self.cache = RaggedKVCache(self.model.config, batch, max_seq_len, self.device, self.attention, self.compile,
                                   role="draft")

    def propose(
        self,
        token_buffer: Tensor,
        seq_lens: Tensor,
        gamma: int,
        logits_processor,
        generator: torch.Generator | None,
        max_seq_len: int,
        row_keys: Tensor | None = None,
    ) -> DraftProposal:
        cache = self.cache
        device = self.device
        generator = self._generator_on(device, generator)
        seq_lens = seq_lens.to(device)
        cache.set_span(max_seq_len + gamma)
        if self._tokens_behind:
            # The cache holds at least s[:-2] minus one token per target-only step since the last draft step (and
            # nothing but the prompts' s[:-2] before the first). Feed the missing tokens first, keeping one logit
            # row (rewrites of cached entries are identical).
            self._feed(token_buffer, seq_lens - 2, self._tokens_behind)
            self._tokens_behind = 0
        # Then the last two committed tokens (one for a one-token row); the draft continues from the last one.
        lens = (seq_lens - 2).clamp_min(0)
        num_first = seq_lens - lens
        logits = self._feed(token_buffer, seq_lens, 2)
        logits = logits.gather(1, (num_first - 1)[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]
        cache.advance(num_first)

        def next_logits(token: Tensor) -> Tensor:
            return model_forward(self.model, cache, token[:, None], logits_to_keep=1)[:, 0]

        tokens, draft_probs = self._sample_chain(logits, gamma, logits_processor, generator, next_logits, row_keys)
        return DraftProposal(tokens=tokens, probs=draft_probs)

    def _sample_chain(self, logits: Tensor, gamma: int, logits_processor, generator, next_logits, row_keys):
        """Sample ``gamma`` draft tokens, the first from ``logits``, each later one from ``next_logits(previous
        token)`` (one draft forward, after which the cache grows by one); returns ``(tokens (B, gamma), q or
        None)``. Draws are keyed by ``row_keys``."""
        keys = None if row_keys is None else row_keys.to(logits.device)
        tokens, probs = [], []
        for i in range(gamma):
            token, prob = logits_processor.sample(logits, generator, keys)
            tokens.append(token)
            probs.append(prob)
            if i + 1 < gamma:
                logits = next_logits(token)
                self.cache.advance(1)
        return torch.stack(tokens, dim=1), None if probs[0] is None else torch.stack(probs, dim=1)

    def _feed(self, token_buffer: Tensor, ends: Tensor, width: int) -> Tensor:
        """Write committed tokens ``[ends - width, ends)`` of every row (from 0 for shorter rows; positions past a
        row's end repeat its last token and lie beyond what is kept) at their positions, at most
        ``prefill_chunk`` columns per forward; returns the ``(B, 2, V)`` logits of the last two fed positions when
        ``width == 2``, else of the last one. Only the step's regular feed (``width == 2``) may run compiled: a
        catch-up's width is a one-off shape."""
        device = self.device
        tokens = token_buffer.to(device)
        ends = ends.clamp_min(1)
        first = (ends - width).clamp_min(0)
        for start in range(0, width, self.prefill_chunk):  # the span was set by propose: it covers every column
            cols = min(self.prefill_chunk, width - start)
            lens = first + start
            self.cache.set_lens(lens)
            idx = torch.minimum(lens[:, None] + torch.arange(cols, device=device)[None, :], ends[:, None] - 1)
            ids = self._draft_ids(tokens.gather(1, idx))
            logits = model_forward(self.model, self.cache, ids, logits_to_keep=min(cols, 2), compile=width == 2)
        return logits

    def _draft_ids(self, ids: Tensor) -> Tensor:
        """Committed ids as draft inputs. A draft over a prefix of the target's vocabulary has no embedding for
        the target-only ids the target may emit; any in-range id stands in for them (it only shapes the proposals,
        which verification corrects). Draft tokens themselves are always in range."""
        return ids.to(self.device).clamp_max(self._max_input_id)

    def note_target_only_step(self) -> None:
        """The engine ran a step without drafts (adaptive draft length 0): one more token to catch up on."""
        self._tokens_behind += 1

    def keep_rows(self, rows: Tensor) -> None:
        self.cache.keep_rows(rows)

    def _generator_on(self, device: torch.device, generator: torch.Generator | None) -> torch.Generator | None:
        """The engine's generator lives on the target's device; a draft elsewhere gets its own generator, seeded
        once from the engine's (one host read per call of the engine, not per step)."""
        if generator is None or generator.device == device:
            return generator
        if self._generator is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator


class FeatureDrafter(ModelDrafter):
    """A :class:`~batched_specdec.draft_model.FeatureHeadDraft` as drafter: it drafts from the target's features.

    The engine hands it the target's final hidden states of every position it runs (prefill chunks, every verify
    forward: :meth:`observe_features`); it keeps them in a ``(B, capacity, H)`` buffer by position, so the features
    of committed positions are always the target's own (positions a verify wrote past what a row committed are
    rewritten by the row's next verify before they are read). Its cache entry at position ``i`` is the draft's
    layer over the pair ``(f_i, x_{i+1})``: row ``b``'s committed pairs are ``i < |s_b| - 1``.

    A step feeds the pairs committed since the last proposal (at most the verify widths seen since, for every row;
    a row with fewer rewrites committed pairs with identical inputs) in one forward, reads the predicted feature
    and ``q`` at each row's last committed pair, and continues for ``gamma - 1`` forwards on its own predicted
    features. A row with no committed pair yet (a one-token prompt before its first step) proposes nothing.
    Lossless as every drafter: ``q`` is exactly the distribution each draft token was sampled from.
    """

    uses_target_features = True

    def __init__(self, model, attention: str = "auto", prefill_chunk: int = PREFILL_CHUNK) -> None:
        super().__init__(model, attention, prefill_chunk)
        self.features: Tensor | None = None

    def start(self, token_buffer: Tensor, seq_lens: Tensor, max_seq_len: int) -> None:
        super().start(token_buffer, seq_lens, max_seq_len)
        batch = token_buffer.shape[0]
        hidden = int(self.model.config.hidden_size)
        self.features = torch.zeros(batch, max_seq_len, hidden, dtype=self.model.dtype, device=self.device)
        self._tokens_behind = 0  # the prefill's observations add every committed pair of the prompts

    def observe_features(self, hidden: Tensor, first_position: Tensor | int, rows: int | None = None) -> None:
        """Keep the target's final hidden states ``hidden`` ``(R, W, H)`` of positions ``first_position[r] + j``
        (``(R,)`` int64, or an int for every row) for rows ``[:rows]`` (all when None): up to ``W`` new committed
        pairs per row for the next proposal to feed. Also ``ragged_cache.prefill``'s ``on_hidden``."""
        buf = self.features if rows is None else self.features[:rows]
        r, w, h = hidden.shape
        first = torch.as_tensor(first_position, dtype=torch.int64, device=self.device).expand(r)
        idx = first[:, None] + torch.arange(w, device=self.device)[None, :]
        buf.scatter_(1, idx[:, :, None].expand(r, w, h), hidden.to(device=self.device, dtype=buf.dtype))
        self._tokens_behind += w

    def note_target_only_step(self) -> None:
        pass  # a target-only step is a verify of width 1, whose features observe_features counted

    def propose(self, token_buffer, seq_lens, gamma, logits_processor, generator, max_seq_len,
                row_keys=None) -> DraftProposal:
        device = self.device
        generator = self._generator_on(device, generator)
        tokens, pairs = token_buffer.to(device), seq_lens.to(device) - 1
        self.cache.set_span(max_seq_len + gamma)
        logits, feature = self._feed_pairs(tokens, pairs.clamp_min(1), max(self._tokens_behind, 1))
        self._tokens_behind = 0
        self.cache.set_lens(pairs.clamp_min(1))

        def next_logits(token: Tensor) -> Tensor:  # the pair (own predicted feature, drafted token)
            nonlocal feature
            logits, hidden = model_forward(self.model, self.cache, token[:, None], logits_to_keep=1,
                                           return_hidden=True, features=feature[:, None])
            feature = hidden[:, 0]
            return logits[:, 0]

        drafted, draft_probs = self._sample_chain(logits, gamma, logits_processor, generator, next_logits, row_keys)
        return DraftProposal(tokens=drafted, probs=draft_probs, num_tokens=torch.where(pairs > 0, gamma, 0))

    def _feed_pairs(self, tokens: Tensor, ends: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """Write the pairs ``[ends - width, ends)`` of every row (from 0 for shorter rows) and return the logits
        ``(B, V)`` and predicted features ``(B, H)`` at each row's pair ``ends - 1``. Wider than ``prefill_chunk``,
        all but the last pair go first, in chunks; columns past a row's last pair repeat it beyond its length."""
        if width > self.prefill_chunk:
            first = (ends - width).clamp_min(0)
            for start in range(0, width - 1, self.prefill_chunk):
                self._pairs_forward(tokens, first + start, ends - 1, min(self.prefill_chunk, width - 1 - start))
            width = 1
        first = (ends - width).clamp_min(0)
        hidden = self._pairs_forward(tokens, first, ends, width)
        col = (ends - 1 - first)[:, None, None]
        feature = hidden.gather(1, col.expand(-1, 1, hidden.shape[-1]))[:, 0]
        return self.model.full_logits(feature), feature

    def _pairs_forward(self, tokens: Tensor, first: Tensor, ends: Tensor, cols: int) -> Tensor:
        """One forward over pairs ``first + j`` (``j < cols``, clamped to ``ends - 1``) at those positions; returns
        the predicted features ``(B, cols, H)``."""
        self.cache.set_lens(first)
        idx = torch.minimum(first[:, None] + torch.arange(cols, device=first.device)[None, :], ends[:, None] - 1)
        idx = idx.clamp_min(0)  # a row with nothing to write in this forward writes placeholders past its length
        feats = self.features.gather(1, idx[:, :, None].expand(-1, -1, self.features.shape[-1]))
        _, hidden = model_forward(self.model, self.cache, self._draft_ids(tokens.gather(1, idx + 1)),
                                  return_hidden=True, features=feats, compute_logits=False)
        return hidden

    def keep_rows(self, rows: Tensor) -> None:
        super().keep_rows(rows)
        # After the cache (released layer by layer): the peak is this buffer twice, about one target layer's KV.
        (self.features,) = compact_rows([self.features], rows.to(self.device))


def as_drafter(draft_model, target_vocab: int, attention: str = "auto", prefill_chunk: int = PREFILL_CHUNK,
               compile: bool = False) -> Drafter:
    """A drafter for ``draft_model``; its vocabulary must be a prefix of the target's (``V_draft <= V_target``).
    A model gets a :class:`ModelDrafter` with the engine's ``attention`` backend, ``prefill_chunk`` and ``compile``.

    Raises
    ------
    ValueError
        ``compile=True`` with a feature draft: its forwards return hidden states, which compiled forwards do not.
    """
    if isinstance(draft_model, Drafter) and not hasattr(draft_model, "config"):
        drafter = draft_model
    elif getattr(draft_model, "kind", None) == "feature":
        if compile:
            raise ValueError("compile=True does not support feature drafts (kind 'feature') yet: their forwards "
                             "return the decoder's hidden states, which compiled forwards do not; use compile=False")
        drafter = FeatureDrafter(draft_model, attention, prefill_chunk)
    elif hasattr(draft_model, "config") and hasattr(draft_model, "get_input_embeddings"):
        drafter = ModelDrafter(draft_model, attention, prefill_chunk, compile)
    else:
        raise TypeError(f"draft_model must be an HF causal LM or a Drafter, got {type(draft_model).__name__}")
    draft_vocab = getattr(drafter, "vocab_size", None)
    if draft_vocab is not None and draft_vocab > target_vocab:
        raise ValueError(
            f"draft vocabulary size {draft_vocab} is larger than the target's {target_vocab}; the draft's vocabulary "
            "must be the target's or a prefix of it (ids the draft lacks get draft probability 0)"
        )
    return drafter


def draft_cost_ratio(drafter, target_model) -> float | None:
    """A model draft's parameter count over the target's (a prior for its cost); None for model-free drafters."""
    model = getattr(drafter, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    return sum(p.numel() for p in model.parameters()) / max(sum(p.numel() for p in target_model.parameters()), 1)
