"""Coupled (drafter-invariant) verification: Gumbel-max sampling keyed by position, a draft kept iff it is the sample.

For row ``b`` and absolute position ``n`` (the index of the token in the row's sequence, prompt included), the
Gumbel vector ``G_n(v) = -log(-log(u_n(v)))`` has one entry per vocabulary id ``v``, from a Philox uniform
``u_n(v)`` under the row's key at the counter and word :data:`GUMBEL_COUNTER_BASE` defines. The target's token at
``n`` is ``y_n = argmax_v (x_n(v) / T + G_n(v))``, with ``x_n`` the target's logits there (filtered entries
``-inf``) and ``T`` the row's temperature: a Gumbel-max sample, exactly distributed as ``softmax(x_n / T)``
(Daliri, Musco and Suresh 2024). The noise depends on the row's key,
``n`` and ``v`` only, never on the step, the draft slot or the vocabulary size, so a draft model over a prefix of
the target's vocabulary that proposes ``argmax_v (log q_n(v) + G_n(v))`` reads the same entries.

Verification of ``K`` draft slots whose slot 0 sits at position ``positions[b]``: draft ``j`` is accepted while
``j < num_draft_tokens[b]`` and ``d_j == y_{positions[b] + j}``; at the first other slot the row emits ``y`` there
(also when every draft was accepted: the bonus token at slot ``num_draft_tokens[b]``). Every emitted token is then
the token target-only sampling with the same key emits at that position, whatever the draft. Rows with
temperature 0 take the plain argmax (greedy verification, no noise). ``K = 0`` is target-only sampling.

Processing: the kernel fuses the temperature (``x * (1 / T)``, with ``1 / T`` computed once in torch for both
backends), the noise, the argmax and the accept decisions in one pass over each reached position's logits, and
never reads a row's positions past its first mismatch. Top-k and top-p filtering are not fused: callers pass
logits already filtered (``LogitsProcessor.process``) with temperature 1
(:meth:`batched_specdec.processors.LogitsProcessor.verify_coupled`).

Exactness: both backends compute ``x * inv_t`` and ``+ G`` as two rounded float32 operations (the kernel is
launched with ``enable_fp_fusion=False``, so no fused multiply-add), and ties go to the lowest id. ``log`` comes
from different libraries in the two backends and may differ in the last bit, so a decision can differ only when two
scores are within about 1e-7 relative of each other.
"""

import torch
import triton
import triton.language as tl

from batched_specdec.kernels._launch import coupled_verify_config, resolve_backend
from batched_specdec.kernels.philox import philox_uniform4_reference

GUMBEL_COUNTER_BASE = 2**62
"""The Gumbel noise's Philox layout: the uniform of id ``v`` at position ``n`` of a row is output word ``v % 4`` of
Philox4x32-10 under the row's own key (its prompt's key, :func:`batched_specdec.options.prompt_seed`) at counter
``GUMBEL_COUNTER_BASE + n * GUMBEL_POSITION_STRIDE + v // 4`` (``tl.randint4x``'s words, read as ``tl.rand`` reads
its first: 31 bits times ``2**-31`` in float32), for positions ``n < 2**30`` and ids ``v < 2**34``. Four ids share a
counter, so a position of ``V`` ids costs ``V / 4`` Philox evaluations. Every other draw of a row sits below
``2**62``: the per-step draws of :class:`~batched_specdec.processors.RowDraws` use counters ``length * DRAW_BLOCK +
c`` with ``c < DRAW_BLOCK = 2**26``, below ``2**62`` for lengths under ``2**36``. So the noise never shares a
counter with them, and two (position, id) pairs never share a word."""
GUMBEL_POSITION_STRIDE = 2**32
"""Counters between the Gumbel noise of consecutive positions (see :data:`GUMBEL_COUNTER_BASE`)."""

_BASE = tl.constexpr(GUMBEL_COUNTER_BASE)  # kernels may only read constexpr globals
_STRIDE = tl.constexpr(GUMBEL_POSITION_STRIDE)
_PLACEHOLDER = -1


