"""Every Triton kernel on the device against its torch reference, on the same inputs: a correctness check, not a timing.

Cases (each run with ``backend="triton"`` and ``backend="torch"`` on identical inputs and Philox seeds):

* ``rejection_sample_from_logits``: greedy rows (temperature 0), sampled rows (temperature 1) with draft logits
  and with a deterministic draft (``draft_logits=None``), fp32 and bf16 logits, ragged ``num_draft_tokens``,
  row keys, the fused kernel and the vocabulary-split path forced (``FORCE_SPLITS``), V up to 151936.
* ``rejection_sample_from_probs``: sampled rows with draft probabilities.
* ``scatter_kv_at_offsets``, ``compact_rows``, ``commit_emitted_tokens``: bit-exact (they only move data).

Verdict per case: greedy rows and the data-movement ops must be identical. Sampled rows draw the same Philox
numbers on both paths, but the softmax sums are reduced in a different order, so a draw that falls within
rounding of a decision boundary may go the other way: the sampled cases pass together when at most
``SAMPLED_TOLERANCE`` of all their rows differ (each case's count is printed). Exit status 1 if a check fails.

    python benchmarks/check_kernels.py                   # on CUDA: real sizes
    python benchmarks/check_kernels.py --cpu-smoke       # toy sizes on CPU under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SAMPLED_TOLERANCE = 0.01
"""Share of sampled rows allowed to differ between the kernel and the reference (draws at a rounding boundary)."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="toy sizes on the CPU under the Triton interpreter (checks the script, not the GPU)")
    p.add_argument("--json", metavar="FILE", help="also write the verdicts to FILE as JSON")
    return p.parse_args(argv)


def rejection_cases(smoke: bool):
    """(name, B, K, V, dtype, kind, splits) for the rejection sampler; kind is greedy, sampled or deterministic."""
    sizes = [(1, 4, 1000), (5, 3, 517)] if smoke else [(1, 4, 151936), (16, 4, 32000), (64, 4, 151936), (7, 8, 128256)]
    splits = [1, 3] if smoke else [1, 8]
    dtypes = ["fp32"] if smoke else ["fp32", "bf16"]
    for B, K, V in sizes:
        for dtype in dtypes:
            for kind in ("greedy", "sampled", "deterministic"):
                for s in splits:
                    yield f"rejection_from_logits B={B} K={K} V={V} {dtype} {kind} splits={s}", B, K, V, dtype, kind, s


