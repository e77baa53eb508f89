"""Commit a verification step: append each live row's emitted tokens, stop at EOS / the row's budget, set lengths.

The same launch writes the target cache's lengths after pruning (``cache_lens``, for the cache to adopt): pruning
rejected drafts is only a length update, no KV bytes move.
"""

import torch
import triton
import triton.language as tl

from batched_specdec.kernels._launch import resolve_backend, row_block_config


@triton.jit
def _commit_emitted_tokens_kernel(
    # pointers
    output_tokens_ptr,  # [B, K + 1] int64
    num_accepted_ptr,  # [B] int64
    token_buffer_ptr,  # [B, S] int64, in place
    seq_lens_ptr,  # [B] int64, in place
    gen_lens_ptr,  # [B] int64, in place
    finished_ptr,  # [B] bool, in place
    cache_lens_ptr,  # [B] int64, out
    eos_ptr,  # [E] int64
    max_gen_lens_ptr,  # [B] int64
    num_committed_ptr,  # [B] int64, out
    # strides
    stride_ob, stride_ok,
    stride_tb, stride_ts,
    # sizes
    B, K1, S, E,
    # meta-parameters
    BLOCK_B: tl.constexpr,
    BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < B
    ks = tl.arange(0, BLOCK_W).to(tl.int64)
    num_acc = tl.load(num_accepted_ptr + rows, mask=row_mask, other=0)
    seq = tl.load(seq_lens_ptr + rows, mask=row_mask, other=0)
    gen = tl.load(gen_lens_ptr + rows, mask=row_mask, other=0)
    done = tl.load(finished_ptr + rows, mask=row_mask, other=1) != 0
    budget = tl.load(max_gen_lens_ptr + rows, mask=row_mask, other=0)
    emitted = tl.minimum(num_acc + 1, K1)
    tok_mask = row_mask[:, None] & (ks[None, :] < emitted[:, None])
    toks = tl.load(output_tokens_ptr + rows[:, None] * stride_ob + ks[None, :] * stride_ok, mask=tok_mask, other=-1)
    is_eos = tl.zeros([BLOCK_B, BLOCK_W], tl.int1)
    for i in range(E):
        is_eos = is_eos | (toks == tl.load(eos_ptr + i))
    is_eos = is_eos & tok_mask
    first_eos = tl.min(tl.where(is_eos, ks[None, :], BLOCK_W), axis=1)
    n = tl.minimum(emitted, first_eos + 1)
    n = tl.minimum(n, tl.maximum(budget - gen, 0))
    n = tl.minimum(n, tl.maximum(S - seq, 0))  # never past the buffer
    n = tl.where(done, 0, n)
    write = row_mask[:, None] & (ks[None, :] < n[:, None])
    tl.store(token_buffer_ptr + rows[:, None] * stride_tb + (seq[:, None] + ks[None, :]) * stride_ts, toks, mask=write)
    seq = seq + n
    gen = gen + n
    done = done | (first_eos < n) | (gen >= budget)
    tl.store(seq_lens_ptr + rows, seq, mask=row_mask)
    tl.store(gen_lens_ptr + rows, gen, mask=row_mask)
    tl.store(finished_ptr + rows, done, mask=row_mask)
    tl.store(cache_lens_ptr + rows, seq - 1, mask=row_mask)
    tl.store(num_committed_ptr + rows, n, mask=row_mask)


def _check(output_tokens, num_accepted, token_buffer, seq_lens, gen_lens, finished, cache_lens, eos_token_ids,
           max_gen_len):  # fmt: skip
    if not isinstance(output_tokens, torch.Tensor) or output_tokens.dim() != 2 or output_tokens.dtype != torch.int64:
        got = ((tuple(output_tokens.shape), output_tokens.dtype) if isinstance(output_tokens, torch.Tensor)
               else output_tokens)
        raise ValueError(f"output_tokens must be a (B, K + 1) int64 tensor, got {got}")
    B = output_tokens.shape[0]
    device = output_tokens.device
    specs = (("num_accepted", num_accepted, (B,), torch.int64), ("seq_lens", seq_lens, (B,), torch.int64),
             ("gen_lens", gen_lens, (B,), torch.int64), ("finished", finished, (B,), torch.bool),
             ("cache_lens", cache_lens, (B,), torch.int64))  # fmt: skip
    for name, t, shape, dtype in specs:
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
            got = (tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else t
            raise ValueError(f"{name} must be a {shape} {dtype} tensor on {device}, got {got}")
    if (not isinstance(token_buffer, torch.Tensor) or token_buffer.dim() != 2 or token_buffer.shape[0] != B
            or token_buffer.dtype != torch.int64 or token_buffer.device != device):  # fmt: skip
        got = ((tuple(token_buffer.shape), token_buffer.dtype) if isinstance(token_buffer, torch.Tensor)
               else token_buffer)
        raise ValueError(f"token_buffer must be a ({B}, S) int64 tensor on {device}, got {got}")
    if (not isinstance(eos_token_ids, torch.Tensor) or eos_token_ids.dim() != 1 or eos_token_ids.numel() < 1
            or eos_token_ids.dtype != torch.int64 or eos_token_ids.device != device):  # fmt: skip
        got = ((tuple(eos_token_ids.shape), eos_token_ids.dtype) if isinstance(eos_token_ids, torch.Tensor)
               else eos_token_ids)
        raise ValueError(f"eos_token_ids must be an (E,) int64 tensor with E >= 1 on {device}, got {got}")
    if isinstance(max_gen_len, torch.Tensor):
        if tuple(max_gen_len.shape) != (B,) or max_gen_len.dtype != torch.int64 or max_gen_len.device != device:
            got = (tuple(max_gen_len.shape), max_gen_len.dtype, str(max_gen_len.device))
            raise ValueError(f"max_gen_len must be an int >= 0 or a ({B},) int64 tensor on {device}, got {got}")
    elif isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 0:
        raise ValueError(f"max_gen_len must be an int >= 0 or a ({B},) int64 tensor, got {max_gen_len!r}")


def commit_emitted_tokens(
    output_tokens: torch.Tensor,
    num_accepted: torch.Tensor,
    token_buffer: torch.Tensor,
    seq_lens: torch.Tensor,
    gen_lens: torch.Tensor,
    finished: torch.Tensor,
    cache_lens: torch.Tensor,
    eos_token_ids: torch.Tensor,
    max_gen_len: int | torch.Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Append each live row's emitted tokens to its buffer and update the per-row lengths, in place.

    For a row not finished, the e = num_accepted + 1 emitted tokens ``output_tokens[b, :e]`` are truncated after
    the first EOS among them (EOS kept), to ``max_gen_len[b] - gen_lens[b]`` and to the buffer size, then appended
    at ``token_buffer[b, seq_lens[b]:]``. Finished rows do not change.

    Parameters
    ----------
    output_tokens : torch.Tensor
        (B, K + 1) int64 from the sampler, padded with -1.
    num_accepted : torch.Tensor
        (B,) int64 accepted drafts per row.
    token_buffer : torch.Tensor
        (B, S) int64, in place: row b's committed tokens are ``token_buffer[b, :seq_lens[b]]``.
    seq_lens, gen_lens : torch.Tensor
        (B,) int64, in place: committed tokens (prompt + generated) and generated tokens per row.
    finished : torch.Tensor
        (B,) bool, in place: set when an EOS is appended or gen_lens reaches the row's max_gen_len.
    cache_lens : torch.Tensor
        (B,) int64, written: target cache length after pruning, the new ``seq_lens - 1``.
    eos_token_ids : torch.Tensor
        (E,) int64 with E >= 1.
    max_gen_len : int or torch.Tensor
        Generation budget: one for every row (int >= 0), or (B,) int64, one per row.
    backend : {"auto", "triton", "torch"}
        "auto": Triton for CUDA tensors, the torch reference otherwise. The Triton path is the custom op
        ``torch.ops.batched_specdec.commit_emitted_tokens``, which compiled graphs call as one node.
    validate : bool
        Check shapes, dtypes and devices first (default); the engine, whose buffers are built to fit, passes False.

    Returns
    -------
    torch.Tensor
        (B,) int64 tokens appended this step per row (0 for rows that were already finished).
    """
    if validate:
        _check(output_tokens, num_accepted, token_buffer, seq_lens, gen_lens, finished, cache_lens, eos_token_ids,
               max_gen_len)  # fmt: skip
    if not isinstance(max_gen_len, torch.Tensor):
        max_gen_len = torch.full(num_accepted.shape, max_gen_len, dtype=torch.int64, device=output_tokens.device)
    if resolve_backend(backend, output_tokens.device) == "torch":
        return _reference_impl(output_tokens, num_accepted, token_buffer, seq_lens, gen_lens, finished, cache_lens,
                               eos_token_ids, max_gen_len)  # fmt: skip
    return _commit_emitted_tokens_op(output_tokens, num_accepted, token_buffer, seq_lens, gen_lens, finished,
                                     cache_lens, eos_token_ids, max_gen_len)  # fmt: skip


@torch.library.custom_op("batched_specdec::commit_emitted_tokens",
                         mutates_args=("token_buffer", "seq_lens", "gen_lens", "finished", "cache_lens"))
def _commit_emitted_tokens_op(output_tokens: torch.Tensor, num_accepted: torch.Tensor, token_buffer: torch.Tensor,
                              seq_lens: torch.Tensor, gen_lens: torch.Tensor, finished: torch.Tensor,
                              cache_lens: torch.Tensor, eos_token_ids: torch.Tensor,
                              max_gen_lens: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The Triton launch as a torch custom op (inputs already checked): one node in compiled graphs."""
    B, K1 = output_tokens.shape
    S = token_buffer.shape[1]
    num_committed = torch.empty((B,), dtype=torch.int64, device=output_tokens.device)
    if B == 0:
        return num_committed
    cfg = row_block_config(B, K1)
    grid = (triton.cdiv(B, cfg["BLOCK_B"]),)
    _commit_emitted_tokens_kernel[grid](
        output_tokens, num_accepted, token_buffer, seq_lens, gen_lens, finished, cache_lens, eos_token_ids,
        max_gen_lens, num_committed,
        output_tokens.stride(0), output_tokens.stride(1),
        token_buffer.stride(0), token_buffer.stride(1),
        B, K1, S, eos_token_ids.shape[0],
        BLOCK_B=cfg["BLOCK_B"], BLOCK_W=cfg["BLOCK_W"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return num_committed


@_commit_emitted_tokens_op.register_fake
def _(output_tokens, num_accepted, token_buffer, seq_lens, gen_lens, finished, cache_lens, eos_token_ids,
      max_gen_lens):  # fmt: skip
    return output_tokens.new_empty((output_tokens.shape[0],))


def _reference_impl(output_tokens, num_accepted, token_buffer, seq_lens, gen_lens, finished, cache_lens,
                    eos_token_ids, max_gen_lens):  # fmt: skip
    K1 = output_tokens.shape[1]
    S = token_buffer.shape[1]
    ks = torch.arange(K1, device=output_tokens.device)[None, :]
    emitted = (num_accepted + 1).clamp_max(K1)
    valid = ks < emitted[:, None]
    is_eos = (output_tokens[..., None] == eos_token_ids).any(-1) & valid
    first_eos = torch.where(is_eos, ks, K1).amin(1)
    n = torch.minimum(emitted, first_eos + 1)
    n = torch.minimum(n, (max_gen_lens - gen_lens).clamp_min(0))
    n = torch.minimum(n, (S - seq_lens).clamp_min(0))
    n = torch.where(finished, torch.zeros_like(n), n)
    # for every buffer column, which emitted token (if any) lands there: a gather, no data-dependent shapes
    src = torch.arange(S, device=output_tokens.device)[None, :] - seq_lens[:, None]  # (B, S)
    hit = (src >= 0) & (src < n[:, None])
    token_buffer.copy_(torch.where(hit, output_tokens.gather(1, src.clamp(0, K1 - 1)), token_buffer))
    seq_lens += n
    gen_lens += n
    finished |= (first_eos < n) | (gen_lens >= max_gen_lens)
    cache_lens.copy_(seq_lens - 1)
    return n


def commit_emitted_tokens_reference(
    output_tokens: torch.Tensor,
    num_accepted: torch.Tensor,
    token_buffer: torch.Tensor,
    seq_lens: torch.Tensor,
    gen_lens: torch.Tensor,
    finished: torch.Tensor,
    cache_lens: torch.Tensor,
    eos_token_ids: torch.Tensor,
    max_gen_len: int | torch.Tensor,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Pure-torch :func:`commit_emitted_tokens`: the same arguments but ``backend``, the same results and
    updates."""
    return commit_emitted_tokens(output_tokens, num_accepted, token_buffer, seq_lens, gen_lens, finished, cache_lens,
                                 eos_token_ids, max_gen_len, backend="torch", validate=validate)  # fmt: skip
