"""Batched speculative decoding over ragged prompts, and the target-only baseline through the same cache.

Every row keeps its own committed tokens ``s_b`` (prompt + emitted) in ``token_buffer[b, :seq_lens[b]]``. The
target cache holds ``s_b[:-1]``; a step drafts up to ``k`` tokens per row (``k = gamma``, or the adaptive
controller's choice), verifies ``[s_b[-1], d_1..d_k]`` in one target forward, rejection-samples per row
(``kernels.rejection_sample_*``) and commits 1..k+1 tokens per live row (``kernels.commit_emitted_tokens``), which
also prunes the cache by setting its lengths. The host reads one small tensor per step (done flags, lengths, and
for the controller the step's per-row counts) to decide whether to stop, how far attention must span and when to
compact finished rows away (``kernels.compact_rows``); with ``delayed_host_read`` it reads the previous step's
(a row that finished meanwhile is frozen by the kernels, so the extra step changes nothing). With ``compile=True``
the forwards, the rejection sampling and the commit run compiled (:mod:`batched_specdec.capture`); the randomness of
a step's sampling is drawn eagerly from the generator first, so seeded outputs do not depend on ``compile``.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from batched_specdec import capture
from batched_specdec.controller import (
    CPU_MIN_VERIFY_TOKENS,
    StepPlan,
    make_controller,
    min_verify_tokens,
    shared_cost_model,
)
from batched_specdec.devices import is_cuda, reset_peak_memory
from batched_specdec.drafters import DraftProposal, as_drafter, draft_cost_ratio
from batched_specdec.inputs import resolve_request, vocab_size
from batched_specdec.kernels import draw_seed_offset, rejection_sample_from_logits, rejection_sample_from_probs
from batched_specdec.processors import GreedyProcessor, LogitsProcessor
from batched_specdec.ragged_batch import GenerationStats, PhaseTimer, RaggedBatch, progress_bar
from batched_specdec.ragged_cache import PREFILL_CHUNK, RaggedKVCache, model_forward, prefill

__all__ = ["GenerationStats", "autoregressive_generate_batch", "speculative_generate_batch"]

GREEDY = GreedyProcessor()
"""The default processor (stateless, so one shared instance is safe)."""


def _prefill_target(model, cache: RaggedKVCache, batch: RaggedBatch, chunk: int, on_hidden=None) -> None:
    """Fill the target cache with ``s_b[:-1]`` for every row, in ragged chunks (``ragged_cache.prefill``), handing
    each chunk's final hidden states to ``on_hidden`` (a feature drafter's) when given."""
    prefill(model, cache, batch.token_buffer, batch.prefill_widths, chunk, on_hidden=on_hidden)


def _verify_forward(model, cache: RaggedKVCache, inputs: Tensor, drafter, feeds_features: bool) -> Tensor:
    """The target's verify forward over ``inputs`` ``(B, k + 1)``; a feature drafter receives the final hidden
    states of all ``k + 1`` positions (it keeps only what rows commit: the rest is rewritten before it is read)."""
    if not feeds_features:
        return model_forward(model, cache, inputs)
    logits, hidden = model_forward(model, cache, inputs, return_hidden=True)
    drafter.observe_features(hidden, cache.lens)
    return logits


def _pad_verify(tokens: Tensor, probs: Tensor | None, num: Tensor | None, device: torch.device):
    """Widen a verify of fewer than ``controller.min_verify_tokens(device)`` tokens (4 on CPU) with padding drafts
    (copies of the last draft, and of its q) past every row's ``num_draft``, which rejection sampling never accepts
    or reads."""
    rows, k = tokens.shape
    least = min_verify_tokens(device)
    if k == 0 or rows * (k + 1) >= least:
        return tokens, probs, num
    extra = -(-least // rows) - 1 - k
    num = torch.full((rows,), k, dtype=torch.int64, device=tokens.device) if num is None else num
    tokens = torch.cat([tokens, tokens[:, -1:].expand(-1, extra)], dim=1)
    if probs is not None:
        probs = torch.cat([probs, probs[:, -1:].expand(-1, extra, -1)], dim=1)
    return tokens, probs, num


def _check_step_options(delayed: bool | None, device: torch.device, adaptive: bool, gamma,
                               compile: bool) -> bool:
    """Check ``compile`` and ``delayed_host_read``; return whether the host reads each step's flags one step late."""
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if delayed is not None and not isinstance(delayed, bool):
        raise TypeError(f"delayed_host_read must be True, False or None, got {delayed!r}")
    if delayed is None:
        return is_cuda(device) and not adaptive
    if delayed and adaptive:
        raise ValueError(f"delayed_host_read=True needs an integer gamma, got gamma={gamma!r}: the adaptive "
                         "controller reads each step's counts and timings before it plans the next step")
    return bool(delayed)


