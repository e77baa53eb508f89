"""Per-row decoding state: committed tokens, lengths, budgets and finished flags, and the host's view of them.

Every row keeps its committed tokens ``s_b`` (prompt + emitted) in ``token_buffer[b, :seq_lens[b]]``. A row holds
one prompt from its admission until it is retired: its results are copied out on the device (no host read) when it
leaves the batch (compaction), when its slot takes the next prompt (continuous batching), or at the end. The host
reads one small tensor per step (:meth:`RaggedBatch.sync`, which returns a :class:`HostView`); everything else stays
on the device. Each step's emitted tokens are committed by the batch itself (:meth:`RaggedBatch.commit`), which
returns the lengths the session's target cache adopts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from batched_specdec import capture
from batched_specdec.devices import HostRing
from batched_specdec.kernels import commit_emitted_tokens


def padded_prompts(prompts: list[list[int]], width: int, pad_token_id: int, rows: int | None = None) -> Tensor:
    """``(rows, width)`` int64 on the host: prompt ``i`` in row ``i``, left-aligned, ``pad_token_id`` after it and in
    rows past the prompts (``rows`` default: one per prompt)."""
    padded = torch.full((len(prompts) if rows is None else rows, width), pad_token_id, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
    return padded


def commit_step(out_tokens, num_accepted, token_buffer, seq_lens, num_generated, finished, eos_token_ids, budgets):
    """The fused commit of :meth:`RaggedBatch.commit` (compiled with ``compile=True``) on the batch's own buffers,
    so no checks. Returns the tokens appended per row and the target cache's lengths after pruning (a new tensor)."""
    cache_lens = torch.empty_like(seq_lens)
    num_committed = commit_emitted_tokens(out_tokens, num_accepted, token_buffer, seq_lens, num_generated, finished,
                                          cache_lens, eos_token_ids, budgets, validate=False)
    return num_committed, cache_lens


class Commit(NamedTuple):
    """What one :meth:`RaggedBatch.commit` did, per row (``(B,)`` tensors on the device)."""

    num_committed: Tensor
    """int64: tokens appended (0 for rows that had finished before)."""
    was_live: Tensor
    """bool: the rows that had not finished before (the rows this step counts as live)."""
    cache_lens: Tensor
    """int64: the target cache's lengths after pruning the rejected drafts, ``seq_lens - 1``."""


@dataclass
class HostView:
    """What the host knows after a step's sync (all host tensors, one entry per row of the batch).

    ``finished`` and ``seq_lens`` are the rows' flags and committed lengths; ``generated`` counts every token
    generated so far (rows that left included); ``extra`` holds the per-row counts the session asked to read with
    them, ``(n_extra, B)`` int64 (the controller's proposed and accepted counts)."""

    finished: Tensor
    seq_lens: Tensor
    generated: int
    extra: Tensor

    @property
    def all_finished(self) -> bool:
        return bool(self.finished.all())


