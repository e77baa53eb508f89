"""A distilled draft that borrows the target's embedding and a vocabulary subset of its output head.

On CPU at batch 1 a draft with the full output head pays for a ``V x hidden`` matmul every token (49152 x 576
for SmolLM2-135M, a fifth of the target's own forward). This draft keeps:

* the target's token embedding module, shared at run time (not stored);
* ``N`` Llama decoder layers (trained; stored) and a final norm (stored), of the target's width or narrower; a
  narrower draft adds two trained projections (target width -> draft width after the embedding, and back before
  the head);
* an output head restricted to ``K`` frequent token ids: the target's output-embedding rows for those ids,
  gathered once at load time (not stored), plus a trained per-token bias (stored).

Its logits over the full vocabulary are ``-inf`` outside the subset. That keeps speculative decoding lossless:
the draft samples from ``q`` with zeros outside the subset and verification uses exactly that ``q``; greedy
verification compares argmaxes, and the draft's argmax is always a subset token.

:class:`FeatureHeadDraft` is the EAGLE-style variant: the same shared embedding and subset head, plus an ``fc`` that
lets its layer read the target's own final hidden state next to each token (see
:class:`batched_specdec.drafting.feature.FeatureDrafter` for how it drafts).

Files of a saved draft (:func:`batched_specdec.training.save.save_draft`): ``draft_config.json`` (the Llama config of
the layers, the target's vocabulary size, the subset size, the kind: ``"tokens"`` or ``"feature"``),
``draft.safetensors`` (layers, norm, head bias, the subset ids and the kind's extra tensors: projections of a narrower
token draft, a feature draft's ``fc``; float tensors in the storage dtype, default bfloat16). Loaded tensors take the
target's dtype. ``manifest.json`` (written by the distillation tool,
:func:`batched_specdec.training.save.write_manifest`) names the target the draft was trained for, with the SHA-256 of
that target's float32 weights and the L2 norm of each of its tensors; a draft with a manifest loads only for a target
whose tensors have the same names, shapes and norms (within :data:`NORM_TOLERANCE`, so that float32, bfloat16 and
float16 loads of the same weights all match).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel

from batched_specdec.model_info import cache_keyword

_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The cache field of transformers' model outputs (``cache`` since 5.2x; setting the old name prints a warning)."""

DEFAULT_DRAFT_DIR = Path(__file__).parent / "drafts" / "smollm2-135m-instruct"
"""Where the draft shipped for the embedded target (SmolLM2-135M-Instruct) lives inside the package."""
CONFIG_NAME = "draft_config.json"
WEIGHTS_NAME = "draft.safetensors"
MANIFEST_NAME = "manifest.json"
NORM_TOLERANCE = 1e-2
"""Relative difference allowed between a target tensor's L2 norm and the manifest's (dtype rounding is ~1e-3)."""
FORMAT_VERSION = 1
_LAYER_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "hidden_act", "rms_norm_eps", "rope_parameters", "attention_bias", "mlp_bias", "max_position_embeddings")


class DraftLoadError(ValueError):
    """A draft directory that cannot be loaded for this target; the message is one line."""


