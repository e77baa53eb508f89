"""A transformers ``GenerationConfig`` resolved for :func:`~batched_specdec.generate` the way ``model.generate``
resolves it: keyword overrides, then the caller's ``GenerationConfig``, then the target's own ``generation_config``,
then transformers' global defaults. Settings that would make the output differ from what the target would have
produced are refused by name; sampling settings under greedy decoding are ignored with a warning, as
``model.generate`` ignores them.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from dataclasses import dataclass

from batched_specdec.checks import OptionError, check_positive_int
from batched_specdec.processors import GreedyProcessor, LogitsProcessor, make_processor

DEFAULT_MAX_NEW_TOKENS = 256
"""New tokens per prompt when neither the caller nor the target's generation config sets ``max_new_tokens`` (the
default of transformers' text-generation pipeline; ``model.generate``'s ``max_length=20`` counts the prompt, which
leaves nothing for a chat prompt)."""

HONOURED = ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "max_length", "eos_token_id")
"""GenerationConfig fields that :func:`generate` applies."""

TRANSFORMERS_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
"""transformers' global defaults of the honoured sampling fields (``GenerationConfig._get_default_generation_params``):
with ``do_sample=True`` and nothing else set, ``model.generate`` samples with top-k 50, and so does :func:`generate`."""

NO_EFFECT = frozenset({
    # ids and switches that never change which tokens come out (pad is internal to the engine)
    "pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache", "renormalize_logits",
    # outputs and caching: the ragged cache replaces transformers' caches
    "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
    "cache_implementation", "cache_config", "max_cache_len", "prefill_chunk_size", "compile_config",
    "disable_compile", "continuous_batching_config", "low_memory",
    # beam-search-only knobs (num_beams > 1 is refused)
    "early_stopping", "length_penalty",
    # transformers' own assisted decoding, which is lossless like ours (the lossy ensemble weight is refused)
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "assistant_lookbehind", "target_lookbehind", "prompt_lookup_num_tokens", "max_matching_ngram_size",
    "assistant_early_exit", "is_assistant", "speculation_type",
})
"""GenerationConfig fields accepted whatever their value, because they cannot change the generated tokens."""

NEUTRAL = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "num_beams": 1, "num_beam_groups": 1,
    "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "min_length": 0,
    "min_new_tokens": 0, "num_return_sequences": 1, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "guidance_scale": 1.0, "remove_invalid_values": False, "token_healing": False, "use_mtp": False,
}
"""Values at which a field :func:`generate` does not implement changes nothing (transformers applies no processor).
Any other value of any other field is refused."""

SAMPLING_ONLY = frozenset({"min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"})
"""Fields transformers applies only when sampling; with greedy decoding they change nothing."""


@dataclass
class SamplingSettings:
    """The resolved decoding settings of a :func:`generate` call.

    ``max_new_tokens`` is None when the caller gave ``max_length`` instead (then each prompt gets
    ``max_length - len(prompt)``); with both None each prompt gets :data:`DEFAULT_MAX_NEW_TOKENS`, capped to what
    fits the model's ``max_position_embeddings``. ``eos_token_id`` None leaves the choice to the engine (the
    tokenizer's EOS).
    ``sources`` names where each field's value came from.
    """

    processor: LogitsProcessor
    max_new_tokens: int | None
    max_length: int | None
    eos_token_id: int | list[int] | None
    sources: dict[str, str]


@functools.lru_cache(maxsize=1)
def _generation_config_fields() -> dict:
    """Every field of a fresh ``GenerationConfig`` with its default value (all None in transformers >= 5.2x)."""
    from transformers import GenerationConfig

    return {k: v for k, v in GenerationConfig().to_dict().items() if not k.startswith("_")}


def _set_fields(config, name: str, *, strict: bool) -> dict:
    """The fields of ``config`` that differ from a fresh ``GenerationConfig``. Entries that are not GenerationConfig
    fields are an error in the caller's config (``strict``) and ignored in a model's (hub configs carry extras)."""
    if config is None:
        return {}
    from transformers import GenerationConfig

    if not isinstance(config, GenerationConfig):
        raise OptionError(f"{name} must be a transformers.GenerationConfig or None, got {type(config).__name__}")
    known = _generation_config_fields()
    fields = {}
    for key, value in config.to_diff_dict().items():
        if key.startswith("_") or key == "transformers_version" or value is None:
            continue
        if key not in known:
            if strict:
                raise OptionError(f"{name} has {key}={value!r}, which is not a GenerationConfig field")
            continue
        fields[key] = value
    return fields


def _is_neutral(name: str, value) -> bool:
    if value is None or (isinstance(value, (list, tuple, dict)) and len(value) == 0):
        return True
    if name in NEUTRAL and value == NEUTRAL[name]:
        return True
    default = _generation_config_fields().get(name)
    return default is not None and value == default


def _refuse_unsupported(effective: dict, sources: dict, do_sample: bool) -> None:
    for name, value in effective.items():
        if name in HONOURED or name in NO_EFFECT or (name in SAMPLING_ONLY and not do_sample):
            continue
        if _is_neutral(name, value):
            continue
        hint = ""
        if name in NEUTRAL and sources[name] != "a keyword argument":
            hint = f"; pass {name}={NEUTRAL[name]!r} to generate() to decode without it"
        raise OptionError(
            f"{name}={value!r} (from {sources[name]}) is not supported: generate() applies only "
            f"{', '.join(HONOURED)}, and ignoring {name} would change the output{hint}"
        )


def _sampling_processor(effective: dict) -> LogitsProcessor:
    """The processor ``model.generate`` would apply: temperature, then top-k (0 is off), then top-p (1.0 is off)."""
    if not bool(effective.get("do_sample", TRANSFORMERS_DEFAULTS["do_sample"])):
        return GreedyProcessor()
    temperature = effective.get("temperature", TRANSFORMERS_DEFAULTS["temperature"])
    top_k = effective.get("top_k", TRANSFORMERS_DEFAULTS["top_k"])
    top_p = effective.get("top_p", TRANSFORMERS_DEFAULTS["top_p"])
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise OptionError(f"temperature={temperature!r} with do_sample=True: expected a float > 0 "
                         "(use do_sample=False for greedy decoding)")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise OptionError(f"top_k={top_k!r}: expected an int >= 0 (0 turns top-k off)")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise OptionError(f"top_p={top_p!r}: expected a float in (0, 1] (1.0 turns top-p off)")
    return make_processor(float(temperature), int(top_k) if top_k else None, float(top_p) if top_p < 1 else None)


def _warn_ignored_sampling(effective: dict, sources: dict, model_source: str) -> None:
    """Warn, as ``model.generate`` does, that sampling settings the caller set do nothing without ``do_sample``
    (greedy decoding ignores them; the target's own generation_config is not warned about)."""
    ignored = [f"{k}={effective[k]!r}" for k in ("temperature", "top_k", "top_p", *sorted(SAMPLING_ONLY))
               if k in effective and sources[k] != model_source and not _is_neutral(k, effective[k])
               and not (k in TRANSFORMERS_DEFAULTS and effective[k] == TRANSFORMERS_DEFAULTS[k])]
    if ignored:
        warnings.warn(f"do_sample is not True, so {', '.join(ignored)} only apply to sampling and are ignored: "
                      "generate() decodes greedily, as model.generate does (pass do_sample=True to sample)",
                      UserWarning, stacklevel=4)


def resolve_sampling(target, generation_config=None, **overrides) -> SamplingSettings:
    """Resolve the decoding settings as ``model.generate`` does, and refuse what cannot be honoured exactly.

    A field's value comes from the first of: the keyword ``overrides``, ``generation_config``, the target's
    ``generation_config``, transformers' global defaults (:data:`TRANSFORMERS_DEFAULTS`). So a model whose
    ``generation_config.json`` sets ``do_sample=True`` samples by default, as ``model.generate`` would; pass
    ``do_sample=False`` for greedy decoding. Two deliberate differences: ``max_length`` counts only when the caller
    sets it (a model's ``max_length`` is usually its context size, not a wish), and with neither
    ``max_new_tokens`` nor ``max_length`` set each prompt gets :data:`DEFAULT_MAX_NEW_TOKENS` new tokens (fewer
    where the model's context ends sooner).

    Raises
    ------
    TypeError
        An override that is not a GenerationConfig field, or a ``generation_config`` of the wrong type.
    ValueError
        A set field that would change the output (repetition penalty, beams, min length, ...), named with its value
        and where it came from, or a bad value of an honoured field.
    """
    known = _generation_config_fields()
    for key in overrides:
        if key not in known:
            raise OptionError(f"generate() got an unexpected keyword argument {key!r}; generation settings are "
                            f"GenerationConfig fields: {', '.join(HONOURED)} (others are refused)")
    model_config = getattr(target, "generation_config", None)
    layers = [
        ("a keyword argument", {k: v for k, v in overrides.items() if v is not None}),
        ("generation_config", _set_fields(generation_config, "generation_config", strict=True)),
        ("the target's generation_config", _set_fields(model_config, "target.generation_config", strict=False)),
    ]
    effective, sources = {}, {}
    for source, fields in reversed(layers):  # lowest precedence first, so each higher layer overwrites
        for key, value in fields.items():
            effective[key], sources[key] = value, source
    do_sample = bool(effective.get("do_sample", False))
    _refuse_unsupported(effective, sources, do_sample)
    if not do_sample:
        _warn_ignored_sampling(effective, sources, layers[2][0])
    processor = _sampling_processor(effective)
    max_new = effective.get("max_new_tokens")
    if max_new is not None:
        max_new = check_positive_int("max_new_tokens", max_new)
    max_length = effective.get("max_length") if sources.get("max_length") != layers[2][0] else None
    if max_length is not None:
        max_length = check_positive_int("max_length", max_length)
    return SamplingSettings(processor, max_new, None if max_new is not None else max_length,
                            effective.get("eos_token_id"), sources)
