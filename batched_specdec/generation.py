"""Text in, text out: :func:`generate` takes strings (or token ids) and a transformers ``GenerationConfig``.

It resolves the sampling settings the way ``model.generate`` does (keyword overrides, then the caller's
``GenerationConfig``, then the target's own ``generation_config``, then transformers' global defaults), refuses every
setting that would make the output differ from what the target would have produced, encodes the prompts (chat
template applied when the tokenizer has one), decodes them in internal batches with
:func:`~batched_specdec.speculative_generate_batch` (or :func:`~batched_specdec.autoregressive_generate_batch` with
``draft=None``), and returns texts and token ids in prompt order.

The module is ``generation`` rather than ``generate`` so that the package attribute ``batched_specdec.generate`` is
the function: importing a submodule of the same name would rebind it to the module.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from batched_specdec.checks import OptionError, check_positive_int, check_seed
from batched_specdec.controller import AdaptiveSpeculation, StaticSpeculation
from batched_specdec.decode.stats import GenerationStats
from batched_specdec.drafting import as_drafter
from batched_specdec.model_info import input_device, max_positions, vocab_size
from batched_specdec.options import normalise_prompts, resolve_options
from batched_specdec.processors import GreedyProcessor, LogitsProcessor, make_processor
from batched_specdec.prompts import encode_prompts
from batched_specdec.ragged_cache import PREFILL_CHUNK
from batched_specdec.runner import PromptResult, check_schedule, decode_prompt_set

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "GenerationResult", "SamplingSettings", "generate", "resolve_sampling"]

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


@dataclass
class GenerationResult:
    """What :func:`generate` returns; every per-prompt list is in prompt order.

    Attributes
    ----------
    texts : list of str or None
        Each prompt's continuation decoded with special tokens skipped; None when no tokenizer was given.
    token_ids : list of list of int
        Each prompt's continuation (prompt excluded), ending after its first EOS or at its token budget.
    stats : GenerationStats
        All batches merged: per-row lists (``accepted``, ``proposed``, ``generated``, ``logprobs``) in prompt order,
        counts and times summed over batches (they run one after another), ``tokens_per_s`` over the summed decode
        time, histograms summed, peak memory the largest; see :func:`~batched_specdec.decode.stats.merge_stats`.
    batch_stats : list of GenerationStats
        Each session's own stats, in the order they ran (one with the continuous schedule, one per batch with the
        static one).
    batches : list of list of int
        The prompt indices of each session.
    finish_reasons : list of str
        Why each prompt's generation ended: ``"stop"`` at an EOS id, ``"length"`` at its token budget.
    num_generated_tokens : list of int
        Each prompt's number of generated tokens (``len(token_ids[i])``).
    logprobs : list of list of float or None
        With ``return_logprobs=True``: per emitted token, the target's log-probability under the processed
        distribution it was sampled from (aligned with ``token_ids``).
    """

    texts: list[str] | None
    token_ids: list[list[int]]
    stats: GenerationStats
    batch_stats: list[GenerationStats]
    batches: list[list[int]]
    finish_reasons: list[str]
    num_generated_tokens: list[int]
    logprobs: list[list[float]] | None = None


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


def _encode(prompts, tokenizer, chat_template: bool | None) -> list:
    """Token ids of every prompt: strings through the tokenizer (and chat template), id sequences as they are."""
    if isinstance(prompts, (str, bytes, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise OptionError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__} "
                        "(wrap a single prompt in a list)")
    if len(prompts) == 0:
        raise OptionError("prompts is empty: expected at least one prompt")
    if chat_template not in (None, True, False):
        raise OptionError(f"chat_template must be None (apply when the tokenizer has one), True or False, "
                         f"got {chat_template!r}")
    is_text = [isinstance(p, str) for p in prompts]
    if not any(is_text):
        if chat_template:
            raise OptionError("chat_template=True needs string prompts; token-id prompts are used as they are")
        return list(prompts)
    if not all(is_text):
        first_ids = is_text.index(False)
        raise OptionError(f"prompts mix strings and token ids (prompt {is_text.index(True)} is a string, prompt "
                         f"{first_ids} is {type(prompts[first_ids]).__name__}): pass all strings or all token ids")
    if tokenizer is None:
        raise OptionError("string prompts need a tokenizer: pass tokenizer= (load_target returns one), "
                         "or pass token-id lists")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise OptionError("chat_template=True but the tokenizer has no chat template; pass chat_template=False "
                         "to encode the prompts as plain text")
    return encode_prompts(tokenizer, list(prompts), chat_template=chat_template)


def _resolve_draft(draft, target, tokenizer, attention: str, prefill_chunk: int, compile: bool):
    """A drafter for ``draft`` (None: target-only decoding), checked before any compute; a draft model loaded from a
    spec must share ``tokenizer`` (where both are at hand)."""
    if draft is None:
        return None
    if isinstance(draft, str):
        from batched_specdec.models import load_draft

        draft = load_draft(draft, target, device=input_device(target), dtype=target.dtype, quiet=True,
                           target_tokenizer=tokenizer)
    return as_drafter(draft, vocab_size(target), attention=attention, prefill_chunk=prefill_chunk, compile=compile)


def _max_gen_lens(rows: list[list[int]], settings: SamplingSettings, positions: int | None) -> list[int]:
    """Each prompt's token budget: ``max_new_tokens``, else what ``max_length`` leaves, else the default (capped to
    the model's context; a prompt that fills it is left to the engine's position check)."""
    if settings.max_new_tokens is not None:
        return [settings.max_new_tokens] * len(rows)
    if settings.max_length is None:
        cap = [DEFAULT_MAX_NEW_TOKENS if positions is None else positions - len(r) for r in rows]
        return [max(1, min(DEFAULT_MAX_NEW_TOKENS, c)) for c in cap]
    lens = []
    for i, row in enumerate(rows):
        room = settings.max_length - len(row)
        if room < 1:
            raise OptionError(f"max_length={settings.max_length} leaves no room to generate for prompt {i} "
                             f"({len(row)} tokens); raise max_length or set max_new_tokens")
        lens.append(room)
    return lens


def generate(
    prompts,
    target,
    draft="auto",
    tokenizer=None,
    generation_config=None,
    *,
    batch_size: int = 16,
    schedule: str = "continuous",
    chat_template: bool | None = None,
    gamma: int | str = "auto",
    gamma_max: int | None = None,
    seed: int | None = None,
    sampling_scheme: str = "rejection",
    return_logprobs: bool = False,
    progress: bool = False,
    on_result: Callable[[PromptResult], None] | None = None,
    attention: str = "auto",
    prefill_chunk: int = PREFILL_CHUNK,
    compile: bool = False,
    cuda_graphs: bool | None = None,
    **overrides,
) -> GenerationResult:
    """Generate continuations of text (or token-id) prompts with lossless speculative decoding.

    Parameters
    ----------
    prompts : list of str, or list of token-id sequences
        Strings are encoded with ``tokenizer`` (as one user turn of its chat template when it has one); token-id
        prompts (lists of ints, 1-D int tensors or arrays) are used as they are. Mixing the two is an error.
    target : PreTrainedModel
        The causal LM whose output is reproduced exactly.
    draft : "auto", str, PreTrainedModel, Drafter or None
        ``"auto"`` (the default: per row, an n-gram match or the draft shipped for ``target``, where one ships for
        it; else ``"ngram"``, model-free prompt lookup), another spec for
        :func:`~batched_specdec.models.load_draft` (loaded on every call: load it once for repeated calls), a
        loaded draft model whose vocabulary is the target's or a prefix of it, a drafter instance, or None for
        target-only decoding (:func:`~batched_specdec.autoregressive_generate_batch`).
    tokenizer : optional
        Needed for string prompts and for ``.texts``; also the EOS fallback when no config names one.
    generation_config : transformers.GenerationConfig, optional
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``max_new_tokens`` (or ``max_length``, counting the
        prompt) and ``eos_token_id`` are honoured; fields that cannot change the tokens (pad id, cache and output
        options, assisted-decoding knobs) are ignored; any other field set to a value that would change the output
        (repetition penalty, beams, min length, bad words, ...) is a ValueError before any compute. Resolution
        follows ``model.generate`` (see :func:`resolve_sampling`): unset fields come from the target's own
        ``generation_config``, then transformers' defaults (greedy; top-k 50 when sampling); new tokens default to
        :data:`DEFAULT_MAX_NEW_TOKENS`.
    batch_size : int
        Prompts decoded at the same time (the batch's rows, its slots). Results come back in prompt order.
    schedule : {"continuous", "static"}
        ``"continuous"`` (the default) keeps every slot busy: a prompt that finishes leaves its slot to the next
        queued prompt while the others keep decoding. ``"static"`` decodes batches of similar prompt length one
        after another (:mod:`batched_specdec.runner`). Outputs are the same either way.
    chat_template : bool or None
        None applies the tokenizer's chat template when it has one, False never, True requires one.
    gamma, gamma_max :
        As in :func:`~batched_specdec.speculative_generate_batch`; with ``"auto"`` each batch's controller starts
        from the step costs measured in the batches (and calls) before it.
    seed : int, optional
        Seeds sampling: each prompt samples under its own key derived from it and the prompt's index
        (:mod:`batched_specdec.runner`), so prompts are not correlated and a prompt's tokens do not depend on the
        schedule, the batch size or the other prompts. Seeded samples
        are reproducible with an integer ``gamma`` or ``draft=None``; with ``gamma="auto"`` the draft lengths
        follow measured timings, so samples differ between runs (each correctly distributed) unless
        ``sampling_scheme="coupled"``.
    sampling_scheme : {"rejection", "coupled"}
        How sampled tokens are drawn and drafts verified (greedy decoding is the same under both).
        ``"rejection"`` (the default): rejection sampling (Leviathan et al. 2023), outputs distributed as the
        target's. ``"coupled"``: Gumbel-max sampling with noise keyed by (seed, prompt, position), drafts accepted
        when they equal the target's token there, so a seeded sampled output is exactly target-only sampling's with
        the same seed (``draft=None``), whatever the draft, gamma, batch size or schedule.
    return_logprobs : bool
        Fill ``.logprobs`` (and ``.stats.logprobs``).
    progress : bool
        A progress bar counting finished prompts and generated tokens.
    on_result : callable, optional
        ``on_result(result)`` receives each prompt's :class:`~batched_specdec.runner.PromptResult` (``index`` in
        ``prompts``, ``token_ids``, ``finish_reason``, ``logprobs``, and ``text`` when a tokenizer is given) as soon
        as the prompt finishes, in finishing order, so a long run can save its results as it goes
        (``on_result=lambda r: out.write(json.dumps(vars(r)) + "\\n")``).
    attention, prefill_chunk :
        As in :func:`~batched_specdec.speculative_generate_batch`: the attention backend (default ``"auto"``) and
        the prompt tokens per row per prefill forward.
    compile : bool
        Compile the decode step (:mod:`batched_specdec.capture`; CUDA graphs on CUDA); outputs are unchanged, and
        each new batch shape costs a compile, so it pays when many batches share shapes.
    cuda_graphs : bool or None
        Record every decode-sized forward once per shape and replay it (:mod:`batched_specdec.graphs`: CUDA graphs
        on CUDA, a checking stand-in elsewhere); outputs are unchanged. None (the default) is off: the graph path
        has not been measured on a GPU yet. Not with ``compile=True``.
    **overrides
        GenerationConfig fields by name (``max_new_tokens=32``, ``do_sample=True``, ...); they take precedence
        over ``generation_config``. A name that is not a GenerationConfig field is a TypeError.

    Returns
    -------
    GenerationResult
        ``.texts``, ``.token_ids``, ``.stats`` (all batches merged, see :func:`~batched_specdec.decode.stats.merge_stats`), ``.batch_stats``,
        ``.batches`` and ``.logprobs``.
    """
    settings = resolve_sampling(target, generation_config, **overrides)
    if isinstance(gamma, (AdaptiveSpeculation, StaticSpeculation)):
        raise OptionError("generate() takes gamma as an int or 'auto'; a controller instance (built for one batch's "
                          "rows) goes to speculative_generate_batch")
    options = resolve_options(target, tokenizer=tokenizer, logits_processor=settings.processor,
                              eos_tokens_id=settings.eos_token_id, gamma=gamma, gamma_max=gamma_max,
                              attention=attention, prefill_chunk=prefill_chunk, compile=compile,
                              return_logprobs=return_logprobs, progress=progress, sampling_scheme=sampling_scheme,
                              cuda_graphs=cuda_graphs)
    batch_size, seed = check_positive_int("batch_size", batch_size), check_seed(seed)
    drafter = _resolve_draft(draft, target, tokenizer, attention, prefill_chunk, compile)
    ids = _encode(prompts, tokenizer, chat_template)
    vocab, positions = vocab_size(target), max_positions(target)
    rows = normalise_prompts(ids, vocab, [0] * len(ids), None)
    max_gen_lens = _max_gen_lens(rows, settings, positions)
    normalise_prompts(rows, vocab, max_gen_lens, positions)
    if on_result is not None and not callable(on_result):
        raise OptionError(f"on_result must be a callable taking a PromptResult, or None, got {on_result!r}")
    result = decode_prompt_set(target, drafter, rows, max_gen_lens, options, batch_size=batch_size, seed=seed,
                               schedule=check_schedule(schedule), on_result=_with_text(on_result, tokenizer))
    texts = None if tokenizer is None else tokenizer.batch_decode(result.outputs, skip_special_tokens=True)
    return GenerationResult(texts=texts, token_ids=result.outputs, stats=result.stats,
                            batch_stats=result.batch_stats, batches=result.batches,
                            finish_reasons=result.finish_reasons, num_generated_tokens=result.stats.generated,
                            logprobs=result.stats.logprobs)


def _with_text(on_result, tokenizer):
    """``on_result`` with each result's ``text`` decoded first (when there is a tokenizer)."""
    if on_result is None or tokenizer is None:
        return on_result

    def hand_over(result: PromptResult) -> None:
        result.text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
        on_result(result)

    return hand_over
