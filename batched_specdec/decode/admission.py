"""Admission: prompts entering the rows of a running batch (continuous batching).

A :class:`~batched_specdec.decode.session.DecodeSession` with more prompts than rows decodes its first ``slots``
prompts at once and queues the others, in prompt order. Whenever rows finish, :meth:`Admission.refill` puts the next
queued prompts into them. An entering prompt writes its own row only: no other row's state or KV entries move.

* The policy (:meth:`Admission.refill`): which queued prompts enter and which are staged, when.
* The stage (:class:`StagedPrompts`): under the continuous schedule rows finish one or two at a time, and a prompt
  prefilled alone into its row costs a forward of one row (on a CPU about twice the time per prompt of a prefill over
  eight rows, on a GPU a whole forward per prompt). So the next queued prompts are prefilled together, in one ragged
  prefill, into a cache of their own.
* Entering (:meth:`Admission.admit`): the rows that are free (:meth:`Admission.free_rows`) take the prompts
  (:meth:`RaggedBatch.admit`); their cache rows receive a staged prompt's KV entries (and, for a feature drafter, its
  final hidden states) by a copy, or a prefill over those rows only; then the drafter resets what it keeps for them
  (its ``admit_rows`` hook).

Terms: a row is *free* once it has finished and its results were copied out. The *stage* holds up to ``rows``
prompts, each in a stage row, their ``len(prompt) - 1`` committed positions written (``s_b[:-1]``: a prompt that
enters a row mid-run has a one-token tail, see the glossary's *prompt tail*).
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from batched_specdec.decode.batch import padded_prompts
from batched_specdec.forwards import prefill
from batched_specdec.ragged_cache import RaggedKVCache

if TYPE_CHECKING:
    from batched_specdec.decode.session import DecodeSession


def stage_rows(slots: int, longest_prompt: int, prefill_chunk: int) -> int:
    """Prompts staged at a time: ``slots``, fewer when prompts are long, so that the stage holds at most about
    ``slots * prefill_chunk`` positions (what one prefill forward of the batch covers); at least one."""
    return max(1, min(slots, slots * prefill_chunk // max(longest_prompt, 1)))


class Admission:
    """The prompts of a session's request that wait for a row, and how they enter it.

    A :class:`~batched_specdec.decode.session.DecodeSession` builds one for itself (its ``admission``). It owns the
    queue and the stage and changes nothing else: the session's rows, cache, drafter and timer change through their
    own methods.

    Parameters
    ----------
    session : DecodeSession
        The session whose rows the prompts enter; its first ``session.rows.size`` prompts are in rows already, the
        others are queued.
    """

    def __init__(self, session: DecodeSession) -> None:
        self.session = session
        prompts = session.request.prompts
        self.queue = deque(range(session.rows.size, len(prompts)))  # prompt order
        self.longest_queued = max((len(prompts[i]) for i in self.queue), default=1)  # what a stage may hold
        self.staging: StagedPrompts | None = None  # prompts prefilled ahead of their admission

    @property
    def waiting(self) -> int:
        """Prompts still queued."""
        return len(self.queue)

    # --- the policy ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def refill(self) -> None:
        """Put the next queued prompts (prompt order) into the rows that are free, if any (:meth:`free_rows`)."""
        free = self.free_rows()
        if len(free):
            self._admit_queued([self.queue.popleft() for _ in range(min(len(free), len(self.queue)))])

    def _admit_queued(self, prompts: list[int]) -> None:
        """Admit ``prompts`` (just taken from the front of the queue): the staged ones first, then the others, each
        group of :attr:`stage_size` staged together with (for the last group) the prompts next in the queue. A stage
        of one prompt would only add a copy, so then prompts are prefilled in their rows. The stage is released once
        the queue is empty."""
        size = self.stage_size
        if size == 1:
            self.admit(prompts)
            return
        ready = [i for i in prompts if self.is_staged(i)]
        rest = [i for i in prompts if not self.is_staged(i)]
        if ready:
            self.admit(ready)
        for start in range(0, len(rest), size):
            group = rest[start : start + size]
            ahead = list(itertools.islice(self.queue, size - len(group))) if start + size >= len(rest) else []
            self.stage(group + ahead)
            self.admit(group)
        if not self.queue:
            self.release_stage()

    # --- the stage -------------------------------------------------------------------------------------------

    @property
    def stage_size(self) -> int:
        """Prompts :meth:`stage` prefills at a time (:func:`stage_rows`)."""
        return stage_rows(self.session.rows.size, self.longest_queued, self.session.options.prefill_chunk)

    def is_staged(self, prompt: int) -> bool:
        return self.staging is not None and prompt in self.staging

    @torch.inference_mode()
    def stage(self, prompts: list[int]) -> None:
        """Prefill the request's prompts ``prompts`` (indices, at most :attr:`stage_size`) together, ahead of their
        admission, replacing the prompts staged before (admit those first)."""
        session = self.session
        if self.staging is None:
            options = session.options
            self.staging = StagedPrompts(session.target, self.stage_size, self.longest_queued, session.device,
                                         options.attention, options.prefill_chunk, session.target_hidden)
        session.timer.start()
        self.staging.fill({i: session.request.prompts[i] for i in prompts})
        session.timer.lap("prefill")

    def release_stage(self) -> None:
        """Free the stage's buffers (no prompt is left to stage); staged prompts not yet admitted are dropped."""
        self.staging = None

    # --- entering rows ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def free_rows(self) -> Tensor:
        """Host indices of the rows that can take a prompt: finished, their results copied out (finished rows are
        retired here first, on the device)."""
        rows = self.session.rows
        rows.retire(rows.retirable())
        return torch.nonzero(rows.view.finished & rows.host_retired).flatten()

    @torch.inference_mode()
    def admit(self, prompts: list[int]) -> None:
        """Put the request's prompts ``prompts`` (indices) into free rows (:meth:`free_rows`) and fill their cache
        rows: staged prompts (:meth:`stage`) by copying their entries, the others by a prefill over those rows only
        (no other row's KV moves); then reset what the drafter keeps for them."""
        session = self.session
        rows = self.free_rows()[: len(prompts)]
        if len(rows) < len(prompts):
            raise RuntimeError(f"{len(prompts)} prompts to admit but only {len(rows)} free rows")
        request = session.request
        session.timer.start()
        session.rows.drain()  # the host view must be current: these rows change hands now
        session.rows.admit(rows, [request.prompts[i] for i in prompts], [request.max_gen_lens[i] for i in prompts],
                           prompts, [session.prompt_seeds[i] for i in prompts])
        staged = [j for j, i in enumerate(prompts) if self.is_staged(i)]
        fresh = [j for j, i in enumerate(prompts) if not self.is_staged(i)]
        if staged:
            self._enter_staged([prompts[j] for j in staged], rows[staged])
        if fresh:
            self._prefill_rows([prompts[j] for j in fresh], rows[fresh])
        if session.drafter is not None:
            session.drafter.admit_rows(session.rows.token_buffer, rows.to(session.device),
                                       [len(request.prompts[i]) for i in prompts])
        session.timer.lap("prefill")

    def _enter_staged(self, prompts: list[int], rows: Tensor) -> None:
        """Copy staged ``prompts``' cache entries (and, for a feature drafter, hidden states) into ``rows``."""
        drafter = self.session.drafter
        source, widths = self.staging.take(prompts)
        self.session.cache.copy_rows_from(self.staging.cache, source, rows, widths)
        width = max(widths)
        if drafter is not None and drafter.uses_target_features and width > 0:
            hidden = self.staging.hidden[:, :width].index_select(0, source.to(self.staging.hidden.device))
            drafter.observe_features(hidden, 0, rows)

    def _prefill_rows(self, prompts: list[int], rows: Tensor) -> None:
        """Prefill ``prompts`` (just admitted into ``rows``) over those rows only."""
        session = self.session
        lengths = [len(session.request.prompts[i]) for i in prompts]
        order = sorted(range(len(prompts)), key=lambda r: -lengths[r])
        on_hidden = None
        if session.drafter is not None and session.drafter.uses_target_features:
            on_hidden = session.drafter.observe_features
        prefill(session.target, session.cache, session.rows.token_buffer, [lengths[r] - 1 for r in order],
                session.options.prefill_chunk, on_hidden=on_hidden, rows=rows[order], hidden=session.target_hidden)


