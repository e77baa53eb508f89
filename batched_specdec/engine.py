"""The two batch engines: speculative decoding of a batch of unpadded prompts, and the target-only baseline through
the same ragged cache. Both check their arguments (:mod:`batched_specdec.options`) and run one
:class:`~batched_specdec.decode.session.DecodeSession`."""

from __future__ import annotations

import torch

from batched_specdec.decode.session import DecodeSession
from batched_specdec.decode.stats import GenerationStats
from batched_specdec.drafting import as_drafter
from batched_specdec.model_info import vocab_size
from batched_specdec.options import resolve_options, resolve_prompts, run_seed
from batched_specdec.processors import GreedyProcessor, LogitsProcessor
from batched_specdec.ragged_cache import PREFILL_CHUNK

__all__ = ["GenerationStats", "autoregressive_generate_batch", "speculative_generate_batch"]

GREEDY = GreedyProcessor()
"""The default processor (stateless, so one shared instance is safe)."""


@torch.inference_mode()
def speculative_generate_batch(
    prompts,
    draft_model,
    target_model,
    tokenizer=None,
    gamma: int | str = 5,
    logits_processor: LogitsProcessor = GREEDY,
    max_gen_len: int | list[int] = 40,
    eos_tokens_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    *,
    gamma_max: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    collect_stats: bool = False,
    progress: bool = False,
    return_logprobs: bool = False,
    attention: str = "auto",
    prefill_chunk: int = PREFILL_CHUNK,
    compile: bool = False,
    delayed_host_read: bool | None = None,
    sampling_scheme: str = "rejection",
    cuda_graphs: bool | None = None,
) -> tuple[list[list[int]], list[float], GenerationStats]:
    """Speculative decoding for a batch of unpadded prompts of different lengths; lossless.

    Parameters
    ----------
    prompts : list of list of int, or list of 1-D int tensors / numpy arrays
        ``B`` prompts, each at least one token, lengths may differ. Never padded by the caller.
    draft_model : PreTrainedModel or Drafter
        A causal LM whose vocabulary is the target's or a prefix of it (``V_draft <= V_target``; the ids it lacks
        get draft probability 0), or a model-free drafter such as :class:`batched_specdec.drafting.NGramDrafter`.
    target_model : PreTrainedModel
        The causal LM whose output distribution is reproduced exactly.
    tokenizer : optional
        Only used for its ``eos_token_id`` when the model's generation config has none.
    gamma : int or "auto"
        Draft tokens per row per step (>= 1), or ``"auto"``: an adaptive controller
        (:mod:`batched_specdec.controller`) picks each step's draft length in ``0..gamma_max`` from the acceptance
        and step timings seen so far. Auto stays lossless (a step's choice never
        depends on its own random draws), but its choices follow measured timings, so under the ``"rejection"``
        scheme seeded sampled outputs are reproducible only with an integer gamma (under ``"coupled"``, always).
        Step costs measured by earlier calls with the same target, drafter
        and device are reused (:func:`batched_specdec.controller.shared_cost_model`).
    logits_processor : LogitsProcessor
        Greedy (exact argmax match) or a sampling processor; applied identically to draft and target.
    max_gen_len : int or list of int
        Tokens generated per row at most (>= 1): one for every row or one per prompt.
    eos_tokens_id : int or list of int or None
        A row stops after emitting one of these (included in its output). ``None`` (the default) takes the
        target's ``generation_config.eos_token_id`` (an int or a list), else the tokenizer's; ``[]`` means none.
    pad_token_id : int or None
        Fills buffer slots past a row's length (masked, never a real token); ``None`` picks one.
    gamma_max : int, optional
        Largest draft length with ``gamma="auto"`` (default 8; 16 for a model-free drafter such as n-gram).
    seed, generator : optional
        Randomness for sampling processors: a seed, or a ``torch.Generator`` one seed is drawn from (one host read
        per call), or neither (one draw from torch's default generator). Prompt ``i`` samples under its own Philox
        key, ``options.prompt_seed(seed, i)``, at counters that follow its length, so its tokens do not depend on the
        other prompts or on its place in the batch.
    collect_stats : bool
        Also measure the time split (synchronises the device between phases).
    progress : bool
        Show a progress bar over generated tokens.
    return_logprobs : bool
        Fill ``stats.logprobs``: per emitted token, the target's log-probability under the processed
        distribution it was sampled from (temperature, top-k, top-p applied; with greedy decoding, the plain
        ``log_softmax`` of the logits). Target-only decoding reports the same values for the same tokens.
    attention : {"auto", "sdpa", "flex", "dense"}
        Attention backend of the target's and a model draft's forwards (:mod:`batched_specdec.attention`): each row
        attends only to its own keys, read in place (no copy per query group); ``"dense"`` is the previous
        dense-mask path, kept as a reference.
    prefill_chunk : int
        Prompt tokens per row per prefill forward (default 128): prompts are prefilled in chunks, each forward over
        only the rows with prompt left, so prefill memory is bounded by rows x chunk, not by the longest prompt. The
        first step's verify forward writes each prompt's last tokens, up to a chunk (its *prompt tail*, glossary),
        so a prompt within one chunk costs no forward of its own.
    compile : bool
        Compile the decode step (:mod:`batched_specdec.capture`): the verify and draft forwards, the rejection
        sampling and the commit, with ``fullgraph=True`` and dynamic shapes (nothing recompiles from step to step);
        on CUDA with CUDA graphs, one per (batch size, draft length, span bucket). The same model with fused
        kernels: logits equal the eager run's to float rounding, tokens too but for near-ties (see
        :mod:`~batched_specdec.capture`). Compiling costs seconds to minutes, so it pays on long runs. Not with
        feature drafts. ``stats.extra["graphs_compiled"]`` counts this call's graphs.
    delayed_host_read : bool or None
        Read each step's stop flags and lengths one step late (a non-blocking copy to pinned memory), so the host
        queues step ``n + 1`` while the device runs step ``n``; rows that finished are frozen by the kernels, so the
        extra step changes no output. ``None`` (default): on for CUDA with an integer gamma, off on CPU, where the
        device runs synchronously and the extra step is pure cost. Needs an integer gamma (the adaptive controller
        reads each step's counts and timings before planning the next).
    sampling_scheme : {"rejection", "coupled"}
        How a sampling processor's tokens are drawn and drafts verified. ``"rejection"`` (the default): drafts are
        rejection-sampled (Leviathan et al.); outputs follow the target's distribution, but which tokens a seed
        gives depends on the draft and on each step's draft length. ``"coupled"``: every token is a Gumbel-max
        sample whose noise is keyed by the seed, the prompt and the token's absolute position, the draft samples
        with the same noise, and a draft is kept iff it equals the target's sample
        (:mod:`batched_specdec.kernels.coupled_verify`): the output is exactly
        ``autoregressive_generate_batch(..., sampling_scheme="coupled")``'s with the same seed, for any drafter,
        gamma (``"auto"`` included), batch and schedule. A model draft's acceptance can be lower than under
        rejection sampling. Greedy decoding is the same under both.
    cuda_graphs : bool or None
        Record every decode-sized forward (verify, target-only, draft-model and feature-head forwards) once per (batch
        bucket, width, span bucket) after eager warm-up runs, and replay it (:mod:`batched_specdec.graphs`), without
        inductor; prefill, the first verify forward (it also writes the prompt tails) and catch-up forwards stay eager.
        Tokens are the eager path's (the same forwards, spans bucketed geometrically). ``stats.extra`` counts the graphs
        a call recorded and the seconds recording took. ``None`` (default): off everywhere, because the graph path is
        not measured on a GPU yet. ``True`` on a CPU runs a checking stand-in (exact, slower). Not with ``compile``.

    Returns
    -------
    outputs : list of list of int
        Row ``i``'s continuation, prompt excluded; it ends after the first EOS or at its ``max_gen_len`` tokens.
    alpha : list of float
        Row ``i``'s accepted draft tokens divided by proposed draft tokens (0.0 when none were proposed).
    stats : GenerationStats
    """
    options = resolve_options(target_model, tokenizer=tokenizer, logits_processor=logits_processor,
                              eos_tokens_id=eos_tokens_id, pad_token_id=pad_token_id, gamma=gamma, gamma_max=gamma_max,
                              attention=attention, prefill_chunk=prefill_chunk, compile=compile,
                              delayed_host_read=delayed_host_read, return_logprobs=return_logprobs,
                              collect_stats=collect_stats, progress=progress, sampling_scheme=sampling_scheme,
                              cuda_graphs=cuda_graphs)
    request = resolve_prompts(prompts, target_model, max_gen_len)
    drafter = as_drafter(draft_model, vocab_size(target_model), attention=attention, prefill_chunk=prefill_chunk,
                         compile=compile)
    session = DecodeSession(target_model, drafter, request, options, run_seed(seed, generator))
    outputs, stats = session.run()
    return outputs, stats.acceptance_rates, stats


