"""Ragged attention: every row attends to the keys it owns, from per-row positions, with no dense mask from the
model and no copy of the KV cache per query group.

The function :func:`ragged_attention_forward` is registered with transformers' public ``AttentionInterface`` under
:data:`RAGGED_ATTENTION`. :func:`batched_specdec.forwards.model_forward` selects it for the duration of one
forward (the model's decoder config names it, then the previous value is restored) and hands it a
:class:`RaggedAttentionInputs` through the model's keyword arguments, which transformers passes through to every
attention call. With that implementation selected transformers builds no mask at all.

Backends (``attention=`` on the engines, ``--attention`` in the CLI):

* ``"sdpa"``: ``scaled_dot_product_attention`` over the cache's keys and values read in place, never repeated per
  query group: each KV head's query group is folded into the query axis (``(B, H_q, Q, D) -> (B, H_kv, n_rep * Q,
  D)``), or, for long prefill chunks on CPU, the CPU flash kernel reads the groups itself (``enable_gqa``). The
  additive mask is built once per forward from the positions (once more for sliding layers), not per layer.
  Soft-capped models (Gemma-2) take the folded layout through an explicit matmul-softmax-matmul, since SDPA cannot
  soft-cap. It computes every column up to the step's span.
* ``"flex"``: compiled ``flex_attention`` with ``enable_gqa=True`` and a ``BlockMask`` built directly from the
  positions (``BlockMask.from_kv_blocks``): key blocks past a row's length, or before its sliding window, are
  skipped; soft-capping is a ``score_mod``. On CPU it is compiled for static shapes (torch 2.13's inductor fails on
  dynamic-shape flex attention there), so every new (rows, width, span) shape costs a compile of seconds.
* ``"dense"``: the previous path, kept as the reference: the model's own attention implementation with a dense
  additive ``(B, 1, Q, span)`` float mask (transformers repeats K/V per query group when it has a mask).
* ``"auto"`` (default): ``"sdpa"`` on every device. Measured on this project's 2-core CPU
  (``benchmarks/bench_attention.py``), it is several times faster than ``"dense"`` for GQA models and needs no
  compile; ``"flex"`` is faster per call once compiled but recompiles for every shape. On CUDA ``"flex"`` is the
  candidate that skips blocks; it has not been measured on a GPU yet, so it is not the default there
  (``benchmarks/check_exactness.py`` checks every path on the device against float64).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface

from batched_specdec.checks import ATTENTION_BACKENDS, OptionError

RAGGED_ATTENTION = "batched_specdec_ragged"
"""The name under which :func:`ragged_attention_forward` is registered with ``AttentionInterface``."""

FOLD_MAX_QUERIES = 64
"""On CPU, the sdpa backend folds query groups when ``n_rep * Q`` is at most this (see :func:`_sdpa`)."""

FLEX_RECOMPILE_LIMIT = 256
"""Compiled shapes the flex backend may hold (torch's default of 8 would soon drop it to eager flex on CPU)."""

FLEX_BLOCK = 128
"""Query and key block size of the flex backend's block masks (flex_attention's default)."""


def resolve_attention(attention: str, device: torch.device) -> str:
    """The backend ``attention`` means on ``device``: ``"sdpa"``, ``"flex"`` or ``"dense"``.

    Raises
    ------
    OptionError
        ``attention`` is not one of :data:`ATTENTION_BACKENDS`.
    """
    if attention not in ATTENTION_BACKENDS:
        raise OptionError(f"unknown attention backend {attention!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
    return "sdpa" if attention == "auto" else attention


@dataclass
class RaggedAttentionInputs:
    """What every attention call of one forward needs: where each query sits, and each layer's window.

    Attributes
    ----------
    positions : Tensor
        ``(B, Q)`` int64: query ``j`` of row ``b`` sits at ``positions[b, j]`` and sees keys ``<= positions[b, j]``
        (and ``> positions[b, j] - window`` on a sliding layer).
    span : int
        Key columns the cache returns (the keys' second-to-last dimension).
    windows : list of int or None
        Per layer, the sliding window or None for full attention (:func:`batched_specdec.ragged_cache`'s reading
        of the config).
    backend : str
        ``"sdpa"`` or ``"flex"``.
    """

    positions: Tensor
    span: int
    windows: list[int | None]
    backend: str
    _masks: dict = field(default_factory=dict)

    def additive_mask(self, window: int | None, n_rep: int, dtype: torch.dtype) -> Tensor:
        """``(B, 1, n_rep * Q, span)`` additive mask (0 where visible, the dtype's minimum elsewhere): query
        ``r * Q + j`` (member ``r`` of a folded query group) of row ``b`` may see key ``k`` iff it is 0. Built once
        per (window, n_rep, dtype) and forward, not per layer."""
        key = ("sdpa", window, n_rep, dtype)
        mask = self._masks.get(key)
        if mask is None:
            keys = torch.arange(self.span, device=self.positions.device)[None, None, :]
            pos = self.positions[:, :, None]
            visible = keys <= pos
            if window is not None:
                visible &= keys > pos - window
            mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
            mask.masked_fill_(~visible, torch.finfo(dtype).min)
            mask = mask[:, None]
            if n_rep > 1:
                mask = mask.repeat(1, 1, n_rep, 1)
            self._masks[key] = mask
        return mask

    def block_mask(self, window: int | None):
        """The flex ``BlockMask`` of this forward for ``window``, from the positions alone (no dense mask)."""
        key = ("flex", window)
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = _block_mask_from_positions(self.positions, self.span, window)
        return mask


def _block_mask_from_positions(positions: Tensor, span: int, window: int | None):
    """A flex ``BlockMask`` where query ``j`` of row ``b`` sees keys in ``(positions[b, j] - window,
    positions[b, j]]``. A key block is listed if any query of the query block sees any of its keys, and listed as
    full (no mask_mod evaluated) if every query of the block sees every key of it."""
    from torch.nn.attention.flex_attention import BlockMask

    b, q = positions.shape
    nq, nk = -(-q // FLEX_BLOCK), -(-span // FLEX_BLOCK)
    # Pad the queries to whole blocks by repeating the last one, so mask_mod never indexes past the end.
    padded = torch.cat([positions, positions[:, -1:].expand(b, nq * FLEX_BLOCK - q)], dim=1)
    blocks = padded.view(b, nq, FLEX_BLOCK)
    first, last = blocks.amin(-1)[..., None], blocks.amax(-1)[..., None]  # (B, nq, 1)
    start = torch.arange(nk, device=positions.device)[None, None, :] * FLEX_BLOCK
    end = start + FLEX_BLOCK - 1
    touched = start <= last
    full = end <= first
    if window is not None:
        touched &= end > first - window
        full &= start > last - window
    partial = touched & ~full

    def listed(selected: Tensor) -> tuple[Tensor, Tensor]:
        count = selected.sum(-1, dtype=torch.int32)[:, None]  # (B, 1, nq)
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
        return count, order

    def mask_mod(b_idx, h_idx, q_idx, kv_idx):
        pos = padded[b_idx, q_idx]
        seen = kv_idx <= pos
        return seen if window is None else seen & (kv_idx > pos - window)

    partial_count, partial_idx = listed(partial)
    full_count, full_idx = listed(full)
    return BlockMask.from_kv_blocks(partial_count, partial_idx, full_count, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(q, span))


def _sdpa(query: Tensor, key: Tensor, value: Tensor, inputs: RaggedAttentionInputs, window: int | None,
          scaling: float, softcap: float | None) -> Tensor:
    """SDPA over the cache's K/V, read in place. ``query`` ``(B, H_q, Q, D)``, ``key``/``value``
    ``(B, H_kv, S, D)``; returns ``(B, Q, H_q, D)``, contiguous.

    Each KV head's query group is folded into the query axis (``(B, H_kv, n_rep * Q, D)``): CUDA's masked SDPA
    kernels take no grouped heads (its math fallback repeats K/V), and on CPU it is the faster layout for the few
    queries of decode, draft and verify forwards (more rows per matmul). The folded mask is ``n_rep`` times larger,
    so on CPU a forward with many queries (prefill chunks) keeps the heads and lets the CPU flash kernel read the
    groups in place (``enable_gqa``). Soft-capping (SDPA has none) is an explicit matmul-softmax-matmul, folded.
    """
    b, h_q, q, d = query.shape
    h_kv = key.shape[1]
    n_rep = h_q // h_kv
    fold = n_rep > 1 and (softcap is not None or query.device.type != "cpu" or n_rep * q <= FOLD_MAX_QUERIES)
    if fold:
        query = query.reshape(b, h_kv, n_rep * q, d)
    mask = inputs.additive_mask(window, n_rep if fold else 1, query.dtype)
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                             enable_gqa=n_rep > 1 and not fold)
    else:
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        scores = torch.tanh(scores / softcap) * softcap + mask
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), value)
    # Layout-agnostic: CUDA's memory-efficient kernel returns its output in a (B, M, H, K) memory layout, where
    # merging the KV-head axis with the folded query axis is no view. Splitting an axis always is, and the one
    # copy goes straight to the layout transformers wants.
    d_v = out.shape[-1]
    return out.view(b, h_kv, n_rep, q, d_v).permute(0, 3, 1, 2, 4).reshape(b, q, h_q, d_v)


