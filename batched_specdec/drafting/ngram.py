"""Model-free drafting: a batched, ragged n-gram (prompt-lookup) drafter.

For every row the drafter looks for the latest earlier occurrence of the row's last ``n`` committed tokens inside
the row's own committed tokens (prompt + output), trying the longest ``n`` first (adaptive n-gram drafting in the
spirit of Ou et al. 2024), and proposes the tokens that followed that occurrence. Proposals are deterministic
(``probs=None``, q one-hot at the draft token), so verification stays exact under greedy decoding and sampling.

The lookup is vectorised torch on the device of the token buffer: no per-row Python loop and no host sync. One
pass over ``n = 1..max_ngram`` costs ``O(B * S * max_ngram)`` element comparisons, because a window of length
``n + 1`` matches only where the window of length ``n`` ending at the same position matches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batched_specdec.checks import check_ngram_sizes, check_positive_int
from batched_specdec.drafting.base import Drafter, DraftProposal

__all__ = ["NGramDrafter", "ngram_lookup", "ngram_lookup_with_match"]


def ngram_lookup(
    token_buffer: Tensor,
    seq_lens: Tensor,
    gamma: int,
    max_ngram: int = 3,
    min_ngram: int = 1,
) -> tuple[Tensor, Tensor]:
    """``(tokens, num_tokens)`` of :func:`ngram_lookup_with_match`."""
    tokens, num_tokens, _ = ngram_lookup_with_match(token_buffer, seq_lens, gamma, max_ngram, min_ngram)
    return tokens, num_tokens


def ngram_lookup_with_match(
    token_buffer: Tensor,
    seq_lens: Tensor,
    gamma: int,
    max_ngram: int = 3,
    min_ngram: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Propose up to ``gamma`` tokens per row by n-gram lookup in the row's own committed tokens.

    For row ``b`` with committed tokens ``t = token_buffer[b, :seq_lens[b]]`` (length ``L``), and for
    ``n = max_ngram, ..., min_ngram`` in that order, find the largest start ``i`` with ``i + n <= L - 1`` and
    ``t[i:i+n] == t[L-n:L]`` (an earlier occurrence: it ends before the row's last position). The first ``n``
    that has a match wins (longest match), and within it the latest occurrence wins. The proposal is
    ``t[i+n : min(i+n+gamma, L)]``: it never reads past the committed end, so a row may propose fewer than
    ``gamma`` tokens, and none when no ``n`` matches.

    Parameters
    ----------
    token_buffer : Tensor
        ``(B, S)`` int64 token ids. Entries at or past ``seq_lens[b]`` are stale and never read as tokens.
    seq_lens : Tensor
        ``(B,)`` integer committed lengths in ``1..S``, on the device of ``token_buffer``. Larger values are
        read as ``S`` (rows the caller ignores, e.g. finished rows outside a scanned span).
    gamma : int
        Maximum number of draft tokens per row, ``>= 1``.
    max_ngram, min_ngram : int
        Longest and shortest n-gram tried, ``1 <= min_ngram <= max_ngram``.

    Returns
    -------
    tokens : Tensor
        ``(B, gamma)`` int64 on the device of ``token_buffer``. Slots at or past ``num_tokens[b]`` hold the row's
        last committed token (a valid id).
    num_tokens : Tensor
        ``(B,)`` int64 in ``0..gamma``: the number of real draft tokens per row.
    match_len : Tensor
        ``(B,)`` int64: the length ``n`` of the matched n-gram, 0 where none matched.
    """
    check_ngram_sizes(max_ngram, min_ngram)
    check_positive_int("gamma", gamma)
    if token_buffer.dim() != 2:
        raise ValueError(f"token_buffer must be 2-D (B, S), got shape {tuple(token_buffer.shape)}")
    if seq_lens.shape != token_buffer.shape[:1]:
        raise ValueError(f"seq_lens must have shape ({token_buffer.shape[0]},), got {tuple(seq_lens.shape)}")
    if seq_lens.device != token_buffer.device:
        raise ValueError(f"seq_lens is on {seq_lens.device}, token_buffer on {token_buffer.device}")

    B, S = token_buffer.shape
    device = token_buffer.device
    tokens = token_buffer.long()
    # A finished row the engine has not compacted away yet may be longer than the scanned span; its proposal is
    # ignored, it only has to be a valid gather.
    lens = seq_lens.long().clamp(max=S)
    pos = torch.arange(S, device=device)

    # Work with windows indexed by their END position e: the window of length n ending at e is
    # tokens[e-n+1 : e+1]. It is an earlier occurrence when e <= L - 2 and e >= n - 1, and it matches the
    # suffix when tokens[e-k] == tokens[L-1-k] for k < n, so matches for n + 1 are matches for n AND one more
    # shifted comparison.
    running = pos.unsqueeze(0) <= (lens - 2).unsqueeze(1)  # (B, S) bool
    best_end = torch.full((B,), -1, dtype=torch.long, device=device)
    best_n = torch.zeros(B, dtype=torch.long, device=device)
    for k in range(min(max_ngram, S)):
        suffix_k = tokens.gather(1, (lens - 1 - k).clamp(min=0).unsqueeze(1))  # (B, 1)
        eq = torch.zeros_like(running)
        eq[:, k:] = tokens[:, : S - k] == suffix_k
        running &= eq
        n = k + 1
        if n >= min_ngram:
            end_n = torch.where(running, pos, -1).amax(dim=1)  # (B,) latest match end, -1 if none
            # n grows with k, so a later match overrides: the longest n that matches wins.
            best_end = torch.where(end_n >= 0, end_n, best_end)
            best_n = torch.where(end_n >= 0, n, best_n)

    found = best_end >= 0
    start = best_end + 1  # first continuation position, <= L - 1 when found
    num_tokens = torch.where(found, (lens - start).clamp(max=gamma), 0)
    slots = torch.arange(gamma, device=device)
    idx = (start.unsqueeze(1) + slots).clamp(0, S - 1)
    last = tokens.gather(1, (lens - 1).clamp(0, S - 1).unsqueeze(1))  # (B, 1)
    draft = torch.where(slots < num_tokens.unsqueeze(1), tokens.gather(1, idx), last)
    return draft, num_tokens, best_n


