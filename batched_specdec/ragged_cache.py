"""The ragged KV cache: static per-layer buffers, one valid length per row, no padding and no KV copies.

Layer ``l`` owns buffers ``[B, H_kv, S, D]`` for keys and values, allocated on the device where that layer runs
(so a model dispatched with ``device_map="auto"`` keeps each layer's cache on its own device). Row ``b`` holds
``lens[b]`` valid entries. A forward with ``Q`` new tokens per row writes them at ``lens[b] .. lens[b] + Q - 1``
(``kernels.scatter_kv_at_offsets``), uses position ids ``lens[b] + j``, and a 4D mask lets query ``j`` of row ``b``
see keys ``< lens[b] + j + 1``. Pruning rejected drafts is ``lens[b] = new length``: stale entries past the
length are masked and overwritten by the next write. Attention only spans ``span`` columns, the bucketed
maximum length that live rows can reach this step, not the whole buffer.

The class plugs into transformers 5.x through the public ``Cache`` interface (``update``) and explicit
``position_ids``; the model is not patched. Forwards through it are :mod:`batched_specdec.forwards`
(:func:`~batched_specdec.forwards.model_forward`, :func:`~batched_specdec.forwards.prefill`).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from batched_specdec import capture, graphs
from batched_specdec.attention import resolve_attention
from batched_specdec.kernels import compact_rows, scatter_kv_at_offsets
from batched_specdec.model_info import decoder_config

SPAN_BUCKET = 64
"""Attention spans are rounded up to a multiple of this, so that shapes change rarely."""

PREFILL_CHUNK = 128
"""Default prompt tokens per row per prefill forward (``prefill_chunk=``): bounds prefill activations and masks."""


def bucketed_span(max_len: int, capacity: int) -> int:
    """Round ``max_len`` up to a multiple of :data:`SPAN_BUCKET`, capped at ``capacity``."""
    return min(capacity, -(-max_len // SPAN_BUCKET) * SPAN_BUCKET)


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
"""Layer types whose attention the cache's 4D masks express; anything else (chunked, linear, ...) is refused."""


def _layer_windows(config) -> list[int | None]:
    """Per layer: the sliding window size, or None for full attention.

    Raises
    ------
    ValueError
        A layer type other than ``full_attention``/``sliding_attention`` (e.g. ``chunked_attention``), or a
        sliding layer without a window: treating such a layer as full attention would silently change the output.
    """
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        chunk = getattr(config, "attention_chunk_size", None)
        if chunk is not None:
            raise ValueError(f"{type(config).__name__} uses chunked attention (attention_chunk_size={chunk}), which "
                             "the ragged KV cache does not support")
        if getattr(config, "use_sliding_window", True) is False:
            return [None] * n
        return [window] * n
    windows = []
    for i, layer_type in enumerate(list(layer_types)[:n]):
        if layer_type not in SUPPORTED_LAYER_TYPES:
            raise ValueError(f"layer {i} of {type(config).__name__} has layer type {layer_type!r}; the ragged KV cache "
                             f"supports only {' and '.join(SUPPORTED_LAYER_TYPES)} layers")
        if layer_type == "sliding_attention" and window is None:
            raise ValueError(f"layer {i} of {type(config).__name__} is a sliding_attention layer but the config has "
                             "no sliding_window")
        windows.append(window if layer_type == "sliding_attention" else None)
    return windows


