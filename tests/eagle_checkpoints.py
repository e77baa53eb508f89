"""EAGLE-1 and EAGLE-3 checkpoints written in their public layouts (key names and config fields as the EAGLE
authors, SpecForge, vLLM and SGLang use them), with random weights, for tiny targets; and direct re-implementations
of both layouts' forwards in plain torch, written from the layout descriptions, to check a loaded head against."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from batched_specdec.model_info import text_config


def _geometry(target) -> dict:
    cfg = text_config(target)
    width = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    return {"width": width, "heads": heads, "kv_heads": int(cfg.num_key_value_heads),
            "head_dim": int(getattr(cfg, "head_dim", None) or width // heads), "inter": 2 * width,
            "vocab": int(cfg.vocab_size)}


def _config(target, extra: dict) -> dict:
    g = _geometry(target)
    return {"model_type": "llama", "hidden_size": g["width"], "intermediate_size": g["inter"],
            "num_attention_heads": g["heads"], "num_key_value_heads": g["kv_heads"], "head_dim": g["head_dim"],
            "num_hidden_layers": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": 256, "vocab_size": g["vocab"], "tie_word_embeddings": False, **extra}


def _layer(prefix: str, g: dict, qkv_in: int, gen: torch.Generator, std: float) -> dict:
    def rand(*shape):
        return torch.randn(*shape, generator=gen) * std

    def norm():
        return 1 + 0.1 * torch.randn(g["width"], generator=gen)

    w, hd = g["width"], g["head_dim"]
    return {
        f"{prefix}self_attn.q_proj.weight": rand(g["heads"] * hd, qkv_in),
        f"{prefix}self_attn.k_proj.weight": rand(g["kv_heads"] * hd, qkv_in),
        f"{prefix}self_attn.v_proj.weight": rand(g["kv_heads"] * hd, qkv_in),
        f"{prefix}self_attn.o_proj.weight": rand(w, g["heads"] * hd),
        f"{prefix}mlp.gate_proj.weight": rand(g["inter"], w),
        f"{prefix}mlp.up_proj.weight": rand(g["inter"], w),
        f"{prefix}mlp.down_proj.weight": rand(w, g["inter"]),
        f"{prefix}post_attention_layernorm.weight": norm(),
    }


def _save(path: Path, config: dict, tensors: dict, fmt: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    else:
        torch.save(tensors, path / "pytorch_model.bin")
    return path


def write_eagle3(path, target, *, draft_vocab: int | None = None, layer_ids=None, seed: int = 0, std: float = 0.3,
                 fmt: str = "safetensors", embed: bool = False, drop=(), add=None, config_extra=None) -> Path:
    """An EAGLE-3 head for ``target`` (``LlamaForCausalLMEagle3``): ``draft_vocab`` ids (default: the target's
    whole vocabulary) chosen at random and mapped by ``d2t``; ``layer_ids`` in ``eagle_config`` (None: not written,
    so the public default applies). ``drop``/``add`` remove or add tensors (to make broken checkpoints)."""
    g = _geometry(target)
    gen = torch.Generator().manual_seed(seed)
    vocab = g["vocab"]
    k = vocab if draft_vocab is None else draft_vocab
    ids = torch.randperm(vocab, generator=gen)[:k].sort().values
    tensors = {
        "fc.weight": torch.randn(g["width"], 3 * g["width"], generator=gen) * std,
        "midlayer.input_layernorm.weight": 1 + 0.1 * torch.randn(g["width"], generator=gen),
        "midlayer.hidden_norm.weight": 1 + 0.1 * torch.randn(g["width"], generator=gen),
        **_layer("midlayer.", g, 2 * g["width"], gen, std),
        "norm.weight": 1 + 0.1 * torch.randn(g["width"], generator=gen),
        "lm_head.weight": torch.randn(k, g["width"], generator=gen),
        "d2t": ids - torch.arange(k),
        "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, ids, True),
    }
    if embed:
        tensors["embed_tokens.weight"] = torch.randn(vocab, g["width"], generator=gen)
    extra = {"architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": k, **(config_extra or {})}
    if layer_ids is not None:
        extra["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(layer_ids), "use_aux_hidden_state": True}
    tensors = {key: v for key, v in tensors.items() if key not in drop} | (add or {})
    return _save(Path(path), _config(target, extra), tensors, fmt)


def write_eagle1(path, target, *, seed: int = 0, std: float = 0.3, fmt: str = "bin", bias: bool = True,
                 drop=(), add=None) -> Path:
    """An EAGLE-1 head for ``target`` (``fc`` with a bias by default, ``layers.0.*`` without an input norm; the
    public EAGLE-1 checkpoints are ``pytorch_model.bin``)."""
    g = _geometry(target)
    gen = torch.Generator().manual_seed(seed)
    tensors = {"fc.weight": torch.randn(g["width"], 2 * g["width"], generator=gen) * std,
               **_layer("layers.0.", g, g["width"], gen, std)}
    if bias:
        tensors["fc.bias"] = torch.randn(g["width"], generator=gen) * 0.1
    tensors = {key: v for key, v in tensors.items() if key not in drop} | (add or {})
    return _save(Path(path), _config(target, {"architectures": ["LlamaForCausalLM"]}), tensors, fmt)


# --- direct re-implementations (no cache, one sequence per row, causal) -------------------------------------------


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta: float = 10000.0):
    """Rotary embedding of ``x`` ``(B, heads, T, d)`` at positions ``0..T-1`` (the half-split convention)."""
    d, t = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _attention_mlp(x_attn, residual, w: dict, prefix: str, g: dict):
    """One layer's attention over ``x_attn`` ``(B, T, in)`` with residual ``residual``, then its MLP."""
    b, t, _ = x_attn.shape
    hd = g["head_dim"]

    def heads(name, n):
        return (x_attn @ w[f"{prefix}self_attn.{name}.weight"].T).view(b, t, n, hd).transpose(1, 2)

    q, k, v = _rope(heads("q_proj", g["heads"])), _rope(heads("k_proj", g["kv_heads"])), heads("v_proj", g["kv_heads"])
    rep = g["heads"] // g["kv_heads"]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1) @ w[f"{prefix}self_attn.o_proj.weight"].T
    h = residual + out
    m = _rms(h, w[f"{prefix}post_attention_layernorm.weight"])
    gate, up = m @ w[f"{prefix}mlp.gate_proj.weight"].T, m @ w[f"{prefix}mlp.up_proj.weight"].T
    return h + (torch.nn.functional.silu(gate) * up) @ w[f"{prefix}mlp.down_proj.weight"].T