class NGramDrafter(Drafter):
    """Drafter that proposes continuations of the row's latest n-gram from the row's own committed tokens.

    Its sources are the match lengths: a row's proposal comes from source ``n - 1`` when its matched n-gram is ``n``
    tokens long (source 0 also when nothing matched, with no proposal). Longer matches are accepted far more often
    (on the copy/edit prompts of benchmarks/results/ngram_vs_prompt_lookup_cpu.md the first draft of a 3-token
    match 87-91% of the time, of a 1-token match 23-36%), so ``gamma="auto"`` keeps each row's acceptance per match
    length and plans from the length the row's match has this step. On CPU :meth:`next_sources` runs the step's
    lookup before the plan and keeps it for :meth:`propose`; elsewhere (a device read) it says nothing and every row's
    evidence is kept as one. Plug it in as the draft of ``speculative_generate_batch(prompts, NGramDrafter(...),
    target, ...)``.

    Parameters
    ----------
    max_ngram : int
        Longest n-gram tried first, ``>= min_ngram``.
    min_ngram : int
        Shortest n-gram tried, ``>= 1``. Larger values propose less often but more accurately.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram, self.min_ngram = check_ngram_sizes(max_ngram, min_ngram)
        self.sources = tuple(f"ngram{n}" for n in range(1, self.max_ngram + 1))
        self._choice: tuple[Tensor, ...] | None = None  # next_sources' lookup (tokens, num, source, seq_lens)

    def start(self, token_buffer: Tensor, seq_lens: Tensor, max_seq_len: int) -> None:
        self._choice = None

    def admit_rows(self, token_buffer: Tensor, rows: Tensor, prompt_lens: list[int]) -> None:
        self._choice = None

    def keep_rows(self, rows: Tensor) -> None:
        self._choice = None

    def _lookup(self, token_buffer: Tensor, seq_lens: Tensor, gamma: int, max_seq_len: int | None):
        """``(tokens (B, gamma), num_tokens (B,), source (B,))`` of :func:`ngram_lookup_with_match`, the scan cut to
        ``max_seq_len``."""
        if max_seq_len is not None:
            token_buffer = token_buffer[:, : max(1, min(int(max_seq_len), token_buffer.shape[1]))]
        draft, num_tokens, match = ngram_lookup_with_match(token_buffer, seq_lens, gamma, self.max_ngram,
                                                           self.min_ngram)  # fmt: skip
        return draft, num_tokens, (match - 1).clamp_min(0)

    def next_sources(self, token_buffer, seq_lens, max_seq_len, gamma_max):
        """Each row's source this step (its match length less one), host ``(B,)``, on CPU; None elsewhere. The lookup
        (of ``gamma_max`` tokens) is kept for :meth:`propose`, which cuts it to its ``gamma``: a shorter proposal of
        the same match is a prefix of the longer one."""
        if token_buffer.device.type != "cpu":
            return None
        self._choice = (*self._lookup(token_buffer, seq_lens, gamma_max, max_seq_len), seq_lens.clone())
        return self._choice[2]

    def propose(self, token_buffer: Tensor, seq_lens: Tensor, gamma: int, logits_processor=None,
                max_seq_len: int | None = None, draws=None) -> DraftProposal:
        """Propose up to ``gamma`` draft tokens per row; see :func:`ngram_lookup_with_match`.

        Parameters
        ----------
        token_buffer : Tensor
            ``(B, S)`` int64; row ``b``'s committed tokens are ``token_buffer[b, :seq_lens[b]]``.
        seq_lens : Tensor
            ``(B,)`` int64 committed lengths, on the device of ``token_buffer``.
        gamma : int
            Maximum number of draft tokens per row.
        logits_processor, draws
            Unused: the proposals are deterministic whatever the sampling settings.
        max_seq_len : int, optional
            The largest ``seq_lens`` of a live row (known on the host). The lookup then scans only
            ``token_buffer[:, :max_seq_len]``, so its cost follows the live rows' length, not the buffer's capacity.

        Returns
        -------
        DraftProposal
            ``tokens`` ``(B, gamma)`` int64, ``probs=None`` (q one-hot), ``num_tokens`` ``(B,)`` int64 in
            ``0..gamma``, ``source`` ``(B,)`` int64 (the match length less one).
        """
        choice, self._choice = self._choice, None
        if choice is None or choice[0].shape[1] < gamma or not torch.equal(choice[3], seq_lens):
            choice = self._lookup(token_buffer, seq_lens, gamma, max_seq_len)
        return DraftProposal(tokens=choice[0][:, :gamma], probs=None, num_tokens=choice[1].clamp_max(gamma),
                             source=choice[2])

    def __repr__(self) -> str:
        return f"NGramDrafter(max_ngram={self.max_ngram}, min_ngram={self.min_ngram})"
