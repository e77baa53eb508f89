"""Forwards of an HF causal LM through a :class:`~batched_specdec.ragged_cache.RaggedKVCache`.

:func:`model_forward` runs one forward (decode, draft, verify, or a prefill chunk) with each row's tokens at its own
positions. Attention reads each row's positions, not a mask: it selects the ragged attention function of
:mod:`batched_specdec.attention` for the duration of the forward (or, with ``attention="dense"``, the reference
path, passes a ready-made 4D mask that transformers' masking utilities return as-is); decode-sized forwards are
recorded and replayed (:mod:`batched_specdec.graphs`) or compiled (:mod:`batched_specdec.capture`) when the cache
says so. It can also hand back hidden states (a feature drafter's input). :func:`prefill` feeds prompts in bounded
chunks, each over only the rows that still have prompt left.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch
from torch import Tensor

from batched_specdec import capture, graphs
from batched_specdec.attention import RAGGED_ATTENTION, RaggedAttentionInputs
from batched_specdec.model_info import cache_keyword, decoder_config
from batched_specdec.ragged_cache import PREFILL_CHUNK, RaggedKVCache


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
    buffers exist (a batch whose prompts fit in one prefill chunk has no prefill forward: its first forward, which
    writes the prompt tails, allocates them eagerly):

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
        raise RuntimeError(f"{type(model).__name__}'s hidden states were captured "
                           f"{len(captured)} times in one forward; "
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


def tail_forward(model, cache: RaggedKVCache, tokens: Tensor, tails: list[int], drafts: Tensor, *,
                 return_hidden: bool | tuple[int, ...] = False):
    """A verify forward that also writes the prompt tails: row ``b`` feeds the ``tails[b]`` committed tokens the
    cache does not hold yet, ``tokens[b, lens[b] : lens[b] + tails[b]]``, then its drafts ``drafts[b]``, at positions
    from ``cache.lens[b]`` on. Returns the logits ``(B, k + 1, V)`` at the tail's last token and at each draft:
    what a verify forward over ``[s_b[-1], d_1..d_k]`` returns, and with ``return_hidden`` also the hidden states of
    every column, ``(B, max(tails) + k, F)`` (:func:`model_forward`'s). One eager forward of ``max(tails) + k`` tokens
    per row; a row with a shorter tail writes placeholder entries past its drafts, which stay invisible.

    Parameters
    ----------
    tokens : Tensor
        ``(B, S)`` int64: the rows' token buffer, holding at least ``cache.lens[b] + tails[b]`` tokens per row.
    tails : list of int
        ``(B,)`` host values >= 1: the committed tokens per row past its cache length (1: only ``s_b[-1]``).
    drafts : Tensor
        ``(B, k)`` int64 on ``tokens``' device, ``k >= 0``.
    """
    device, k = tokens.device, drafts.shape[1]
    tail = torch.tensor(tails, dtype=torch.int64, device=device)[:, None]
    columns = torch.arange(max(tails) + k, device=device)[None, :]
    inputs = tokens.gather(1, (cache.lens.to(device)[:, None] + columns).clamp_max(tokens.shape[1] - 1))
    if k:
        inputs = torch.where(columns < tail, inputs, drafts.gather(1, (columns - tail).clamp(0, k - 1)))
    kept = tail - 1 + columns[:, : k + 1]
    with _output_rows_kept(model, kept) as fired:
        out = model_forward(model, cache, inputs, return_hidden=return_hidden, compile=False)
    logits = out[0] if return_hidden else out
    if not fired:  # a model that computes its logits without calling its output head module: every column came back
        logits = torch.take_along_dim(logits, kept.to(logits.device)[:, :, None], dim=1)
    return (logits, out[1]) if return_hidden else logits


@contextmanager
def _output_rows_kept(model, columns: Tensor):
    """While open, ``model``'s output head reads only the hidden states at ``columns`` ``(B, K)`` of each row (a
    forward pre-hook on it): a forward returns logits ``(B, K, V)``, without the logits of other columns. Yields a
    list that is non-empty once the hook has run."""
    fired: list[bool] = []

    def keep(module, args):
        fired.append(True)
        hidden = args[0]
        return (torch.take_along_dim(hidden, columns.to(hidden.device)[:, :, None], dim=1), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(keep)
    try:
        yield fired
    finally:
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
        out = model_forward(model, cache, chunk_tokens, logits_to_keep=1,
                            return_hidden=on_hidden is not None and hidden)
        if on_hidden is not None:
            on_hidden(out[1], start, active if index is None else index[:active])
    cache.set_rows(None)
    final = torch.tensor(widths, dtype=torch.int64, device=device)
    cache.set_lens(final if index is None else cache.lens.index_copy(0, index, final))