@torch.inference_mode()
def autoregressive_generate_batch(
    prompts,
    model,
    logits_processor: LogitsProcessor = GREEDY,
    max_gen_len: int | list[int] = 40,
    eos_tokens_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    *,
    tokenizer=None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    return_stats: bool = False,
    return_logprobs: bool = False,
    attention: str = "auto",
    prefill_chunk: int = PREFILL_CHUNK,
    compile: bool = False,
    delayed_host_read: bool | None = None,
    sampling_scheme: str = "rejection",
    cuda_graphs: bool | None = None,
):
    """Target-only batched decoding through the same ragged cache: the fair baseline for every speedup.

    Same arguments, defaults and stopping rules as :func:`speculative_generate_batch`, ``compile``,
    ``delayed_host_read``, ``sampling_scheme`` and ``cuda_graphs`` included (the forward and the commit are compiled;
    sampling with a generator stays eager). With ``sampling_scheme="coupled"`` each token is the Gumbel-max sample keyed
    by the seed, the prompt and its position: what speculative decoding with that scheme and seed emits.
    Returns ``list[list[int]]``, the continuation of every prompt, or ``(outputs, stats)`` with
    ``return_stats=True`` or ``return_logprobs=True`` (then ``stats.logprobs`` holds the log-probability of every
    emitted token).
    """
    options = resolve_options(model, tokenizer=tokenizer, logits_processor=logits_processor,
                              eos_tokens_id=eos_tokens_id, pad_token_id=pad_token_id, attention=attention,
                              prefill_chunk=prefill_chunk, compile=compile, delayed_host_read=delayed_host_read,
                              return_logprobs=return_logprobs, progress=progress, sampling_scheme=sampling_scheme,
                              cuda_graphs=cuda_graphs)
    request = resolve_prompts(prompts, model, max_gen_len)
    session = DecodeSession(model, None, request, options, run_seed(seed, generator))
    outputs, stats = session.run()
    return (outputs, stats) if return_stats or return_logprobs else outputs
