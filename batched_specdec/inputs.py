"""Checking and resolving what a caller passes to the engines, in one place, before any compute.

Both :func:`~batched_specdec.speculative_generate_batch` and :func:`~batched_specdec.autoregressive_generate_batch`
go through :func:`resolve_request`: prompts become lists of Python ints, EOS ids come from the model when not given,
per-row generation budgets are expanded, and every bad value is reported with what was expected.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from batched_specdec.processors import LogitsProcessor

DEFAULT_PAD_TOKEN_ID = 0
"""Fills buffer slots past a row's length. Those slots are masked, so the id never acts as a real token."""


@dataclass
class DecodeRequest:
    """A validated generation request for one batch."""

    rows: list[list[int]]
    max_gen_lens: list[int]
    eos: list[int]
    pad_token_id: int
    device: torch.device
    generator: torch.Generator | None

    @property
    def max_gen_len(self) -> int:
        return max(self.max_gen_lens)


def decoder_config(config):
    """The decoder's config: ``config.get_text_config()`` for composite (multimodal) configs, which keep layers,
    windows, layer types and vocabulary there; else the config itself."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def text_config(model):
    """:func:`decoder_config` of ``model.config``."""
    return decoder_config(model.config)


def vocab_size(model) -> int:
    """Rows of the model's output head (the width of its logits)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(text_config(model).vocab_size)


def input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def check_processor(logits_processor) -> LogitsProcessor:
    if not isinstance(logits_processor, LogitsProcessor):
        raise TypeError(f"logits_processor must be a LogitsProcessor, got {type(logits_processor).__name__}")
    return logits_processor


