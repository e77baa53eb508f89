"""Exactness on the device, in the layouts the engine uses: each attention path against a float64 reference, and
greedy decoding of a ragged batch on the device against the same model's decoding on the CPU.

Two parts (a correctness check, not a timing):

* ``attention``: :func:`batched_specdec.attention.ragged_attention_forward` with the engine's memory layouts (the
  query a transposed view, as transformers hands it over; K/V the first ``span`` columns of a larger cache buffer;
  ragged row lengths; a GQA group of 7 as in Qwen2-7B) for a decode (1 query per row), a verify (4) and a prefill
  chunk (64), against float64 attention computed on the CPU. Backends: ``sdpa`` with torch's own kernel choice and
  with each SDPA kernel forced alone (cuDNN, memory-efficient, math; flash takes no mask and is reported as
  unsupported), and ``flex``. Verdict: the relative error ``|out - ref| / |ref|`` under 2e-2 in bf16, 1e-3 in fp32.
* ``engine``: a random-weight Qwen2 (4 layers, GQA), float32, a batch of 8 prompts of 20-100 tokens, 48 greedy
  tokens per row: target-only and speculative decoding (gamma 3, the synthetic-acceptance drafter of
  ``bench_e2e.py``) on the device, per attention backend and SDPA kernel, each against target-only decoding of the
  same weights on the CPU (float32). A row passes when its tokens are identical; each failing row prints the index
  of its first differing token. The graph path (``cuda_graphs=True``: every decode-sized forward recorded once and
  replayed; on the CPU smoke its checking stand-in) is checked the same way, first.

    python benchmarks/check_exactness.py                  # on CUDA
    python benchmarks/check_exactness.py --graphs-only    # only the graph path's engine check (sdpa)
    python benchmarks/check_exactness.py --cpu-smoke      # the same checks at toy size on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import check_device, run_key

from batched_specdec.attention import RaggedAttentionInputs, ragged_attention_forward

TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-3}
"""Largest relative error of an attention output against the float64 reference, per dtype."""


def sdpa_kernels(device: torch.device) -> dict[str, list | None]:
    """SDPA kernel restrictions to try: torch's own choice (None), then each kernel alone."""
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return {"sdpa": None, "sdpa[math]": [SDPBackend.MATH]}
    return {"sdpa": None, "sdpa[cudnn]": [SDPBackend.CUDNN_ATTENTION],
            "sdpa[efficient]": [SDPBackend.EFFICIENT_ATTENTION], "sdpa[flash]": [SDPBackend.FLASH_ATTENTION],
            "sdpa[math]": [SDPBackend.MATH]}  # fmt: skip


def kernel_unavailable(exc: RuntimeError) -> bool:
    """Whether SDPA refused because no kernel it may use takes these inputs (cuDNN attention has no float32, flash
    no mask): reported as unsupported, not as a failure. Any other error fails the check."""
    return "No available kernel" in str(exc) or "No viable backend" in str(exc)


def restricted(kernels: list | None):
    """A context in which SDPA may use only ``kernels`` (no restriction for None)."""
    if kernels is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(kernels)


def unsupported_or_error(case: str, exc: RuntimeError) -> dict:
    """The verdict of a case that raised: unsupported (passes) when no permitted kernel takes the inputs, else an
    error (fails)."""
    unavailable = kernel_unavailable(exc)
    return {"case": case, "ok": unavailable, "status": "unsupported" if unavailable else "error",
            "detail": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}


def reference_attention(query, key, value, positions, scaling):
    """float64 attention on the CPU: K/V repeated per query group, each query sees keys <= its position.
    ``query`` ``(B, H_q, Q, D)``, ``key``/``value`` ``(B, H_kv, span, D)``; returns ``(B, Q, H_q, D)``."""
    query, key, value, positions = (t.detach().cpu().double() for t in (query, key, value, positions))
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scores = query @ key.transpose(-1, -2) * scaling
    visible = torch.arange(key.shape[2], dtype=torch.float64)[None, None, :] <= positions[:, :, None]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return (torch.softmax(scores, -1) @ value).transpose(1, 2)