class RaggedKVCache(Cache):
    """Per-row-length KV cache for a batch of ``batch_size`` rows and ``capacity`` positions per row.

    Parameters
    ----------
    config : PretrainedConfig
        The model's config (number of layers, sliding windows, layer types); for a composite (multimodal) config,
        its decoder (text) config is read.
    batch_size : int
        Rows ``B``.
    capacity : int
        Positions ``S`` per row; no row may grow past it.
    device : torch.device
        Where the per-row lengths live (the model's input device). Buffers go where each layer runs.
    attention : {"auto", "sdpa", "flex", "dense"}
        The attention backend of forwards through this cache (:mod:`batched_specdec.attention`).
    compile : bool
        Run decode-sized forwards through it compiled (:func:`model_forward`; on CUDA with CUDA graphs). Its
        buffers then come from :data:`batched_specdec.capture.BUFFERS` under ``role``, so a later call of the same
        shape reuses them, and compaction keeps rows in the front of the same buffers.
    role : str
        The pool's name for this cache's buffers (``"target"``, ``"draft"``): caches alive at the same time need
        different roles. Recorded forwards of different roles also have separate graph pools.
    graphs : bool
        Record decode-sized forwards through it once and replay them (:mod:`batched_specdec.graphs`): its buffers
        are pooled and kept in place as with ``compile``, and spans are bucketed geometrically
        (:func:`~batched_specdec.graphs.graph_span`).

    The state a forward reads is static: the buffers are allocated once, ``lens`` is updated in place and the span
    is a Python int, so a compiled forward's shapes depend only on (rows, queries per row, span bucket).
    """

    def __init__(self, config, batch_size: int, capacity: int, device: torch.device, attention: str = "auto",
                 compile: bool = False, role: str = "target", graphs: bool = False) -> None:
        super().__init__(layers=[])
        config = decoder_config(config)
        self.windows = _layer_windows(config)  # first: an unsupported layer type fails before any allocation
        self.attention = resolve_attention(attention, torch.device(device))
        self.compile = compile
        self.graphs = graphs
        self.stable = compile or graphs  # buffers pooled and kept in place (graph-stable addresses)
        self.config = config
        self.capacity = capacity
        self.role = role
        self.lens = capture.new_buffer(f"{role}.lens", (batch_size,), torch.int64, device, self.stable).zero_()
        self.span = min(capacity, SPAN_BUCKET)
        self.rows: int | Tensor | None = None  # forwards cover rows [:rows], or the rows of an index; None: all
        self.key_buffers: list[Tensor | None] = [None] * config.num_hidden_layers
        self.value_buffers: list[Tensor | None] = [None] * config.num_hidden_layers
        self._lens_on: dict[torch.device, Tensor] = {}

    @property
    def batch_size(self) -> int:
        return self.lens.shape[0]

    @property
    def allocated(self) -> bool:
        """Whether every layer's buffers exist (they are allocated by the first forward through the cache)."""
        return all(buffer is not None for buffer in self.key_buffers)

    # --- transformers Cache interface -------------------------------------------------------------------------

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        """Write this forward's ``(B, H, Q, D)`` keys/values at each row's length; return the ``span`` columns."""
        kbuf = self.key_buffers[layer_idx]
        if kbuf is None:
            _, h, _, d = key_states.shape
            shape = (self.batch_size, h, self.capacity, d)
            # Entries past a row's length are masked; a pooled buffer's stale entries are finite (capture.BufferPool).
            kbuf = self.key_buffers[layer_idx] = self._buffer(f"key.{layer_idx}", shape, key_states)
            self.value_buffers[layer_idx] = self._buffer(f"value.{layer_idx}", shape, value_states)
        vbuf = self.value_buffers[layer_idx]
        lens = self._lens_for(key_states.device)
        if isinstance(self.rows, Tensor):  # a forward over some rows: write into a copy of their span, then back
            idx = self.rows.to(kbuf.device)
            kspan, vspan = kbuf[:, :, : self.span], vbuf[:, :, : self.span]
            krows, vrows = kspan.index_select(0, idx), vspan.index_select(0, idx)
            scatter_kv_at_offsets(krows, vrows, key_states, value_states, lens, validate=False)
            kspan.index_copy_(0, idx, krows)
            vspan.index_copy_(0, idx, vrows)
            return krows, vrows
        if self.rows is not None:
            kbuf, vbuf = kbuf[: self.rows], vbuf[: self.rows]
        # Shapes fit by construction: no per-layer checks (the cache built the buffers from the model's own K/V).
        scatter_kv_at_offsets(kbuf, vbuf, key_states, value_states, lens, validate=False)
        return kbuf[:, :, : self.span], vbuf[:, :, : self.span]

    def _buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return capture.new_buffer(f"{self.role}.{name}", shape, like.dtype, like.device, self.stable)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Only consulted by models when position_ids are not given; the engine always gives them.
        return self.span

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity

    @property
    def is_compileable(self) -> bool:
        return True  # static buffers, lengths updated in place

    # --- engine interface --------------------------------------------------------------------------------------

    def _lens_for(self, device: torch.device) -> Tensor:
        if self.rows is None and device == self.lens.device:
            return self.lens  # the common case, and the only one a compiled forward sees: no dict, no copy
        lens = self._lens_on.get(device)
        if lens is None:
            if isinstance(self.rows, Tensor):
                lens = self.lens.index_select(0, self.rows.to(self.lens.device))
            else:
                lens = self.lens if self.rows is None else self.lens[: self.rows]
            lens = self._lens_on[device] = lens.to(device, non_blocking=True)
        return lens

    def set_lens(self, lens: Tensor) -> None:
        """Set every row's valid length to ``lens`` (``(B,)`` int64), copied into :attr:`lens` (its address stays,
        as recorded forwards need), and drop the copies of the old lengths made for forwards. Pruning rejected
        drafts is exactly this."""
        if lens is not self.lens:
            self.lens.copy_(lens)
        self._lens_on = {}

    def set_rows(self, rows: int | Tensor | None) -> None:
        """Let forwards cover only rows ``[:rows]``, or the rows of an index tensor ``(R,)`` int64 (a prefill of
        prompts that entered some rows), or every row (``None``); the other rows are left untouched."""
        self.rows = rows
        self._lens_on = {}

    def set_span(self, max_len: int) -> None:
        """Let attention span the first ``bucketed(max_len)`` columns (with ``graphs``, the geometric
        :func:`~batched_specdec.graphs.graph_span`); ``max_len`` bounds every key position read."""
        span = graphs.graph_span if self.graphs else bucketed_span
        self.span = span(max_len, self.capacity)

    def frozen(self) -> RaggedKVCache:
        """A copy that shares this cache's buffers (the same tensors) and keeps its current span, rows, lengths
        tensor and buffer views, whatever this cache does later: what a recorded forward runs on, as a CUDA graph
        keeps the addresses and shapes of its recording."""
        frozen = copy.copy(self)
        frozen.key_buffers, frozen.value_buffers = list(self.key_buffers), list(self.value_buffers)
        frozen._lens_on = {}
        return frozen

    def addresses(self) -> tuple[int, ...]:
        """Where the state a forward reads and writes in place lives (lengths, every layer's K/V buffers): what a
        recorded forward is keyed by, with the shapes."""
        buffers = (self.lens, *self.key_buffers, *self.value_buffers)
        return (self.capacity, *(b.data_ptr() for b in buffers), *(b.shape[0] for b in self.key_buffers))

    def positions(self, num_queries: int) -> Tensor:
        """``(B, Q)`` int64 positions of the next forward's queries: ``lens[b] + j`` (rows ``[:rows]`` only)."""
        lens = self._lens_for(self.lens.device)
        return lens[:, None] + torch.arange(num_queries, device=lens.device)[None, :]

    def dense_mask(self, positions: Tensor, dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
        """The reference path's 4D additive attention mask ``(B, 1, Q, span)`` for queries at ``positions``.

        Query ``j`` of row ``b`` sees keys at positions ``<= positions[b, j]`` (and, for sliding-window layers,
        ``> positions[b, j] - window``, transformers' ``sliding_window_overlay``). When every layer attends alike,
        one tensor: transformers' ``create_causal_mask`` and ``create_sliding_window_causal_mask`` return a 4D mask
        as-is. When full and sliding layers mix (Gemma-2, Gemma-3, Qwen2 with ``max_window_layers``), the mapping
        ``{"full_attention": mask, "sliding_attention": mask}``, which those models hand to layers by layer type.
        """
        device = positions.device
        keys = torch.arange(self.span, device=device)[None, None, :]
        visible = keys <= positions[:, :, None]
        zero = torch.zeros((), dtype=dtype, device=device)
        blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)  # a fill: no host copy in a graph

        def additive(window: int | None) -> Tensor:
            allowed = visible if window is None else visible & (keys > positions[:, :, None] - window)
            return torch.where(allowed, zero, blocked)[:, None]

        windows = set(self.windows)
        if len(windows) == 1:
            return additive(windows.pop())
        sliding = next(w for w in windows if w is not None)  # _layer_windows allows one window size besides None
        return {"full_attention": additive(None), "sliding_attention": additive(sliding)}

    def copy_rows_from(self, source: RaggedKVCache, source_rows: Tensor, rows: Tensor, widths: list[int]) -> None:
        """Copy the first ``widths[i]`` entries of ``source``'s row ``source_rows[i]`` into row ``rows[i]`` of every
        layer and set those rows' lengths to ``widths`` (prompts staged in another cache entering this one); the other
        rows are left as they are. ``source`` has this cache's layers; index tensors are ``(N,)`` int64. Both caches
        must have run a forward (their buffers exist) unless every width is 0."""
        width = max(widths, default=0)
        if width > 0:
            if not (self.allocated and source.allocated):
                raise RuntimeError("copy_rows_from needs both caches' buffers: run a forward through each first")
            on_device = {}  # one copy of the indices per device the layers live on, not one per layer
            for i, src_key in enumerate(source.key_buffers):
                if src_key.device not in on_device:
                    on_device[src_key.device] = (rows.to(src_key.device), source_rows.to(src_key.device))
                dst_idx, src_idx = on_device[src_key.device]
                for dst, src in ((self.key_buffers[i], src_key), (self.value_buffers[i], source.value_buffers[i])):
                    dst[:, :, :width].index_copy_(0, dst_idx, src[:, :, :width].index_select(0, src_idx))
        lens = torch.tensor(widths, dtype=torch.int64, device=self.lens.device)
        self.set_lens(self.lens.index_copy(0, rows.to(self.lens.device), lens))

    def advance(self, num_new: Tensor | int) -> None:
        """Grow every row's length by ``num_new`` (int or ``(B,)``) after a forward."""
        self.set_lens(self.lens + num_new)

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only ``rows`` (``(N,)`` int64, ascending) of the batch, in that order, for every layer.

        One layer at a time, each old buffer released before the next layer's new one is allocated, so the peak is
        the cache plus one layer, not two caches. With ``compile`` the kept rows are copied into the front of the
        same buffers (graph-stable addresses); likewise with ``graphs``."""
        for i, kbuf in enumerate(self.key_buffers):
            if kbuf is None:
                continue
            idx = rows.to(kbuf.device)
            kept = compact_rows([kbuf, self.value_buffers[i]], idx)
            if self.stable:
                kept = [capture.copy_to_front(buf, t) for buf, t in zip((kbuf, self.value_buffers[i]), kept)]
            self.key_buffers[i], self.value_buffers[i] = kept
            del kbuf
        lens = self.lens.index_select(0, rows.to(self.lens.device))
        self.lens = capture.copy_to_front(self.lens, lens) if self.stable else lens
        self._lens_on = {}
