"""The ragged KV cache: static per-layer buffers, one valid length per row, no padding and no KV copies.

Layer ``l`` owns buffers ``[B, H_kv, S, D]`` for keys and values, allocated on the device where that layer runs
(so a model dispatched with ``device_map="auto"`` keeps each layer's cache on its own device). Row ``b`` holds
``lens[b]`` valid entries. A forward with ``Q`` new tokens per row writes them at ``lens[b] .. lens[b] + Q - 1``
(``kernels.scatter_kv_at_offsets``), uses position ids ``lens[b] + j``, and a 4D mask lets query ``j`` of row ``b``
see keys ``< lens[b] + j + 1``. Pruning rejected drafts is ``lens[b] = new length``: stale entries past the
length are masked and overwritten by the next write. Attention only spans ``span`` columns, the bucketed
maximum length that live rows can reach this step, not the whole buffer.

The class plugs into transformers 5.x through the public ``Cache`` interface (``update``) and explicit
``position_ids``; the model is not patched. Attention reads each row's positions, not a mask: :func:`model_forward`
selects the ragged attention function of :mod:`batched_specdec.attention` for the duration of the forward (or, with
``attention="dense"``, the reference path, passes a ready-made 4D mask that transformers' masking utilities return
as-is). :func:`prefill` feeds prompts in bounded chunks, each over only the rows that still have prompt left.
"""

from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from batched_specdec import capture, graphs
from batched_specdec.attention import RAGGED_ATTENTION, RaggedAttentionInputs, resolve_attention
from batched_specdec.kernels import compact_rows, scatter_kv_at_offsets
from batched_specdec.model_info import cache_keyword, decoder_config

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
        """Set every row's valid length (``(B,)`` int64), in place. Pruning rejected drafts is exactly this."""
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


@contextmanager
def _attention_selected(model, implementation: str | None):
    """Let ``model``'s decoder layers dispatch to ``implementation`` for the duration (None: leave it)."""
    if implementation is None:
        yield
        return
    configs = {id(c): c for c in _attention_configs(model)}.values()
    previous = [(c, c._attn_implementation_internal) for c in configs]
    for config in configs:
        config._attn_implementation_internal = implementation
    try:
        yield
    finally:
        for config, value in previous:
            config._attn_implementation_internal = value


def _attention_configs(model) -> list:
    """The configs whose attention setting the decoder layers read: the model's decoder config and, for wrappers
    that build their decoder from a config of their own (the distilled drafts), the decoder's."""
    configs = [decoder_config(model.config)]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and getattr(decoder, "config", None) is not None:
        configs.append(decoder_config(decoder.config))
    return configs


def model_forward(model, cache: RaggedKVCache, input_ids: Tensor, logits_to_keep: int = 0, *,
                  return_hidden: bool | tuple[int, ...] = False, compile: bool = True, **model_inputs):
    """One forward of an HF causal LM through a :class:`RaggedKVCache`.

    Row ``b``'s ``Q`` tokens go to positions ``cache.lens[b] .. cache.lens[b] + Q - 1`` (rows ``[:cache.rows]``
    when set); the caller advances the lengths afterwards. Returns float logits ``(B, Q', V)`` for the last
    ``logits_to_keep`` queries (all when 0), and with ``return_hidden`` also hidden states of every query, as
    ``(logits, hidden)``: with True the decoder's final ones ``(B, Q, H)`` (what its output head reads: after the
    final norm), with a tuple of layer indices the inputs of those decoder layers (``output_hidden_states``
    indices, 0 the embedding) concatenated, ``(B, Q, n * H)`` (an EAGLE-3 head's features).
    ``model_inputs`` go to the model as keyword arguments (a feature draft's ``features``).

    ``compile`` says the forward is decode-sized (callers clear it for one-off widths such as a drafter's catch-up).
    A decode-sized forward over every row (decode, draft and verify forwards; not prefill chunks), once the cache's
    buffers exist (a batch of one-token prompts has no prefill: its first forward allocates them eagerly):

    * with ``cache.graphs`` and at most :data:`~batched_specdec.graphs.MAX_WIDTH` queries per row, is recorded once
      per shape and buffer addresses and replayed (:mod:`batched_specdec.graphs`; ``return_hidden`` included). The
      results are the recording's outputs: read or copy them before the next forward through a cache of the same
      role and model;
    * with ``cache.compile``, runs compiled (:mod:`batched_specdec.capture`), with CUDA graphs on CUDA (one per
      rows, queries and span bucket); not with ``return_hidden``, and not with flex attention on CPU, which compiles
      itself per shape (inductor cannot compile it with dynamic shapes there).
    """
    decode_sized = compile and cache.rows is None and cache.allocated
    if decode_sized and cache.graphs and input_ids.shape[1] <= graphs.MAX_WIDTH:
        return _recorded_forward(model, cache, input_ids, logits_to_keep, return_hidden, model_inputs)
    compiled = decode_sized and cache.compile and not return_hidden and \
        not (cache.attention == "flex" and cache.lens.is_cpu)
    out = _eager_forward(model, cache, input_ids, logits_to_keep, return_hidden, model_inputs, compiled)
    return out if return_hidden else out[0]