@triton.jit
def _gumbel_argmax(
    x_rows,  # [BLOCK_B] pointers to (b, j, 0) of the logits
    stride_v,
    inv_t,  # [BLOCK_B] fp32, 1 / temperature (0 for greedy rows)
    sample,  # [BLOCK_B] rows that add noise (temperature > 0)
    reach,  # [BLOCK_B] rows that read this position
    seed,  # [BLOCK_B] int64 Philox key of each row
    counter0,  # [BLOCK_B] int64 counter of id 0 at this position
    V,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """First argmax over ids of ``x * inv_t + G`` (sampling rows) or ``x`` (greedy rows); 0 for rows not reached."""
    cols0 = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_B], -float("inf"), tl.float32)
    tok = tl.zeros([BLOCK_B], tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        cols64 = cols.to(tl.int64)
        mask = reach[:, None] & (cols < V)[None, :]
        x = tl.load(x_rows[:, None] + cols64[None, :] * stride_v, mask=mask, other=-float("inf")).to(tl.float32)
        w0, w1, w2, w3 = tl.randint4x(seed[:, None], counter0[:, None] + (cols64 // 4)[None, :])
        lane = (cols % 4)[None, :]
        word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3))).to(tl.int32, bitcast=True)
        u = tl.where(word < 0, -word - 1, word).to(tl.float32) * 4.6566127342e-10  # tl.rand's conversion
        scale = tl.where(sample, inv_t, 1.0)  # greedy rows: x * 1, not -inf * 0 (their noisy score is not used)
        noisy = x * scale[:, None] + -tl.log(-tl.log(u))
        score = tl.where(mask, tl.where(sample[:, None], noisy, x), -float("inf"))
        bmax = tl.max(score, axis=1)
        bidx = tl.min(tl.where(score == bmax[:, None], cols64[None, :], 9223372036854775807), axis=1)
        tok = tl.where(bmax > best, bidx, tok)
        best = tl.maximum(best, bmax)
    return tok


