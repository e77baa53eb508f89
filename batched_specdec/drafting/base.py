"""What a drafter is: the base class every drafter implements, and the proposal it returns.

A drafter sees the committed tokens of every row and proposes up to ``gamma`` draft tokens per row. The session
(:mod:`batched_specdec.decode.session`) verifies them with the target; nothing a drafter does can change the output
distribution, only the speed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor

from batched_specdec.processors import RowDraws


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
    includes_catch_up : bool
        The drafter also fed tokens it had missed (the prompts, or steps without drafts) while proposing, so the
        time it took is not the cost of its draft forwards alone.
    source : Tensor or None
        ``(B,)`` int64, for a drafter with several sources (:attr:`Drafter.sources`): the index of the source each
        row's tokens came from. The session counts each row's verified and accepted drafts per source.
    """

    tokens: Tensor
    probs: Tensor | None = None
    num_tokens: Tensor | None = None
    deterministic_rows: Tensor | None = None
    includes_catch_up: bool = False
    source: Tensor | None = None


class Drafter(ABC):
    """Base class of every drafter: :meth:`propose`, and hooks whose defaults do nothing.

    The session owns the committed tokens: ``token_buffer`` is ``(B, S)`` int64 and row ``b``'s committed tokens
    (prompt + emitted) are ``token_buffer[b, :seq_lens[b]]``; entries past ``seq_lens[b]`` are stale. ``seq_lens``
    is ``(B,)`` int64 on the same device. Every method is called with the session's current (possibly compacted)
    batch. With ``gamma="auto"`` the session asks for a different ``gamma`` (1..gamma_max) each step, may verify
    only a prefix of a proposal, and runs steps with no drafts without calling :meth:`propose` (it calls
    :meth:`note_target_only_step` instead).

    Losslessness needs one rule from a drafter that proposes fewer tokens than asked: a row's proposal length may
    depend on committed tokens and on the drafter's own state, never on the draft tokens it sampled in this step
    (the session may cut a proposal to a width chosen from the lengths). Every built-in drafter keeps it.
    """

    vocab_size: int | None = None
    """Size of the vocabulary the drafter proposes from, or None when it proposes ids it saw (n-gram)."""
    uses_target_features: bool = False
    """Whether the drafter reads the target's hidden states (:meth:`observe_features`)."""
    feature_layers: tuple[int, ...] | None = None
    """Which: None for the final (normed) hidden states, else the inputs of these target decoder layers
    (``output_hidden_states`` indices), concatenated (an EAGLE-3 head's three)."""
    model = None
    """The draft model whose forwards drafting costs (None for a model-free drafter)."""
    sources: tuple[str, ...] | None = None
    """Names of the sources a proposal's ``source`` indexes, for a drafter with several (the hybrid drafter, and the
    n-gram drafter's match lengths)."""

    @property
    def copy_sources(self) -> tuple[int, ...]:
        """Indices of the :attr:`sources` that copy an n-gram match of the row's own tokens (names ``ngram...``):
        the ones gamma auto prices by their streak of full acceptances."""
        return tuple(i for i, name in enumerate(self.sources or ()) if name.startswith("ngram"))

    @property
    def target_hidden(self) -> bool | tuple[int, ...]:
        """The ``return_hidden`` of the target's forwards (:func:`~batched_specdec.forwards.model_forward`):
        False when the drafter reads no features, True for the final hidden states, else :attr:`feature_layers`."""
        return bool(self.uses_target_features) and (self.feature_layers or True)

    def start(self, token_buffer: Tensor, seq_lens: Tensor, max_seq_len: int) -> None:
        """Called once before the first step with the prompts; ``max_seq_len`` bounds every row's length."""

    @abstractmethod
    def propose(self, token_buffer: Tensor, seq_lens: Tensor, gamma: int, logits_processor, max_seq_len: int,
                draws: RowDraws | None = None) -> DraftProposal:
        """Propose up to ``gamma`` draft tokens per row. Must not synchronise with the host.

        ``max_seq_len`` is the largest ``seq_lens`` of a live row (known on the host), for sizing attention spans.
        ``draws`` holds each row's Philox key and first counter for this step (the session's
        :class:`~batched_specdec.processors.RowDraws`, already shifted to the drafter's counters; under the
        ``"coupled"`` scheme also the position of each row's next token): a sampling drafter draws draft token ``i``
        with ``logits_processor.sample(logits, draws=draws.draft(i))``, so a row's drafts depend on its prompt and
        position only, never on its place in the batch. Under the ``"coupled"`` scheme that is the Gumbel-max sample
        of the draft's distribution with the target's noise at position ``seq_lens + i`` (its ``probs`` are None),
        which makes the draft likely to equal the target's token there. None: greedy only.
        """

    def next_sources(self, token_buffer: Tensor, seq_lens: Tensor, max_seq_len: int, gamma_max: int) -> Tensor | None:
        """For a drafter with several :attr:`sources`: the host ``(B,)`` int64 index of the source each row will
        draft from in this step's :meth:`propose` (called first, before the step's plan, so the plan can read each
        source's own acceptance), or None where it cannot say without a device read. Depends on committed tokens and
        the drafter's state only. Default None."""
        return None

    def observe_features(self, hidden: Tensor, first_position: Tensor | int, rows: int | Tensor | None = None) -> None:
        """The target's hidden states ``(R, W, F)`` (:attr:`target_hidden`) of positions ``first_position + j`` (an int,
        or ``(R,)`` int64 per row) for rows ``[:rows]``, the rows of an ``(R,)`` int64 index tensor on any device
        (prompts entering some rows), or all (None), from every prefill chunk, verify forward and admission. Only
        drafters with :attr:`uses_target_features` are called."""

    def use_graphs(self, enabled: bool) -> None:
        """Called by the session before :meth:`start`: record and replay the drafter's decode-sized forwards
        (``cuda_graphs``, :mod:`batched_specdec.graphs`) or not. A model drafter passes it to its cache; the
        default does nothing."""

    def note_target_only_step(self, width: int = 1) -> None:
        """A step in which this drafter proposed nothing (the session's draft length 0, or a hybrid drafter's
        other source): rows commit up to ``width`` tokens it has not seen."""

    def observe_verified(self, proposed: Tensor, accepted: Tensor) -> None:
        """After a step with drafts: ``(B,)`` int64 drafts each row verified and accepted (0 for finished rows)."""

    def admit_rows(self, token_buffer: Tensor, rows: Tensor, prompt_lens: list[int]) -> None:
        """New prompts entered ``rows`` (``(R,)`` int64 on the session's device): their tokens are in ``token_buffer``
        ``(B, S)``, ``prompt_lens`` (host ints) long. Reset what the drafter keeps for those rows. The target's features
        of their prompts (a feature drafter) arrive through :meth:`observe_features` first."""

    def keep_rows(self, rows: Tensor) -> None:
        """Drop finished rows: keep ``rows`` (``(N,)`` int64, ascending) of the current batch, in that order."""


def draft_cost_ratio(drafter: Drafter, target_model) -> float | None:
    """A model draft's parameter count over the target's (a prior for its cost); None for model-free drafters."""
    if drafter.model is None:
        return None
    draft = sum(p.numel() for p in drafter.model.parameters())
    return draft / max(sum(p.numel() for p in target_model.parameters()), 1)