def check_tokenizer(tokenizer) -> None:
    """The seed API takes ``tokenizer`` 4th, so ``speculative_generate_batch(p, d, t, 5)`` is a likely slip."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, (bool, numbers.Number)) or isinstance(tokenizer, str) and tokenizer == "auto":
        raise TypeError(f"tokenizer must be a tokenizer or None, got {type(tokenizer).__name__} {tokenizer!r}; "
                        f"did you mean gamma={tokenizer!r}? (pass gamma by keyword)")
    if not hasattr(tokenizer, "eos_token_id"):
        raise TypeError(f"tokenizer must be a tokenizer (with eos_token_id) or None, got {type(tokenizer).__name__}")


def _is_token_id(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def _prompt_ids(i: int, prompt) -> list[int]:
    if isinstance(prompt, Tensor) or hasattr(prompt, "__array__") and hasattr(prompt, "ndim"):
        if prompt.ndim != 1 or not (str(prompt.dtype).startswith(("torch.int", "torch.uint", "int", "uint"))):
            raise ValueError(f"prompt {i} must be a 1-D integer tensor or array, got shape {tuple(prompt.shape)} "
                             f"and dtype {prompt.dtype}")
        return [int(t) for t in prompt.tolist()]
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
        raise TypeError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__} "
                        "(for text use batched_specdec.generate, which tokenizes)")
    return list(prompt)


def normalise_prompts(prompts, vocab: int, max_gen_lens: list[int], max_positions: int | None) -> list[list[int]]:
    if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)):
        raise TypeError(f"prompts must be a list of token-id lists or 1-D tensors, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: expected at least one prompt")
    rows = []
    for i, prompt in enumerate(prompts):
        ids = _prompt_ids(i, prompt)
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        for t in ids:
            if not _is_token_id(t) or not 0 <= t < vocab:
                raise ValueError(f"prompt {i} has token id {t!r}, expected an int in [0, {vocab})")
        need = len(ids) + max_gen_lens[i]
        if max_positions is not None and need > max_positions:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_gen_len={max_gen_lens[i]} it needs {need} positions, "
                f"but the model supports max_position_embeddings={max_positions}. Shorten the prompt or lower "
                "max_gen_len."
            )
        rows.append([int(t) for t in ids])
    return rows


def expand_max_gen_len(max_gen_len, num_prompts: int) -> list[int]:
    """An int for every row, or one int per prompt."""
    if isinstance(max_gen_len, (list, tuple)):
        if len(max_gen_len) != num_prompts:
            raise ValueError(f"max_gen_len has {len(max_gen_len)} entries, expected one per prompt ({num_prompts})")
        return [check_positive_int(f"max_gen_len[{i}]", m) for i, m in enumerate(max_gen_len)]
    return [check_positive_int("max_gen_len", max_gen_len)] * num_prompts


def _as_id_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, Tensor) or hasattr(value, "ndim") and hasattr(value, "tolist"):  # torch / numpy ids
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def resolve_eos(eos_tokens_id, model, tokenizer, vocab: int) -> list[int]:
    """``None`` means the model's ``generation_config.eos_token_id`` (an int or a list), else the tokenizer's;
    ``[]`` means no EOS (every row runs to its ``max_gen_len``)."""
    source = "eos_tokens_id"
    if eos_tokens_id is None:
        eos_tokens_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        source = "eos_tokens_id (from the target's generation_config.eos_token_id)"
        if eos_tokens_id is None and tokenizer is not None:
            eos_tokens_id = tokenizer.eos_token_id
            source = "eos_tokens_id (from tokenizer.eos_token_id)"
    ids = []
    for t in _as_id_list(eos_tokens_id):
        if not _is_token_id(t) or not 0 <= t < vocab:
            raise ValueError(f"{source} has {t!r}, expected ints in [0, {vocab})")
        if int(t) not in ids:
            ids.append(int(t))
    return ids


def resolve_pad(pad_token_id, vocab: int) -> int:
    if pad_token_id is None:
        return DEFAULT_PAD_TOKEN_ID
    if not _is_token_id(pad_token_id) or not 0 <= pad_token_id < vocab:
        raise ValueError(f"pad_token_id must be None or an int in [0, {vocab}), got {pad_token_id!r}")
    return int(pad_token_id)


def make_generator(seed, generator, device: torch.device) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if seed is not None:
        if not _is_token_id(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        return torch.Generator(device=device).manual_seed(int(seed))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def check_attention_settings(attention, prefill_chunk) -> None:
    """``attention`` must name a backend of :mod:`batched_specdec.attention`; ``prefill_chunk`` an int >= 1."""
    from batched_specdec.attention import resolve_attention

    resolve_attention(attention, torch.device("cpu"))  # the ValueError for an unknown backend
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be an int >= 1 (prompt tokens per row per prefill forward), "
                         f"got {prefill_chunk!r}")


def resolve_request(prompts, model, *, tokenizer, logits_processor, max_gen_len, eos_tokens_id, pad_token_id, seed,
                    generator, attention, prefill_chunk) -> DecodeRequest:
    """Check everything the two engines share and resolve the defaults that come from the model."""
    check_attention_settings(attention, prefill_chunk)
    check_processor(logits_processor)
    check_tokenizer(tokenizer)
    if isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        max_gen_lens = expand_max_gen_len(max_gen_len, len(prompts))
    else:
        max_gen_lens = []
    vocab = vocab_size(model)
    max_positions = getattr(text_config(model), "max_position_embeddings", None)
    rows = normalise_prompts(prompts, vocab, max_gen_lens, max_positions)
    eos = resolve_eos(eos_tokens_id, model, tokenizer, vocab)
    pad = resolve_pad(pad_token_id, vocab)
    device = input_device(model)
    return DecodeRequest(rows, max_gen_lens, eos, pad, device, make_generator(seed, generator, device))


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit integers that spreads every input bit over the output."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def batch_seed(seed: int, first_prompt_index: int) -> int:
    """The seed of the batch whose first prompt is ``first_prompt_index`` in the whole prompt set.

    ``(seed, index)`` is packed into 64 bits (seed in the high half, index in the low half), which is injective for
    seeds and indices in ``[0, 2**32)``, then mixed by a bijection. So seed ``s`` batch ``i`` never gets the stream of
    seed ``s + 1`` batch ``j`` (as ``seed + i`` would), and neighbouring seeds or batches get unrelated streams.
    Seeds outside ``[0, 2**32)`` are first hashed into it. (torch's CPU generator keeps only the low 32 bits of
    a seed, so there distinct derived seeds coincide with chance 2**-32 per pair; CUDA's keeps all 64.)
    """
    seed = int(seed)
    if not 0 <= seed < 1 << 32:
        seed = _mix64(seed & _MASK64) >> 32
    return _mix64((seed << 32) | (int(first_prompt_index) & 0xFFFFFFFF))
