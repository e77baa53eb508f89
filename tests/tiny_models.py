"""Tiny random-weight HF causal LMs built in the tests (no hub), float32 on CPU."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_causal_lm(arch: str = "llama", *, vocab_size: int = 96, seed: int = 0, layers: int = 2,
                   hidden: int = 32, max_positions: int = 256, init_std: float = 0.5, **overrides):
    """A tiny random model. A large ``init_std`` gives peaked next-token distributions, so greedy outputs
    have no near-ties that rounding could flip."""
    config_cls, model_cls = ARCHITECTURES[arch]
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
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    model = model_cls(config).eval()
    return model


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
