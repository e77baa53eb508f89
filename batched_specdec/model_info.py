"""What the library reads off a Hugging Face causal LM: its decoder config, vocabulary size and input device."""

from __future__ import annotations

import functools
import inspect

import torch


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


def max_positions(model) -> int | None:
    """The model's ``max_position_embeddings`` (None when its config has none)."""
    return getattr(text_config(model), "max_position_embeddings", None)


def cache_keyword(model) -> str:
    """The keyword ``model``'s forward takes a cache by: ``cache`` in current transformers, ``past_key_values``
    (deprecated there, removed in 5.40) in older 5.x releases."""
    return _cache_keyword(type(model))


@functools.cache
def _cache_keyword(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