class HeadDraft(nn.Module):
    """What every draft head is: decoder layers (``self.model``, a ``LlamaModel`` whose ``last_hidden_state`` the
    drafter reads and, for a feature head, feeds back), called like an HF causal LM.

    Subclasses define :meth:`hidden_states` (the decoder's output from token ids and, for a feature head,
    ``features``) and :meth:`full_logits` (logits ``(..., V)`` over the target's vocabulary, ``-inf`` for ids the
    head lacks) and set ``config`` (its ``vocab_size`` is the target's), ``_target_embed`` (the embedding module
    :meth:`get_input_embeddings` returns) and ``_cache_kw`` (:func:`~batched_specdec.model_info.cache_keyword` of
    ``model``, read once, outside any compiled forward).
    """

    kind = "tokens"
    """What the draft reads: ``"tokens"`` (token ids only) or ``"feature"`` (the target's hidden states too)."""
    feature_layers: tuple[int, ...] | None = None
    """A feature head's target hidden states: None for the final (normed) hidden state, else the inputs of these
    target decoder layers (``output_hidden_states`` indices: 0 is the embedding), concatenated in this order."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def get_input_embeddings(self) -> nn.Module:
        return self._target_embed

    def get_decoder(self) -> nn.Module:
        """The decoder layers' model (its config is the one their attention reads)."""
        return self.model

    def forward(
        self,
        input_ids: Tensor,
        attention_mask=None,
        position_ids: Tensor | None = None,
        cache=None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
        compute_logits: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``.logits`` ``(B, Q', V)``; ``compute_logits=False`` skips the head (``.logits`` is None) for callers that
        only read the decoder's hidden states (a feature drafter's catch-up)."""
        hidden = self.hidden_states(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{self._cache_kw: cache},
            **kwargs,  # ragged_attention (each row's positions); a feature draft's features
        )
        if not compute_logits:
            return CausalLMOutputWithPast(logits=None, **{_OUTPUT_CACHE_FIELD: cache})
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.full_logits(hidden), **{_OUTPUT_CACHE_FIELD: cache})


class SubsetHeadDraft(HeadDraft):
    """``N`` decoder layers over the target's embedding, with an output head restricted to ``vocab_ids``.

    Callable like an HF causal LM (``input_ids``, 4D additive ``attention_mask``, ``position_ids``,
    ``cache``, ``use_cache``, ``logits_to_keep``) and returns ``.logits`` of shape ``(B, Q', V)`` over the
    target's full vocabulary, ``-inf`` outside the subset.

    Parameters
    ----------
    config : LlamaConfig
        From :func:`batched_specdec.training.save.draft_config_from_target`; ``vocab_size`` is the target's.
    target : PreTrainedModel
        Supplies the input embedding module (shared) and the output-embedding rows of the subset (gathered).
    vocab_ids : Tensor
        ``(K,)`` int64, distinct ids in ``0..V-1``.
    """

    def __init__(self, config: LlamaConfig, target, vocab_ids: Tensor) -> None:
        super().__init__()
        self.config = config
        inner = LlamaConfig.from_dict(config.to_dict())
        inner.vocab_size = 1  # the embedding is the target's; do not allocate a V x hidden table
        inner.pad_token_id = None
        inner._attn_implementation = config._attn_implementation
        self.model = LlamaModel(inner)
        self._cache_kw = cache_keyword(self.model)  # read once, outside any compiled forward
        # A plain attribute outside the module tree: not a parameter of the draft, not saved, never trained.
        self.__dict__["_target_embed"] = target.get_input_embeddings()
        target_width = int(target.config.hidden_size)
        if config.hidden_size != target_width:
            self.in_proj = nn.Linear(target_width, config.hidden_size, bias=False)
            self.out_proj = nn.Linear(config.hidden_size, target_width, bias=False)
        else:
            self.in_proj = self.out_proj = None
        self.model.embed_tokens = _SharedEmbedding(self._target_embed, self.in_proj)
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.int64)
        self.register_buffer("vocab_ids", vocab_ids.clone(), persistent=False)
        head = target.get_output_embeddings().weight.detach()
        self.register_buffer("head_weight", head.index_select(0, vocab_ids.to(head.device)).clone(), persistent=False)
        self.head_bias = nn.Parameter(torch.zeros(len(vocab_ids), dtype=head.dtype, device=head.device))
        self.to(device=head.device, dtype=head.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.head_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.head_weight.device

    def subset_logits(self, hidden: Tensor) -> Tensor:
        """``(..., K)`` logits over the subset from the hidden states ``(..., target width)`` of
        :meth:`hidden_states`."""
        return nn.functional.linear(hidden, self.head_weight, self.head_bias)

    def hidden_states(self, input_ids: Tensor, **kwargs) -> Tensor:
        """Final hidden states in the target's width (the draft's, projected back when it is narrower)."""
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        return hidden if self.out_proj is None else self.out_proj(hidden)

    def extra_tensors(self) -> dict[str, Tensor]:
        """Trained tensors outside the decoder and the head bias, by file key (saved and loaded by name)."""
        if self.in_proj is None:
            return {}
        return {"in_proj": self.in_proj.weight, "out_proj": self.out_proj.weight}

    def full_logits(self, hidden: Tensor) -> Tensor:
        """``(..., V)`` logits over the target's whole vocabulary, ``-inf`` outside the subset."""
        sub = self.subset_logits(hidden)
        full = sub.new_full((*sub.shape[:-1], self.config.vocab_size), float("-inf"))
        full.index_copy_(-1, self.vocab_ids, sub)
        return full


class _SharedEmbedding(nn.Module):
    """Calls the target's embedding without registering its weight as a draft parameter."""

    def __init__(self, embed: nn.Module, proj: nn.Module | None) -> None:
        super().__init__()
        self.__dict__["_embed"] = embed
        self.__dict__["_proj"] = proj  # owned (and saved) by the draft, not by this wrapper

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self._embed(input_ids)
        return x if self._proj is None else self._proj(x)


class FeatureHeadDraft(SubsetHeadDraft):
    """An EAGLE-style draft head: it reads the target's own final hidden states ("features").

    Its input at position ``i`` is the pair ``(f_i, x_{i+1})``: the target's feature at position ``i`` (the
    hidden state its head turned into the distribution of ``x_{i+1}``) and the embedding of the token that followed.
    ``fc`` maps their concatenation ``(2H)`` to ``H``; ``N`` decoder layers (one, usually) and the final norm predict
    ``f_{i+1}``; the subset head turns that into ``q(x_{i+2})``. Drafting continues on its own predicted features.
    The target's embedding and output-head rows are shared, as in :class:`SubsetHeadDraft`; the width is the
    target's.

    Called like an HF causal LM with one more keyword argument, ``features`` ``(B, Q, H)``; its decoder's final
    hidden states (``get_decoder()``'s ``last_hidden_state``) are the predicted features.
    """

    kind = "feature"

    def __init__(self, config: LlamaConfig, target, vocab_ids: Tensor) -> None:
        if int(config.hidden_size) != int(target.config.hidden_size):
            raise ValueError(f"a feature draft has the target's width {target.config.hidden_size}, got "
                             f"{config.hidden_size}")
        super().__init__(config, target, vocab_ids)
        width = int(config.hidden_size)
        self.fc = nn.Linear(2 * width, width, bias=False, device=self.device, dtype=self.dtype)
        with torch.no_grad():  # start from "embedding + feature"
            self.fc.weight.copy_(torch.cat([torch.eye(width), torch.eye(width)], dim=1))

    @property
    def feature_size(self) -> int:
        """Width of the target features it reads (the target's hidden size)."""
        return self.fc.in_features // 2

    def project_features(self, features: Tensor) -> Tensor:
        """Features in the width :meth:`pair_inputs` reads: the target's and its own are the same (unchanged)."""
        return features

    def hidden_states(self, input_ids: Tensor, features: Tensor | None = None, **kwargs) -> Tensor:
        """Predicted features ``(B, Q, H)`` from token ids ``(B, Q)`` and the features ``(B, Q, H)`` before them."""
        if features is None or features.shape[:2] != input_ids.shape or features.shape[-1] != self.fc.in_features // 2:
            raise ValueError(f"a feature draft needs features of shape {(*input_ids.shape, self.fc.in_features // 2)}, "
                             f"got {None if features is None else tuple(features.shape)}")
        return self.model(inputs_embeds=self.pair_inputs(input_ids, features), **kwargs).last_hidden_state

    def pair_inputs(self, input_ids: Tensor, features: Tensor) -> Tensor:
        """The decoder's input ``(B, Q, H)``: ``fc`` over each token's embedding and the feature before it."""
        return self.fc(torch.cat([self._target_embed(input_ids), features.to(self.dtype)], dim=-1))

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"fc": self.fc.weight}


