"""Per-row decoding state shared by the speculative engine and the target-only baseline.

Every row keeps its committed tokens ``s_b`` (prompt + emitted) in ``token_buffer[b, :seq_lens[b]]``. Rows finish
at their own EOS or generation budget and are compacted away once enough of the batch is done. The host reads one
small tensor per step (:meth:`RaggedBatch.sync`); everything else stays on the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from batched_specdec import capture
from batched_specdec.devices import host_arrived, host_copy, peak_memory, synchronize
from batched_specdec.kernels import commit_emitted_tokens
from batched_specdec.ragged_cache import RaggedKVCache

COMPACT_FRACTION = 0.25
"""Drop finished rows from the batch once at least this fraction of it is finished."""


@dataclass
class GenerationStats:
    """What a generation call measured. Per-row lists are in prompt order.

    ``tokens_per_target_forward`` is the mean number of tokens a live row gained per target forward
    (accepted drafts + 1 for speculative decoding, 1 for the baseline). ``acceptance_histogram[j]`` counts the
    (row, step) pairs that accepted exactly ``j`` drafts. ``peak_memory_bytes`` is the peak CUDA memory
    allocated on CUDA, and the process' peak resident memory on CPU (``peak_memory_kind`` says which).
    ``time_split`` (seconds in draft, verify, sampling and bookkeeping) is measured only with
    ``collect_stats=True``, which synchronises the device between phases. ``logprobs[i]`` (with
    ``return_logprobs=True``) holds, for every token of output ``i``, the target's log-probability of it under the
    processed distribution it was sampled from. ``controller`` (with ``gamma="auto"``) says which draft lengths
    the controller chose and what it predicted and measured.
    """

    accepted: list[int]
    proposed: list[int]
    generated: list[int]
    target_forwards: int
    tokens_per_target_forward: float
    acceptance_histogram: list[int]
    wall_time_s: float
    generated_tokens: int
    tokens_per_s: float
    acceptance_rate: float
    peak_memory_bytes: int | None = None
    peak_memory_kind: str = ""
    time_split: dict[str, float] | None = None
    steps: int = 0
    compactions: int = 0
    logprobs: list[list[float]] | None = None
    controller: dict | None = None
    extra: dict = field(default_factory=dict)


def add_counts(into: list[int], counts: list[int]) -> list[int]:
    """Add histogram ``counts`` into ``into`` element-wise, growing it as needed; returns ``into``."""
    if len(counts) > len(into):
        into += [0] * (len(counts) - len(into))
    for j, n in enumerate(counts):
        into[j] += int(n)
    return into


class RaggedBatch:
    """Per-row decoding state on the target's input device; rows may be dropped (compacted) as they finish.

    Per-row generation budgets share the one scalar limit of the commit kernel: row ``b`` starts with
    ``gen_lens[b] = max(max_gen_lens) - max_gen_lens[b]``, so it reaches the limit after its own budget.

    With ``compile=True`` the commit runs compiled and the per-row buffers are static (on CUDA, marked for CUDA
    graphs). With ``delayed_host_read=True`` the host's view (:attr:`host_finished`, :attr:`host_seq_lens`) is one
    step behind the device: :meth:`sync` starts a non-blocking copy of this step's state and reads the previous
    step's, and :meth:`max_live_seq_len` adds the last commit's width, which the host has not seen yet.
    """

    def __init__(self, prompts: list[list[int]], max_gen_lens: list[int], capacity: int, pad_token_id: int,
                 device: torch.device, *, logprobs: bool = False, compile: bool = False,
                 delayed_host_read: bool = False) -> None:
        batch = len(prompts)
        self.prompt_lens_host = [len(p) for p in prompts]  # in prompt order, for the results
        # Rows are held longest prompt first (row_ids maps them back), so the rows that still have prompt left in
        # any prefill chunk are a prefix of the batch (ragged_cache.prefill).
        order = sorted(range(batch), key=lambda i: -len(prompts[i]))
        prompts = [prompts[i] for i in order]
        max_gen_lens = [max_gen_lens[i] for i in order]
        lens = [len(p) for p in prompts]
        self.prefill_widths = [n - 1 for n in lens]
        self.max_prompt_len = max(lens)
        self.max_gen_len = max(max_gen_lens)
        self.capacity = capacity
        self.compile = compile
        self.device = device
        padded = torch.full((batch, capacity), pad_token_id, dtype=torch.int64)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
        self.token_buffer = self._device_state("tokens", padded)
        self.logprob_buffer = self._device_state("logprobs", torch.zeros(batch, capacity)) if logprobs else None
        self.prompt_lens = self._device_state("prompt_lens", torch.tensor(lens, dtype=torch.int64))
        self.seq_lens = self._device_state("seq_lens", torch.tensor(lens, dtype=torch.int64))
        self.gen_lens = self._device_state("gen_lens", torch.tensor([self.max_gen_len - m for m in max_gen_lens]))
        self.finished = self._device_state("finished", torch.zeros(batch, dtype=torch.bool))
        self.row_ids = self._device_state("row_ids", torch.tensor(order, dtype=torch.int64))
        self.host_row_ids = torch.tensor(order, dtype=torch.int64)
        # Results of every original row, filled when rows are compacted away and at the end.
        self.final_tokens = torch.empty_like(self.token_buffer)
        self.final_logprobs = None if self.logprob_buffer is None else torch.empty_like(self.logprob_buffer)
        self.final_seq_lens = torch.empty_like(self.seq_lens)
        self.host_seq_lens = torch.tensor(lens)
        self.host_finished = torch.zeros(batch, dtype=torch.bool)
        self.host_generated = 0
        self.host_prompt_lens = torch.tensor(lens)
        self.dropped_generated = 0  # tokens of rows compacted away
        self.host_extra = torch.zeros(0, dtype=torch.int64)
        self.steps = self.compactions = 0
        self._live_row_steps = torch.zeros((), dtype=torch.int64, device=device)  # read once, at the end
        self._last_width = 0
        self.delayed = delayed_host_read
        # a step's state on its way to the host (delayed read): (host tensor, event, rows kept since or None)
        self._pending: tuple[Tensor, object, Tensor | None] | None = None
        self.unseen_width = 0  # tokens per row the last commit may have added that the host view does not show

    def _device_state(self, role: str, values: Tensor) -> Tensor:
        """``values`` (host) in a device buffer: pooled and static with ``compile`` (graph-stable across calls)."""
        buffer = capture.new_buffer(f"batch.{role}", values.shape, values.dtype, self.device, self.compile)
        return buffer.copy_(values)

    def _kept(self, buffer: Tensor, rows: Tensor) -> Tensor:
        """``buffer[rows]``; with ``compile``, written into the front of ``buffer`` itself (same addresses)."""
        return capture.copy_to_front(buffer, buffer[rows]) if self.compile else buffer[rows]

    @property
    def size(self) -> int:
        return self.token_buffer.shape[0]

    def sync(self, extra: list[Tensor] = ()) -> None:
        """The one host synchronisation per step: done flags, lengths, generated counts, and any ``extra``
        ``(B,)`` int64 tensors (read back into :attr:`host_extra`, one row each).

        With the delayed read, this step's state starts its way to pinned host memory (an event marks its arrival)
        and the host view becomes the previous step's, which has long arrived: the host waits for nothing."""
        state = torch.cat([self.finished.to(torch.int64), self.seq_lens, *extra])
        if not self.delayed:
            self._apply(state.cpu(), len(extra))
            return
        if extra:
            raise ValueError("the delayed host read carries no extra per-row counts (the adaptive controller needs "
                             "them at once)")
        previous, self._pending = self._pending, (*host_copy(state), None)
        # The host view now lags by exactly this step's commit (after the first step: the prompts, by the first).
        self.unseen_width = self._last_width
        if previous is not None:
            host, event, kept = previous
            host = host_arrived(host, event)
            if kept is not None:  # rows were compacted after this state was taken: drop theirs
                host = host.view(2, -1)[:, kept].reshape(-1)
            self._apply(host, 0)

    def _apply(self, host: Tensor, n_extra: int) -> None:
        b = self.size
        self.host_finished = host[:b].bool()
        self.host_seq_lens = host[b : 2 * b]
        self.host_generated = int((self.host_seq_lens - self.host_prompt_lens).sum()) + self.dropped_generated
        self.host_extra = host[2 * b :].view(n_extra, b)

    @property
    def row_steps(self) -> int:
        """(row, step) pairs in which the row was live (a read of the device: for results, not for the loop)."""
        return int(self._live_row_steps)

    @property
    def all_finished(self) -> bool:
        return bool(self.host_finished.all())

    def max_live_seq_len(self) -> int:
        """An upper bound on every live row's committed length, from the host view (plus what it has not seen)."""
        live = self.host_seq_lens[~self.host_finished]
        return (int(live.max()) if live.numel() else int(self.host_seq_lens.max())) + self.unseen_width

    def flush(self) -> None:
        self.final_tokens.index_copy_(0, self.row_ids, self.token_buffer)
        self.final_seq_lens.index_copy_(0, self.row_ids, self.seq_lens)
        if self.logprob_buffer is not None:
            self.final_logprobs.index_copy_(0, self.row_ids, self.logprob_buffer)

    def keep_rows(self, rows: Tensor, host_rows: Tensor) -> None:
        """Keep ``rows`` (on the device) of the batch; ``host_rows`` is the same index on the host."""
        self.flush()
        self.token_buffer, self.prompt_lens, self.seq_lens, self.gen_lens, self.finished, self.row_ids = (
            self._kept(t, rows) for t in (self.token_buffer, self.prompt_lens, self.seq_lens, self.gen_lens,
                                          self.finished, self.row_ids)
        )
        if self.logprob_buffer is not None:
            self.logprob_buffer = self._kept(self.logprob_buffer, rows)
        kept = torch.zeros(self.host_seq_lens.shape[0], dtype=torch.bool)
        kept[host_rows] = True
        self.dropped_generated += int((self.host_seq_lens - self.host_prompt_lens)[~kept].sum())
        self.host_finished = self.host_finished[host_rows]
        self.host_seq_lens = self.host_seq_lens[host_rows]
        self.host_prompt_lens = self.host_prompt_lens[host_rows]
        self.host_row_ids = self.host_row_ids[host_rows]
        if self._pending is not None:  # the state in flight has the old rows: keep these when it arrives
            host, event, _ = self._pending
            self._pending = (host, event, host_rows)

    def rows_to_keep(self, finished: Tensor) -> Tensor | None:
        """Ascending indices (on the host) of the rows to keep given ``finished`` (a host view), or None to keep
        the batch as it is.

        Eager: the live rows, once at least :data:`COMPACT_FRACTION` of the batch finished. With ``compile``: only
        when the live rows fit a smaller power of two (:func:`capture.batch_bucket`), and then exactly that many
        rows, the live ones and the first finished ones, which stay frozen, so compiled graphs see few batch sizes.
        """
        done = int(finished.sum())
        if done == 0 or done == self.size:
            return None
        if not self.compile:
            return None if done < COMPACT_FRACTION * self.size else torch.arange(self.size)[~finished]
        bucket = capture.batch_bucket(self.size - done)
        if bucket >= self.size:
            return None
        fillers = torch.arange(self.size)[finished][: bucket - (self.size - done)]
        keep = torch.zeros(self.size, dtype=torch.bool)
        keep[~finished] = True
        keep[fillers] = True
        return torch.arange(self.size)[keep]

    def commit(self, out_tokens: Tensor, num_accepted: Tensor, cache: RaggedKVCache, eos: Tensor,
               logprobs: Tensor | None = None) -> Tensor:
        """Append each live row's emitted tokens (and their ``(B, W)`` log-probabilities), detect EOS / budget,
        and prune the target cache to ``seq_lens - 1`` (lengths only: no KV bytes move). Returns the ``(B,)``
        tokens committed per row."""
        start = self.seq_lens.clone() if logprobs is not None else None
        self._live_row_steps += (~self.finished).sum()
        args = (out_tokens, num_accepted, self.token_buffer, self.seq_lens, self.gen_lens, self.finished, cache.lens,
                eos, self.max_gen_len)
        if self.compile:
            committed = capture.run_compiled(_commit, out_tokens.device, *args)
        else:
            committed = _commit(*args)
        self._last_width = out_tokens.shape[1]
        cache.set_lens(cache.lens)
        if logprobs is not None and self.logprob_buffer is not None:
            # Slots past a row's committed count land past its length (stale, never read); capacity has room.
            cols = start[:, None] + torch.arange(logprobs.shape[1], device=start.device)[None, :]
            self.logprob_buffer.scatter_(1, cols, logprobs.float())
        return committed

    def end_step(self, bar, *row_holders, extra: list[Tensor] = ()) -> bool:
        """Count the step, do the step's one host sync, update the progress bar, and compact finished rows away
        from this batch and every ``row_holders`` (caches, drafter) when enough have finished. True when done."""
        self.steps += 1
        finished_before = self.host_finished
        self.sync(extra)
        if bar is not None:
            bar.update(self.host_generated - bar.n)
        if self.all_finished:
            if bar is not None:
                bar.close()
            return True
        # Compaction follows the state after the previous step in both modes (what the delayed read has now), so
        # the batch's row layout, and with it every seeded random draw, is the same with and without the delay.
        host_keep = self.rows_to_keep(self.host_finished if self.delayed else finished_before)
        if host_keep is not None:
            # built on the host from the step's one sync, copied to the device: no device-to-host read here
            keep = host_keep.to(self.token_buffer.device)
            self.keep_rows(keep, host_keep)
            for holder in row_holders:
                holder.keep_rows(keep)
            self.compactions += 1
        return False

    def stats(self, t0: float, device: torch.device, accepted: list[int], proposed: list[int],
              histogram: list[int], time_split: dict[str, float] | None) -> tuple[list[list[int]], GenerationStats]:
        outputs = self.outputs()
        wall = time.perf_counter() - t0
        generated = [len(o) for o in outputs]
        total = sum(generated)
        peak, peak_kind = peak_memory(device)
        return outputs, GenerationStats(
            accepted=accepted,
            proposed=proposed,
            generated=generated,
            target_forwards=self.steps,
            tokens_per_target_forward=total / max(self.row_steps, 1),
            acceptance_histogram=histogram,
            wall_time_s=wall,
            generated_tokens=total,
            tokens_per_s=total / wall if wall > 0 else 0.0,
            acceptance_rate=sum(accepted) / max(sum(proposed), 1),
            peak_memory_bytes=peak,
            peak_memory_kind=peak_kind,
            time_split=time_split,
            steps=self.steps,
            compactions=self.compactions,
            logprobs=self.output_logprobs(),
        )

    def outputs(self) -> list[list[int]]:
        self.flush()
        tokens = self.final_tokens.cpu()
        seq = self.final_seq_lens.cpu().tolist()
        starts = self.prompt_lens_host
        return [tokens[i, starts[i] : seq[i]].tolist() for i in range(tokens.shape[0])]

    def output_logprobs(self) -> list[list[float]] | None:
        if self.final_logprobs is None:
            return None
        values = self.final_logprobs.cpu()
        seq = self.final_seq_lens.cpu().tolist()
        starts = self.prompt_lens_host
        return [values[i, starts[i] : seq[i]].tolist() for i in range(values.shape[0])]


class PhaseTimer:
    """Seconds per phase of a step, measured only when enabled (it synchronises the device between phases)."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device = device
        self.split = {"draft": 0.0, "verify": 0.0, "sampling": 0.0, "bookkeeping": 0.0}
        self._t = 0.0

    def start(self) -> None:
        if self.enabled:
            synchronize(self.device)
            self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.enabled:
            synchronize(self.device)
            now = time.perf_counter()
            self.split[phase] += now - self._t
            self._t = now


def progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", leave=False)


def _commit(out_tokens, num_accepted, token_buffer, seq_lens, gen_lens, finished, cache_lens, eos, max_gen_len):
    """The step's commit (compiled with ``compile=True``); the buffers are the batch's own, so no checks."""
    return commit_emitted_tokens(out_tokens, num_accepted, token_buffer, seq_lens, gen_lens, finished, cache_lens, eos,
                                 max_gen_len, validate=False)