def _eager_forward(model, cache: RaggedKVCache, input_ids: Tensor, logits_to_keep: int, return_hidden,
                   model_inputs: dict, compiled: bool = False) -> tuple:
    """``(logits,)``, or ``(logits, hidden)`` with ``return_hidden``: the forward with the ragged attention selected
    (compiled with ``compiled``)."""
    implementation = None if cache.attention == "dense" else RAGGED_ATTENTION
    captured: list[Tensor] = []
    cache_kw = cache_keyword(model)
    with _attention_selected(model, implementation), _hidden_captured(model, captured, return_hidden):
        if compiled:
            logits = capture.run_compiled(_forward, input_ids.device, model, cache, input_ids, logits_to_keep,
                                          model_inputs, cache_kw)
        else:
            logits = _forward(model, cache, input_ids, logits_to_keep, model_inputs, cache_kw)
    if not return_hidden:
        return (logits,)
    expected = 1 if return_hidden is True else len(return_hidden)
    if len(captured) != expected:
        raise RuntimeError(f"{type(model).__name__}'s hidden states were captured {len(captured)} times in one forward; "
                           f"expected {expected}")
    return logits, captured[0] if return_hidden is True else torch.cat(captured, dim=-1)


def _recorded_forward(model, cache: RaggedKVCache, input_ids: Tensor, logits_to_keep: int, return_hidden,
                      model_inputs: dict):
    """:func:`model_forward` through the graph pool of ``(model, cache.role)``: the tensor inputs are copied into a
    recording's static buffers and the recording replayed (recorded first for a new shape or moved buffers)."""
    tensors = {"input_ids": input_ids, **{k: v for k, v in model_inputs.items() if isinstance(v, Tensor)}}
    settings = tuple(sorted((k, v) for k, v in model_inputs.items() if not isinstance(v, Tensor)))
    shape = (cache.batch_size, cache.span, cache.attention, logits_to_keep, return_hidden, settings,
             *((k, tuple(v.shape), v.dtype, v.device) for k, v in tensors.items()))
    weights = model.get_input_embeddings().weight
    addresses = (*cache.addresses(), id(model), weights.data_ptr())
    recorded: list[RaggedKVCache] = []  # the cache as it is now, frozen, if this call records

    def forward(static: dict) -> tuple:
        if not recorded:
            recorded.append(cache.frozen())
        inputs = {**model_inputs, **{k: v for k, v in static.items() if k != "input_ids"}}
        return _eager_forward(model, recorded[0], static["input_ids"], logits_to_keep, return_hidden, inputs)

    out = graphs.pool_for(model, cache.role, input_ids.device).run(shape, addresses, forward, tensors)
    return out if return_hidden else out[0]


def _forward(model, cache: RaggedKVCache, input_ids: Tensor, logits_to_keep: int, model_inputs: dict,
             cache_kw: str) -> Tensor:
    """The forward itself (compiled or not): positions from the cache's lengths, the attention inputs, the model
    (which takes the cache by the keyword ``cache_kw``, see :func:`~batched_specdec.model_info.cache_keyword`)."""
    positions = cache.positions(input_ids.shape[1])
    if cache.attention == "dense":
        extra = {"attention_mask": cache.dense_mask(positions, model.dtype)}
    else:
        extra = {"ragged_attention": RaggedAttentionInputs(positions, cache.span, cache.windows, cache.attention)}
    extra[cache_kw] = cache
    out = model(input_ids=input_ids, position_ids=positions, use_cache=True,
                logits_to_keep=logits_to_keep, **extra, **model_inputs)
    return out.logits