def check_target_sizes(config: dict, target) -> None:
    """Raise :class:`DraftLoadError` unless ``target`` has the vocabulary and width the draft ``config`` was made
    for."""
    tcfg = target.config
    hidden = int(config.get("target_hidden_size", config["hidden_size"]))
    if int(config["vocab_size"]) != int(tcfg.vocab_size) or hidden != int(tcfg.hidden_size):
        raise DraftLoadError(
            f"draft was trained for a target with vocab_size={config['vocab_size']} and hidden_size="
            f"{hidden}, but this target has vocab_size={tcfg.vocab_size} and hidden_size={tcfg.hidden_size}"
        )


def target_tensor_norms(target) -> dict[str, list]:
    """``name -> [*shape, L2 norm]`` of every parameter of ``target`` (tied ones once), norms in float64."""
    return {name: [*p.shape, float(p.detach().double().norm())] for name, p in target.named_parameters()}


def check_manifest(path: str | Path, target) -> None:
    """Raise :class:`DraftLoadError` unless ``target`` is the model the draft at ``path`` was trained for (same
    tensor names and shapes, norms within :data:`NORM_TOLERANCE`); a directory without a manifest passes."""
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        return
    try:
        manifest = json.loads(file.read_text())
        want = manifest["target_tensor_norms"]
    except (ValueError, KeyError) as exc:
        raise DraftLoadError(f"draft manifest {str(file)!r} is unreadable ({exc})") from exc
    have = target_tensor_norms(target)
    trained_for = f"draft {str(path)!r} was trained for {manifest.get('target', 'another target')!r}"
    if set(have) != set(want):
        extra = sorted(set(have) ^ set(want))[:3]
        raise DraftLoadError(f"{trained_for}; this target's tensors differ by name (e.g. {extra})")
    for name, entry in want.items():
        shape, norm = entry[:-1], entry[-1]
        got_shape, got_norm = have[name][:-1], have[name][-1]
        if got_shape != shape or abs(got_norm - norm) > NORM_TOLERANCE * max(abs(norm), 1e-12):
            raise DraftLoadError(f"{trained_for}; this target's {name!r} has shape {got_shape} and norm "
                                 f"{got_norm:.6g}, expected {shape} and {norm:.6g} (another model's weights)")