def _no_drafts(rows: int, device: torch.device) -> tuple[Tensor, None, None, None]:
    return torch.zeros(rows, 0, dtype=torch.int64, device=device), None, None, None


def _verify_drafts(processor: LogitsProcessor, draft_tokens: Tensor, draft_probs: Tensor | None, logits: Tensor,
                   num_draft: Tensor | None, seed: Tensor, offset: Tensor, row_keys: Tensor,
                   deterministic_rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """Rejection-sample one step's drafts (``k >= 1``) against the verify ``logits``: ``(out_tokens (B, k + 1),
    num_accepted (B,))``. Compiled with ``compile=True``; its randomness comes in as ``seed``/``offset``, keyed per
    row by ``row_keys`` (the rows' prompt indices). ``deterministic_rows`` flags rows whose q is one-hot although
    ``draft_probs`` is given (a hybrid drafter's n-gram rows)."""
    if processor.is_greedy:
        return rejection_sample_from_logits(draft_tokens, None, logits, 0.0, num_draft_tokens=num_draft, seed=seed,
                                            offset=offset)
    return rejection_sample_from_probs(draft_tokens, draft_probs, processor.probs(logits), num_draft_tokens=num_draft,
                                       seed=seed, offset=offset, row_keys=row_keys,
                                       deterministic_rows=deterministic_rows)  # fmt: skip


def _accept(processor: LogitsProcessor, draft_tokens: Tensor, draft_probs: Tensor | None, logits: Tensor,
            num_draft: Tensor | None, generator: torch.Generator | None, zero: Tensor, row_keys: Tensor,
            deterministic_rows: Tensor | None, compile: bool) -> tuple[Tensor, Tensor]:
    """The step's emitted tokens ``(B, k + 1)`` and accepted counts ``(B,)``: a plain target sample when the step
    has no drafts, else :func:`_verify_drafts` (compiled with ``compile``). Every draw is keyed by ``row_keys``."""
    if draft_tokens.shape[1] == 0:
        token, _ = processor.sample(logits[:, 0], generator, row_keys)
        return token[:, None], torch.zeros_like(token)
    # Drawn as the sampler would draw them itself (so seeded outputs do not depend on compile); greedy draws none.
    seed, offset = (zero, zero) if processor.is_greedy else draw_seed_offset(generator, logits.device)
    args = (processor, draft_tokens, draft_probs, logits, num_draft, seed, offset, row_keys, deterministic_rows)
    return capture.run_compiled(_verify_drafts, logits.device, *args) if compile else _verify_drafts(*args)


def _emitted_logprobs(logits: Tensor, out_tokens: Tensor, processor: LogitsProcessor) -> Tensor:
    """``(B, W)`` target log-probability of each emitted token under the processed distribution at its position."""
    logp = torch.log_softmax(processor.process(logits), dim=-1)
    return logp.gather(2, out_tokens.clamp_min(0)[:, :, None])[:, :, 0]


def _propose(drafter, batch: RaggedBatch, plan: StepPlan, controller, processor, generator, max_len: int, device):
    """Ask the drafter for the plan's drafts, apply the row budgets and cut the verify width to what is worth
    verifying. Returns ``(draft_tokens, draft_probs, num_draft, deterministic_rows)`` with ``k`` columns, ``k``
    possibly 0."""
    k = plan.draft_len
    proposal: DraftProposal = drafter.propose(batch.token_buffer, batch.seq_lens, k, processor, generator, max_len,
                                              batch.row_ids)
    tokens = proposal.tokens.to(device)
    probs = None if proposal.probs is None else proposal.probs.to(device)
    onehot = None if probs is None or proposal.deterministic_rows is None else proposal.deterministic_rows.to(device)
    num = proposal.num_tokens
    # Proposal lengths within budget, when the drafter may propose fewer than asked and the host knows the lengths
    # without a sync (a drafter that always proposes k adds nothing to what the plan already weighed).
    lengths = torch.minimum(num, plan.budgets) if plan.budgets is not None and num is not None and \
        num.device.type == "cpu" else None
    if plan.budgets is not None:
        budgets = plan.budgets.to(device, non_blocking=True)
        num = budgets if num is None else torch.minimum(num.to(device), budgets)
    width = controller.choose_width(plan, lengths, batch.host_row_ids, ~batch.host_finished)
    if width < k:
        tokens = tokens[:, :width]
        probs = None if probs is None else probs[:, :width]
        num = None if num is None else num.clamp_max(width)
    return tokens, probs, num, onehot


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
) -> tuple[list[list[int]], list[float], GenerationStats]:
    """Speculative decoding for a batch of unpadded prompts of different lengths; lossless.

    Parameters
    ----------
    prompts : list of list of int, or list of 1-D int tensors / numpy arrays
        ``B`` prompts, each at least one token, lengths may differ. Never padded by the caller.
    draft_model : PreTrainedModel or Drafter
        A causal LM whose vocabulary is the target's or a prefix of it (``V_draft <= V_target``; the ids it lacks
        get draft probability 0), or a model-free drafter such as :class:`batched_specdec.ngram.NGramDrafter`.
    target_model : PreTrainedModel
        The causal LM whose output distribution is reproduced exactly.
    tokenizer : optional
        Only used for its ``eos_token_id`` when the model's generation config has none.
    gamma : int or "auto"
        Draft tokens per row per step (>= 1), or ``"auto"``: an adaptive controller
        (:mod:`batched_specdec.controller`) picks each step's draft length in ``0..gamma_max`` and per-row draft
        budgets from the acceptance and step timings seen so far. Auto stays lossless (a step's choice never
        depends on its own random draws), but its choices follow measured timings, so seeded sampled outputs are
        reproducible only with an integer gamma. Step costs measured by earlier calls with the same target, drafter
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
        Largest draft length with ``gamma="auto"`` (default 8).
    seed, generator : optional
        Randomness for sampling processors: a seed, or a ``torch.Generator`` on the target's device.
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
        only the rows with prompt left, so prefill memory is bounded by rows x chunk, not by the longest prompt.
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

    Returns
    -------
    outputs : list of list of int
        Row ``i``'s continuation, prompt excluded; it ends after the first EOS or at its ``max_gen_len`` tokens.
    alpha : list of float
        Row ``i``'s accepted draft tokens divided by proposed draft tokens (0.0 when none were proposed).
    stats : GenerationStats
    """
    req = resolve_request(prompts, target_model, tokenizer=tokenizer, logits_processor=logits_processor,
                          max_gen_len=max_gen_len, eos_tokens_id=eos_tokens_id, pad_token_id=pad_token_id, seed=seed,
                          generator=generator, attention=attention, prefill_chunk=prefill_chunk)
    drafter = as_drafter(draft_model, vocab_size(target_model), attention=attention, prefill_chunk=prefill_chunk,
                         compile=compile)
    n_rows, device = len(req.rows), req.device
    ratio = draft_cost_ratio(drafter, target_model)
    costs = shared_cost_model(target_model, drafter, device, ratio, compiled=compile) if gamma == "auto" else None
    controller = make_controller(gamma, gamma_max, n_rows, device, ratio, cost_model=costs)
    delayed = _check_step_options(delayed_host_read, device, controller.adaptive, gamma, compile)
    g_max = controller.gamma_max
    timer = PhaseTimer(collect_stats, device)
    reset_peak_memory(device)
    t0, graphs0 = time.perf_counter(), capture.graphs_compiled()

    capacity = capture.stable_capacity(max(len(p) for p in req.rows) + req.max_gen_len +
                                       max(g_max, CPU_MIN_VERIFY_TOKENS) + 2, compile)
    batch = RaggedBatch(req.rows, req.max_gen_lens, capacity, req.pad_token_id, device, logprobs=return_logprobs,
                        compile=compile, delayed_host_read=delayed)
    eos_tensor = torch.tensor(req.eos or [-1], dtype=torch.int64, device=device)
    accepted = torch.zeros(n_rows, dtype=torch.int64, device=device)
    proposed = torch.zeros(n_rows, dtype=torch.int64, device=device)
    histogram = torch.zeros(g_max + 1, dtype=torch.int64, device=device)  # padding drafts are never accepted
    zero = torch.zeros((), dtype=torch.int64, device=device)

    target_cache = RaggedKVCache(target_model.config, n_rows, capacity, device, attention, compile)
    drafter.start(batch.token_buffer[:, : batch.max_prompt_len], batch.seq_lens, capacity)
    feeds_features = getattr(drafter, "uses_target_features", False)
    _prefill_target(target_model, target_cache, batch, prefill_chunk,
                    drafter.observe_features if feeds_features else None)
    bar = progress_bar(progress, sum(req.max_gen_lens), "speculative")
    processor, gen = logits_processor, req.generator
    catching_up = True  # the drafter's next propose also feeds what it missed (the prompts, target-only steps)
    while True:
        timer.start()
        if compile:
            capture.step_begin(device)
        controller.start_step()
        graphs_before_step = capture.graphs_compiled()
        max_len = batch.max_live_seq_len()
        plan = controller.plan(batch.host_row_ids, ~batch.host_finished)
        draft_timing_usable = not catching_up
        if plan.draft_len > 0:
            draft_tokens, draft_probs, num_draft, onehot = _propose(drafter, batch, plan, controller, processor, gen,
                                                                    max_len, device)
            catching_up = False
        else:
            draft_tokens, draft_probs, num_draft, onehot = _no_drafts(batch.size, device)
            if hasattr(drafter, "note_target_only_step"):
                drafter.note_target_only_step()
                catching_up = True
        draft_tokens, draft_probs, num_draft = _pad_verify(draft_tokens, draft_probs, num_draft, device)
        k = draft_tokens.shape[1]
        controller.mark("draft")
        timer.lap("draft")

        last = batch.token_buffer.gather(1, (batch.seq_lens - 1)[:, None])
        target_cache.set_span(max_len + k)
        verify_inputs = torch.cat([last, draft_tokens.to(device)], dim=1)
        logits = _verify_forward(target_model, target_cache, verify_inputs, drafter, feeds_features).to(device)
        timer.lap("verify")

        out_tokens, num_accepted = _accept(processor, draft_tokens, draft_probs, logits, num_draft, gen, zero,
                                           batch.row_ids, onehot, compile)
        controller.mark("verify")
        timer.lap("sampling")

        live = ~batch.finished
        lp = _emitted_logprobs(logits, out_tokens, processor) if return_logprobs else None
        committed = batch.commit(out_tokens, num_accepted, target_cache, eos_tensor, lp)
        # Drafts past a row's stop (EOS or budget) in its last step count neither as proposed nor as accepted.
        step_proposed = torch.full_like(num_accepted, k) if num_draft is None else num_draft
        step_proposed = torch.where(batch.finished, torch.minimum(step_proposed, committed), step_proposed) * live
        step_accepted = torch.minimum(num_accepted, committed) * live
        accepted.index_add_(0, batch.row_ids, step_accepted)
        proposed.index_add_(0, batch.row_ids, step_proposed)
        histogram.index_add_(0, step_accepted, live.to(torch.int64))
        host_live, host_rows, rows = ~batch.host_finished, batch.host_row_ids, batch.size
        extra = [step_proposed, step_accepted] if controller.adaptive else []
        done = batch.end_step(bar, target_cache, drafter, extra=extra)
        if controller.adaptive:
            step_props, step_accs = batch.host_extra
            controller.observe(host_rows, step_props, step_accs, host_live, rows, plan.draft_len, k,
                               draft_timing_usable=draft_timing_usable,
                               timing_usable=capture.graphs_compiled() == graphs_before_step)
        timer.lap("bookkeeping")
        if done:
            break

    acc, prop = accepted.tolist(), proposed.tolist()
    outputs, stats = batch.stats(t0, device, acc, prop, histogram.tolist(),
                                 dict(timer.split) if collect_stats else None)
    stats.controller = controller.summary()
    stats.extra["graphs_compiled"] = capture.graphs_compiled() - graphs0
    alpha = [a / p if p else 0.0 for a, p in zip(acc, prop)]
    return outputs, alpha, stats


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
):
    """Target-only batched decoding through the same ragged cache: the fair baseline for every speedup.

    Same arguments, defaults and stopping rules as :func:`speculative_generate_batch`, ``compile`` and
    ``delayed_host_read`` included (the forward and the commit are compiled; sampling with a generator stays eager).
    Returns ``list[list[int]]``, the continuation of every prompt, or ``(outputs, stats)`` with
    ``return_stats=True`` or ``return_logprobs=True`` (then ``stats.logprobs`` holds the log-probability of every
    emitted token).
    """
    req = resolve_request(prompts, model, tokenizer=tokenizer, logits_processor=logits_processor,
                          max_gen_len=max_gen_len, eos_tokens_id=eos_tokens_id, pad_token_id=pad_token_id, seed=seed,
                          generator=generator, attention=attention, prefill_chunk=prefill_chunk)
    device = req.device
    delayed = _check_step_options(delayed_host_read, device, False, 1, compile)
    reset_peak_memory(device)
    t0, graphs0 = time.perf_counter(), capture.graphs_compiled()

    capacity = capture.stable_capacity(max(len(p) for p in req.rows) + req.max_gen_len + 2, compile)
    batch = RaggedBatch(req.rows, req.max_gen_lens, capacity, req.pad_token_id, device, logprobs=return_logprobs,
                        compile=compile, delayed_host_read=delayed)
    eos_tensor = torch.tensor(req.eos or [-1], dtype=torch.int64, device=device)
    cache = RaggedKVCache(model.config, len(req.rows), capacity, device, attention, compile)
    _prefill_target(model, cache, batch, prefill_chunk)
    no_drafts = torch.zeros(len(req.rows), dtype=torch.int64, device=device)
    bar = progress_bar(progress, sum(req.max_gen_lens), "target-only")
    while True:
        if compile:
            capture.step_begin(device)
        last = batch.token_buffer.gather(1, (batch.seq_lens - 1)[:, None])
        cache.set_span(batch.max_live_seq_len())
        logits = model_forward(model, cache, last, logits_to_keep=1).to(device)
        token, _ = logits_processor.sample(logits[:, 0], req.generator, batch.row_ids)
        lp = _emitted_logprobs(logits, token[:, None], logits_processor) if return_logprobs else None
        batch.commit(token[:, None], no_drafts[: batch.size], cache, eos_tensor, lp)
        if batch.end_step(bar, cache):
            break
    if not (return_stats or return_logprobs):
        return batch.outputs()
    zeros = [0] * len(req.rows)
    outputs, stats = batch.stats(t0, device, zeros, zeros, [batch.row_steps], None)
    stats.extra["graphs_compiled"] = capture.graphs_compiled() - graphs0
    return outputs, stats
