"""Batched speculative decoding over ragged prompts, and the target-only baseline through the same cache.

Every row keeps its own committed tokens ``s_b`` (prompt + emitted) in ``token_buffer[b, :seq_lens[b]]``. The
target cache holds ``s_b[:-1]``; a step drafts up to ``gamma`` tokens per row, verifies ``[s_b[-1], d_1..d_gamma]``
in one target forward, rejection-samples per row (``kernels.rejection_sample_*``) and commits 1..gamma+1 tokens
per live row (``kernels.commit_emitted_tokens``), which also prunes the cache by setting its lengths. The host
reads one small tensor per step (done flags, lengths) to decide whether to stop, how far attention must span and
when to compact finished rows away (``kernels.compact_rows``).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from batched_specdec.drafters import Drafter, DraftProposal, ModelDrafter, model_forward
from batched_specdec.processors import GreedyProcessor, LogitsProcessor
from batched_specdec.ragged_cache import RaggedKVCache
from kernels import (
    commit_emitted_tokens,
    rejection_sample_from_logits,
    rejection_sample_from_probs,
)

GREEDY = GreedyProcessor()
"""The default processor (stateless, so one shared instance is safe)."""

COMPACT_FRACTION = 0.25
"""Drop finished rows from the batch once at least this fraction of it is finished."""


@dataclass
class GenerationStats:
    """What a generation call measured. Per-row lists are in prompt order.

    ``tokens_per_target_forward`` is the mean number of tokens a live row gained per target forward
    (accepted drafts + 1 for speculative decoding, 1 for the baseline). ``acceptance_histogram[j]`` counts the
    (row, step) pairs that accepted exactly ``j`` drafts. ``peak_memory_bytes`` is the peak CUDA memory
    allocated on CUDA, and the process' peak resident memory on CPU (``peak_memory_kind`` says which).
    ``time_split`` (seconds in draft, verify, sampling and bookkeeping) is measured only with
    ``collect_stats=True``, which synchronises the device between phases.
    """

    accepted: list[int]
    proposed: list[int]
    generated: list[int]
    target_forwards: int
    tokens_per_target_forward: float
    acceptance_histogram: list[int]
    wall_time_s: float
    generated_tokens: int
    tokens_per_s: float
    acceptance_rate: float
    peak_memory_bytes: int | None = None
    peak_memory_kind: str = ""
    time_split: dict[str, float] | None = None
    steps: int = 0
    compactions: int = 0
    extra: dict = field(default_factory=dict)


# --- validation ---------------------------------------------------------------------------------------------------


def _vocab_size(model) -> int:
    return int(model.config.vocab_size)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _normalise_prompts(prompts, vocab_size: int, max_gen_len: int, max_positions: int | None) -> list[list[int]]:
    if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)):
        raise TypeError(f"prompts must be a list of token-id lists or 1-D tensors, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: expected at least one prompt")
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, Tensor):
            if prompt.dim() != 1 or prompt.is_floating_point():
                raise ValueError(f"prompt {i} must be a 1-D integer tensor, got shape {tuple(prompt.shape)} "
                                 f"and dtype {prompt.dtype}")
            prompt = prompt.tolist()
        elif isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise TypeError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
        prompt = list(prompt)
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"prompt {i} has token id {t!r}, expected an int in [0, {vocab_size})")
        if max_positions is not None and len(prompt) + max_gen_len > max_positions:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens; with max_gen_len={max_gen_len} it needs "
                f"{len(prompt) + max_gen_len} positions, but the model supports max_position_embeddings="
                f"{max_positions}. Shorten the prompt or lower max_gen_len."
            )
        rows.append(prompt)
    return rows


def _eos_list(eos_tokens_id, vocab_size: int) -> list[int]:
    if eos_tokens_id is None:
        return []
    ids = [eos_tokens_id] if isinstance(eos_tokens_id, int) else list(eos_tokens_id)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"eos_tokens_id has {t!r}, expected ints in [0, {vocab_size})")
    return ids


def _make_generator(seed, generator, device: torch.device) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        return torch.Generator(device=device).manual_seed(seed)
    return generator


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


# --- the shared decoding loop ------------------------------------------------------------------------------------


class _RaggedBatch:
    """Per-row decoding state on the target's input device; rows may be dropped (compacted) as they finish."""

    def __init__(self, prompts: list[list[int]], capacity: int, pad_token_id: int, device: torch.device) -> None:
        batch = len(prompts)
        lens = [len(p) for p in prompts]
        self.max_prompt_len = max(lens)
        self.capacity = capacity
        padded = torch.full((batch, capacity), pad_token_id, dtype=torch.int64)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
        self.token_buffer = padded.to(device)
        self.prompt_lens = torch.tensor(lens, dtype=torch.int64, device=device)
        self.seq_lens = self.prompt_lens.clone()
        self.gen_lens = torch.zeros(batch, dtype=torch.int64, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.row_ids = torch.arange(batch, device=device)
        # Results of every original row, filled when rows are compacted away and at the end.
        self.final_tokens = torch.empty_like(self.token_buffer)
        self.final_seq_lens = torch.empty_like(self.seq_lens)
        self.host_seq_lens = torch.tensor(lens)
        self.host_finished = torch.zeros(batch, dtype=torch.bool)
        self.host_generated = 0
        self.prompt_lens_host = lens
        self.steps = self.row_steps = self.compactions = 0

    @property
    def size(self) -> int:
        return self.token_buffer.shape[0]

    def sync(self) -> None:
        """The one host synchronisation per step: done flags, lengths and generated counts."""
        host = torch.cat([self.finished.to(torch.int64), self.seq_lens, self.gen_lens.sum()[None]]).cpu()
        b = self.size
        self.host_finished = host[:b].bool()
        self.host_seq_lens = host[b : 2 * b]
        self.host_generated = int(host[-1])

    @property
    def all_finished(self) -> bool:
        return bool(self.host_finished.all())

    def max_live_seq_len(self) -> int:
        live = self.host_seq_lens[~self.host_finished]
        return int(live.max()) if live.numel() else int(self.host_seq_lens.max())

    def flush(self) -> None:
        self.final_tokens.index_copy_(0, self.row_ids, self.token_buffer)
        self.final_seq_lens.index_copy_(0, self.row_ids, self.seq_lens)

    def keep_rows(self, rows: Tensor, host_rows: Tensor) -> None:
        """Keep ``rows`` (on the device) of the batch; ``host_rows`` is the same index on the host."""
        self.flush()
        self.token_buffer, self.prompt_lens, self.seq_lens, self.gen_lens, self.finished, self.row_ids = (
            self.token_buffer[rows], self.prompt_lens[rows], self.seq_lens[rows], self.gen_lens[rows],
            self.finished[rows], self.row_ids[rows],
        )
        self.host_finished = self.host_finished[host_rows]
        self.host_seq_lens = self.host_seq_lens[host_rows]

    def rows_to_keep(self) -> Tensor | None:
        """Indices (on the host) of live rows if enough rows finished to pay for a compaction, else None."""
        done = int(self.host_finished.sum())
        if done == 0 or done == self.size or done < COMPACT_FRACTION * self.size:
            return None
        return torch.arange(self.size)[~self.host_finished]

    def commit(self, out_tokens: Tensor, num_accepted: Tensor, cache: RaggedKVCache, eos: Tensor,
               max_gen_len: int) -> None:
        """Append each live row's emitted tokens, detect EOS / max length, and prune the target cache to
        ``seq_lens - 1`` (lengths only: no KV bytes move)."""
        commit_emitted_tokens(
            out_tokens, num_accepted, self.token_buffer, self.seq_lens, self.gen_lens, self.finished, cache.lens,
            eos, max_gen_len,
        )
        cache.set_lens(cache.lens)

    def end_step(self, bar, *row_holders) -> bool:
        """Count the step, do the step's one host sync, update the progress bar, and compact finished rows away
        from this batch and every ``row_holders`` (caches, drafter) when enough have finished. True when done."""
        self.steps += 1
        self.row_steps += int((~self.host_finished).sum())
        self.sync()
        if bar is not None:
            bar.update(self.host_generated - bar.n)
        if self.all_finished:
            if bar is not None:
                bar.close()
            return True
        host_keep = self.rows_to_keep()
        if host_keep is not None:
            # built on the host from the step's one sync, copied to the device: no device-to-host read here
            keep = host_keep.to(self.token_buffer.device)
            self.keep_rows(keep, host_keep)
            for holder in row_holders:
                holder.keep_rows(keep)
            self.compactions += 1
        return False

    def stats(self, t0: float, device: torch.device, accepted: list[int], proposed: list[int],
              histogram: list[int], time_split: dict[str, float] | None) -> tuple[list[list[int]], GenerationStats]:
        outputs = self.outputs()
        wall = time.perf_counter() - t0
        generated = [len(o) for o in outputs]
        total = sum(generated)
        peak, peak_kind = _peak_memory(device)
        return outputs, GenerationStats(
            accepted=accepted,
            proposed=proposed,
            generated=generated,
            target_forwards=self.steps,
            tokens_per_target_forward=total / max(self.row_steps, 1),
            acceptance_histogram=histogram,
            wall_time_s=wall,
            generated_tokens=total,
            tokens_per_s=total / wall if wall > 0 else 0.0,
            acceptance_rate=sum(accepted) / max(sum(proposed), 1),
            peak_memory_bytes=peak,
            peak_memory_kind=peak_kind,
            time_split=time_split,
            steps=self.steps,
            compactions=self.compactions,
        )

    def outputs(self) -> list[list[int]]:
        self.flush()
        tokens = self.final_tokens.cpu()
        seq = self.final_seq_lens.cpu().tolist()
        starts = self.prompt_lens_host
        return [tokens[i, starts[i] : seq[i]].tolist() for i in range(tokens.shape[0])]


class _Timer:
    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.split = {"draft": 0.0, "verify": 0.0, "sampling": 0.0, "bookkeeping": 0.0}
        self._t = 0.0

    def start(self) -> None:
        if self.enabled:
            if self.cuda:
                torch.cuda.synchronize()
            self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.enabled:
            if self.cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.split[phase] += now - self._t
            self._t = now


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", leave=False)


def _peak_memory(device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


def _prefill_target(model, cache: RaggedKVCache, batch: _RaggedBatch) -> None:
    """Fill the target cache with ``s_b[:-1]`` for every row in one ragged forward."""
    width = batch.max_prompt_len - 1
    if width > 0:
        cache.set_span(width)
        model_forward(model, cache, batch.token_buffer[:, :width], logits_to_keep=1)
    cache.set_lens(batch.seq_lens - 1)


@torch.inference_mode()
def speculative_generate_batch(
    prompts,
    draft_model,
    target_model,
    tokenizer=None,
    gamma: int = 5,
    logits_processor: LogitsProcessor = GREEDY,
    max_gen_len: int = 40,
    eos_tokens_id: int | list[int] | None = 1,
    pad_token_id: int = 0,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    collect_stats: bool = False,
    progress: bool = False,
) -> tuple[list[list[int]], list[float], GenerationStats]:
    """Speculative decoding for a batch of unpadded prompts of different lengths; lossless.

    Parameters
    ----------
    prompts : list of list of int, or list of 1-D int tensors
        ``B`` prompts, each at least one token, lengths may differ. Never padded by the caller.
    draft_model : PreTrainedModel or Drafter
        A causal LM sharing the target's vocabulary, or a model-free drafter such as
        :class:`batched_specdec.ngram.NGramDrafter`.
    target_model : PreTrainedModel
        The causal LM whose output distribution is reproduced exactly.
    tokenizer : optional
        Only used for its ``eos_token_id`` when ``eos_tokens_id`` is None.
    gamma : int
        Draft tokens per row per step (>= 1).
    logits_processor : LogitsProcessor
        Greedy (exact argmax match) or a sampling processor; applied identically to draft and target.
    max_gen_len : int
        Tokens generated per row at most (>= 1).
    eos_tokens_id : int or list of int or None
        A row stops after emitting one of these (included in its output).
    pad_token_id : int
        Fills unused buffer slots; never appears in outputs.
    seed, generator : optional
        Randomness for sampling processors: a seed, or a ``torch.Generator`` on the target's device.
    collect_stats : bool
        Also measure the time split (synchronises the device between phases).
    progress : bool
        Show a progress bar over generated tokens.

    Returns
    -------
    outputs : list of list of int
        Row ``i``'s continuation, prompt excluded; it ends after the first EOS or at ``max_gen_len`` tokens.
    alpha : list of float
        Row ``i``'s accepted draft tokens divided by proposed draft tokens (0.0 when none were proposed).
    stats : GenerationStats
    """
    gamma = _check_positive_int("gamma", gamma)
    max_gen_len = _check_positive_int("max_gen_len", max_gen_len)
    if not isinstance(logits_processor, LogitsProcessor):
        raise TypeError(f"logits_processor must be a LogitsProcessor, got {type(logits_processor).__name__}")
    vocab_size = _vocab_size(target_model)
    if isinstance(draft_model, Drafter) and not hasattr(draft_model, "config"):
        drafter = draft_model
    elif hasattr(draft_model, "config") and hasattr(draft_model, "get_input_embeddings"):
        if _vocab_size(draft_model) != vocab_size:
            raise ValueError(
                f"draft vocabulary size {_vocab_size(draft_model)} differs from the target's {vocab_size}; "
                "the draft must share the target's vocabulary"
            )
        drafter = ModelDrafter(draft_model)
    else:
        raise TypeError(f"draft_model must be an HF causal LM or a Drafter, got {type(draft_model).__name__}")
    if eos_tokens_id is None and tokenizer is not None:
        eos_tokens_id = tokenizer.eos_token_id
    eos = _eos_list(eos_tokens_id, vocab_size)
    max_positions = getattr(target_model.config, "max_position_embeddings", None)
    rows = _normalise_prompts(prompts, vocab_size, max_gen_len, max_positions)

    device = _input_device(target_model)
    generator = _make_generator(seed, generator, device)
    timer = _Timer(collect_stats, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()

    capacity = max(len(p) for p in rows) + max_gen_len + gamma + 2
    batch = _RaggedBatch(rows, capacity, pad_token_id, device)
    eos_tensor = torch.tensor(eos if eos else [-1], dtype=torch.int64, device=device)
    n_rows = len(rows)
    accepted = torch.zeros(n_rows, dtype=torch.int64, device=device)
    proposed = torch.zeros(n_rows, dtype=torch.int64, device=device)
    histogram = torch.zeros(gamma + 1, dtype=torch.int64, device=device)

    target_cache = RaggedKVCache(target_model.config, n_rows, capacity, device)
    _prefill_target(target_model, target_cache, batch)
    drafter.start(batch.token_buffer[:, : batch.max_prompt_len], batch.seq_lens, capacity)
    bar = _progress(progress, n_rows * max_gen_len, "speculative")
    while True:
        timer.start()
        max_len = batch.max_live_seq_len()
        proposal: DraftProposal = drafter.propose(
            batch.token_buffer, batch.seq_lens, gamma, logits_processor, generator, max_len
        )
        draft_tokens = proposal.tokens.to(device)
        num_draft = None if proposal.num_tokens is None else proposal.num_tokens.to(device)
        timer.lap("draft")

        last = batch.token_buffer.gather(1, (batch.seq_lens - 1)[:, None])
        target_cache.set_span(max_len + gamma)
        logits = model_forward(target_model, target_cache, torch.cat([last, draft_tokens], dim=1)).to(device)
        timer.lap("verify")

        if logits_processor.is_greedy:
            out_tokens, num_accepted = rejection_sample_from_logits(
                draft_tokens, None, logits, 0.0, num_draft_tokens=num_draft
            )
        else:
            draft_probs = None if proposal.probs is None else proposal.probs.to(device)
            out_tokens, num_accepted = rejection_sample_from_probs(
                draft_tokens,
                draft_probs,
                logits_processor.probs(logits),
                num_draft_tokens=num_draft,
                generator=generator,
            )
        timer.lap("sampling")

        live = ~batch.finished
        accepted.index_add_(0, batch.row_ids, num_accepted * live)
        proposed.index_add_(0, batch.row_ids, (gamma if num_draft is None else num_draft) * live)
        histogram.index_add_(0, num_accepted, live.to(torch.int64))
        batch.commit(out_tokens, num_accepted, target_cache, eos_tensor, max_gen_len)
        done = batch.end_step(bar, target_cache, drafter)
        timer.lap("bookkeeping")
        if done:
            break

    acc, prop = accepted.tolist(), proposed.tolist()
    outputs, stats = batch.stats(t0, device, acc, prop, histogram.tolist(),
                                 dict(timer.split) if collect_stats else None)
    alpha = [a / p if p else 0.0 for a, p in zip(acc, prop)]
    return outputs, alpha, stats


@torch.inference_mode()
def autoregressive_generate_batch(
    prompts,
    model,
    logits_processor: LogitsProcessor = GREEDY,
    max_gen_len: int = 40,
    eos_tokens_id: int | list[int] | None = 1,
    pad_token_id: int = 0,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    return_stats: bool = False,
):
    """Target-only batched decoding through the same ragged cache: the fair baseline for every speedup.

    Same arguments and stopping rules as :func:`speculative_generate_batch`. Returns ``list[list[int]]``, the
    continuation of every prompt, or ``(outputs, stats)`` with ``return_stats=True``.
    """
    max_gen_len = _check_positive_int("max_gen_len", max_gen_len)
    if not isinstance(logits_processor, LogitsProcessor):
        raise TypeError(f"logits_processor must be a LogitsProcessor, got {type(logits_processor).__name__}")
    vocab_size = _vocab_size(model)
    eos = _eos_list(eos_tokens_id, vocab_size)
    rows = _normalise_prompts(prompts, vocab_size, max_gen_len, getattr(model.config, "max_position_embeddings", None))
    device = _input_device(model)
    generator = _make_generator(seed, generator, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()

    capacity = max(len(p) for p in rows) + max_gen_len + 2
    batch = _RaggedBatch(rows, capacity, pad_token_id, device)
    eos_tensor = torch.tensor(eos if eos else [-1], dtype=torch.int64, device=device)
    cache = RaggedKVCache(model.config, len(rows), capacity, device)
    _prefill_target(model, cache, batch)
    no_drafts = torch.zeros(len(rows), dtype=torch.int64, device=device)
    bar = _progress(progress, len(rows) * max_gen_len, "target-only")
    while True:
        last = batch.token_buffer.gather(1, (batch.seq_lens - 1)[:, None])
        cache.set_span(batch.max_live_seq_len())
        logits = model_forward(model, cache, last, logits_to_keep=1)[:, 0].to(device)
        token, _ = logits_processor.sample(logits, generator)
        batch.commit(token[:, None], no_drafts[: batch.size], cache, eos_tensor, max_gen_len)
        if batch.end_step(bar, cache):
            break
    if not return_stats:
        return batch.outputs()
    zeros = [0] * len(rows)
    outputs, stats = batch.stats(t0, device, zeros, zeros, [batch.row_steps], None)
    return outputs, stats
