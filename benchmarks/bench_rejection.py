"""Rejection sampling on logits: the fused Triton kernel vs its torch reference vs an eager multi-kernel PyTorch path.

Three implementations of one verification step (temperature 1, draft logits given, i.e. the sampling path):

* ``fused_triton``: ``kernels.rejection_sample_from_logits(..., backend="triton")`` with its own dispatch (the
  one-launch fused kernel, or the three-launch vocabulary-split path at small B). Needs CUDA; on a CPU machine
  its rows are recorded as ``skipped-no-gpu`` (the Triton interpreter is not a timing).
* ``triton_no_split`` / ``triton_vocab_split``: the same call with the path forced (``kernels._launch.FORCE_SPLITS``
  = 1, or ``ceil(2 * SMs / B)`` splits), so one run shows where the split pays and whether the dispatch rule in
  ``kernels._launch.rejection_sample_config`` picks the faster path. CUDA only.
* ``torch_reference``: the same call with ``backend="torch"`` (bit-exact reference, shared Philox stream).
* ``eager_pytorch``: :func:`eager_rejection_sample` below, written the way common implementations do it:
  softmax of both sides, gather p(d) and q(d), ratio, uniform draws, cumprod to find the first rejection,
  residual max(0, p - q), multinomial, bonus token. Many launches and full-vocab intermediates.

Bytes (the effective-bandwidth formula, :func:`bytes_moved`): one read of the target logits ``B*(K+1)*V`` and the
draft logits ``B*K*V`` in the input dtype, plus the draft tokens read and the ``(B, K+1)`` output tokens and
``(B,)`` counts written (int64). This is the minimum any implementation must move; ``eff_GBps`` is that
divided by the median time, and ``frac_copy_bw`` divides it by the measured bandwidth of a device copy of the
same number of bytes (``common.copy_bandwidth_gbs``, read + write counted). On CUDA every call, the copy included,
is replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``; ``--no-cudagraph`` for ``do_bench``), so a
B=1 call's few microseconds are not launch overhead; the ``timer`` column says which timer each row used.

Goals (issue 7, recorded per row in ``goal``): at B=64, K=4, V=151936 the fused kernel reaches >= 60% of copy
bandwidth and is >= 5x faster than the eager path; at B=1 it takes < 20 us.

    python benchmarks/bench_rejection.py            # CPU: B 1 8, K 4, V 32000, fp32; reference + eager only
    python benchmarks/bench_rejection.py --quick    # CI size
    python benchmarks/bench_rejection.py            # on a CUDA machine: the full sweep, fp32 and bf16
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import KEY_FIELDS, copy_bandwidth_gbs, cpu_note, pick_device, print_run_header, run_key, save_rows, timed

import batched_specdec.kernels._launch as launch
from batched_specdec.kernels import rejection_sample_from_logits

FIELDS = KEY_FIELDS + [
    "method", "batch", "k", "vocab", "dtype", "status", "timer", "median_us", "p20_us", "p80_us", "bytes", "eff_GBps",
    "copy_GBps", "frac_copy_bw", "speedup_vs_eager", "goal", "note",
]  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRITON_METHODS = ["fused_triton", "triton_no_split", "triton_vocab_split"]
METHODS = TRITON_METHODS + ["torch_reference", "eager_pytorch"]


def eager_rejection_sample(draft_tokens, draft_logits, target_logits, generator=None):
    """Speculative rejection sampling the common eager way (temperature 1). Returns (output_tokens, num_accepted).

    ``draft_tokens`` (B, K) int64, ``draft_logits`` (B, K, V), ``target_logits`` (B, K+1, V); output tokens are
    ``(B, K+1)`` padded with -1 after the emitted ones, as the fused kernel returns them.
    """
    B, K = draft_tokens.shape
    q = torch.softmax(draft_logits.float(), dim=-1)  # (B, K, V)
    p = torch.softmax(target_logits.float(), dim=-1)  # (B, K+1, V)
    idx = draft_tokens[:, :, None]
    p_d = p[:, :K].gather(2, idx)[:, :, 0]
    q_d = q.gather(2, idx)[:, :, 0]
    ratio = (p_d / q_d).clamp(max=1.0)
    u = torch.rand(B, K, device=draft_tokens.device, generator=generator)
    accepted = (u < ratio).to(torch.int64)
    num_accepted = accepted.cumprod(dim=1).sum(dim=1)  # (B,)
    # Residual distribution at the first rejected position; p[K] (the bonus) when all were accepted.
    pos = num_accepted[:, None, None].expand(B, 1, p.shape[-1])
    p_at = p.gather(1, pos)[:, 0]
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)
    q_at = q_pad.gather(1, pos)[:, 0]
    residual = (p_at - q_at).clamp(min=0.0)
    residual = residual / residual.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    extra = torch.multinomial(residual, 1, generator=generator)[:, 0]
    cols = torch.arange(K + 1, device=draft_tokens.device)[None, :]
    drafts = torch.cat([draft_tokens, torch.zeros_like(draft_tokens[:, :1])], dim=1)
    out = torch.where(cols < num_accepted[:, None], drafts, torch.full_like(drafts, -1))
    out = torch.where(cols == num_accepted[:, None], extra[:, None], out)
    return out, num_accepted


def bytes_moved(B: int, K: int, V: int, elem: int) -> int:
    """Minimum bytes of one call: logits read once, tokens read, outputs written."""
    return B * (K + 1) * V * elem + B * K * V * elem + B * K * 8 + B * (K + 1) * 8 + B * 8


def make_inputs(B, K, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)  # generated on the device: GPU sizes are ~1 GB
    # Peaked logits (scale 4) so acceptance is neither 0 nor 1 and the residual is non-trivial.
    target = 4 * torch.randn(B, K + 1, V, generator=g, device=device)
    draft = (target[:, :K] + torch.randn(B, K, V, generator=g, device=device)).to(dtype)
    draft_tokens = torch.randint(0, V, (B, K), generator=g, device=device)
    return draft_tokens, draft, target.to(dtype)


def _with_splits(splits: int, fn):
    """``fn`` with the rejection sampler's vocabulary-split count forced to ``splits``."""
    def call():
        launch.FORCE_SPLITS = splits
        try:
            return fn()
        finally:
            launch.FORCE_SPLITS = None
    return call


