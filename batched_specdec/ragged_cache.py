"""The ragged KV cache: static per-layer buffers, one valid length per row, no padding and no KV copies.

Layer ``l`` owns buffers ``[B, H_kv, S, D]`` for keys and values, allocated on the device where that layer runs
(so a model dispatched with ``device_map="auto"`` keeps each layer's cache on its own device). Row ``b`` holds
``lens[b]`` valid entries. A forward with ``Q`` new tokens per row writes them at ``lens[b] .. lens[b] + Q - 1``
(``kernels.scatter_kv_at_offsets``), uses position ids ``lens[b] + j``, and a 4D mask lets query ``j`` of row ``b``
see keys ``< lens[b] + j + 1``. Pruning rejected drafts is ``lens[b] = new length``: stale entries past the
length are masked and overwritten by the next write. Attention only spans ``span`` columns, the bucketed
maximum length that live rows can reach this step, not the whole buffer.

The class plugs into transformers 5.x through the public ``Cache`` interface (``update``), a ready-made 4D mask
(returned as-is by transformers' masking utilities) and explicit ``position_ids``; the model is not patched.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from batched_specdec.inputs import decoder_config
from kernels import compact_rows, scatter_kv_at_offsets

SPAN_BUCKET = 64
"""Attention spans are rounded up to a multiple of this, so that shapes change rarely."""


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
        its ``getdecoder_config()`` is read.
    batch_size : int
        Rows ``B``.
    capacity : int
        Positions ``S`` per row; no row may grow past it.
    device : torch.device
        Where the per-row lengths live (the model's input device). Buffers go where each layer runs.
    """

    def __init__(self, config, batch_size: int, capacity: int, device: torch.device) -> None:
        super().__init__(layers=[])
        config = decoder_config(config)
        self._windows = _layer_windows(config)  # first: an unsupported layer type fails before any allocation
        self.config = config
        self.capacity = capacity
        self.lens = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.span = min(capacity, SPAN_BUCKET)
        self.key_buffers: list[Tensor | None] = [None] * config.num_hidden_layers
        self.value_buffers: list[Tensor | None] = [None] * config.num_hidden_layers
        self._lens_on: dict[torch.device, Tensor] = {}

    @property
    def batch_size(self) -> int:
        return self.lens.shape[0]

    # --- transformers Cache interface -------------------------------------------------------------------------

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        """Write this forward's ``(B, H, Q, D)`` keys/values at each row's length; return the ``span`` columns."""
        kbuf = self.key_buffers[layer_idx]
        if kbuf is None:
            b, h, _, d = key_states.shape
            shape = (b, h, self.capacity, d)
            kbuf = self.key_buffers[layer_idx] = key_states.new_zeros(shape)
            self.value_buffers[layer_idx] = value_states.new_zeros(shape)
        vbuf = self.value_buffers[layer_idx]
        scatter_kv_at_offsets(kbuf, vbuf, key_states, value_states, self._lens_for(key_states.device))
        return kbuf[:, :, : self.span], vbuf[:, :, : self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Only consulted by models when position_ids are not given; the engine always gives them.
        return self.span

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity

    @property
    def is_compileable(self) -> bool:
        return False

    # --- engine interface --------------------------------------------------------------------------------------

    def _lens_for(self, device: torch.device) -> Tensor:
        lens = self._lens_on.get(device)
        if lens is None:
            lens = self._lens_on[device] = self.lens.to(device, non_blocking=True)
        return lens

    def set_lens(self, lens: Tensor) -> None:
        """Set every row's valid length (``(B,)`` int64). Pruning rejected drafts is exactly this."""
        self.lens = lens
        self._lens_on = {lens.device: lens}

    def set_span(self, max_len: int) -> None:
        """Let attention span the first ``bucketed(max_len)`` columns; ``max_len`` bounds every key position read."""
        self.span = bucketed_span(max_len, self.capacity)

    def inputs(self, num_queries: int, dtype: torch.dtype) -> tuple[Tensor, Tensor | dict[str, Tensor]]:
        """Position ids ``(B, Q)`` and the 4D additive attention mask ``(B, 1, Q, span)`` of the next forward.

        Query ``j`` of row ``b`` sits at position ``lens[b] + j`` and sees keys at positions ``<= lens[b] + j``
        (and, for sliding-window layers, ``> lens[b] + j - window``, transformers' ``sliding_window_overlay``).
        When every layer attends alike, one tensor: transformers' ``create_causal_mask`` and
        ``create_sliding_window_causal_mask`` return a 4D mask as-is, so every layer uses it. When full and
        sliding layers mix (Gemma-2, Gemma-3, Qwen2 with ``max_window_layers``), the mapping
        ``{"full_attention": mask, "sliding_attention": mask}``: those models skip mask creation when given a dict
        and give layer ``i`` the entry of ``config.layer_types[i]``.
        """
        device = self.lens.device
        positions = self.lens[:, None] + torch.arange(num_queries, device=device)[None, :]
        keys = torch.arange(self.span, device=device)[None, None, :]
        visible = keys <= positions[:, :, None]
        zero = torch.zeros((), dtype=dtype, device=device)
        blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)

        def additive(window: int | None) -> Tensor:
            allowed = visible if window is None else visible & (keys > positions[:, :, None] - window)
            return torch.where(allowed, zero, blocked)[:, None]

        windows = set(self._windows)
        if len(windows) == 1:
            return positions, additive(windows.pop())
        sliding = next(w for w in windows if w is not None)  # _layer_windows allows one window size besides None
        return positions, {"full_attention": additive(None), "sliding_attention": additive(sliding)}

    def advance(self, num_new: Tensor | int) -> None:
        """Grow every row's length by ``num_new`` (int or ``(B,)``) after a forward."""
        self.set_lens(self.lens + num_new)

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only ``rows`` (``(N,)`` int64, ascending) of the batch, in that order, for every layer."""
        allocated = [i for i, k in enumerate(self.key_buffers) if k is not None]
        by_device: dict[torch.device, list[int]] = {}
        for i in allocated:
            by_device.setdefault(self.key_buffers[i].device, []).append(i)
        for device, layer_ids in by_device.items():
            idx = rows.to(device)
            tensors = [self.key_buffers[i] for i in layer_ids] + [self.value_buffers[i] for i in layer_ids]
            out = compact_rows(tensors, idx)
            for j, i in enumerate(layer_ids):
                self.key_buffers[i] = out[j]
                self.value_buffers[i] = out[len(layer_ids) + j]
        self.set_lens(self.lens.index_select(0, rows.to(self.lens.device)))
