"""The decode session: one batch's state and the step that advances it.

A :class:`DecodeSession` owns the rows (:class:`~batched_specdec.decode.batch.RaggedBatch`), the target's ragged KV
cache, the drafter, the controller and the compile policy; they change only in its step, in the compaction it runs
and in its admission, each through its own methods. :meth:`~DecodeSession.step` reads as its phases
(:data:`~batched_specdec.glossary.STEP_PHASES`), each written in one place:

1. plan (``controller/``): the controller picks the step's draft length ``k`` (0..gamma_max);
2. draft (``drafting/``): the drafter proposes up to ``k`` tokens per row (skipped when ``k == 0``), cut to the
   verify width the controller chooses;
3. verify (:func:`~batched_specdec.forwards.model_forward`, through the session's ``_verify``): one target forward
   over ``[s_b[-1], d_1..d_k]`` per row through the ragged cache (the first step's over ``[tail, d_1..d_k]``, which
   also writes the prompt tails, :func:`~batched_specdec.forwards.tail_forward`);
4. accept (``decode/accept.py``): rejection sampling (or, with ``sampling_scheme="coupled"``, coupled verification)
   keeps 0..k drafts per row and adds one recovered or bonus token; with ``k == 0`` a plain target sample;
5. commit (:meth:`RaggedBatch.commit <batched_specdec.decode.batch.RaggedBatch.commit>`, one fused kernel,
   ``kernels/commit_tokens.py``): the rows append their emitted tokens and check EOS ids and budgets, and the cache
   is pruned to the ``|s_b| - 1`` entries that commit returns (:meth:`RaggedKVCache.set_lens`: lengths only, no KV
   bytes move);
6. sync (:meth:`RaggedBatch.sync <batched_specdec.decode.batch.RaggedBatch.sync>`): the one host read of the
   step, whose view the controller learns from;

then compaction (``decode/compaction.py``, timed with the sync): finished rows leave the rows, the cache and the
drafter, in that order. Between steps, admission (``decode/admission.py``, the session's
:attr:`~DecodeSession.admission`) puts queued prompts into rows that finished (continuous batching).

Target-only decoding is a session without a drafter: every step plans ``k = 0``. With ``compile=True`` the verify
forward, the rejection sampling and the commit run compiled (:mod:`batched_specdec.capture`); a step's randomness
is drawn eagerly from the generator first, so seeded outputs do not depend on ``compile``. With
``cuda_graphs=True`` the verify forward and the drafter's decode-sized forwards are recorded once per shape and
replayed (:mod:`batched_specdec.graphs`); everything else runs as without it. The first step's verify forward, which
also writes the prompt tails, runs eagerly in either case.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from batched_specdec import capture, graphs
from batched_specdec.controller import (
    StaticSpeculation,
    StepPlan,
    make_controller,
    shared_cost_model,
)
from batched_specdec.decode.accept import accept, emitted_logprobs
from batched_specdec.decode.admission import Admission
from batched_specdec.decode.batch import HostView, RaggedBatch
from batched_specdec.decode.compaction import COMPACT_FRACTION, compact, finished_to_follow
from batched_specdec.decode.stats import GenerationStats, PhaseTimer, progress_bar
from batched_specdec.devices import peak_memory, reset_peak_memory
from batched_specdec.drafting.base import Drafter, DraftProposal, draft_cost_ratio
from batched_specdec.forwards import model_forward, prefill, tail_forward
from batched_specdec.options import DecodeOptions, DecodeRequest, prompt_seed
from batched_specdec.processors import DRAFT_DRAWS, DRAW_BLOCK, RowDraws
from batched_specdec.ragged_cache import RaggedKVCache


class DecodeSession:
    """A set of prompts decoded by ``target``, speculatively with ``drafter`` or target-only without, in ``slots``
    rows: all at once (the default), or a few at a time, later prompts entering rows that finished
    (:attr:`admission`, continuous batching).

    Parameters
    ----------
    target : PreTrainedModel
        The model whose output is reproduced exactly.
    drafter : Drafter or None
        Proposes the drafts; None decodes target-only.
    request : DecodeRequest
        Every prompt the session may decode, checked, with per-prompt budgets and keys
        (:func:`batched_specdec.options.resolve_prompts`); its buffers are sized once for all of them.
    options : DecodeOptions
        Everything else, resolved once (:func:`batched_specdec.options.resolve_options`).
    seed : int
        The run's seed: prompt ``i`` draws under the Philox key ``prompt_seed(seed, request.keys[i])``.
    slots : int, optional
        Rows of the batch; the first ``slots`` prompts enter at once. None: every prompt.
    """

    @torch.inference_mode()
    def __init__(self, target, drafter: Drafter | None, request: DecodeRequest, options: DecodeOptions, seed: int,
                 slots: int | None = None) -> None:
        self.target, self.drafter, self.options, self.request = target, drafter, options, request
        self.device = device = request.device
        n_prompts = len(request.prompts)
        slots = n_prompts if slots is None else min(slots, n_prompts)
        self.prompt_seeds = [prompt_seed(seed, key) for key in request.keys]
        self.controller = self._make_controller(n_prompts, slots)
        verify_room = self.controller.gamma_max if drafter is not None else 0
        longest = max(len(p) + m for p, m in zip(request.prompts, request.max_gen_lens))
        stable = options.compile or options.cuda_graphs  # graph-stable buffers, compaction to power-of-two sizes
        self.capacity = capture.stable_capacity(longest + verify_room + 2, stable)
        first = range(slots)
        self.rows = RaggedBatch([request.prompts[i] for i in first], [request.max_gen_lens[i] for i in first],
                                self.prompt_seeds[:slots], self.capacity, options.pad_token_id, device,
                                logprobs=options.return_logprobs, compile=stable,
                                delayed_host_read=options.delayed_host_read)
        self.cache = RaggedKVCache(target.config, slots, self.capacity, device, options.attention, options.compile,
                                   graphs=options.cuda_graphs)
        if drafter is not None:
            drafter.use_graphs(options.cuda_graphs)
        self.eos_token_ids = torch.tensor(list(options.eos_token_ids) or [-1], dtype=torch.int64, device=device)
        self.budgets = torch.tensor(request.max_gen_lens, dtype=torch.int64)  # per prompt, on the host
        self.accepted = torch.zeros(n_prompts, dtype=torch.int64, device=device)
        self.proposed = torch.zeros(n_prompts, dtype=torch.int64, device=device)
        self.histogram = torch.zeros(self.controller.gamma_max + 1, dtype=torch.int64, device=device)
        sources = () if drafter is None or drafter.sources is None else drafter.sources
        # per (prompt, source): accepted drafts, verified drafts, (row, step) pairs that verified drafts
        self.by_source = torch.zeros(n_prompts * len(sources), 3, dtype=torch.int64, device=device)
        self.timer = PhaseTimer(options.collect_stats, device)
        self.steps = self.compactions = 0
        self.bar = None
        # Host (B,): each row's prompt tail, the last prompt tokens (up to a prefill chunk) that the first step's
        # verify forward writes before its drafts, so a prompt within one chunk costs no forward of its own; None
        # once written, or when every tail is the one token every verify forward starts with, s_b[-1].
        self.tails: list[int] | None = None
        self._recorded_before = graphs.COUNTS.snapshot()  # reset by start()
        self.admission = Admission(self)  # the prompts beyond the first ``slots``, queued (continuous batching)

    def _make_controller(self, n_prompts: int, slots: int):
        if self.drafter is None:
            return StaticSpeculation(0)
        gamma, device = self.options.gamma, self.device
        ratio = draft_cost_ratio(self.drafter, self.target)
        # Step costs are shared by calls without host launch overhead (compiled or recorded) and by eager calls apart.
        fast = self.options.compile or self.options.cuda_graphs
        costs = shared_cost_model(self.target, self.drafter, device, ratio, compiled=fast,
                                  rows=slots) if gamma == "auto" else None
        sources = len(self.drafter.sources) if self.drafter.sources else 1
        return make_controller(gamma, self.options.gamma_max, n_prompts, device, ratio, cost_model=costs,
                               num_sources=sources, copy_sources=self.drafter.copy_sources,
                               compact_fraction=COMPACT_FRACTION, fixed_width=fast)

    # --- the run ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self) -> tuple[list[list[int]], GenerationStats]:
        """Decode every prompt at once: prefill, step until every row has finished, and return the outputs (prompt
        order) and the stats."""
        t0, graphs0 = self.start()
        label = "target-only" if self.drafter is None else "speculative"
        self.bar = progress_bar(self.options.progress, sum(self.request.max_gen_lens), label)
        while not self.step():
            pass
        if self.bar is not None:
            self.bar.close()
        return self.finish(t0, graphs0)

    @torch.inference_mode()
    def start(self) -> tuple[float, int]:
        """Reset the peak-memory window and prefill the first prompts; returns the clock and graph count to pass
        to :meth:`finish`."""
        reset_peak_memory(self.device)
        t0, graphs0 = time.perf_counter(), capture.graphs_compiled()
        self._recorded_before = graphs.COUNTS.snapshot()
        self.timer.start()
        self.prefill()
        self.timer.lap("prefill")
        return t0, graphs0

    @torch.inference_mode()
    def finish(self, t0: float, graphs0: int) -> tuple[list[list[int]], GenerationStats]:
        """The outputs in prompt order and the stats of the run started at ``t0``."""
        outputs, stats = self.results(t0)
        stats.extra["graphs_compiled"] = capture.graphs_compiled() - graphs0
        if self.options.cuda_graphs:
            stats.extra.update(graphs.COUNTS.since(self._recorded_before))
        return outputs, stats

    @property
    def target_hidden(self) -> bool | tuple[int, ...]:
        """The target hidden states the drafter reads (:attr:`~batched_specdec.drafting.Drafter.target_hidden`)."""
        return False if self.drafter is None else self.drafter.target_hidden

    def prefill(self) -> None:
        """Fill the target cache with every row's prompt up to its tail, in ragged chunks (a feature drafter receives
        each chunk's hidden states); the first step's verify forward writes the tails (:attr:`tails`)."""
        rows, drafter = self.rows, self.drafter
        on_hidden = None
        if drafter is not None:
            drafter.start(rows.token_buffer[:, : rows.max_prompt_len], rows.seq_lens, self.capacity)
            on_hidden = drafter.observe_features if drafter.uses_target_features else None
        longest = self._longest_tail()
        tails = rows.host_prompt_lens.clamp_max(longest)
        self.tails = tails.tolist() if longest > 1 else None
        prefill(self.target, self.cache, rows.token_buffer, (rows.host_prompt_lens - tails).tolist(),
                self.options.prefill_chunk, on_hidden=on_hidden, hidden=self.target_hidden)

    def _longest_tail(self) -> int:
        """The most prompt tokens per row the first verify forward writes: a prefill chunk, or only ``s_b[-1]`` for a
        target without an output head module (:func:`~batched_specdec.forwards.tail_forward` keeps the logits it
        needs by a hook on it)."""
        head = self.target.get_output_embeddings() if hasattr(self.target, "get_output_embeddings") else None
        return 1 if head is None else self.options.prefill_chunk

    # --- admission (continuous batching: decode/admission.py) ------------------------------------------------

    def free_rows(self) -> Tensor:
        """:meth:`Admission.free_rows <batched_specdec.decode.admission.Admission.free_rows>`."""
        return self.admission.free_rows()

    @property
    def stage_size(self) -> int:
        """:attr:`Admission.stage_size <batched_specdec.decode.admission.Admission.stage_size>`."""
        return self.admission.stage_size

    def is_staged(self, prompt: int) -> bool:
        """:meth:`Admission.is_staged <batched_specdec.decode.admission.Admission.is_staged>`."""
        return self.admission.is_staged(prompt)

    def stage(self, prompts: list[int]) -> None:
        """:meth:`Admission.stage <batched_specdec.decode.admission.Admission.stage>`."""
        self.admission.stage(prompts)

    def admit(self, prompts: list[int]) -> None:
        """:meth:`Admission.admit <batched_specdec.decode.admission.Admission.admit>`."""
        self.admission.admit(prompts)

    # --- the step --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, refilling: bool = False) -> bool:
        """One step: plan, draft, verify, accept, commit, sync, then compaction (timed with the sync). Returns True
        once every row has finished. ``refilling=True``: queued prompts take the finished rows' places
        (:meth:`Admission.refill <batched_specdec.decode.admission.Admission.refill>`), so finished rows stay in the
        batch and the controller plans for a batch that stays full; otherwise for the batch's last stretch (each
        row's tokens to go), and finished rows leave the batch (:mod:`batched_specdec.decode.compaction`)."""
        graphs_before = self._step_started()
        writes_tails = self.tails is not None
        max_len = self.rows.max_live_seq_len()
        plan, evidence = self._plan(max_len, refilling)
        self._phase_ended("plan")
        drafts = self._draft(plan, max_len, evidence)
        self._phase_ended("draft")
        logits = self._verify(drafts.tokens, max_len)
        self._phase_ended("verify")
        out_tokens, num_accepted = self._accept(drafts, logits)
        self._phase_ended("accept")
        counts = self._commit(out_tokens, num_accepted, logits, drafts)
        self._phase_ended("commit")
        finished_before = self.rows.view.finished
        view = self._sync(counts)
        # a step that also wrote prompt tails, compiled or recorded a graph teaches nothing about step costs
        timing_usable = not writes_tails and self._graph_counts() == graphs_before
        self._observe(view, finished_before, plan, evidence, drafts, timing_usable)
        done = view.all_finished
        if not done and not refilling:
            finished = finished_to_follow(view, finished_before, self.options.delayed_host_read)
            if compact(self.rows, self.cache, self.drafter, finished):
                self.compactions += 1
        self._phase_ended("sync")
        return done

    # --- the phases ------------------------------------------------------------------------------------------

    def _plan(self, max_len: int, refilling: bool) -> tuple[StepPlan, Tensor]:
        """The controller's plan for the step and the rows' evidence ids (:meth:`_evidence_ids`); see
        :meth:`step` for ``refilling``."""
        controller = self.controller
        remaining = None if refilling or not controller.adaptive else self._remaining()
        evidence = self._evidence_ids(max_len)
        if self.tails is not None and self.drafter is not None and self.drafter.uses_target_features:
            return StepPlan(0, remaining), evidence  # it drafts from the hidden states this step's forward writes
        return controller.plan(evidence, ~self.rows.view.finished, remaining), evidence

    def _evidence_ids(self, max_len: int) -> Tensor:
        """Host ``(B,)``: where the controller keeps each row's acceptance for this step, by original row and, for a
        drafter with several sources that can say without a device read, the source the row drafts from."""
        controller, rows = self.controller, self.rows
        sources = None
        if controller.adaptive and controller.num_sources > 1:
            sources = self.drafter.next_sources(rows.token_buffer, rows.seq_lens, max_len, controller.gamma_max)
        return controller.evidence_ids(rows.host_row_ids, sources)

    def _remaining(self) -> Tensor:
        """Host ``(B,)``: each row's budget less what the host view has seen it generate."""
        rows = self.rows
        generated = rows.view.seq_lens - rows.host_prompt_lens
        return (self.budgets[rows.host_row_ids] - generated).clamp_min(1)

    def _draws(self) -> RowDraws:
        """Each row's Philox key and this step's first counter: keyed by the prompt and its committed length (under
        the ``"coupled"`` scheme also that length as the position of the row's next token)."""
        seq_lens = self.rows.seq_lens
        positions = seq_lens if self.options.sampling_scheme == "coupled" else None
        return RowDraws(self.rows.row_seeds, seq_lens * DRAW_BLOCK, positions)

    def _draft(self, plan: StepPlan, max_len: int, evidence: Tensor) -> DraftProposal:
        """The plan's drafts, cut to the width worth verifying (``evidence``: the rows' evidence ids): ``tokens``
        ``(B, width)``, ``width`` possibly 0."""
        rows, device = self.rows, self.device
        if plan.draft_len == 0:
            if self.drafter is not None:
                self.drafter.note_target_only_step()
            return DraftProposal(torch.zeros(rows.size, 0, dtype=torch.int64, device=device))
        k = plan.draft_len
        proposal = self.drafter.propose(rows.token_buffer, rows.seq_lens, k, self.options.processor, max_len,
                                        self._draws().at(DRAFT_DRAWS))
        tokens = proposal.tokens.to(device)
        probs = None if proposal.probs is None else proposal.probs.to(device)
        deterministic = proposal.deterministic_rows
        deterministic = None if probs is None or deterministic is None else deterministic.to(device)
        num = proposal.num_tokens
        # Proposal lengths, when the drafter may propose fewer than asked and the host knows them without a sync (a
        # drafter that always proposes k adds nothing to what the plan already weighed).
        lengths = num if num is not None and num.device.type == "cpu" else None
        width = self.controller.choose_width(plan, lengths, evidence, ~rows.view.finished)
        num = None if num is None else num.to(device, non_blocking=True)
        if width < k:
            tokens = tokens[:, :width]
            probs = None if probs is None else probs[:, :width]
            num = None if num is None else num.clamp_max(width)
        source = None if proposal.source is None else proposal.source.to(device)
        return DraftProposal(tokens, probs, num, deterministic, proposal.includes_catch_up, source)

    def _verify(self, draft_tokens: Tensor, max_len: int) -> Tensor:
        """The target's logits ``(B, k + 1, V)`` over ``[s_b[-1], d_1..d_k]`` (the first step's over ``[tail,
        d_1..d_k]``); a feature drafter receives the hidden states of every position the forward writes (it keeps
        only what rows commit: the rest is rewritten before it is read)."""
        k = draft_tokens.shape[1]
        self.cache.set_span(max_len + k)
        features = self.drafter is not None and self.drafter.uses_target_features
        hidden = self.target_hidden if features else False
        if self.tails is not None:  # the first step also writes the prompt tails
            tails, self.tails = self.tails, None
            out = tail_forward(self.target, self.cache, self.rows.token_buffer, tails, draft_tokens,
                               return_hidden=hidden)
        else:
            last = self.rows.last_tokens()
            out = model_forward(self.target, self.cache, last if k == 0 else torch.cat([last, draft_tokens], dim=1),
                                return_hidden=hidden)
        if not features:
            return out.to(self.device)
        logits, hidden = out
        self.drafter.observe_features(hidden, self.cache.lens)
        return logits.to(self.device)

    def _accept(self, drafts: DraftProposal, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Verification of ``drafts`` against the target's ``logits`` (:func:`~batched_specdec.decode.accept.accept`):
        the emitted tokens ``(B, width + 1)`` and the accepted drafts per row ``(B,)``."""
        options = self.options
        return accept(options.processor, drafts.tokens, drafts.probs, logits, drafts.num_tokens, self._draws(),
                      drafts.deterministic_rows, options.compile)

    def _commit(self, out_tokens: Tensor, num_accepted: Tensor, logits: Tensor, drafts: DraftProposal) -> list[Tensor]:
        """The rows commit their emitted tokens (EOS and budgets checked), the target cache is pruned to the lengths
        they return (``seq_lens - 1``), and the step's drafts are counted. Returns the per-row counts the controller
        reads at the sync (proposed and accepted, with ``gamma="auto"``), else nothing."""
        rows, options = self.rows, self.options
        logprobs = emitted_logprobs(logits, out_tokens, options.processor) if options.return_logprobs else None
        commit = rows.commit(out_tokens=out_tokens, num_accepted=num_accepted, eos_token_ids=self.eos_token_ids,
                             logprobs=logprobs, compiled=options.compile)
        self.cache.set_lens(commit.cache_lens)
        if self.drafter is None:
            return []
        live, committed = commit.was_live, commit.num_committed
        # Drafts past a row's stop (EOS or budget) in its last step count neither as proposed nor as accepted.
        k = drafts.tokens.shape[1]
        proposed = torch.full_like(num_accepted, k) if drafts.num_tokens is None else drafts.num_tokens
        proposed = torch.where(rows.finished, torch.minimum(proposed, committed), proposed) * live
        accepted = torch.minimum(num_accepted, committed) * live
        self.accepted.index_add_(0, rows.row_ids, accepted)
        self.proposed.index_add_(0, rows.row_ids, proposed)
        self.histogram.index_add_(0, accepted, live.to(torch.int64))
        if drafts.source is not None:
            index = rows.row_ids * len(self.drafter.sources) + drafts.source
            self.by_source.index_add_(0, index, torch.stack([accepted, proposed, (proposed > 0).long()], dim=1))
        self.drafter.observe_verified(proposed, accepted)
        return [proposed, accepted] if self.controller.adaptive else []

    def _sync(self, counts: list[Tensor]) -> HostView:
        """The step's one host read (flags, lengths and ``counts``) and the progress bar."""
        self.steps += 1
        view = self.rows.sync(counts)
        if self.bar is not None:
            self.bar.update(view.generated - self.bar.n)
        return view

    def _observe(self, view: HostView, finished_before: Tensor, plan: StepPlan, evidence: Tensor, drafts: DraftProposal,
                 timing_usable: bool) -> None:
        """What the adaptive controller learns from the sync: the rows that were live (``finished_before``: the view
        before the sync), their proposed and accepted drafts (``view.extra``), and with ``timing_usable`` the step's
        timings."""
        if self.controller.adaptive:
            self.controller.observe(evidence, *view.extra, ~finished_before, finished_before.shape[0], plan.draft_len,
                                    drafts.tokens.shape[1], draft_timing_usable=not drafts.includes_catch_up,
                                    timing_usable=timing_usable)

    # --- instrumentation -------------------------------------------------------------------------------------

    def _step_started(self) -> tuple[int, int]:
        """A step starts: the phase timer and the controller's clock start (and, with ``compile``, the compiled
        step). Returns the graphs compiled and recorded so far (:meth:`_graph_counts`)."""
        self.timer.start()
        if self.options.compile:
            capture.step_begin(self.device)
        self.controller.start_step()
        return self._graph_counts()

    def _phase_ended(self, phase: str) -> None:
        """The step's ``phase`` (:data:`~batched_specdec.glossary.STEP_PHASES`) has ended: the controller's clock
        marks it (without a sync), then the phase timer adds its time (with one, when enabled)."""
        self.controller.mark(phase)
        self.timer.lap(phase)

    @staticmethod
    def _graph_counts() -> tuple[int, int]:
        """Graphs compiled and graphs recorded so far: a step whose timings include either teaches the controller
        nothing about step costs."""
        return capture.graphs_compiled(), graphs.COUNTS.recorded

    # --- results ---------------------------------------------------------------------------------------------

    def results(self, t0: float) -> tuple[list[list[int]], GenerationStats]:
        """The outputs in prompt order and the :class:`GenerationStats` of the run that started at ``t0``."""
        by_prompt, logprobs = self.rows.results()
        n = len(self.request.prompts)
        outputs = [by_prompt[i] for i in range(n)]
        wall = time.perf_counter() - t0
        row_steps = self.rows.row_steps
        histogram = self.histogram.tolist() if self.drafter is not None else [row_steps]
        peak, peak_kind = peak_memory(self.device)
        stats = GenerationStats(
            accepted=self.accepted.tolist(), proposed=self.proposed.tolist(), generated=[len(o) for o in outputs],
            steps=self.steps, row_steps=row_steps, wall_time_s=wall,
            acceptance_histogram=histogram, peak_memory_bytes=peak, peak_memory_kind=peak_kind,
            time_split=dict(self.timer.split) if self.options.collect_stats else None, compactions=self.compactions,
            logprobs=None if logprobs is None else [logprobs[i] for i in range(n)],
            controller=self.controller.summary(),
        )
        if self.by_source.numel():
            stats.extra["sources"] = self._source_counts(n)
        return outputs, stats

    def _source_counts(self, n: int) -> dict[str, dict]:
        """Per source of a multi-source drafter: accepted and verified drafts, the (row, step) pairs that verified
        drafts from it, and each prompt's accepted drafts from it (prompt order)."""
        counts = self.by_source.view(n, len(self.drafter.sources), 3).cpu()
        return {name: {"accepted": int(counts[:, j, 0].sum()), "proposed": int(counts[:, j, 1].sum()),
                       "rows": int(counts[:, j, 2].sum()), "accepted_per_prompt": counts[:, j, 0].tolist()}
                for j, name in enumerate(self.drafter.sources)}
