"""Drop finished rows: gather the kept rows of every layer's caches and of the per-row state, out of place."""

import torch
import triton
import triton.language as tl

from batched_specdec.kernels._launch import copy_config, resolve_backend


@triton.jit
def _compact_rows_kernel(
    # pointers
    src_ptr,  # [B, ROW] contiguous rows
    dst_ptr,  # [N, ROW] contiguous rows
    keep_rows_ptr,  # [N] int64
    # sizes
    ROW,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    # grid: (N, cdiv(ROW, BLOCK)); a program copies BLOCK elements of one kept row.
    i = tl.program_id(0).to(tl.int64)
    pid_e = tl.program_id(1).to(tl.int64)
    src_row = tl.load(keep_rows_ptr + i)
    e = pid_e * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = e < ROW
    x = tl.load(src_ptr + src_row * ROW + e, mask=mask)
    tl.store(dst_ptr + i * ROW + e, x, mask=mask)


def _check(tensors, keep_rows):
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(f"tensors must be a list of tensors, got {type(tensors).__name__}")
    if not isinstance(keep_rows, torch.Tensor) or keep_rows.dim() != 1 or keep_rows.dtype != torch.int64:
        got = (tuple(keep_rows.shape), keep_rows.dtype) if isinstance(keep_rows, torch.Tensor) else keep_rows
        raise ValueError(f"keep_rows must be an (N,) int64 tensor of ascending row indices, got {got}")
    for k, t in enumerate(tensors):
        if t.dim() < 1:
            raise ValueError(f"tensors[{k}] must have the batch as dim 0, got a 0-d tensor")
        if t.device != keep_rows.device:
            raise ValueError(f"tensors[{k}] is on {t.device} but keep_rows is on {keep_rows.device}")


def compact_rows(tensors: list[torch.Tensor], keep_rows: torch.Tensor, *, backend: str = "auto") -> list[torch.Tensor]:
    """Return ``[t[keep_rows] for t in tensors]`` as new contiguous tensors.

    Parameters
    ----------
    tensors : list of torch.Tensor
        Tensors of any dtype with the batch as dim 0, e.g. every layer's (B, H, S, D) K and V caches and
        (B, S) / (B,) per-row state. Batch sizes may differ (each is indexed by the same keep_rows).
    keep_rows : torch.Tensor
        (N,) int64 row indices to keep, ascending, each < that tensor's batch size (not checked: no host sync).
    backend : {"auto", "triton", "torch"}
        "auto": Triton for CUDA tensors, the torch reference otherwise.

    Returns
    -------
    list of torch.Tensor
        One (N, ...) contiguous tensor per input, same dtype and device.
    """
    _check(tensors, keep_rows)
    if resolve_backend(backend, keep_rows.device) == "torch":
        return [t.index_select(0, keep_rows).contiguous() for t in tensors]
    N = keep_rows.shape[0]
    out = []
    for t in tensors:
        src = t if t.is_contiguous() else t.contiguous()
        dst = torch.empty((N, *t.shape[1:]), dtype=t.dtype, device=t.device)
        row = src[0].numel() if src.shape[0] > 0 else dst[0].numel() if N > 0 else 0
        if N > 0 and row > 0:
            if src.dtype == torch.bool:  # copy the bytes; bool pointers load as i1
                src, dst_view = src.view(torch.uint8), dst.view(torch.uint8)
            else:
                dst_view = dst
            cfg = copy_config(row)
            grid = (N, triton.cdiv(row, cfg["BLOCK"]))
            _compact_rows_kernel[grid](src, dst_view, keep_rows, row, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
        out.append(dst)
    return out


def compact_rows_reference(tensors: list[torch.Tensor], keep_rows: torch.Tensor) -> list[torch.Tensor]:
    """Pure-torch :func:`compact_rows`: the same arguments but ``backend``, the same results."""
    return compact_rows(tensors, keep_rows, backend="torch")
