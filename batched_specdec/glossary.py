"""The words the package uses, each defined once; code, docstrings and docs use them in these senses.

Speculative decoding follows Leviathan et al. 2023 (https://arxiv.org/abs/2211.17192) over a ragged batch. Terms:

prompt
    One token list a call decodes, identified by its index in the call's list (*prompt order*: the order of every
    per-prompt result and stat). A prompt's random draws are keyed by the run's seed and that index, never by the
    row it runs in.
row
    One sequence of the running batch, index ``b`` of every per-step ``(B, ...)`` tensor. Row ``b``'s committed
    tokens ``s_b`` are its prompt plus the tokens it has emitted. A row is *live* until it finishes; finished rows
    leave the batch when it is compacted, or take a queued prompt (continuous batching).
slot
    A row of the running batch seen as a place that prompts enter and leave: ``slots`` (``batch_size`` in
    :func:`~batched_specdec.generate`) is how many rows run at once.
draft length (``gamma``)
    How many draft tokens a step asks each row for: a fixed ``gamma``, or ``0..gamma_max`` chosen per step with
    ``gamma="auto"``. In a step's code it is ``k`` (:attr:`~batched_specdec.controller.StepPlan.draft_len`); draft
    length 0 is a plain target step.
drafts (draft tokens)
    The tokens a drafter proposes for a row in one step (:class:`~batched_specdec.drafting.DraftProposal`). A row's
    *proposal length* (``num_tokens[b]``) may be shorter than the draft length. Drafts from a deterministic source
    (q one-hot at the draft token: the n-gram drafter, a hybrid drafter's n-gram rows, ``deterministic_rows``) need
    no draft probabilities.
verify width
    Drafts per row the step's verify forward checks: the draft length, cut to what is worth verifying of the
    proposals (``gamma="auto"``; with a fixed ``gamma``, to the longest proposal when the drafter's proposal lengths
    are on the host). The verify forward carries ``width + 1`` tokens per row, ``[s_b[-1], d_1..d_width]`` (the first
    step's also carries the prompt tails).
prompt tail
    The last tokens of a row's prompt (up to a prefill chunk, ``prefill_chunk``) that the first step's verify forward
    writes before the row's drafts, ``[tail, d_1..d_width]``, instead of the prefill: a prompt within one chunk costs
    no forward of its own. Later verify forwards carry ``[s_b[-1], d_1..d_width]``. A feature drafter drafts nothing
    in the first step (it drafts from the hidden states that forward writes); prompts entering rows mid-run keep a
    tail of one token.
accepted
    A draft kept by verification; ``num_accepted[b]`` is in ``0..width``, a prefix of the row's drafts.
recovered token
    The token sampled from ``norm(max(0, p - q))`` at a row's first rejected position (``p``: the target's
    distribution, ``q``: the draft's).
bonus token
    The token sampled from ``p`` after the last draft when every draft of the row was accepted.
emitted
    The accepted drafts plus the one recovered or bonus token: every step emits ``1..width + 1`` tokens per live
    row (fewer where the row reaches an EOS id or its budget). Step outputs are ``(B, width + 1)``, padded with
    ``PLACEHOLDER_TOKEN_ID = -1`` after the emitted tokens.
budget
    The most tokens a prompt may generate (``max_gen_len`` in the engines, ``max_new_tokens`` in
    :func:`~batched_specdec.generate` and the CLI; per prompt ``max_gen_lens``, per row ``budgets``).
EOS ids
    The token ids that end a row, kept: ``eos_tokens_id`` in the engines (and
    :func:`~batched_specdec.options.resolve_options`, which takes the engines' arguments), ``eos_token_id`` in
    :func:`~batched_specdec.generate` (transformers' name), ``eos_token_ids`` everywhere else.
finish reason
    Why a prompt's generation ended: ``"stop"`` at an EOS id, ``"length"`` at its budget.
source
    Where a row's drafts come from in a step, for a drafter with several (:attr:`~batched_specdec.Drafter.sources`:
    the hybrid drafter's n-gram match or its model). Acceptance is estimated and counted per row and source.
evidence id
    Where the adaptive controller keeps one row's acceptance for one source: ``row * num_sources + source``, by the
    row's original index, so compaction and continuous batching keep it
    (:meth:`~batched_specdec.controller.AdaptiveSpeculation.evidence_ids`).
feature drafter
    A drafter that reads the target's hidden states of committed positions (EAGLE-style heads), handed over by the
    target's own prefill and verify forwards, never by an extra forward.
acceptance rate
    Accepted over proposed drafts, where every draft a row sent to the verify forward counts, also those after its
    first rejection (drafts past a row's stop count as neither). The *per-position acceptance* that the adaptive
    controller estimates, the chance that a draft verification reaches is accepted, is at least as high.
row-steps
    The (row, step) pairs in which a row was live. *Tokens per target forward* is generated tokens over row-steps:
    the mean tokens a live row gains per verify forward (accepted + 1 with drafts, 1 target-only).
step phases
    A decode step runs :data:`STEP_PHASES` in order: *plan* (the controller picks the draft length), *draft* (the
    drafter proposes and the verify width is chosen), *verify* (one target forward through the ragged cache), *accept*
    (rejection sampling or coupled verification: accepted drafts and the recovered or bonus token), *commit* (rows
    append their emitted tokens and check EOS ids and budgets; the cache is pruned to the committed lengths), *sync*
    (the step's one host read, what the controller learns from it, and compaction of finished rows). *prefill* (writing
    prompts up to their tails into the cache, at the start and when prompts enter rows) runs outside the step.
    :data:`PHASES` are the keys of ``GenerationStats.time_split``. The adaptive controller's cost model takes plan and
    draft as its draft seconds, verify and accept as its verify seconds
    (:data:`~batched_specdec.controller.policy.TIMED_PHASES`).
"""

STEP_PHASES = ("plan", "draft", "verify", "accept", "commit", "sync")
"""A decode step's phases, in the order they run."""
PHASES = ("prefill", *STEP_PHASES)
"""Every timed phase of a decode: prefill and the step's phases."""