def make_rejection_inputs(B, K, V, dtype, device, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    target = 4 * torch.randn(B, K + 1, V, generator=g, device=device)
    draft = target[:, :K] + torch.randn(B, K, V, generator=g, device=device)
    # Drafts mostly the target's argmax so that greedy rows accept a few before the first rejection.
    draft_tokens = torch.where(torch.rand(B, K, generator=g, device=device) < 0.7, target[:, :K].argmax(-1),
                               torch.randint(0, V, (B, K), generator=g, device=device))
    num_draft = torch.randint(0, K + 1, (B,), generator=g, device=device)
    row_keys = torch.randperm(4 * B, generator=g, device=device)[:B]
    return draft_tokens, draft.to(dtype), target.to(dtype), num_draft, row_keys


def check_rejection(case, device) -> dict:
    import torch

    import batched_specdec.kernels._launch as launch
    from batched_specdec.kernels import rejection_sample_from_logits

    name, B, K, V, dtype, kind, splits = case
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tokens, draft, target, num_draft, keys = make_rejection_inputs(B, K, V, dt, device)
    seed = torch.tensor(1234, dtype=torch.int64, device=device)
    offset = torch.tensor(77, dtype=torch.int64, device=device)
    temperature = 0.0 if kind == "greedy" else 1.0
    draft_logits = None if kind in ("greedy", "deterministic") else draft
    out = {}
    for backend in ("triton", "torch"):
        launch.FORCE_SPLITS = splits if backend == "triton" else None
        try:
            out[backend] = rejection_sample_from_logits(tokens, draft_logits, target, temperature,
                                                        num_draft_tokens=num_draft, seed=seed, offset=offset,
                                                        row_keys=keys, backend=backend)  # fmt: skip
        finally:
            launch.FORCE_SPLITS = None
    return verdict(name, out["triton"], out["torch"], exact=kind == "greedy")


def check_probs(device, smoke: bool) -> dict:
    import torch

    from batched_specdec.kernels import rejection_sample_from_probs

    B, K, V = (4, 3, 300) if smoke else (32, 4, 151936)
    tokens, draft, target, num_draft, keys = make_rejection_inputs(B, K, V, torch.float32, device, seed=1)
    seed = torch.tensor(99, dtype=torch.int64, device=device)
    offset = torch.tensor(5, dtype=torch.int64, device=device)
    out = {b: rejection_sample_from_probs(tokens, draft.softmax(-1), target.softmax(-1), num_draft_tokens=num_draft,
                                          seed=seed, offset=offset, row_keys=keys, backend=b)
           for b in ("triton", "torch")}  # fmt: skip
    return verdict(f"rejection_from_probs B={B} K={K} V={V} fp32 sampled", out["triton"], out["torch"], exact=False)


def verdict(name, got, want, *, exact: bool) -> dict:
    """Rows whose tokens or accepted count differ; an exact case passes only with none (sampled: see main)."""
    tokens_differ = (got[0] != want[0]).any(dim=1) | (got[1] != want[1])
    rows, bad = tokens_differ.numel(), int(tokens_differ.sum())
    return {"case": name, "rows": rows, "rows_differing": bad, "exact": exact, "ok": bad == 0 or not exact}


def sampled_verdict(results: list[dict]) -> dict:
    """All sampled cases together: at most ``SAMPLED_TOLERANCE`` of their rows may differ."""
    sampled = [r for r in results if r.get("exact") is False]
    rows, bad = sum(r["rows"] for r in sampled), sum(r["rows_differing"] for r in sampled)
    allowed = int(SAMPLED_TOLERANCE * rows)
    return {"case": f"sampled rows, all cases (at most {SAMPLED_TOLERANCE:.0%} may differ)", "rows": rows,
            "rows_differing": bad, "exact": None, "ok": bad <= allowed, "allowed": allowed}


def check_data_movement(device, smoke: bool) -> list[dict]:
    """scatter, compact and commit on the device: bit-exact against the references."""
    import torch

    from batched_specdec.kernels import (
        commit_emitted_tokens,
        commit_emitted_tokens_reference,
        compact_rows,
        compact_rows_reference,
        scatter_kv_at_offsets,
        scatter_kv_at_offsets_reference,
    )

    g = torch.Generator(device=device).manual_seed(3)
    B, H, S, D, Q = (3, 2, 24, 16, 4) if smoke else (64, 8, 1024, 128, 5)
    results = []
    # States in the cache dtype, as the engine writes them; fp32 states into a bf16 cache (a cast on write) only on
    # CUDA, since the interpreter truncates that cast where the GPU rounds to nearest even.
    pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
    for dtype, state_dtype in pairs + ([] if smoke else [(torch.bfloat16, torch.float32)]):
        caches = [torch.randn(B, H, S, D, generator=g, device=device).to(dtype) for _ in range(2)]
        states = [torch.randn(B, H, Q, D, generator=g, device=device).to(state_dtype) for _ in range(2)]
        lens = torch.randint(0, S - 2, (B,), generator=g, device=device)
        a = [c.clone() for c in caches]
        b = [c.clone() for c in caches]
        scatter_kv_at_offsets(a[0], a[1], states[0], states[1], lens, backend="triton")
        scatter_kv_at_offsets_reference(b[0], b[1], states[0], states[1], lens)
        same = all(torch.equal(x, y) for x, y in zip(a, b))
        results.append({"case": f"scatter_kv_at_offsets {state_dtype} into {dtype}", "rows": B, "ok": same})
        keep = torch.arange(0, B, 2, device=device)
        got = compact_rows([*caches, lens], keep, backend="triton")
        want = compact_rows_reference([*caches, lens], keep)
        results.append({"case": f"compact_rows {dtype}", "rows": B,
                        "ok": all(torch.equal(x, y) for x, y in zip(got, want))})  # fmt: skip
    W = 6
    state = {"output_tokens": torch.randint(0, 50, (B, W), generator=g, device=device),
             "num_accepted": torch.randint(0, W, (B,), generator=g, device=device),
             "token_buffer": torch.zeros(B, 64, dtype=torch.int64, device=device),
             "seq_lens": torch.randint(1, 40, (B,), generator=g, device=device),
             "gen_lens": torch.randint(0, 10, (B,), generator=g, device=device),
             "finished": torch.rand(B, generator=g, device=device) < 0.2,
             "cache_lens": torch.zeros(B, dtype=torch.int64, device=device),
             "eos_token_ids": torch.tensor([7, 11], device=device)}  # fmt: skip
    runs = []
    for fn, kw in ((commit_emitted_tokens, {"backend": "triton"}), (commit_emitted_tokens_reference, {})):
        s = {k: v.clone() for k, v in state.items()}
        fn(*s.values(), 12, **kw)
        runs.append(s)
    results.append({"case": "commit_emitted_tokens", "rows": B,
                    "ok": all(torch.equal(runs[0][k], runs[1][k]) for k in state)})  # fmt: skip
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import check_device, run_key

    device = check_device(args.cpu_smoke, "check_kernels")
    if device is None:
        return 2
    key = run_key(device)
    print(f"{key['device']} | torch {key['torch']} | triton {key['triton']} | commit {key['commit']}")
    results = [check_rejection(c, device) for c in rejection_cases(args.cpu_smoke)]
    results.append(check_probs(device, args.cpu_smoke))
    results.append(sampled_verdict(results))
    results += check_data_movement(device, args.cpu_smoke)
    for r in results:
        extra = f"  {r['rows_differing']}/{r['rows']} rows differ" if "rows_differing" in r else ""
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']}{extra}")
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks ok")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**key, "sampled_tolerance": SAMPLED_TOLERANCE, "results": results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