_compiled_flex = {}


@functools.cache
def _softcap_score_mod(softcap: float):
    """flex's ``score_mod`` for ``softcap * tanh(score / softcap)``; one function per value, so compiled graphs are
    reused across forwards."""

    def score_mod(score, b_idx, h_idx, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return score_mod


def _flex(query: Tensor, key: Tensor, value: Tensor, block_mask, scaling: float, softcap: float | None) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = None if softcap is None else _softcap_score_mod(softcap)
    if torch.compiler.is_compiling():  # inside a compiled forward (compile=True, CUDA): traced with the rest of it
        return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                              enable_gqa=key.shape[1] != query.shape[1])
    device = query.device.type
    fn = _compiled_flex.get(device)
    if fn is None:
        # One compiled graph per shape on CPU: without a higher limit, torch would fall back to eager flex attention
        # (dense and slow) after 8 shapes, which a run with a few batch sizes, widths and span buckets reaches
        # quickly. Set once, process-wide (a higher limit stays).
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, FLEX_RECOMPILE_LIMIT)
        # Static shapes on CPU: torch 2.13's inductor cannot compile dynamic-shape flex attention for the CPU.
        fn = _compiled_flex[device] = torch.compile(flex_attention, dynamic=False if device == "cpu" else None)
    return fn(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
              enable_gqa=key.shape[1] != query.shape[1])


def ragged_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    ragged_attention: RaggedAttentionInputs | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The ``AttentionInterface`` function: ``query`` ``(B, H_q, Q, D)``, ``key``/``value`` ``(B, H_kv, span, D)``
    from the ragged cache; returns ``((B, Q, H_q, D), None)``. The layer's window comes from the cache's reading of
    the config (``ragged_attention.windows[module.layer_idx]``), the same one the dense reference masks with."""
    if ragged_attention is None:
        raise RuntimeError(f"attention implementation {RAGGED_ATTENTION!r} runs only inside "
                           "batched_specdec.forwards.model_forward, which supplies each row's positions")
    window = ragged_attention.windows[module.layer_idx]
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    if ragged_attention.backend == "flex":
        out = _flex(query, key, value, ragged_attention.block_mask(window), scaling, softcap)
        return out.transpose(1, 2).contiguous(), None
    return _sdpa(query, key, value, ragged_attention, window, scaling, softcap), None


AttentionInterface.register(RAGGED_ATTENTION, ragged_attention_forward)