@triton.jit
def _coupled_verify_kernel(
    # pointers
    draft_tokens_ptr,  # [B, K] int64
    logits_ptr,  # [B, K + 1, V] target logits (filtered entries -inf)
    num_draft_ptr,  # [B] int64
    inv_t_ptr,  # [B] fp32: 1 / temperature, 0 for greedy rows
    seed_ptr,  # [B] int64: each row's Philox key
    position_ptr,  # [B] int64: absolute position of slot 0
    out_tokens_ptr,  # [B, K + 1] int64
    num_accepted_ptr,  # [B] int64
    # strides
    stride_db, stride_dk,
    stride_xb, stride_xk, stride_xv,
    stride_ob, stride_ok,
    # sizes
    B, K, V,
    # meta-parameters
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K1: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < B
    n = tl.load(num_draft_ptr + rows, mask=row_mask, other=0)
    inv_t = tl.load(inv_t_ptr + rows, mask=row_mask, other=0.0)
    sample = inv_t > 0.0
    seed = tl.load(seed_ptr + rows, mask=row_mask, other=0)
    first = tl.load(position_ptr + rows, mask=row_mask, other=0)
    x_rows = logits_ptr + rows * stride_xb
    live = row_mask  # still verifying: every earlier draft accepted
    num_acc = tl.zeros([BLOCK_B], tl.int64)
    token = tl.zeros([BLOCK_B], tl.int64)
    for j in range(K + 1):
        y = tl.zeros([BLOCK_B], tl.int64)
        if tl.sum(live.to(tl.int32), axis=0) > 0:  # no row of the block reads this position: skip the pass
            y = _gumbel_argmax(x_rows + j * stride_xk, stride_xv, inv_t, sample, live, seed,
                               (first + j) * _STRIDE + _BASE, V, BLOCK_B, BLOCK_V)
        verify = live & (j < n)
        d = tl.load(draft_tokens_ptr + rows * stride_db + j * stride_dk, mask=verify, other=-1)
        accept = verify & (d == y)
        token = tl.where(live & (accept == 0), y, token)
        num_acc += accept.to(tl.int64)
        live = accept
    ks = tl.arange(0, BLOCK_K1).to(tl.int64)
    before = ks[None, :] < num_acc[:, None]
    drafts = tl.load(draft_tokens_ptr + rows[:, None] * stride_db + ks[None, :] * stride_dk,
                     mask=row_mask[:, None] & before, other=-1)
    out = tl.where(before, drafts, tl.where(ks[None, :] == num_acc[:, None], token[:, None], -1))
    tl.store(out_tokens_ptr + rows[:, None] * stride_ob + ks[None, :] * stride_ok, out,
             mask=row_mask[:, None] & (ks < K + 1)[None, :])
    tl.store(num_accepted_ptr + rows, num_acc, mask=row_mask)


@torch.library.custom_op("batched_specdec::coupled_verify", mutates_args=())
def _coupled_verify_op(draft_tokens: torch.Tensor, logits: torch.Tensor, num_draft: torch.Tensor,
                       inv_t: torch.Tensor, seeds: torch.Tensor,
                       positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on checked inputs, as one torch op (a single node in compiled graphs and CUDA graphs)."""
    B, K = draft_tokens.shape
    V = logits.shape[2]
    out = torch.empty((B, K + 1), dtype=torch.int64, device=logits.device)
    num_acc = torch.empty((B,), dtype=torch.int64, device=logits.device)
    cfg = coupled_verify_config(B, V)
    grid = (triton.cdiv(B, cfg["BLOCK_B"]),)
    _coupled_verify_kernel[grid](
        draft_tokens, logits, num_draft, inv_t, seeds, positions, out, num_acc,
        draft_tokens.stride(0), draft_tokens.stride(1),
        *logits.stride(),
        out.stride(0), out.stride(1),
        B, K, V,
        BLOCK_B=cfg["BLOCK_B"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K1=triton.next_power_of_2(K + 1),
        num_warps=cfg["num_warps"], enable_fp_fusion=False,
    )  # fmt: skip
    return out, num_acc


@_coupled_verify_op.register_fake
def _(draft_tokens, logits, num_draft, inv_t, seeds, positions):
    B, K = draft_tokens.shape
    return draft_tokens.new_empty((B, K + 1)), draft_tokens.new_empty((B,))


def _noise_at(seeds: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The Gumbel noise of ids ``ids`` at positions ``positions`` under keys ``seeds`` (broadcast together), float32,
    ``-inf`` where the uniform is 0."""
    counters = GUMBEL_COUNTER_BASE + positions * GUMBEL_POSITION_STRIDE + ids // 4
    u = philox_uniform4_reference(seeds, counters).gather(-1, (ids % 4).expand_as(counters)[..., None])[..., 0]
    return -torch.log(-torch.log(u))


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, width: int, vocab: int) -> torch.Tensor:
    """The Gumbel noise of positions ``positions[b] + j`` (``j < width``), ids ``0..vocab-1``: ``(B, width, vocab)``
    float32 (:data:`GUMBEL_COUNTER_BASE`; ``-inf`` where the uniform is 0). ``seeds``/``positions`` ``(B,)``
    int64."""
    device = positions.device
    pos = positions[:, None, None] + torch.arange(width, device=device)[None, :, None]
    groups = torch.arange(-(-vocab // 4), device=device)[None, None, :]
    u = philox_uniform4_reference(seeds[:, None, None], GUMBEL_COUNTER_BASE + pos * GUMBEL_POSITION_STRIDE + groups)
    u = u.flatten(-2)[..., :vocab]  # id v is word v % 4 of group v // 4
    return -torch.log(-torch.log(u))


def _sparse_width(z: torch.Tensor, sample: torch.Tensor) -> int | None:
    """On CPU (eagerly), the most finite entries a sampling row has at one position, when that is at most an eighth
    of the vocabulary (filtered logits: top-k, top-p): noise is then drawn for those entries only. None otherwise."""
    if z.device.type != "cpu" or torch.compiler.is_compiling() or not bool(sample.any()):
        return None
    finite = (z > float("-inf")) & sample[:, None, None]
    width = int(finite.sum(-1, dtype=torch.int32).max())  # a host value, no device read on CPU
    return width if 0 < width <= z.shape[-1] // 8 else None


def _target_tokens(x: torch.Tensor, inv_t: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``(B, K + 1)``: the kernel's ``y`` at every slot: first argmax of ``x * inv_t + G`` (sampling rows) or of
    ``x`` (greedy rows). ``-inf`` entries score ``-inf`` whatever their noise, so with filtered logits on CPU only the
    finite entries' noise is drawn (the same scores, the same first argmax)."""
    _, K1, V = x.shape
    sample = inv_t > 0
    z = x * torch.where(sample, inv_t, 1.0)[:, None, None]
    pos = positions[:, None, None] + torch.arange(K1, device=x.device)[None, :, None]
    width = _sparse_width(z, sample)
    if width is None:
        y = (z + gumbel_noise(seeds, positions, K1, V)).argmax(-1)
    else:
        vals, ids = z.topk(width, dim=-1)  # every finite entry of every sampling row
        score = vals + _noise_at(seeds[:, None, None], pos, ids)
        best = score.amax(-1, keepdim=True)
        y = torch.where(score == best, ids, V).amin(-1)  # lowest id among the best, as argmax
        y = torch.where(best[..., 0] == float("-inf"), 0, y)  # no finite score: argmax of all -inf is id 0
    return torch.where(sample[:, None], y, x.argmax(-1))


def _reference_impl(draft_tokens, logits, num_draft, inv_t, seeds, positions):
    """Pure torch, same decisions as the kernel (see the module docstring); every position is computed."""
    B, K = draft_tokens.shape
    y = _target_tokens(logits.to(torch.float32), inv_t, seeds, positions)
    slot = torch.arange(K + 1, device=logits.device)
    accept = (draft_tokens == y[:, :K]) & (slot[None, :K] < num_draft[:, None])
    stop = accept.to(torch.int64).cumprod(1).sum(1)
    placeholder = torch.full((B, 1), _PLACEHOLDER, dtype=torch.int64, device=logits.device)
    drafts = torch.cat([draft_tokens, placeholder], 1)
    token = y.gather(1, stop[:, None])
    out = torch.where(slot[None, :] < stop[:, None], drafts,
                      torch.where(slot[None, :] == stop[:, None], token, placeholder.expand_as(drafts)))
    return out, stop


def _check_tensor(name, value, shape, dtypes, device) -> None:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype not in dtypes:
        got = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value
        raise ValueError(f"{name} must be a {shape} tensor of dtype {' or '.join(map(str, dtypes))}, got {got}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but target_logits is on {device}")


def _checked(draft_tokens, target_logits, temperature, num_draft_tokens, seed, positions):
    """Checked inputs as ``(draft_tokens, logits, num_draft, inv_t, seeds, positions)``."""
    if not isinstance(target_logits, torch.Tensor) or target_logits.dim() != 3 or target_logits.shape[2] < 1:
        got = tuple(target_logits.shape) if isinstance(target_logits, torch.Tensor) else target_logits
        raise ValueError(f"target_logits must be a (B, K + 1, V) tensor with V >= 1, got {got}")
    if target_logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"target_logits must be float32, bfloat16 or float16, got {target_logits.dtype}")
    B, K1, _ = target_logits.shape
    device = target_logits.device
    _check_tensor("draft_tokens", draft_tokens, (B, K1 - 1), (torch.int64,), device)
    if num_draft_tokens is None:
        num_draft_tokens = torch.full((B,), K1 - 1, dtype=torch.int64, device=device)
    _check_tensor("num_draft_tokens", num_draft_tokens, (B,), (torch.int64,), device)
    _check_tensor("seed", seed, (B,), (torch.int64,), device)
    _check_tensor("positions", positions, (B,), (torch.int64,), device)
    if isinstance(temperature, torch.Tensor):
        if tuple(temperature.shape) not in ((B,), ()) or not temperature.dtype.is_floating_point:
            raise ValueError(f"temperature must be a float or a ({B},) float tensor, got "
                             f"{tuple(temperature.shape)} {temperature.dtype}")
        if temperature.device != device:
            raise ValueError(f"temperature is on {temperature.device} but target_logits is on {device}")
        t = temperature.to(torch.float32).expand(B)
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a float >= 0 or a ({B},) tensor, got {temperature!r}")
    else:
        t = torch.full((B,), float(temperature), dtype=torch.float32, device=device)
    inv_t = torch.where(t > 0, 1.0 / torch.where(t > 0, t, 1.0), 0.0).contiguous()
    return draft_tokens, target_logits, num_draft_tokens, inv_t, seed.contiguous(), positions.contiguous()


def coupled_verify(
    draft_tokens: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    num_draft_tokens: torch.Tensor | None = None,
    seed: torch.Tensor,
    positions: torch.Tensor,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify draft tokens by Gumbel-max coupling (module docstring): a draft is accepted iff it is the target's
    keyed sample at its position. On the device, no host read.

    Parameters
    ----------
    draft_tokens : torch.Tensor
        ``(B, K)`` int64, ``K >= 0`` (``K = 0``: one target sample per row). Slots at or past
        ``num_draft_tokens[b]`` are never accepted.
    target_logits : torch.Tensor
        ``(B, K + 1, V)`` float32/bfloat16/float16 logits at slot 0's position and the next ``K``; filtered entries
        ``-inf`` (at least one finite entry per position).
    temperature : float or torch.Tensor
        ``>= 0``, or ``(B,)`` float per row (not checked on the device); 0 verifies greedily (plain argmax).
    num_draft_tokens : torch.Tensor, optional
        ``(B,)`` int64 in ``0..K``: real draft slots per row; None means ``K``.
    seed : torch.Tensor
        ``(B,)`` int64: each row's Philox key.
    positions : torch.Tensor
        ``(B,)`` int64 in ``[0, 2**30 - K)``: the absolute position of slot 0 (the row's committed length).
    backend : {"auto", "triton", "torch"}
        ``"auto"``: the Triton kernel on CUDA, the torch reference elsewhere.

    Returns
    -------
    out_tokens : torch.Tensor
        ``(B, K + 1)`` int64: accepted drafts, the target's token at the first other slot, then ``-1``.
    num_accepted : torch.Tensor
        ``(B,)`` int64 in ``0..num_draft_tokens[b]``.
    """
    args = _checked(draft_tokens, target_logits, temperature, num_draft_tokens, seed, positions)
    if resolve_backend(backend, target_logits.device) == "triton":
        return _coupled_verify_op(*args)
    return _reference_impl(*args)


def coupled_verify_reference(
    draft_tokens: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    num_draft_tokens: torch.Tensor | None = None,
    seed: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch :func:`coupled_verify`: the same arguments but ``backend``, the same results."""
    return _reference_impl(*_checked(draft_tokens, target_logits, temperature, num_draft_tokens, seed, positions))
