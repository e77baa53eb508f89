"""Tiny random-weight HF causal LMs built in the tests (no hub), float32 on CPU.

One entry per model family the engine supports, each with the features that make the family differ from Llama:
Llama-3's EOS list and ``llama3`` rope scaling, Qwen2.5's q/k/v biases, Qwen3's q/k norms, Gemma-2's logit and
attention soft-capping with alternating sliding-window layers, Gemma-3's mix of sliding and full layers with
per-type rope, Phi-3's fused projections. Special ids are set inside the tiny vocabulary (the real defaults,
e.g. Phi-3's 32000, are out of range).
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "llama3": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
}

FAMILY_DEFAULTS = {
    "llama": {},
    # Llama-3: an EOS list (<|end_of_text|>, <|eom_id|>, <|eot_id|> in the real model) and llama3 rope scaling.
    "llama3": {
        "bos_token_id": 1,
        "eos_token_id": [2, 3, 4],
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    },
    # Qwen2.5: q/k/v biases, no sliding window (use_sliding_window=False, as every released Qwen2.5).
    "qwen2": {"bos_token_id": 1, "eos_token_id": 2},
    # Qwen3: RMS norms on q and k per head, explicit head_dim.
    "qwen3": {"bos_token_id": 1, "eos_token_id": 2, "head_dim": 16},
    "mistral": {"sliding_window": None},
    # Gemma-2: soft-capped attention scores and logits, sliding layers alternating with full ones. SDPA cannot
    # soft-cap, so the model refuses it.
    "gemma2": {
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 8,
        "attn_implementation": "eager",
    },
    # Gemma-3 text: sliding and full layers mixed (5:1 in the real models), a rope per layer type.
    "gemma3": {
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}},
    },
    # Phi-3: fused qkv and gate_up projections; the real special ids (32000) are past the tiny vocabulary.
    "phi3": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "sliding_window": None},
}


def _config_kwargs(arch: str, vocab_size: int, layers: int, hidden: int, max_positions: int, init_std: float,
                   overrides: dict) -> dict:
    kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
        "initializer_range": init_std,
        "tie_word_embeddings": False,
        "attn_implementation": "sdpa",
    }
    kwargs.update(FAMILY_DEFAULTS[arch])
    kwargs.update(overrides)
    layer_types = kwargs.get("layer_types")
    if layer_types is not None and len(layer_types) != kwargs["num_hidden_layers"]:
        # Repeat the family's pattern to the requested depth.
        kwargs["layer_types"] = [layer_types[i % len(layer_types)] for i in range(kwargs["num_hidden_layers"])]
    return kwargs


def tiny_causal_lm(arch: str = "llama", *, vocab_size: int = 96, seed: int = 0, layers: int = 2,
                   hidden: int = 32, max_positions: int = 256, init_std: float = 0.5, **overrides):
    """A tiny random model of family ``arch`` (a key of :data:`ARCHITECTURES`).

    A large ``init_std`` gives peaked next-token distributions, so greedy outputs have no near-ties that rounding
    could flip. ``overrides`` are config fields.
    """
    config_cls, model_cls = ARCHITECTURES[arch]
    kwargs = _config_kwargs(arch, vocab_size, layers, hidden, max_positions, init_std, overrides)
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    model = model_cls(config).eval()
    return model


def tiny_gemma3_multimodal(*, vocab_size: int = 128, seed: int = 0, layers: int = 4, hidden: int = 32,
                           init_std: float = 0.5, **text_overrides):
    """A tiny ``Gemma3ForConditionalGeneration``: a composite config whose decoder settings (vocab_size,
    num_hidden_layers, sliding_window, layer_types) live only in ``config.get_text_config()``.

    The vision tower is one 28x28 SigLIP layer (4 patches, 4 image tokens): cheap, and never run on text prompts.
    The image/boi/eoi special ids sit at the top of the vocabulary.
    """
    text_kwargs = _config_kwargs("gemma3", vocab_size, layers, hidden, 256, init_std, text_overrides)
    text_kwargs.pop("attn_implementation")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=Gemma3TextConfig(**text_kwargs), vision_config=vision.to_dict(),
                          mm_tokens_per_image=4, boi_token_index=vocab_size - 3, eoi_token_index=vocab_size - 2,
                          image_token_index=vocab_size - 1, initializer_range=init_std,
                          attn_implementation="sdpa", eos_token_id=text_kwargs["eos_token_id"],
                          tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(config).eval()


def save_tiny_model_dir(model, path) -> str:
    """Save ``model`` with ``save_pretrained`` and a word-level tokenizer (token ``i`` is ``"w{i}"``, EOS is the
    model's first EOS id) to ``path``, so that the loaders can read it like a downloaded checkpoint."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    config = model.config.get_text_config()
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(config.vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token=f"w{eos}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@torch.no_grad()
def greedy_reference(model, prompt: list[int], max_gen_len: int, eos: list[int]) -> list[int]:
    """Target-only greedy decoding with no cache: argmax of model(full sequence) at every step."""
    seq = list(prompt)
    out = []
    for _ in range(max_gen_len):
        logits = model(torch.tensor([seq])).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        seq.append(token)
        if token in eos:
            break
    return out
