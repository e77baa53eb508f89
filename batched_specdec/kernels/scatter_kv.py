"""Ragged KV-cache write: row b's Q new entries go to positions cache_lens[b] .. cache_lens[b] + Q - 1.

Called once per layer from the HF ``Cache.update``; K and V are written by the same launch.
"""

import torch
import triton
import triton.language as tl

from batched_specdec.kernels._launch import copy_config, resolve_backend


@triton.jit
def _scatter_kv_at_offsets_kernel(
    # pointers
    key_cache_ptr,  # [B, H, S, D]
    value_cache_ptr,  # [B, H, S, D]
    key_states_ptr,  # [B, H, Q, D]
    value_states_ptr,  # [B, H, Q, D]
    cache_lens_ptr,  # [B] int64
    # strides
    stride_kcb, stride_kch, stride_kcs, stride_kcd,
    stride_vcb, stride_vch, stride_vcs, stride_vcd,
    stride_ksb, stride_ksh, stride_ksq, stride_ksd,
    stride_vsb, stride_vsh, stride_vsq, stride_vsd,
    # sizes
    H, S, Q, D,
    # meta-parameters
    BLOCK: tl.constexpr,
):  # fmt: skip
    # grid: (B * H, cdiv(Q * D, BLOCK)); a program copies BLOCK consecutive (q, d) entries of one (b, h) for K and V.
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_e = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    e = pid_e * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    q = e // D
    d = e % D
    pos = tl.load(cache_lens_ptr + b) + q
    # entries past the static buffer are dropped, never written out of bounds
    mask = (e < Q * D) & (pos < S) & (pos >= 0)
    k = tl.load(key_states_ptr + b * stride_ksb + h * stride_ksh + q * stride_ksq + d * stride_ksd, mask=mask)
    v = tl.load(value_states_ptr + b * stride_vsb + h * stride_vsh + q * stride_vsq + d * stride_vsd, mask=mask)
    # explicit round-to-nearest cast to the cache dtype (an implicit store cast may truncate)
    k = k.to(key_cache_ptr.dtype.element_ty)
    v = v.to(value_cache_ptr.dtype.element_ty)
    tl.store(key_cache_ptr + b * stride_kcb + h * stride_kch + pos * stride_kcs + d * stride_kcd, k, mask=mask)
    tl.store(value_cache_ptr + b * stride_vcb + h * stride_vch + pos * stride_vcs + d * stride_vcd, v, mask=mask)


def _check(key_cache, value_cache, key_states, value_states, cache_lens):
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache),
                    ("key_states", key_states), ("value_states", value_states)):  # fmt: skip
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else t
            raise ValueError(f"{name} must be a 4-D tensor (B, H, S or Q, D), got {got}")
    B, H, S, D = key_cache.shape
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} must equal key_cache shape {(B, H, S, D)}")
    Q = key_states.shape[2]
    for name, t in (("key_states", key_states), ("value_states", value_states)):
        if tuple(t.shape) != (B, H, Q, D):
            raise ValueError(f"{name} must have shape (B, H, Q, D) = {(B, H, Q, D)}, got {tuple(t.shape)}")
    if not isinstance(cache_lens, torch.Tensor) or tuple(cache_lens.shape) != (B,) or cache_lens.dtype != torch.int64:
        got = (tuple(cache_lens.shape), cache_lens.dtype) if isinstance(cache_lens, torch.Tensor) else cache_lens
        raise ValueError(f"cache_lens must be a ({B},) int64 tensor, got {got}")
    for name, t in (("value_cache", value_cache), ("key_states", key_states),
                    ("value_states", value_states), ("cache_lens", cache_lens)):  # fmt: skip
        if t.device != key_cache.device:
            raise ValueError(f"{name} is on {t.device} but key_cache is on {key_cache.device}")