def load_distilled_draft(target_model, path: str | Path = DEFAULT_DRAFT_DIR) -> SubsetHeadDraft:
    """Load a draft saved by :func:`~batched_specdec.training.save.save_draft` for ``target_model``, on its device in
    its dtype, in eval mode: a :class:`SubsetHeadDraft`, or a :class:`FeatureHeadDraft` when its config says
    ``"kind": "feature"``.

    Raises
    ------
    DraftLoadError
        The directory is missing, incomplete, was trained for a target of another vocabulary or width, or its
        manifest names other target weights (:func:`check_manifest`).
    """
    from safetensors.torch import load_file

    path = Path(path)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
    if missing:
        raise DraftLoadError(f"draft directory {str(path)!r} has no {' and no '.join(missing)}")
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
    except ValueError as exc:
        raise DraftLoadError(f"draft config {str(path / CONFIG_NAME)!r} is not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise DraftLoadError(f"draft {str(path)!r} has format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    check_target_sizes(meta, target_model)
    check_manifest(path, target_model)
    config_dict = dict(meta["llama_config"])
    config = LlamaConfig.from_dict(config_dict)
    config._attn_implementation = getattr(target_model.config, "_attn_implementation", None) or "sdpa"
    tensors = load_file(str(path / WEIGHTS_NAME))
    kinds = {cls.kind: cls for cls in (SubsetHeadDraft, FeatureHeadDraft)}
    kind = meta.get("kind", SubsetHeadDraft.kind)  # drafts saved before feature drafts existed have none
    if kind not in kinds:
        raise DraftLoadError(f"draft {str(path)!r} has kind {kind!r}, expected one of {sorted(kinds)}")
    try:
        draft = kinds[kind](config, target_model, tensors["vocab_ids"].to(torch.int64))
    except ValueError as exc:  # e.g. a feature draft whose width is not its target's
        raise DraftLoadError(f"draft {str(path)!r} does not fit this target: {exc}") from exc
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = draft.model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("embed_tokens")]
    if missing or unexpected:
        raise DraftLoadError(f"draft {str(path)!r} does not match its config: missing {missing}, unexpected "
                             f"{unexpected}")
    extra = draft.extra_tensors()
    known = {"head_bias", "vocab_ids"} | {k for k in tensors if k.startswith("model.")}
    if set(extra) != set(tensors) - known:
        raise DraftLoadError(f"draft {str(path)!r} does not match its config: expected tensors {sorted(extra)} "
                             f"besides the layers, found {sorted(set(tensors) - known)}")
    with torch.no_grad():
        draft.head_bias.copy_(tensors["head_bias"])
        for key, value in extra.items():
            value.copy_(tensors[key])
    draft.eval()
    draft.requires_grad_(False)
    return draft