def attention_case(batch, queries, dtype, device, smoke, seed=0):
    """Inputs in the engine's layouts: ``query`` a transposed view of ``(B, Q, H_q, D)``, K/V the first ``span``
    columns of ``(B, H_kv, capacity, D)`` buffers holding finite stale values past each row's length."""
    g = torch.Generator().manual_seed(seed)
    h_kv, n_rep, d, capacity = (2, 2, 16, 256) if smoke else (4, 7, 128, 1024)
    lens = torch.randint(0, capacity // 2 - queries, (batch,), generator=g)
    span = min(capacity, -(-int((lens + queries).max()) // 64) * 64)
    positions = lens[:, None] + torch.arange(queries)[None, :]
    query = torch.randn(batch, queries, h_kv * n_rep, d, generator=g).to(dtype).to(device).transpose(1, 2)
    kbuf = torch.randn(batch, h_kv, capacity, d, generator=g).to(dtype).to(device)
    vbuf = torch.randn(batch, h_kv, capacity, d, generator=g).to(dtype).to(device)
    return query, kbuf[:, :, :span], vbuf[:, :, :span], positions.to(device), span


def check_attention(device, smoke, backends):
    """Yield one verdict per (dtype, forward kind, backend): ``backends`` is a list of (name, backend, SDPA kernels)."""
    dtypes = [torch.float32] if smoke else [torch.bfloat16, torch.float32]
    for dtype in dtypes:
        for batch, queries, what in ((1, 1, "decode"), (8, 1, "decode"), (8, 4, "verify"), (8, 64, "prefill")):
            query, key, value, positions, span = attention_case(batch, queries, dtype, device, smoke)
            scaling = 1 / math.sqrt(query.shape[-1])
            ref = reference_attention(query, key, value, positions, scaling)
            for name, backend, kernels in backends:
                case = f"attention {what} B={batch} Q={queries} {str(dtype).removeprefix('torch.')} {name}"
                inputs = RaggedAttentionInputs(positions, span, [None], backend)
                try:
                    with restricted(kernels):
                        out, _ = ragged_attention_forward(SimpleNamespace(layer_idx=0), query, key, value, None,
                                                          scaling=scaling, ragged_attention=inputs)
                except RuntimeError as exc:
                    yield unsupported_or_error(case, exc)
                    continue
                err = float((out.cpu().double() - ref).norm() / ref.norm())
                yield {"case": case, "ok": math.isfinite(err) and err <= TOLERANCE[dtype], "status": "checked",
                       "rel_err": err}


def random_target(smoke: bool):
    """A random-weight Qwen2 with grouped KV heads, float32, on the CPU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    hidden, inter, heads = (64, 128, 4) if smoke else (896, 2048, 14)  # GQA: 2 KV heads
    config = Qwen2Config(vocab_size=512 if smoke else 32000, num_hidden_layers=2 if smoke else 4, hidden_size=hidden,
                         intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=4096)
    model = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    return model


def check_engine(device, smoke, backends, graphs: bool = False):
    """Yield one verdict per (backend, method): ``backends`` is a list of (name, attention, SDPA kernels); with
    ``graphs`` through the graph path (``cuda_graphs=True``)."""
    import copy

    from e2e_models import SyntheticAcceptanceDrafter, known_tokens, random_prompts

    from batched_specdec.engine import autoregressive_generate_batch, speculative_generate_batch
    from batched_specdec.processors import GreedyProcessor

    cpu_model = random_target(smoke)
    model = copy.deepcopy(cpu_model).to(device)
    draft_model = copy.deepcopy(cpu_model).to(device)  # the drafter's own proposals do not matter here
    prompts = random_prompts(8, model.config.vocab_size, 20, 100, seed=1)
    kw = {"logits_processor": GreedyProcessor(), "max_gen_len": 16 if smoke else 48, "eos_tokens_id": [],
          "pad_token_id": 0}
    ref = autoregressive_generate_batch(prompts, cpu_model, **kw)
    if graphs:
        kw["cuda_graphs"] = True
    known = known_tokens(ref, device)
    for name, attention, kernels in backends:
        for method in ("target-only", "speculative"):
            case = f"engine {method} B=8 fp32 {name}{' graphs' if graphs else ''}"
            try:
                with restricted(kernels):
                    if method == "target-only":
                        out = autoregressive_generate_batch(prompts, model, attention=attention, **kw)
                    else:
                        drafter = SyntheticAcceptanceDrafter(draft_model, known, 0.8, prompts)
                        out = speculative_generate_batch(prompts, drafter, model, gamma=3, attention=attention,
                                                         **kw)[0]
            except RuntimeError as exc:
                yield unsupported_or_error(case, exc)
                continue
            first = {i: next((j for j, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
                     for i, (o, r) in enumerate(zip(out, ref)) if o != r}
            detail = ", ".join(f"row {i} from token {j}" for i, j in first.items())
            yield {"case": case, "ok": not first, "status": "checked", "rows_differing": len(first),
                   "rows": len(ref), "detail": detail}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (checks the script)")
    parser.add_argument("--json", metavar="FILE", help="also write the verdicts to FILE as JSON")
    parser.add_argument("--graphs-only", action="store_true",
                        help="only greedy decoding through the graph path (cuda_graphs=True, sdpa) against the CPU")
    args = parser.parse_args(argv)
    device = check_device(args.cpu_smoke, "check_exactness")
    if device is None:
        return 2
    key = run_key(device)
    print(f"{key['device']} | torch {key['torch']} | commit {key['commit']}", flush=True)
    sdpa = [(name, "sdpa", kernels) for name, kernels in sdpa_kernels(device).items()]
    # The graph path first (unmeasured on a GPU until this runs there); then SDPA (no compile), then flex (compiled
    # per shape: slow to start) and the dense reference path.
    parts = [check_engine(device, args.cpu_smoke, [("sdpa", "sdpa", None)], graphs=True)]
    if not args.graphs_only:
        parts += [check_attention(device, args.cpu_smoke, sdpa),
                  check_engine(device, args.cpu_smoke, [b for b in sdpa if b[0] != "sdpa[flash]"]),
                  check_attention(device, args.cpu_smoke, [("flex", "flex", None)]),
                  check_engine(device, args.cpu_smoke, [("flex", "flex", None), ("dense", "dense", None)])]
    results = []
    for part in parts:
        for r in part:
            print(format_result(r), flush=True)
            results.append(r)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks ok")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**key, "results": results}, f, indent=1)
    return 1 if failed else 0


def format_result(r: dict) -> str:
    extra = f"  rel err {r['rel_err']:.2e}" if "rel_err" in r else ""
    if "rows_differing" in r:
        extra = f"  {r['rows_differing']}/{r['rows']} rows differ"
    if r.get("status") in ("unsupported", "error"):
        extra = f"  {r['status']}: {r['detail']}"
    elif r.get("detail"):
        extra += f" ({r['detail']})"
    return f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']}{extra}"


if __name__ == "__main__":
    sys.exit(main())