@contextmanager
def _hidden_captured(model, captured: list, which: bool | tuple[int, ...]):
    """Append to ``captured``: with ``which=True`` the decoder's ``last_hidden_state`` of each forward (a forward
    hook on ``model.get_decoder()``), with a tuple the input of each of those decoder layers, in that order (forward
    pre-hooks on them); hooks removed on exit."""
    if which is False:
        yield
        return
    decoder = model.get_decoder()
    if which is True:
        def hook(module, args, output) -> None:
            captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

        handles = [decoder.register_forward_hook(hook)]
    else:
        slots: dict[int, Tensor] = {}

        def keep(index: int):
            def pre_hook(module, args, kwargs) -> None:
                slots[index] = args[0] if args else kwargs["hidden_states"]
            return pre_hook

        handles = [decoder.layers[i].register_forward_pre_hook(keep(n), with_kwargs=True) for n, i in enumerate(which)]
    try:
        yield
        if which is not True:
            captured.extend(slots[n] for n in sorted(slots))
    finally:
        for handle in handles:
            handle.remove()


def prefill(model, cache: RaggedKVCache, tokens: Tensor, widths: list[int], chunk: int = PREFILL_CHUNK,
            on_hidden=None, rows: Tensor | None = None, hidden: bool | tuple[int, ...] = True) -> None:
    """Write ``tokens[b, :widths[b]]`` of every row into ``cache`` (positions ``0 .. widths[b] - 1``), ``chunk``
    columns per forward, each forward over only the rows with tokens left; then set their lengths to ``widths``.

    Rows must come longest first (``widths`` non-increasing), so that the rows of every chunk are a prefix of the
    batch (or of ``rows``). A forward is at most ``rows x chunk`` tokens wide; a row shorter than its chunk's width
    writes placeholder entries past its length, which stay invisible.

    Parameters
    ----------
    tokens : Tensor
        ``(B, >= widths[0])`` int64 on the model's input device: the whole batch's token buffer.
    widths : list of int
        Tokens per row to write (host values, >= 0), non-increasing: one per row of the batch, or with ``rows`` one
        per entry of ``rows``.
    chunk : int
        Columns per forward (>= 1).
    on_hidden : callable, optional
        ``on_hidden(hidden, start, rows)`` after each forward, with the hidden states ``(R, W, F)`` that ``hidden``
        asks :func:`model_forward` for (default: the decoder's final ones)
        of the chunk's positions ``start .. start + W - 1`` of the forward's rows: ``[:R]`` (an int), or an index
        tensor with ``rows`` (a feature drafter's input).
    rows : Tensor, optional
        ``(R,)`` int64 host indices of the rows to prefill (prompts that entered those rows); the other rows'
        cache entries and lengths are left as they are. None: every row.
    hidden : bool or tuple of int
        With ``on_hidden``: the hidden states it receives (``return_hidden`` of :func:`model_forward`).
    """
    if any(a < b for a, b in itertools.pairwise(widths)):
        raise ValueError(f"prefill needs rows ordered longest first, got widths {widths}")
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
    device = cache.lens.device
    index = None if rows is None else rows.to(device)
    for start in range(0, widths[0] if widths else 0, chunk):
        active = sum(1 for w in widths if w > start)
        width = min(chunk, widths[0] - start)
        if index is None:
            cache.set_rows(active)
            cache.set_lens(torch.full((cache.batch_size,), start, dtype=torch.int64, device=device))
            chunk_tokens = tokens[:active, start : start + width]
        else:
            cache.set_rows(index[:active])
            cache.set_lens(cache.lens.index_fill(0, index, start))
            chunk_tokens = tokens.index_select(0, index[:active])[:, start : start + width]
        cache.set_span(start + width)
        out = model_forward(model, cache, chunk_tokens, logits_to_keep=1, return_hidden=on_hidden is not None and hidden)
        if on_hidden is not None:
            on_hidden(out[1], start, active if index is None else index[:active])
    cache.set_rows(None)
    final = torch.tensor(widths, dtype=torch.int64, device=device)
    cache.set_lens(final if index is None else cache.lens.index_copy(0, index, final))
