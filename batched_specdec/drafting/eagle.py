"""EAGLE-1 and EAGLE-3 draft heads, loaded from checkpoints in their public layouts.

A checkpoint is a directory with ``config.json`` (a Llama config of the head) and ``model.safetensors`` or
``pytorch_model.bin``, with the key names the EAGLE authors, SGLang's SpecForge, vLLM and SGLang write and read:

* **EAGLE-1**: ``fc.weight`` ``(H, 2H)`` (and ``fc.bias`` when present) over ``[embedding of x_{i+1}, f_i]``, where
  ``f_i`` is the target's final (normed) hidden state at position ``i``; one Llama decoder layer ``layers.0.*``
  without an input norm; no final norm. The target's output head reads the layer's output, which is also the feature
  the head's next draft reads.
* **EAGLE-3** (``architectures: ["LlamaForCausalLMEagle3"]``): ``fc.weight`` ``(H, 3T)`` over the inputs of three
  target decoder layers (``eagle_aux_hidden_state_layer_ids``, top level or in ``eagle_config``; default
  ``(2, L // 2, L - 3)`` for a target of ``L`` layers; index 0 is the embedding), ``T`` the target's width
  (``target_hidden_size``, default ``H``); one layer ``midlayer.*`` (or ``layers.0.*``) whose attention reads
  ``[input_layernorm(embedding), hidden_norm(h)]`` (``2H`` wide) and whose residual is ``h`` (``hidden_norm(h)``
  with ``norm_before_residual``); ``norm.weight``; ``lm_head.weight`` ``(K, H)`` over a draft vocabulary of ``K``
  ids, mapped to the target's by ``d2t`` (target id = draft id + ``d2t[draft id]``; ``t2d`` is not needed). Drafts
  after the first read the layer's output before ``norm`` (``h``, ``H`` wide) instead of ``fc``'s.

Either may carry ``embed_tokens.weight`` (its own embedding); without it the target's embedding is shared. Ids the
draft vocabulary lacks get draft probability 0, so drafting stays lossless. Every tensor of the directory must load
into the head and every weight of the head must come from the directory; anything else is a
:class:`~batched_specdec.drafting.heads.DraftLoadError` that names the keys or the sizes that differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel, LlamaRMSNorm

from batched_specdec.drafting.heads import DraftLoadError, HeadDraft, check_manifest
from batched_specdec.model_info import cache_keyword, text_config

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
LAYOUTS = ("eagle1", "eagle3")


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's default target layers for a target of ``num_layers`` layers: a low, a middle and a late one."""
    return (2, num_layers // 2, num_layers - 3)


class _Eagle1Layer(LlamaDecoderLayer):
    """A Llama decoder layer without its input norm (EAGLE-1's first layer reads ``fc``'s output as it is)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config, layer_idx=0)
        self.input_layernorm = nn.Identity()


class _Eagle3Layer(LlamaDecoderLayer):
    """EAGLE-3's layer: its input is ``[embedding, h]`` (``2H``); attention reads both, normed separately; the
    residual stream is ``h``; it returns ``H`` wide."""

    def __init__(self, config: LlamaConfig, norm_before_residual: bool) -> None:
        super().__init__(config, layer_idx=0)
        width = int(config.hidden_size)
        attn = self.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(2 * width, old.out_features, bias=old.bias is not None))
        self.hidden_norm = LlamaRMSNorm(width, eps=config.rms_norm_eps)
        self.norm_before_residual = norm_before_residual

    def forward(self, hidden_states: Tensor, **kwargs) -> Tensor:
        width = self.hidden_norm.weight.shape[0]
        embeds, hidden = hidden_states[..., :width], hidden_states[..., width:]
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        attended, _ = self.self_attn(hidden_states=torch.cat([self.input_layernorm(embeds), normed], dim=-1),
                                     **kwargs)
        hidden = residual + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class EagleDraft(HeadDraft):
    """An EAGLE-1 or EAGLE-3 head over a held target (see the module docstring for both layouts).

    Called like an HF causal LM with one more keyword argument, ``features`` ``(B, Q, F)``: the target's features
    (``F`` = :attr:`feature_size`) or the head's own predicted ones (``H``). Its decoder's ``last_hidden_state`` is
    the predicted feature a next draft reads.

    Parameters
    ----------
    config : LlamaConfig
        The head's layer config; ``vocab_size`` is the target's.
    target : PreTrainedModel
        Supplies the embedding (unless ``own_embedding``) and, for EAGLE-1, the output head (shared, not copied).
    layout : str
        ``"eagle1"`` or ``"eagle3"``.
    feature_layers : tuple of int, optional
        EAGLE-3's three target layers (inputs of those decoder layers).
    vocab_ids : Tensor, optional
        EAGLE-3: ``(K,)`` int64 target ids of the draft vocabulary (``arange(K) + d2t``).
    """

    kind = "feature"

    def __init__(self, config: LlamaConfig, target, *, layout: str, feature_layers=None, vocab_ids=None,
                 fc_bias: bool = False, own_embedding: bool = False, norm_before_residual: bool = False) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.config, self.layout = config, layout
        width, target_width = int(config.hidden_size), int(text_config(target).hidden_size)
        inner = LlamaConfig.from_dict({**config.to_dict(), "pad_token_id": None, "num_hidden_layers": 1})
        inner.vocab_size = 1  # the embedding is the target's or the head's own: no V x H table in the decoder
        inner._attn_implementation = config._attn_implementation
        self.model = LlamaModel(inner)
        self.model.embed_tokens = None  # inputs arrive as embeddings (pair_inputs)
        self.model.norm = nn.Identity()  # the last hidden state is the feature fed back; the head norms it itself
        self._cache_kw = cache_keyword(self.model)
        if own_embedding:
            self.embed_tokens = nn.Embedding(int(config.vocab_size), width)
        elif width != target_width:
            raise ValueError(f"a head without its own embedding has the target's width {target_width}, got {width}")
        self.__dict__["_target_embed"] = self.embed_tokens if own_embedding else target.get_input_embeddings()
        if layout == "eagle3":
            if 3 * target_width == width:
                raise ValueError(f"an EAGLE-3 head of width {width} cannot tell the target's fused features "
                                 "from its own")
            self.model.layers[0] = _Eagle3Layer(inner, norm_before_residual)
            self.fc = nn.Linear(3 * target_width, width, bias=False)
            self.norm = LlamaRMSNorm(width, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(width, len(vocab_ids), bias=False)
            self.register_buffer("vocab_ids", torch.as_tensor(vocab_ids, dtype=torch.int64).clone(), persistent=False)
            self.feature_layers = tuple(int(i) for i in feature_layers)
            num_layers = int(text_config(target).num_hidden_layers)
            if not all(0 <= i < num_layers for i in self.feature_layers):
                raise ValueError(f"feature layers {list(self.feature_layers)} are outside the target's {num_layers}")
            self.feature_size = 3 * target_width
        else:
            self.model.layers[0] = _Eagle1Layer(inner)
            self.fc = nn.Linear(2 * width, width, bias=fc_bias)
            self.__dict__["_target_head"] = target.get_output_embeddings()
            self.feature_size = width
        head = target.get_output_embeddings().weight
        self.to(device=head.device, dtype=head.dtype)

    def project_features(self, features: Tensor) -> Tensor:
        """Features in the head's width ``H``: EAGLE-3's ``fc`` over the target's fused ones; its own (and
        EAGLE-1's, which ``fc`` reads with the embedding) unchanged."""
        features = features.to(self.dtype)
        return self.fc(features) if self.layout == "eagle3" and features.shape[-1] == self.feature_size else features

    def pair_inputs(self, input_ids: Tensor, hidden: Tensor) -> Tensor:
        """The layer's input at each pair from token ids ``(B, Q)`` and features in the head's width ``(B, Q, H)``."""
        embeds = self._target_embed(input_ids).to(self.dtype)
        if self.layout == "eagle3":
            return torch.cat([embeds, hidden], dim=-1)
        return self.fc(torch.cat([embeds, hidden], dim=-1))

    def hidden_states(self, input_ids: Tensor, features: Tensor | None = None, **kwargs) -> Tensor:
        """Predicted features ``(B, Q, H)`` from token ids ``(B, Q)`` and the features before them."""
        widths = {self.feature_size, int(self.config.hidden_size)}
        if features is None or features.shape[:2] != input_ids.shape or features.shape[-1] not in widths:
            raise ValueError(f"an {self.layout} head needs features of shape {(*input_ids.shape, self.feature_size)} "
                             f"(or its own, {self.config.hidden_size} wide), got "
                             f"{None if features is None else tuple(features.shape)}")
        inputs = self.pair_inputs(input_ids, self.project_features(features))
        return self.model(inputs_embeds=inputs, **kwargs).last_hidden_state

    def subset_logits(self, hidden: Tensor) -> Tensor:
        """EAGLE-3: ``(..., K)`` logits over the draft vocabulary; EAGLE-1: ``(..., V)`` (the target's head)."""
        if self.layout == "eagle3":
            return self.lm_head(self.norm(hidden))
        head = self._target_head
        return nn.functional.linear(hidden, head.weight, head.bias)

    def full_logits(self, hidden: Tensor) -> Tensor:
        """``(..., V)`` logits over the target's vocabulary, ``-inf`` for ids the draft vocabulary lacks."""
        sub = self.subset_logits(hidden)
        if self.layout == "eagle1":
            return sub
        full = sub.new_full((*sub.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.vocab_ids, sub)


def is_eagle_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory in an EAGLE layout: an EAGLE-3 architecture in its config, or a one-layer
    config whose weights have ``fc.weight`` (EAGLE-1)."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    if any(a in EAGLE3_ARCHITECTURES for a in config.get("architectures") or ()):
        return True
    return config.get("num_hidden_layers") == 1 and "fc.weight" in _weight_keys(path)


def _weights_file(path: Path) -> Path | None:
    return next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)


def _weight_keys(path: Path) -> set[str]:
    file = _weights_file(path)
    if file is None:
        return set()
    return {_public_key(k) for k in _read_weights(file)}


def _read_weights(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def _public_key(key: str) -> str:
    """A key in the head's own names: a leading ``model.`` dropped, ``midlayer.`` read as ``layers.0.``."""
    key = key.removeprefix("model.")
    return "layers.0." + key.removeprefix("midlayer.") if key.startswith("midlayer.") else key


def load_eagle_draft(target, path: str | Path) -> EagleDraft:
    """Load the EAGLE-1 or EAGLE-3 checkpoint in ``path`` for ``target``, on its device in its dtype, in eval mode.

    Raises
    ------
    DraftLoadError
        A missing or unreadable file; a head that does not fit the target (vocabulary, width, feature layers
        outside the target's layer count), naming what differs; weights that do not all load (missing or unexpected
        keys, shapes); a ``manifest.json`` that names other target weights.
    """
    path = Path(path)
    file = _weights_file(path)
    if not (path / CONFIG_FILE).is_file() or file is None:
        raise DraftLoadError(f"EAGLE checkpoint {str(path)!r} needs {CONFIG_FILE} and one of "
                             f"{' or '.join(WEIGHT_FILES)}")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
        tensors = {_public_key(k): v for k, v in _read_weights(file).items()}
    except Exception as exc:  # JSON, safetensors and pickle errors alike: the file is unreadable
        raise DraftLoadError(f"EAGLE checkpoint {str(path)!r} is unreadable ({type(exc).__name__}: {exc})") from exc
    check_manifest(path, target)
    layout, kwargs = _layout_of(meta, tensors, target, path)
    config = LlamaConfig.from_dict({k: v for k, v in meta.items() if k not in ("architectures", "auto_map")})
    config._attn_implementation = getattr(text_config(target), "_attn_implementation", None) or "sdpa"
    try:
        draft = EagleDraft(config, target, layout=layout, **kwargs)
    except ValueError as exc:
        raise DraftLoadError(f"EAGLE checkpoint {str(path)!r} does not fit this target: {exc}") from exc
    _load_weights(draft, tensors, path)
    draft.eval()
    draft.requires_grad_(False)
    return draft


def _layout_of(meta: dict, tensors: dict[str, Tensor], target, path: Path) -> tuple[str, dict]:
    """The layout and :class:`EagleDraft` keyword arguments of a checkpoint, after checking it fits ``target``."""
    tcfg = text_config(target)
    name = f"EAGLE checkpoint {str(path)!r}"
    if "fc.weight" not in tensors:
        raise DraftLoadError(f"{name} has no fc.weight: not an EAGLE-1 or EAGLE-3 head")
    if int(meta.get("num_hidden_layers", 1)) != 1:
        raise DraftLoadError(f"{name} has {meta['num_hidden_layers']} layers; heads of one layer are supported")
    vocab, width = int(meta.get("vocab_size", -1)), int(meta.get("hidden_size", -1))
    target_width = int(meta.get("target_hidden_size") or width)
    if vocab != int(tcfg.vocab_size) or target_width != int(tcfg.hidden_size):
        raise DraftLoadError(f"{name} was made for a target with vocab_size={vocab} and hidden_size={target_width}; "
                             f"this target has vocab_size={tcfg.vocab_size} and hidden_size={tcfg.hidden_size}")
    fc_in = int(tensors["fc.weight"].shape[-1])
    eagle3 = any(a in EAGLE3_ARCHITECTURES for a in meta.get("architectures") or ()) or fc_in == 3 * target_width
    kwargs = {"own_embedding": "embed_tokens.weight" in tensors}
    if not eagle3:
        return "eagle1", {**kwargs, "fc_bias": "fc.bias" in tensors}
    eagle_config = meta.get("eagle_config") or {}
    layers = (meta.get("eagle_aux_hidden_state_layer_ids") or eagle_config.get("eagle_aux_hidden_state_layer_ids")
              or default_feature_layers(int(tcfg.num_hidden_layers)))
    if len(layers) != 3 or not all(0 <= int(i) < int(tcfg.num_hidden_layers) for i in layers):
        raise DraftLoadError(f"{name} reads target layers {list(layers)}; this target has {tcfg.num_hidden_layers} "
                             f"layers (three ids in 0..{int(tcfg.num_hidden_layers) - 1} expected)")
    draft_vocab = int(meta.get("draft_vocab_size") or vocab)
    offsets = tensors.pop("d2t", None)
    tensors.pop("t2d", None)
    if (offsets is None and draft_vocab != vocab) or (offsets is not None and tuple(offsets.shape) != (draft_vocab,)):
        raise DraftLoadError(f"{name} has draft_vocab_size={draft_vocab} but d2t of shape "
                             f"{None if offsets is None else tuple(offsets.shape)} (expected ({draft_vocab},))")
    ids = torch.arange(draft_vocab) + (0 if offsets is None else offsets.to(torch.int64).cpu())
    if int(ids.min()) < 0 or int(ids.max()) >= vocab or len(torch.unique(ids)) != draft_vocab:
        raise DraftLoadError(f"{name} maps its draft vocabulary (d2t) to ids outside 0..{vocab - 1} or to one id twice")
    return "eagle3", {**kwargs, "feature_layers": tuple(int(i) for i in layers), "vocab_ids": ids,
                      "norm_before_residual": bool(meta.get("norm_before_residual", False))}


def _load_weights(draft: EagleDraft, tensors: dict[str, Tensor], path: Path) -> None:
    """Copy ``tensors`` (public key names) into ``draft``: every one must have a home of its shape, and every
    weight of the head must be among them."""
    params = {_public_key(k): p for k, p in draft.named_parameters()}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(params[k].shape)})"
             for k in sorted(set(params) & set(tensors)) if tensors[k].shape != params[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{label} {items[:6]}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong)) if items]
        raise DraftLoadError(f"EAGLE checkpoint {str(path)!r} does not load into a {draft.layout} head: "
                             f"{'; '.join(parts)}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