def scatter_kv_at_offsets(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> None:
    """Write this forward's K/V entries into static cache buffers at per-row offsets, in place.

    Parameters
    ----------
    key_cache, value_cache : torch.Tensor
        (B, H, S, D) static buffers of any float dtype, written in place.
    key_states, value_states : torch.Tensor
        (B, H, Q, D) new entries (cast to the cache dtype on write).
    cache_lens : torch.Tensor
        (B,) int64: row b's entries go to positions cache_lens[b] .. cache_lens[b] + Q - 1; positions >= S
        are dropped.
    backend : {"auto", "triton", "torch"}
        "auto": Triton for CUDA tensors, the torch reference otherwise. The Triton path is the custom op
        ``torch.ops.batched_specdec.scatter_kv_at_offsets``, which compiled graphs call as one node.
    validate : bool
        Check shapes, dtypes and devices first (default). The ragged cache, which builds its buffers itself,
        passes False: this runs once per layer per forward.
    """
    if validate:
        _check(key_cache, value_cache, key_states, value_states, cache_lens)
    if resolve_backend(backend, key_cache.device) == "torch":
        _reference_impl(key_cache, value_cache, key_states, value_states, cache_lens)
        return
    _scatter_kv_at_offsets_op(key_cache, value_cache, key_states, value_states, cache_lens)


@torch.library.custom_op("batched_specdec::scatter_kv_at_offsets", mutates_args=("key_cache", "value_cache"))
def _scatter_kv_at_offsets_op(key_cache: torch.Tensor, value_cache: torch.Tensor, key_states: torch.Tensor,
                              value_states: torch.Tensor, cache_lens: torch.Tensor) -> None:
    """The Triton launch as a torch custom op (inputs already checked), so torch.compile and CUDA graphs capture
    it as one node instead of tracing into the launch."""
    B, H, S, D = key_cache.shape
    Q = key_states.shape[2]
    if B * H * Q * D == 0:
        return
    cfg = copy_config(Q * D)
    grid = (B * H, triton.cdiv(Q * D, cfg["BLOCK"]))
    _scatter_kv_at_offsets_kernel[grid](
        key_cache, value_cache, key_states, value_states, cache_lens,
        *key_cache.stride(), *value_cache.stride(), *key_states.stride(), *value_states.stride(),
        H, S, Q, D,
        BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
    )  # fmt: skip


@_scatter_kv_at_offsets_op.register_fake
def _(key_cache, value_cache, key_states, value_states, cache_lens) -> None:
    return None


def _reference_impl(key_cache, value_cache, key_states, value_states, cache_lens):
    B, H, S, D = key_cache.shape
    Q = key_states.shape[2]
    if Q == 0:
        return
    # Touch only the Q new positions per row (O(Q), not O(S)). Entries that would land past S are dropped: they
    # are redirected to slot lens - 1 (never a write target of this call) and rewrite its own value there.
    pos = cache_lens[:, None] + torch.arange(Q, device=key_cache.device)[None, :]  # (B, Q)
    if key_cache.device.type == "cpu" and not torch.compiler.is_compiling():
        # Every engine forward writes inside the buffer: one scatter per buffer (this runs once per layer per forward;
        # the general path below takes three times as long), no host read. An entry past S makes the CPU scatter_
        # raise (it checks every index); what it wrote before are in-range entries, which the general path rewrites
        # with the same values.
        idx = pos[:, None, :, None].expand(B, H, Q, D)
        try:
            key_cache.scatter_(2, idx, key_states.to(key_cache.dtype))
            value_cache.scatter_(2, idx, value_states.to(value_cache.dtype))
            return
        except RuntimeError:
            pass
    valid = (pos < S)[:, None, :, None]
    idx = torch.where(pos < S, pos, (cache_lens[:, None] - 1).clamp_min(0))[:, None, :, None].expand(B, H, Q, D)
    for cache, states in ((key_cache, key_states), (value_cache, value_states)):
        new = states.to(cache.dtype)
        cache.scatter_(2, idx, torch.where(valid, new, cache.gather(2, idx)))


def scatter_kv_at_offsets_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """Pure-torch :func:`scatter_kv_at_offsets`: the same arguments but ``backend``, in place."""
    scatter_kv_at_offsets(key_cache, value_cache, key_states, value_states, cache_lens, backend="torch",
                          validate=validate)
