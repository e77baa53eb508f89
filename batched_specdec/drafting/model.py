"""A small Hugging Face causal LM as drafter, with its own ragged KV cache."""

from __future__ import annotations

import torch
from torch import Tensor

from batched_specdec.drafting.base import Drafter, DraftProposal
from batched_specdec.forwards import model_forward
from batched_specdec.model_info import vocab_size
from batched_specdec.processors import RowDraws
from batched_specdec.ragged_cache import PREFILL_CHUNK, RaggedKVCache


class ModelDrafter(Drafter):
    """A small HF causal LM as drafter, with its own ragged KV cache.

    Cache invariant: at the start of a drafting step the draft cache holds at least ``s_b[:-2]``, so
    the first draft forward feeds the last two committed tokens (one for a one-token row) and each later forward
    feeds the previous draft token. After verification the session's ``seq_lens`` alone tells the next step where
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

    def __init__(self, model, attention: str = "auto", prefill_chunk: int = PREFILL_CHUNK,
                 compile: bool = False) -> None:
        self.model = model
        self.attention = attention
        self.prefill_chunk = prefill_chunk
        self.compile = compile  # its decode-sized forwards run compiled (forwards.model_forward)
        self.graphs = False  # or recorded and replayed (use_graphs)
        self.vocab_size = vocab_size(model)  # the width of its logits, so of the q it returns
        embeddings = model.get_input_embeddings()
        self._max_input_id = int(getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]) - 1
        self.cache = None
        self._tokens_behind = 0
        self._missed_steps = True  # the next proposal also feeds what the drafter missed (prompts, plain steps)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def start(self, token_buffer: Tensor, seq_lens: Tensor, max_seq_len: int) -> None:
        batch, _ = token_buffer.shape
        self._missed_steps = True
        # The prompts are fed lazily, by the first propose: a run that never drafts (gamma auto on a
        # workload where drafting cannot pay) never pays the draft's prefill.
        self._tokens_behind = max(int(token_buffer.shape[1]) - 2, 0)  # committed tokens before s[:-2] not yet fed
        self.cache = RaggedKVCache(self.model.config, batch, max_seq_len, self.device, self.attention, self.compile,
                                   role="draft", graphs=self.graphs)

    def use_graphs(self, enabled: bool) -> None:
        self.graphs = enabled

    def propose(self, token_buffer: Tensor, seq_lens: Tensor, gamma: int, logits_processor, max_seq_len: int,
                draws: RowDraws | None = None) -> DraftProposal:
        cache = self.cache
        device = self.device
        seq_lens = seq_lens.to(device)
        cache.set_span(max_seq_len + gamma)
        if self._tokens_behind:
            # The cache holds at least s[:-2] minus one token per target-only step since the last draft step (and
            # nothing but the prompts' s[:-2] before the first). Feed the missing tokens first, keeping one logit
            # row (rewrites of cached entries are identical). Never more than a live row's length (``max_seq_len``
            # bounds them; from position 0 that rewrites every token), however many steps and prompts it missed.
            self._feed(token_buffer, seq_lens - 2, min(self._tokens_behind, max_seq_len))
            self._tokens_behind = 0
        # Then the last two committed tokens (one for a one-token row); the draft continues from the last one.
        lens = (seq_lens - 2).clamp_min(0)
        num_first = seq_lens - lens
        logits = self._feed(token_buffer, seq_lens, 2)
        logits = logits.gather(1, (num_first - 1)[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]
        cache.advance(num_first)

        def next_logits(token: Tensor) -> Tensor:
            return model_forward(self.model, cache, token[:, None], logits_to_keep=1)[:, 0]

        tokens, draft_probs = self._sample_chain(logits, gamma, logits_processor, next_logits, draws)
        return DraftProposal(tokens=tokens, probs=draft_probs, includes_catch_up=self._caught_up())

    def _caught_up(self) -> bool:
        """Whether this proposal fed what the drafter missed since its last one (then clears that)."""
        missed, self._missed_steps = self._missed_steps, False
        return missed

    def _sample_chain(self, logits: Tensor, gamma: int, logits_processor, next_logits, draws: RowDraws | None):
        """Sample ``gamma`` draft tokens, the first from ``logits``, each later one from ``next_logits(previous
        token)`` (one draft forward, after which the cache grows by one); returns ``(tokens (B, gamma), q or
        None)``. Token ``i`` is drawn from ``draws.draft(i)``: counters ``2 * i`` on, or, coupled draws, the
        Gumbel-max sample at the position ``i`` past the committed tokens (then q is None: coupled verification
        reads no draft distribution)."""
        draws = None if draws is None else draws.to(logits.device)
        tokens, probs = [], []
        for i in range(gamma):
            token, prob = logits_processor.sample(logits, draws=None if draws is None else draws.draft(i))
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

    def note_target_only_step(self, width: int = 1) -> None:
        """A step without its drafts: up to ``width`` more committed tokens to catch up on."""
        self._tokens_behind += width
        self._missed_steps = True

    def admit_rows(self, token_buffer: Tensor, rows: Tensor, prompt_lens: list[int]) -> None:
        """New prompts' tokens are fed with the next catch-up (every row's last tokens are rewritten with identical
        entries, the new rows' from position 0)."""
        self._tokens_behind = max(self._tokens_behind, max(prompt_lens) - 2)
        self._missed_steps = True

    def keep_rows(self, rows: Tensor) -> None:
        self.cache.keep_rows(rows)