class StagedPrompts:
    """Up to ``rows`` prompts prefilled into a KV cache of their own, waiting to enter a session's rows.

    Parameters
    ----------
    target : PreTrainedModel
        The session's target (the stage's cache has its layers, windows and devices).
    rows : int
        Prompts staged at a time (:func:`stage_rows`).
    capacity : int
        Positions per stage row: the longest prompt that can be staged.
    device : torch.device
        The target's input device.
    attention : str
        The session's attention backend.
    prefill_chunk : int
        Columns per prefill forward.
    keep_hidden : bool or tuple of int
        Keep the target's hidden states of every staged position (a feature drafter reads them on entry): False
        none, else the ``return_hidden`` of :func:`~batched_specdec.forwards.model_forward` (the drafter's
        ``target_hidden``).
    """

    def __init__(self, target, rows: int, capacity: int, device: torch.device, attention: str, prefill_chunk: int,
                 keep_hidden: bool | tuple[int, ...]) -> None:
        self.target, self.device, self.prefill_chunk = target, device, prefill_chunk
        self.cache = RaggedKVCache(target.config, rows, capacity, device, attention, compile=False, role="stage")
        self.keep_hidden = keep_hidden
        self.hidden: Tensor | None = None  # (rows, capacity, F) once a prefill has run, with keep_hidden
        self.row_of: dict[int, int] = {}  # staged prompt (request index) -> stage row
        self.widths: dict[int, int] = {}  # staged prompt -> positions written

    @property
    def rows(self) -> int:
        return self.cache.batch_size

    def __contains__(self, prompt: int) -> bool:
        return prompt in self.row_of

    @torch.inference_mode()
    def fill(self, prompts: dict[int, list[int]]) -> None:
        """Prefill ``prompts`` (request index -> token ids, at most :attr:`rows`, each at most the capacity) in one
        ragged prefill, replacing whatever was staged."""
        if len(prompts) > self.rows:
            raise ValueError(f"{len(prompts)} prompts to stage, but the stage holds {self.rows}")
        for i, tokens in prompts.items():
            if len(tokens) > self.cache.capacity:
                raise ValueError(f"prompt {i} has {len(tokens)} tokens; the stage holds prompts of at most "
                                 f"{self.cache.capacity}")
        order = sorted(prompts, key=lambda i: -len(prompts[i]))  # prefill wants rows longest first
        self.row_of = {i: r for r, i in enumerate(order)}
        self.widths = {i: len(prompts[i]) - 1 for i in order}
        tokens = padded_prompts([prompts[i] for i in order], self.cache.capacity, 0, rows=self.rows)
        widths = [self.widths[i] for i in order] + [0] * (self.rows - len(order))  # unused stage rows: nothing
        on_hidden = self._keep if self.keep_hidden else None
        prefill(self.target, self.cache, tokens.to(self.device), widths, self.prefill_chunk, on_hidden=on_hidden,
                hidden=self.keep_hidden)

    def _keep(self, hidden: Tensor, start: int, rows: int) -> None:
        """``prefill``'s ``on_hidden``: the chunk's hidden states ``(rows, W, H)`` at positions ``start ..``."""
        if self.hidden is None:
            shape = (self.rows, self.cache.capacity, hidden.shape[-1])
            self.hidden = torch.zeros(shape, dtype=hidden.dtype, device=hidden.device)
        self.hidden[:rows, start : start + hidden.shape[1]] = hidden

    def take(self, prompts: list[int]) -> tuple[Tensor, list[int]]:
        """Remove staged ``prompts`` from the stage: their stage rows ``(N,)`` int64 (host) and widths."""
        rows = torch.tensor([self.row_of.pop(i) for i in prompts], dtype=torch.int64)
        return rows, [self.widths.pop(i) for i in prompts]
