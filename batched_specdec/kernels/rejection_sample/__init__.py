"""Speculative-decoding rejection sampling (Leviathan et al. 2023, Chen et al. 2023): one op, four modules.

* :mod:`.api`: the public functions and their input checks; :mod:`.reference`: the pure-torch implementation;
  :mod:`.op`: the Triton path as a torch custom op; :mod:`.fused` and :mod:`.split`: its kernels;
  :mod:`.common`: the device functions they share.

Terms.

Per row b with k = num_draft_tokens[b] real draft slots, for j = 0..k-1 the draft token d_j is accepted iff
``u_j * q_j(d_j) < p_j(d_j)`` (strict, so a token with p = 0 is never accepted, even for u = 0). At the first
rejection j the recovered token is sampled from norm(max(0, p_j - q_j)) (falling back to p_j when that is all
zero through rounding); if all k drafts are accepted the bonus token is sampled from p_k.

Randomness. Every random number of row b is a Philox4x32-10 draw keyed by the row's int64 seed at the int64 counter
``offset_b + j * (V + 1) + c``: ``c = V`` gives the acceptance uniform of (b, j), ``c = v < V`` the uniform behind
the exponential E_v = -log(u_v) of vocabulary entry v at position j. The callers give one seed for every row or one
per row, and either each row's first counter ``offset_b`` or one ``offset`` with ``offset_b = offset + row_keys[b] *
(K + 1) * (V + 1)`` (``row_keys`` default ``0..B-1``), so a row's draws follow its key, not its position in the
batch. The recovered/bonus
token is the exponential race ``argmax_v r_v / E_v`` over the unnormalised weights r (an exact sample of
r / sum(r); ties go to the lowest index). The kernel uses ``tl.rand``; the reference reproduces its bits with a
pure-torch Philox (same uint32 -> float conversion), so both backends make the same decisions from the same
seed/offset. A call consumes ``(max key + 1) * (K + 1) * (V + 1)`` counters: advance ``offset`` by that much
between calls (or draw a fresh random one, as ``generator=`` does).
With ``generator=`` the seed and offset are drawn from it with torch on the device (no host sync).

Parallelism. The fused kernel (one launch) gives each program BLOCK_B rows and walks their positions in order,
never reading a row's logits past its first rejection. When the batch is too small to fill the GPU that way,
``kernels._launch.rejection_sample_config`` switches to the vocabulary-split path (three launches: per-chunk softmax
statistics, per-chunk decisions and race, merge), which reads every reachable position but spreads each row over
many programs. Both paths draw the same Philox numbers and make the same decisions.

Exactness caveat: ``-log(u)`` and (for logits) ``exp``/the softmax sums are computed by different libraries in
the two backends and can differ in the last bit; a decision can then differ only when two race scores (or
``u * q`` and ``p``) are within ~1e-7 relative of each other.
"""

from batched_specdec.kernels.rejection_sample.api import (
    MAX_ROW_KEY,
    draw_seed_offset,
    rejection_sample_from_logits,
    rejection_sample_from_logits_reference,
    rejection_sample_from_probs,
    rejection_sample_from_probs_reference,
)
from batched_specdec.kernels.rejection_sample.reference import PLACEHOLDER_TOKEN_ID

__all__ = [
    "MAX_ROW_KEY",
    "PLACEHOLDER_TOKEN_ID",
    "draw_seed_offset",
    "rejection_sample_from_logits",
    "rejection_sample_from_logits_reference",
    "rejection_sample_from_probs",
    "rejection_sample_from_probs_reference",
]
