"""Prompts prefilled ahead of their admission, several at a time (continuous batching).

Under the continuous schedule rows finish one or two at a time, and a prompt prefilled alone into its row costs a
forward of one row: on a CPU about twice the time per prompt of a prefill over eight rows, on a GPU a whole forward
per prompt. So the next queued prompts are prefilled together, in one ragged prefill, into a cache of their own
(:class:`StagedPrompts`); an admission then copies a staged prompt's KV entries (and, for a feature drafter, its
final hidden states) into the row it enters. No other row's KV moves.

Terms: the *stage* holds up to ``rows`` prompts, each in a stage row, their ``len(prompt) - 1`` committed positions
written (``s_b[:-1]``, what a session's prefill writes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from batched_specdec.forwards import prefill
from batched_specdec.ragged_cache import RaggedKVCache


def stage_rows(slots: int, longest_prompt: int, prefill_chunk: int) -> int:
    """Prompts staged at a time: ``slots``, fewer when prompts are long, so that the stage holds at most about
    ``slots * prefill_chunk`` positions (what one prefill forward of the batch covers); at least one."""
    return max(1, min(slots, slots * prefill_chunk // max(longest_prompt, 1)))


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
        tokens = torch.zeros(self.rows, self.cache.capacity, dtype=torch.int64)
        for r, i in enumerate(order):
            tokens[r, : len(prompts[i])] = torch.tensor(prompts[i], dtype=torch.int64)
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
