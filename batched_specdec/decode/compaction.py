"""Compaction: finished rows leave the batch, so that later steps do not run them.

After a step's sync the session drops finished rows from its rows, its target cache and its drafter, in that order,
when the rule says so (:func:`rows_to_keep`). Rows that leave are retired first (their results copied out on the
device), and the host's view and the controller's evidence follow the rows that stay. A batch that refills its
finished rows from a queue (continuous batching) is not compacted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from batched_specdec import capture

if TYPE_CHECKING:
    from batched_specdec.decode.batch import HostView, RaggedBatch
    from batched_specdec.drafting.base import Drafter
    from batched_specdec.ragged_cache import RaggedKVCache

COMPACT_FRACTION = 0.25
"""An eager batch drops its finished rows once at least this fraction of it has finished (:func:`rows_to_keep`);
the session passes it to the controller, whose prediction of a batch's last stretch follows the same rule
(:func:`batched_specdec.controller.compacted_batch_sizes`)."""


def rows_to_keep(finished: Tensor, stable: bool) -> Tensor | None:
    """Ascending indices (on the host) of the rows to keep given ``finished``, or None to keep the batch as it is.

    Eager: the live rows, once at least :data:`COMPACT_FRACTION` of the batch finished. Graph-stable (``stable``,
    the batch's ``compile``): only when the live rows fit a smaller power of two (:func:`capture.batch_bucket`),
    and then exactly that many rows, the live ones and the first finished ones, which stay frozen, so compiled or
    recorded graphs see few batch sizes.

    Parameters
    ----------
    finished : Tensor
        ``(B,)`` bool on the host: the rows' finished flags, as a host view shows them.
    stable : bool
        The batch keeps graph-stable buffers (:attr:`RaggedBatch.stable`).
    """
    size = finished.shape[0]
    done = int(finished.sum())
    if done == 0 or done == size:
        return None
    if not stable:
        return None if done < COMPACT_FRACTION * size else torch.arange(size)[~finished]
    bucket = capture.batch_bucket(size - done)
    if bucket >= size:
        return None
    fillers = torch.arange(size)[finished][: bucket - (size - done)]
    keep = torch.zeros(size, dtype=torch.bool)
    keep[~finished] = True
    keep[fillers] = True
    return torch.arange(size)[keep]


def finished_to_follow(view: HostView, finished_before: Tensor, delayed_host_read: bool) -> Tensor:
    """The finished flags (host ``(B,)``) that compaction follows after a step's sync: the state after the previous
    step in both read modes, the delayed read's ``view`` or the immediate read's ``finished_before`` (the view
    before the sync), so that the batch's row layout is the same with and without the delay."""
    return view.finished if delayed_host_read else finished_before


def compact(rows: RaggedBatch, cache: RaggedKVCache, drafter: Drafter | None, finished: Tensor) -> bool:
    """Drop finished rows (host ``(B,)`` flags ``finished``) from ``rows``, ``cache`` and ``drafter``, in that order,
    when :func:`rows_to_keep` says so. Each keeps its own rows (``keep_rows``). Returns whether the batch was
    compacted."""
    host_keep = rows_to_keep(finished, rows.stable)
    if host_keep is None:
        return False
    keep = host_keep.to(rows.device)  # built on the host from the step's sync: no device-to-host read here
    rows.keep_rows(keep, host_keep)
    cache.keep_rows(keep)
    if drafter is not None:
        drafter.keep_rows(keep)
    return True
