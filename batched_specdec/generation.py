"""Text in, text out: :func:`generate` takes strings (or token ids) and a transformers ``GenerationConfig``.

It resolves the sampling settings the way ``model.generate`` does (:mod:`batched_specdec.generation_config`: keyword
overrides, then the caller's ``GenerationConfig``, then the target's own ``generation_config``, then transformers'
global defaults; every setting that would make the output differ from what the target would have produced is
refused), encodes the prompts (chat
template applied when the tokenizer has one), decodes them in internal batches with
:func:`~batched_specdec.speculative_generate_batch` (or :func:`~batched_specdec.autoregressive_generate_batch` with
``draft=None``), and returns texts and token ids in prompt order.

The module is ``generation`` rather than ``generate`` so that the package attribute ``batched_specdec.generate`` is
the function: importing a submodule of the same name would rebind it to the module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from batched_specdec.checks import OptionError, check_positive_int, check_seed
from batched_specdec.controller import AdaptiveSpeculation, StaticSpeculation
from batched_specdec.decode.stats import GenerationStats
from batched_specdec.drafting import as_drafter
from batched_specdec.generation_config import DEFAULT_MAX_NEW_TOKENS, SamplingSettings, resolve_sampling
from batched_specdec.model_info import input_device, max_positions, vocab_size
from batched_specdec.options import normalise_prompts, resolve_options
from batched_specdec.prompts import encode_prompts
from batched_specdec.ragged_cache import PREFILL_CHUNK
from batched_specdec.runner import PromptResult, check_schedule, decode_prompt_set

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "GenerationResult", "SamplingSettings", "generate", "resolve_sampling"]


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
        ``.texts``, ``.token_ids``, ``.stats`` (all batches merged, see
        :func:`~batched_specdec.decode.stats.merge_stats`), ``.batch_stats``, ``.batches`` and ``.logprobs``.
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