class RaggedBatch:
    """Per-row decoding state on the target's input device.

    Rows are first filled longest prompt first (``prompts`` given to the constructor), so that the rows with prompt
    left in any prefill chunk are a prefix of the batch; :meth:`admit` puts later prompts into any retired rows.
    :attr:`row_ids` is each row's prompt index within the session (its results and statistics are kept under it),
    :attr:`row_seeds` its Philox key. Each row counts the tokens it generated (:attr:`num_generated`) against its
    own budget (:attr:`budgets`) and finishes at it or at an EOS.

    With ``compile=True`` (the session's ``compile`` or ``cuda_graphs``) the per-row buffers are static and pooled
    (graph-stable across calls) and compaction keeps rows in the front of the same buffers. With
    ``delayed_host_read=True`` the host's view is one step behind the device: :meth:`sync` starts a non-blocking copy
    of this step's state into a small ring of pinned buffers (:class:`~batched_specdec.devices.HostRing`: no
    allocation per step) and reads the previous step's, and :meth:`max_live_seq_len` adds the last commit's width,
    which the host has not seen yet.
    """

    def __init__(self, prompts: list[list[int]], max_gen_lens: list[int], seeds: list[int], capacity: int,
                 pad_token_id: int, device: torch.device, *, logprobs: bool = False, compile: bool = False,
                 delayed_host_read: bool = False) -> None:
        batch = len(prompts)
        order = sorted(range(batch), key=lambda i: -len(prompts[i]))
        lens = [len(prompts[i]) for i in order]
        self.max_prompt_len = max(lens)
        # compile: graph-stable buffers (the session passes compile or cuda_graphs)
        self.capacity, self.stable, self.device, self.pad_token_id = capacity, compile, device, pad_token_id
        padded = padded_prompts([prompts[i] for i in order], capacity, pad_token_id)
        self.token_buffer = self._device_state("tokens", padded)
        self.logprob_buffer = self._device_state("logprobs", torch.zeros(batch, capacity)) if logprobs else None
        self.seq_lens = self._device_state("seq_lens", torch.tensor(lens, dtype=torch.int64))
        self.num_generated = self._device_state("num_generated", torch.zeros(batch, dtype=torch.int64))
        self.budgets = self._device_state("budgets", torch.tensor([max_gen_lens[i] for i in order], dtype=torch.int64))
        self.finished = self._device_state("finished", torch.zeros(batch, dtype=torch.bool))
        self.row_ids = self._device_state("row_ids", torch.tensor(order, dtype=torch.int64))
        self.row_seeds = self._device_state("row_seeds", torch.tensor([seeds[i] for i in order], dtype=torch.int64))
        self.host_row_ids = torch.tensor(order, dtype=torch.int64)
        self.host_prompt_lens = torch.tensor(lens)
        self.host_retired = torch.zeros(batch, dtype=torch.bool)  # rows whose results were copied out
        self.prompt_lens: dict[int, int] = {i: len(p) for i, p in enumerate(prompts)}  # per prompt index
        self.view = HostView(torch.zeros(batch, dtype=torch.bool), torch.tensor(lens), 0,
                             torch.zeros(0, batch, dtype=torch.int64))
        self.left_generated = 0  # tokens of rows that left the batch or their slot
        self.retired: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []  # (ids host, tokens, lens, logprobs)
        self.collected: dict[int, tuple[list[int], list[float] | None]] = {}  # read to the host, by prompt index
        self.live_row_steps = torch.zeros((), dtype=torch.int64, device=device)  # read once, at the end
        self.last_width = 0  # tokens per row the last commit may have added
        self.delayed = delayed_host_read
        # a step's state on its way to the host (delayed read): (ring ticket, rows kept since or None)
        self._pending: tuple[int, Tensor | None] | None = None
        self._ring = HostRing(device) if delayed_host_read else None
        self.unseen_width = 0  # tokens per row the last commit may have added that the host view does not show

    def _device_state(self, role: str, values: Tensor) -> Tensor:
        """``values`` (host) in a device buffer: pooled and static with ``compile`` (graph-stable across calls)."""
        buffer = capture.new_buffer(f"batch.{role}", values.shape, values.dtype, self.device, self.stable)
        return buffer.copy_(values)

    def _kept(self, buffer: Tensor, rows: Tensor) -> Tensor:
        """``buffer[rows]``; with ``compile``, written into the front of ``buffer`` itself (same addresses)."""
        return capture.copy_to_front(buffer, buffer[rows]) if self.stable else buffer[rows]

    @property
    def size(self) -> int:
        return self.token_buffer.shape[0]

    def last_tokens(self) -> Tensor:
        """``(B, 1)``: every row's last committed token."""
        return self.token_buffer.gather(1, (self.seq_lens - 1)[:, None])

    # --- the step's commit ----------------------------------------------------------------------------------

    def commit(self, *, out_tokens: Tensor, num_accepted: Tensor, eos_token_ids: Tensor,
               logprobs: Tensor | None = None, compiled: bool = False) -> Commit:
        """Append each live row's emitted tokens and count the step, on the device (no host read).

        Row ``b``'s emitted tokens ``out_tokens[b, :num_accepted[b] + 1]`` are cut after the first EOS among them
        (EOS kept) and at the row's budget, then appended to its committed tokens; the row finishes at that EOS or
        budget. One fused kernel (:func:`~batched_specdec.kernels.commit_emitted_tokens`) writes the tokens, lengths,
        generated counts and flags in place (the same buffers every step) and the target cache's new lengths. The
        live rows' step is added to :attr:`live_row_steps`, and ``W``, the most a row grew, is kept as
        :attr:`last_width`.

        Parameters
        ----------
        out_tokens : Tensor
            ``(B, W)`` int64 emitted tokens, padded with -1.
        num_accepted : Tensor
            ``(B,)`` int64 accepted drafts per row.
        eos_token_ids : Tensor
            ``(E,)`` int64, E >= 1 (``[-1]`` for none).
        logprobs : Tensor or None
            ``(B, W)`` log-probabilities of ``out_tokens``, stored with the tokens (the batch keeps them).
        compiled : bool
            Run the kernel compiled (:func:`batched_specdec.capture.run_compiled` of :func:`commit_step`).

        Returns
        -------
        Commit
            Tokens appended per row, the rows that were live, and the lengths the target cache takes now.
        """
        start = self.seq_lens.clone() if logprobs is not None else None
        was_live = ~self.finished
        self.live_row_steps += was_live.sum()
        args = (out_tokens, num_accepted, self.token_buffer, self.seq_lens, self.num_generated, self.finished,
                eos_token_ids, self.budgets)
        num_committed, cache_lens = capture.run_compiled(commit_step, self.device, *args) if compiled else \
            commit_step(*args)
        self.last_width = out_tokens.shape[1]
        if start is not None:
            self._record_logprobs(start, logprobs)
        return Commit(num_committed, was_live, cache_lens)

    def _record_logprobs(self, start: Tensor, logprobs: Tensor) -> None:
        """Store ``(B, W)`` log-probabilities of the tokens committed from positions ``start`` ``(B,)`` on. Slots
        past a row's committed count land past its length (stale, never read); the capacity has room."""
        cols = start[:, None] + torch.arange(logprobs.shape[1], device=start.device)[None, :]
        self.logprob_buffer.scatter_(1, cols, logprobs.float())

    # --- the host's view ------------------------------------------------------------------------------------

    def sync(self, extra: list[Tensor] = ()) -> HostView:
        """The one host synchronisation per step: done flags, lengths, and any ``extra`` ``(B,)`` int64 tensors.

        With the delayed read, this step's state starts its way to pinned host memory (an event marks its arrival)
        and the view becomes the previous step's, which has long arrived: the host waits for nothing."""
        state = torch.cat([self.finished.to(torch.int64), self.seq_lens, *extra])
        if not self.delayed:
            self._apply(state.cpu(), len(extra))
            return self.view
        if extra:
            raise ValueError("the delayed host read carries no extra per-row counts (the adaptive controller needs "
                             "them at once)")
        previous, self._pending = self._pending, (self._ring.start(state), None)
        # The host view now lags by exactly this step's commit (after the first step: the prompts, by the first).
        self.unseen_width = self.last_width
        if previous is not None:
            self._apply_arrived(previous)
        return self.view

    def _apply_arrived(self, pending) -> None:
        ticket, kept = pending
        host = self._ring.read(ticket).clone()  # the view outlives the ring's slot, and admission writes into it
        if kept is not None:  # rows were compacted after this state was taken: drop theirs
            host = host.view(2, -1)[:, kept].reshape(-1)
        self._apply(host, 0)

    def drain(self) -> None:
        """Make the host view current (delayed read: wait for the state in flight), before rows change hands."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._apply_arrived(pending)
            self.unseen_width = 0

    def _apply(self, host: Tensor, n_extra: int) -> None:
        b = self.size
        seq_lens = host[b : 2 * b]
        generated = int((seq_lens - self.host_prompt_lens).sum()) + self.left_generated
        self.view = HostView(host[:b].bool(), seq_lens, generated, host[2 * b :].view(n_extra, b))

    @property
    def row_steps(self) -> int:
        """(row, step) pairs in which the row was live (a read of the device: for results, not for the loop)."""
        return int(self.live_row_steps)

    def max_live_seq_len(self) -> int:
        """An upper bound on every live row's committed length, from the host view (plus what it has not seen)."""
        live = self.view.seq_lens[~self.view.finished]
        return (int(live.max()) if live.numel() else int(self.view.seq_lens.max())) + self.unseen_width

    def retirable(self) -> Tensor:
        """Host indices of the rows that finished (host view) and whose results are still in them."""
        return torch.nonzero(self.view.finished & ~self.host_retired).flatten()

    # --- rows entering and leaving -------------------------------------------------------------------------

    def retire(self, rows: Tensor) -> None:
        """Copy the results of ``rows`` (host indices, finished) out of the batch, on the device: no host read."""
        rows = rows[~self.host_retired[rows]]
        if rows.numel() == 0:
            return
        idx = rows.to(self.device)
        logprobs = None if self.logprob_buffer is None else self.logprob_buffer.index_select(0, idx)
        self.retired.append((self.host_row_ids[rows].clone(), self.token_buffer.index_select(0, idx),
                             self.seq_lens.index_select(0, idx), logprobs))
        self.host_retired[rows] = True

    def admit(self, rows: Tensor, prompts: list[list[int]], max_gen_lens: list[int], ids: list[int],
              seeds: list[int]) -> None:
        """Put ``prompts`` (prompt indices ``ids``, Philox keys ``seeds``) into the retired ``rows`` (host
        indices); their KV cache rows are the session's to fill. The host view shows them live at once."""
        if not bool(self.host_retired[rows].all()):
            raise RuntimeError(f"rows {rows.tolist()} still hold results: retire them before admitting prompts")
        self.left_generated += int((self.view.seq_lens[rows] - self.host_prompt_lens[rows]).sum())
        lens = torch.tensor([len(p) for p in prompts])
        padded = padded_prompts(prompts, self.capacity, self.pad_token_id)
        idx = rows.to(self.device)
        self.token_buffer.index_copy_(0, idx, padded.to(self.device))
        self.seq_lens.index_copy_(0, idx, lens.to(self.device))
        budgets = torch.tensor(max_gen_lens, dtype=torch.int64)
        self.num_generated.index_fill_(0, idx, 0)
        self.budgets.index_copy_(0, idx, budgets.to(self.device))
        self.finished.index_fill_(0, idx, False)
        self.row_ids.index_copy_(0, idx, torch.tensor(ids, dtype=torch.int64, device=self.device))
        self.row_seeds.index_copy_(0, idx, torch.tensor(seeds, dtype=torch.int64, device=self.device))
        self.host_row_ids[rows] = torch.tensor(ids, dtype=torch.int64)
        self.host_prompt_lens[rows] = lens
        self.host_retired[rows] = False
        self.view.finished[rows] = False
        self.view.seq_lens[rows] = lens
        self.prompt_lens.update({i: len(p) for i, p in zip(ids, prompts)})

    def keep_rows(self, rows: Tensor, host_rows: Tensor) -> None:
        """Keep ``rows`` (on the device) of the batch; ``host_rows`` is the same index on the host. Rows that
        leave are retired first (compaction: :func:`~batched_specdec.decode.compaction.compact`)."""
        kept = torch.zeros(self.size, dtype=torch.bool)
        kept[host_rows] = True
        self.retire(torch.nonzero(~kept).flatten())
        (self.token_buffer, self.seq_lens, self.num_generated, self.budgets, self.finished, self.row_ids,
         self.row_seeds) = (self._kept(t, rows) for t in (self.token_buffer, self.seq_lens, self.num_generated,
                                                          self.budgets, self.finished, self.row_ids, self.row_seeds))
        if self.logprob_buffer is not None:
            self.logprob_buffer = self._kept(self.logprob_buffer, rows)
        view = self.view
        self.left_generated += int((view.seq_lens - self.host_prompt_lens)[~kept].sum())
        self.view = HostView(view.finished[host_rows], view.seq_lens[host_rows], view.generated,
                             view.extra[:, host_rows])
        self.host_prompt_lens = self.host_prompt_lens[host_rows]
        self.host_row_ids = self.host_row_ids[host_rows]
        self.host_retired = self.host_retired[host_rows]
        if self._pending is not None:  # the state in flight has the old rows: keep these when it arrives
            self._pending = (self._pending[0], host_rows)

    # --- results -------------------------------------------------------------------------------------------

    def results(self) -> tuple[dict[int, list[int]], dict[int, list[float]] | None]:
        """Every prompt's continuation (and log-probabilities), by prompt index: the rows still in the batch are
        retired first."""
        self.retire(torch.nonzero(~self.host_retired).flatten())
        self.collect()
        outputs = {i: tokens for i, (tokens, _) in self.collected.items()}
        logprobs = None if self.logprob_buffer is None else {i: lps for i, (_, lps) in self.collected.items()}
        return outputs, logprobs

    def collect(self) -> dict[int, tuple[list[int], list[float] | None]]:
        """The results retired since the last call, by prompt index: ``(tokens, logprobs or None)``. One host read
        of what was copied out (none when nothing was)."""
        new: dict[int, tuple[list[int], list[float] | None]] = {}
        for ids, tokens, lens, lps in self.retired:
            tokens, lens = tokens.cpu(), lens.cpu().tolist()
            values = None if lps is None else lps.cpu()
            for r, i in enumerate(ids.tolist()):
                start = self.prompt_lens[i]
                new[i] = (tokens[r, start : lens[r]].tolist(), None if values is None else
                          values[r, start : lens[r]].tolist())
        self.retired.clear()
        self.collected.update(new)
        return new
