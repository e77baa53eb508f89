"""Making and saving a distilled draft: its config from the target's, its start from the target's layers, its
files, and the manifest that ties it to the target it was trained for."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import LlamaConfig

from batched_specdec.drafting.heads import (
    _LAYER_KEYS,
    CONFIG_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    SubsetHeadDraft,
    target_tensor_norms,
)


def draft_config_from_target(target_config, num_layers: int, width: int | None = None) -> LlamaConfig:
    """The Llama config of a ``num_layers``-layer draft with the target's attention geometry.

    ``width`` (default: the target's hidden size) must be a multiple of the target's head dimension; a narrower
    draft keeps the head dimension and the query/KV head ratio and scales the MLP with the width."""
    kwargs = {k: getattr(target_config, k) for k in _LAYER_KEYS if getattr(target_config, k, None) is not None}
    if "head_dim" not in kwargs:
        kwargs["head_dim"] = target_config.hidden_size // target_config.num_attention_heads
    target_width = int(target_config.hidden_size)
    if width is not None and int(width) != target_width:
        head_dim = int(kwargs["head_dim"])
        if width < head_dim or width % head_dim:
            raise ValueError(f"draft width {width} must be a positive multiple of the target's head dimension "
                             f"{head_dim}")
        heads = width // head_dim
        group = max(1, int(target_config.num_attention_heads) // int(target_config.num_key_value_heads))
        kwargs.update(
            hidden_size=int(width),
            num_attention_heads=heads,
            num_key_value_heads=heads // group if heads % group == 0 else heads,
            intermediate_size=round(int(target_config.intermediate_size) * width / target_width),
        )
    config = LlamaConfig(
        vocab_size=int(target_config.vocab_size),
        num_hidden_layers=int(num_layers),
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=getattr(target_config, "bos_token_id", None),
        eos_token_id=getattr(target_config, "eos_token_id", None),
        **kwargs,
    )
    config._attn_implementation = getattr(target_config, "_attn_implementation", None) or "sdpa"
    config.target_hidden_size = target_width
    return config


def init_from_target(draft: SubsetHeadDraft, target, layer_ids: list[int] | None) -> None:
    """Copy target layers ``layer_ids`` (one per draft layer) and the final norm into the draft.

    ``None`` keeps the random initialisation of the layers (the norm is still copied)."""
    tmodel = target.model
    if draft.in_proj is not None:
        if layer_ids is not None:
            raise ValueError(f"a draft of width {draft.config.hidden_size} cannot copy layers of the target's width "
                             f"{target.config.hidden_size}; initialise it randomly")
        return
    if layer_ids is not None:
        if len(layer_ids) != len(draft.model.layers):
            raise ValueError(f"{len(layer_ids)} init layers given for a {len(draft.model.layers)}-layer draft")
        for dst, src in zip(draft.model.layers, layer_ids):
            dst.load_state_dict(tmodel.layers[src].state_dict())
    draft.model.norm.load_state_dict(tmodel.norm.state_dict())


def save_draft(draft: SubsetHeadDraft, path: str | Path, *, storage_dtype: torch.dtype = torch.bfloat16,
               metadata: dict | None = None) -> Path:
    """Write the draft's own tensors (layers, norm, head bias, subset ids) and its config to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().to("cpu", storage_dtype).contiguous()
               for k, v in draft.model.state_dict().items() if not k.startswith("embed_tokens")}
    tensors["head_bias"] = draft.head_bias.detach().to("cpu", storage_dtype).contiguous()
    for key, value in draft.extra_tensors().items():
        tensors[key] = value.detach().to("cpu", storage_dtype).contiguous()
    tensors["vocab_ids"] = draft.vocab_ids.detach().to("cpu", torch.int32).contiguous()
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": str(FORMAT_VERSION)})
    config = {"format": FORMAT_VERSION, "llama_config": draft.config.to_dict(), "subset_size": len(draft.vocab_ids),
              "vocab_size": draft.config.vocab_size, "hidden_size": draft.config.hidden_size,
              "target_hidden_size": int(draft._target_embed.weight.shape[1]), "kind": draft.kind}
    if metadata:
        config["metadata"] = metadata
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return path


def target_weights_sha256(target) -> str:
    """SHA-256 over every parameter's name, shape and float32 bytes, in name order (provenance: it identifies the
    exact weights a draft was trained with; loading checks the dtype-independent norms instead)."""
    digest = hashlib.sha256()
    for name, p in sorted(target.named_parameters()):
        digest.update(f"{name}{tuple(p.shape)}".encode())
        digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_manifest(path: str | Path, target, target_name: str, training: dict | None = None) -> Path:
    """Write ``manifest.json`` into the draft directory ``path``: the target's name, weight hash and tensor norms,
    and what the training recorded (``training``)."""
    manifest = {"target": target_name, "target_weights_sha256": target_weights_sha256(target),
                "target_tensor_norms": target_tensor_norms(target), "training": training or {}}
    out = Path(path) / MANIFEST_NAME
    out.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return out