def make_fns(draft_tokens, draft, target, seed, offset, gen) -> dict:
    """The timed calls on the same inputs (fixed seed/offset tensors: kernel cost only, no RNG draw)."""
    def triton_call():
        return rejection_sample_from_logits(draft_tokens, draft, target, 1.0, seed=seed, offset=offset,
                                            backend="triton")

    sms = torch.cuda.get_device_properties(draft_tokens.device).multi_processor_count \
        if draft_tokens.device.type == "cuda" else 1
    return {
        "fused_triton": triton_call,
        "triton_no_split": _with_splits(1, triton_call),
        "triton_vocab_split": _with_splits(max(2, -(-2 * sms // draft_tokens.shape[0])), triton_call),
        "torch_reference": lambda: rejection_sample_from_logits(
            draft_tokens, draft, target, 1.0, seed=seed, offset=offset, backend="torch"),
        "eager_pytorch": lambda: eager_rejection_sample(draft_tokens, draft, target, gen),
    }  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="batch sizes B (default: 1 8 32 64 128 on CUDA, 1 8 on CPU)")
    parser.add_argument("--ks", type=int, nargs="+", default=None,
                        help="draft tokens per row K (default: 1 4 8 on CUDA, 4 on CPU)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=None,
                        help="vocabulary sizes V (default: 32000 128256 151936 on CUDA, 32000 on CPU)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="logit dtypes (default: fp32 bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="implementations to time (default: all; the Triton ones are skipped without CUDA)")
    parser.add_argument("--quick", action="store_true", help="CI size: B 1, K 4, V 32000, fp32, few repeats")
    parser.add_argument("--repeats", type=int, default=15, help="timing samples on CPU (median and 20/80%% reported)")
    parser.add_argument("--no-cudagraph", action="store_true",
                        help="on CUDA, time with triton.testing.do_bench instead of replaying each call from a CUDA "
                             "graph (do_bench_cudagraph, the default: launch overhead would dominate small calls)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the shared CPU machines oversubscribe badly with more)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to results/rejection.csv")
    return parser


def resolve_sweep(args: argparse.Namespace, gpu: bool) -> argparse.Namespace:
    """The sweep: each flag's values, else the CUDA or CPU defaults; ``--quick`` is B 1, K 4, V 32000, fp32 and 5
    repeats whatever the other flags say. Methods default to all on CUDA, to the fused kernel (recorded as skipped),
    the torch reference and the eager path on CPU."""
    if args.quick:
        sweep = argparse.Namespace(batch_sizes=[1], ks=[4], vocabs=[32000], dtypes=["fp32"], repeats=5)
    else:
        sweep = argparse.Namespace(batch_sizes=args.batch_sizes or ([1, 8, 32, 64, 128] if gpu else [1, 8]),
                                   ks=args.ks or ([1, 4, 8] if gpu else [4]),
                                   vocabs=args.vocabs or ([32000, 128256, 151936] if gpu else [32000]),
                                   dtypes=args.dtypes or (["fp32", "bf16"] if gpu else ["fp32"]),
                                   repeats=args.repeats)  # fmt: skip
    sweep.methods = args.methods or (METHODS if gpu else ["fused_triton", "torch_reference", "eager_pytorch"])
    sweep.cudagraph = not args.no_cudagraph
    return sweep


def case_rows(sweep, base: dict, B: int, K: int, V: int, dname: str, copy_cache: dict, device) -> list[dict]:
    """One row per method at (B, K, V, dtype) on the same inputs: Triton methods without CUDA are recorded as
    ``skipped-no-gpu``; measured rows get ``speedup_vs_eager`` when the eager path ran, and ``fused_triton`` its
    goals. ``copy_cache`` keeps the measured copy bandwidth per byte count."""
    draft_tokens, draft, target = make_inputs(B, K, V, DTYPES[dname], device)
    nbytes = bytes_moved(B, K, V, target.element_size())
    if nbytes not in copy_cache:
        copy_cache[nbytes] = copy_bandwidth_gbs(nbytes, device, repeats=sweep.repeats, cudagraph=sweep.cudagraph)
    copy_gbs = copy_cache[nbytes]
    seed = torch.tensor(1234, dtype=torch.int64, device=device)
    offset = torch.tensor(0, dtype=torch.int64, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    fns = make_fns(draft_tokens, draft, target, seed, offset, gen)
    rows, medians = [], {}
    for m in sweep.methods:
        row = dict(base, method=m, batch=B, k=K, vocab=V, dtype=dname, bytes=nbytes, copy_GBps=copy_gbs)
        if m in TRITON_METHODS and device.type != "cuda":
            row.update(status="skipped-no-gpu", note="Triton kernel needs CUDA; the interpreter is not timed")
            rows.append(row)
            continue
        med, lo, hi, timer = timed(fns[m], device, repeats=sweep.repeats, cudagraph=sweep.cudagraph)
        medians[m] = med
        eff = nbytes / (med * 1e-3) / 1e9
        row.update(status="measured", timer=timer, median_us=med * 1e3, p20_us=lo * 1e3, p80_us=hi * 1e3,
                   eff_GBps=eff, frac_copy_bw=eff / copy_gbs)  # fmt: skip
        rows.append(row)
    for row in rows:
        if row["status"] == "measured" and "eager_pytorch" in medians:
            row["speedup_vs_eager"] = medians["eager_pytorch"] / medians[row["method"]]
        if row["method"] == "fused_triton" and row["status"] == "measured":
            row["goal"] = goal_text(row)
    return rows


def print_table(rows: list[dict], gpu: bool) -> None:
    """Print the rows as a table (time, effective bandwidth, share of copy bandwidth, speedup over eager, goals)."""
    print(f"{'method':<16}{'dtype':>6}{'B':>5}{'K':>3}{'V':>8}{'median us':>11}{'p20':>9}{'p80':>9}"
          f"{'GB/s':>8}{'copy%':>7}{'x eager':>8}  status")  # fmt: skip
    for r in rows:
        if r["status"] != "measured":
            print(f"{r['method']:<16}{r['dtype']:>6}{r['batch']:>5}{r['k']:>3}{r['vocab']:>8}{'':>52}  {r['status']}")
            continue
        sp = r.get("speedup_vs_eager")
        print(f"{r['method']:<16}{r['dtype']:>6}{r['batch']:>5}{r['k']:>3}{r['vocab']:>8}{r['median_us']:>11.1f}"
              f"{r['p20_us']:>9.1f}{r['p80_us']:>9.1f}{r['eff_GBps']:>8.2f}{100 * r['frac_copy_bw']:>6.1f}%"
              f"{'' if sp is None else f'{sp:.2f}':>8}  {r['status']} {r.get('goal', '')}")  # fmt: skip
    if not gpu:
        print("GPU goals NOT measured: no CUDA device; fused_triton rows are skipped-no-gpu.")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = pick_device(args.device, parser)
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    sweep = resolve_sweep(args, gpu)
    key = run_key(device)
    note = cpu_note(device)
    print_run_header(key, note)
    base = dict(key, note=note)
    rows = []
    copy_cache: dict[int, float] = {}
    for dname in sweep.dtypes:
        for V in sweep.vocabs:
            for K in sweep.ks:
                for B in sweep.batch_sizes:
                    rows += case_rows(sweep, base, B, K, V, dname, copy_cache, device)
    print_table(rows, gpu)
    if not args.no_save:
        save_rows("rejection", FIELDS, rows)
    return 0


def goal_text(row: dict) -> str:
    """The issue-7 goals this row can speak to, with met/NOT met and the margin."""
    parts = []
    if row["batch"] == 64 and row["k"] == 4 and row["vocab"] == 151936:
        frac = row["frac_copy_bw"]
        parts.append(f"copy-bw>=60%: {'met' if frac >= 0.6 else 'NOT met'} ({100 * frac:.0f}%)")
        sp = row.get("speedup_vs_eager")
        if sp is not None:
            parts.append(f"vs-eager>=5x: {'met' if sp >= 5 else 'NOT met'} ({sp:.1f}x)")
    if row["batch"] == 1:
        us = row["median_us"]
        parts.append(f"B1<20us: {'met' if us < 20 else 'NOT met'} ({us:.1f} us)")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