def reference_eagle3(w: dict, target, tokens, features):
    """EAGLE-3 logits ``(B, T, V)`` (``-inf`` outside the draft vocabulary) and pre-norm outputs ``(B, T, H)`` at
    pairs ``(features[:, i], tokens[:, i])``; ``features`` are the target's fused ones ``(B, T, 3H)``."""
    g = _geometry(target)
    embed = target.get_input_embeddings().weight
    e = embed[tokens]
    h = features @ w["fc.weight"].T
    x = torch.cat([_rms(e, w["midlayer.input_layernorm.weight"]), _rms(h, w["midlayer.hidden_norm.weight"])], -1)
    out = _attention_mlp(x, h, w, "midlayer.", g)
    sub = _rms(out, w["norm.weight"]) @ w["lm_head.weight"].T
    ids = torch.arange(len(w["d2t"])) + w["d2t"]
    full = sub.new_full((*sub.shape[:-1], g["vocab"]), float("-inf"))
    full[..., ids] = sub
    return full, out


def reference_eagle1(w: dict, target, tokens, features):
    """EAGLE-1 logits ``(B, T, V)`` and outputs ``(B, T, H)`` at pairs ``(features[:, i], tokens[:, i])``."""
    g = _geometry(target)
    e = target.get_input_embeddings().weight[tokens]
    x = torch.cat([e, features], -1) @ w["fc.weight"].T + w.get("fc.bias", 0)
    out = _attention_mlp(x, x, w, "layers.0.", g)
    return out @ target.get_output_embeddings().weight.T, out


def target_features(target, tokens, layer_ids=None):
    """The target's features of ``tokens`` by a plain HF forward: the final hidden states (``layer_ids`` None) or
    ``output_hidden_states[i]`` of each layer id, concatenated."""
    out = target(tokens, output_hidden_states=True)
    if layer_ids is None:
        return out.hidden_states[-1]
    return torch.cat([out.hidden_states[i] for i in layer_ids], -1)
