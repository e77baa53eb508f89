"""Compile every Triton kernel for a real GPU target (PTX and cubin via Triton's bundled ptxas), no GPU needed.

The interpreter that runs the kernel tests on CPU is permissive: it does not type-check loop-carried values or
branches the way the compiler does. This script calls each public kernel wrapper with CPU tensors, intercepts the
launches instead of running them, and compiles each intercepted launch for ``--arch`` (default sm_90, Hopper)
with the same argument types, constexprs and ``num_warps``. It must run WITHOUT ``TRITON_INTERPRET=1``.

    python tests/compile_kernels_for_gpu.py [--arch 90]

Exit status 0 when every launch compiled; it prints one line per kernel specialisation.
"""

from __future__ import annotations

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run this without TRITON_INTERPRET=1: it compiles the kernels, it does not interpret them")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import batched_specdec.kernels._launch as launch
from batched_specdec import kernels

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8"}


def capture_launches(calls) -> list[tuple[JITFunction, dict, dict]]:
    """Run ``calls()`` with every Triton launch replaced by a record of (kernel, bound arguments, options)."""
    records = []

    def fake_run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        records.append((self, bound, options))

    original = JITFunction.run
    JITFunction.run = fake_run
    try:
        calls()
    finally:
        JITFunction.run = original
    return records


def source_for(fn: JITFunction, bound: dict) -> ASTSource:
    signature, constexprs = {}, {}
    for param in fn.params:
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i64" if not -(2**31) <= value < 2**31 else "i32"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: no signature type for argument {param.name}={value!r}")
    return ASTSource(fn, signature, constexprs)


def kernel_calls():
    """One call of each public wrapper per code path (dtypes, probs/logits, with/without draft, fused/split)."""
    g = torch.Generator().manual_seed(0)
    seed, offset = torch.tensor(1), torch.tensor(2)
    for B, K, V, dtype, splits in ((4, 3, 1000, torch.float32, None), (2, 4, 32000, torch.bfloat16, None),
                                   (2, 4, 32000, torch.float16, 8)):
        launch.FORCE_SPLITS = splits
        tl_ = torch.randn(B, K + 1, V, generator=g).to(dtype)
        dl = torch.randn(B, K, V, generator=g).to(dtype)
        tokens = torch.randint(0, V, (B, K), generator=g)
        n = torch.full((B,), K)
        for draft in (dl, None):
            kernels.rejection_sample_from_logits(tokens, draft, tl_, torch.rand(B, generator=g), num_draft_tokens=n,
                                                 seed=seed, offset=offset, backend="triton")
            kernels.rejection_sample_from_probs(tokens, None if draft is None else dl.softmax(-1),
                                                tl_.softmax(-1), num_draft_tokens=n, seed=seed, offset=offset,
                                                backend="triton")
    launch.FORCE_SPLITS = None
    for dtype in (torch.float32, torch.bfloat16):
        B, H, S, Q, D = 3, 2, 64, 5, 64
        kc, vc = torch.zeros(B, H, S, D, dtype=dtype), torch.zeros(B, H, S, D, dtype=dtype)
        ks, vs = torch.randn(B, H, Q, D, generator=g), torch.randn(B, H, Q, D, generator=g)
        kernels.scatter_kv_at_offsets(kc, vc, ks, vs, torch.tensor([0, 7, 20]), backend="triton")
        kernels.compact_rows([kc, vc, torch.zeros(B, dtype=torch.int64)], torch.tensor([0, 2]), backend="triton")
    for B, K, V, dtype in ((4, 3, 1000, torch.float32), (2, 0, 32000, torch.bfloat16)):
        kernels.coupled_verify(torch.randint(0, V, (B, K), generator=g), torch.randn(B, K + 1, V).to(dtype),
                               torch.rand(B, generator=g), seed=torch.arange(B), positions=torch.arange(B),
                               backend="triton")
    B, K, S = 3, 4, 64
    out = torch.randint(0, 100, (B, K + 1), generator=g)
    kernels.commit_emitted_tokens(out, torch.tensor([4, 0, 2]), torch.zeros(B, S, dtype=torch.int64),
                                  torch.tensor([5, 9, 3]), torch.zeros(B, dtype=torch.int64),
                                  torch.zeros(B, dtype=torch.bool), torch.zeros(B, dtype=torch.int64),
                                  torch.tensor([2, 7]), 16, backend="triton")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for (90 = H100)")
    args = parser.parse_args(argv)
    # The wrappers refuse backend="triton" for CPU tensors outside the interpreter; here nothing runs.
    for name in ("rejection_sample.api", "scatter_kv", "commit_tokens", "compact_rows", "coupled_verify"):
        sys.modules[f"batched_specdec.kernels.{name}"].resolve_backend = lambda backend, device: "triton"
    records = capture_launches(kernel_calls)
    target = GPUTarget("cuda", args.arch, 32)
    seen = set()
    for fn, bound, options in records:
        src = source_for(fn, bound)
        key = (fn.__name__, tuple(sorted(src.signature.items())), tuple(sorted(map(str, src.constants.items()))))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(src, target=target, options=options)
        consts = ", ".join(f"{k}={v}" for k, v in bound.items() if k in dict(src.signature) and
                           src.signature[k] == "constexpr")
        print(f"sm_{args.arch} {fn.__name__}({consts}) num_warps={options.get('num_warps', 4)}: "
              f"{len(compiled.asm['cubin'])} bytes of cubin, {compiled.metadata.shared} bytes of shared memory")
    print(f"{len(seen)} kernel specialisations compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
