"""KV-cache bookkeeping after verification: our per-row prune + commit + append vs the two common alternatives.

After a verify forward every row ``b`` holds ``len_b + K + 1`` cache entries (K drafts), of which it keeps
``len_b + a_b + 1`` (``a_b`` accepted, ragged across rows). Each method is timed from that state until the cache
is ready for the next step *and* the next step's ``K + 1`` entries per row are written, over all ``L`` layers:

* ``ragged_prune_commit_append`` (ours): ``kernels.commit_emitted_tokens`` (append the emitted tokens, set per-row
  lengths = prune; no KV bytes move) + per layer ``kernels.scatter_kv_at_offsets`` of the next ``K + 1`` entries
  at each row's own offset. Triton on CUDA, the torch references on CPU (``backend`` column). Timed calls also
  reset three ``(B,)`` length tensors so that every call sees the same state.
* ``crop_to_shortest_recompute``: a rectangular ``transformers.DynamicCache``; every row is cropped to the shortest
  accepted length ``T + min_b(a_b) + 1`` and the ``max_b(a_b) - min_b(a_b)`` tokens the longer rows lose are
  recomputed with a model forward (random-weight Llama of the stated shape; its cache update is HF's ``cat``).
* ``copy_realign``: a padded rectangle ``[B, H, T, D]`` per layer (left-padded); rows are unpadded and re-padded
  to the new common length with one vectorised gather per tensor (the fastest form of this approach; per-row
  Python loops are slower), then the next ``K + 1`` entries are written into the re-padded buffer.

KV bytes moved by ``copy_realign`` (``kv_bytes`` column) = ``2 * L * 2 * B * H * T * D * elem`` (read and write
of K and V); ours moves ``2 * L * B * H * (K + 1) * D * elem`` (the new entries only).

    python benchmarks/bench_kv.py            # CPU: tiny shapes, B 1 8
    python benchmarks/bench_kv.py --quick    # CI size
    python benchmarks/bench_kv.py            # on CUDA: 32 layers x 8 kv heads x 128 dim, bf16, B 1 8 32 64 128
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import KEY_FIELDS, cpu_note, do_bench, join_notes, pick_device, print_run_header, run_key, save_rows

from batched_specdec.kernels import commit_emitted_tokens, scatter_kv_at_offsets

FIELDS = KEY_FIELDS + [
    "method", "backend", "batch", "k", "layers", "kv_heads", "head_dim", "kv_len", "dtype", "median_us", "p20_us",
    "p80_us", "kv_bytes", "speedup_of_ours", "note",
]  # fmt: skip


def make_model(layers, kv_heads, head_dim, q_heads, intermediate, vocab, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=q_heads * head_dim, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=8192,
    )  # fmt: skip
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: an fp32 8B model would need 32 GB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def bench_ours(B, K, L, H, D, T, dtype, device, accepted, repeats):
    S = T + 2 * (K + 1)
    kbufs = [torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(L)]
    vbufs = [torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(L)]
    new_k = torch.randn(B, H, K + 1, D, device=device, dtype=dtype)
    new_v = torch.randn_like(new_k)
    lens0 = torch.randint(T // 2, T + 1, (B,), device=device)  # ragged committed lengths, s_b
    out_tokens = torch.randint(0, 1000, (B, K + 1), device=device)
    cols = torch.arange(K + 1, device=device)[None, :]
    out_tokens = torch.where(cols <= accepted[:, None], out_tokens, torch.full_like(out_tokens, -1))
    token_buffer = torch.zeros(B, S + K + 1, dtype=torch.int64, device=device)
    seq_lens, gen_lens = lens0.clone(), torch.zeros_like(lens0)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache_lens = torch.empty_like(lens0)
    eos = torch.tensor([-1], device=device)

    def step():
        seq_lens.copy_(lens0)
        gen_lens.zero_()
        finished.zero_()
        commit_emitted_tokens(out_tokens, accepted, token_buffer, seq_lens, gen_lens, finished, cache_lens, eos, 10**6)
        for k, v in zip(kbufs, vbufs):
            scatter_kv_at_offsets(k, v, new_k, new_v, cache_lens)

    return do_bench(step, device, repeats=repeats), 2 * L * B * H * (K + 1) * D * new_k.element_size()


def bench_crop(model, B, K, L, H, D, T, dtype, device, accepted, repeats):
    from transformers import DynamicCache

    keep = T + int(accepted.min()) + 1
    delta = int(accepted.max() - accepted.min())
    cache = DynamicCache(config=model.config)
    for layer in range(L):
        cache.update(torch.randn(B, H, T + K + 1, D, device=device, dtype=dtype),
                     torch.randn(B, H, T + K + 1, D, device=device, dtype=dtype), layer)  # fmt: skip
    ids = torch.randint(0, model.config.vocab_size, (B, max(delta, 1)), device=device)
    pos = torch.arange(keep, keep + ids.shape[1], device=device)[None].expand(B, -1)

    def step():
        extra = cache.get_seq_length() - keep
        if extra > 0:
            cache.crop(-extra)  # negative crop = drop that many tokens (works across transformers 5.x)
        if delta > 0:
            model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)

    with torch.inference_mode():
        return do_bench(step, device, repeats=repeats), delta


def bench_realign(B, K, L, H, D, T, dtype, device, accepted, repeats):
    lens = torch.randint(T // 2, T + 1, (B,), device=device) + K + 1  # valid entries after verify, right-aligned
    new_lens = lens - K + accepted  # keep len + a + 1 of the len + K + 1
    old_T = T + K + 1
    new_T = int(new_lens.max()) + K + 1  # room for the next K + 1 entries on the right
    kbufs = [torch.randn(B, H, old_T, D, device=device, dtype=dtype) for _ in range(L)]
    vbufs = [torch.randn(B, H, old_T, D, device=device, dtype=dtype) for _ in range(L)]
    new_k = torch.randn(B, H, K + 1, D, device=device, dtype=dtype)
    new_v = torch.randn_like(new_k)
    # Left-padded layout: row b's entry i (0-based) sits at column old_T - lens[b] + i. In the new rectangle its
    # kept entries end at column new_T - (K + 1) - 1.
    j = torch.arange(new_T - (K + 1), device=device)[None, :]
    start_new = (new_T - (K + 1)) - new_lens[:, None]
    src = (old_T - lens[:, None]) + (j - start_new)
    valid = j >= start_new
    src = torch.where(valid, src, torch.zeros_like(src))
    idx = src[:, None, :, None].expand(B, H, -1, D)
    mask = valid[:, None, :, None]

    def step():
        out = []
        for k, v in zip(kbufs, vbufs):
            nk = torch.empty(B, H, new_T, D, device=device, dtype=dtype)
            nv = torch.empty_like(nk)
            nk[:, :, : new_T - (K + 1)] = torch.where(mask, k.gather(2, idx), 0)
            nv[:, :, : new_T - (K + 1)] = torch.where(mask, v.gather(2, idx), 0)
            nk[:, :, new_T - (K + 1):] = new_k
            nv[:, :, new_T - (K + 1):] = new_v
            out.append((nk, nv))
        return out

    return do_bench(step, device, repeats=repeats), 2 * L * 2 * B * H * old_T * D * new_k.element_size()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="batch sizes B (default: 1 8 32 64 128 on CUDA, 1 8 on CPU)")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per row per step (gamma)")
    parser.add_argument("--layers", type=int, default=None, help="layers L (default: 32 on CUDA, 2 on CPU)")
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads H (default: 8 on CUDA, 2 on CPU)")
    parser.add_argument("--head-dim", type=int, default=None, help="head dimension D (default: 128 on CUDA, 32 on CPU)")
    parser.add_argument("--q-heads", type=int, default=None,
                        help="query heads of the recompute model (default: 32 on CUDA, 4 on CPU)")
    parser.add_argument("--intermediate", type=int, default=None,
                        help="MLP width of the recompute model (default: 14336 on CUDA, 512 on CPU)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary of the recompute model (default: 128256 on CUDA, 1000 on CPU)")
    parser.add_argument("--kv-len", type=int, default=None,
                        help="committed cache length T per row before the step (default: 512 on CUDA, 128 on CPU)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="KV and model dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--no-recompute", action="store_true",
                        help="skip crop_to_shortest_recompute (it builds a random-weight model of the stated shape)")
    parser.add_argument("--quick", action="store_true", help="CI size: B 1 8, 1 layer, T 64, few repeats")
    parser.add_argument("--repeats", type=int, default=15, help="timing samples on CPU (median and 20/80%% reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the shared CPU machines oversubscribe badly with more)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the accepted counts and random tensors")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to results/kv.csv")
    return parser


def resolve_sizes(args: argparse.Namespace, gpu: bool) -> argparse.Namespace:
    """The run's sizes and dtype: each flag's value, else its CUDA or CPU default; ``--quick`` sets B 1 8, one layer,
    T 64 and 5 repeats over them."""

    def pick(value, on_gpu, on_cpu):
        return value if value is not None else (on_gpu if gpu else on_cpu)

    sizes = argparse.Namespace(
        batch_sizes=args.batch_sizes or ([1, 8, 32, 64, 128] if gpu else [1, 8]), K=args.k,
        L=pick(args.layers, 32, 2), H=pick(args.kv_heads, 8, 2), D=pick(args.head_dim, 128, 32),
        T=pick(args.kv_len, 512, 128), repeats=args.repeats, q_heads=pick(args.q_heads, 32, 4),
        intermediate=pick(args.intermediate, 14336, 512), vocab=pick(args.vocab, 128256, 1000),
        dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or
                                                                                     ("bf16" if gpu else "fp32")],
    )  # fmt: skip
    if args.quick:
        sizes.batch_sizes, sizes.L, sizes.T, sizes.repeats = [1, 8], 1, 64, 5
    return sizes


def recompute_model(args: argparse.Namespace, sizes: argparse.Namespace, device):
    """The random-weight Llama that ``crop_to_shortest_recompute`` runs (seeded with ``--seed``), or None with
    ``--no-recompute``; prints its size."""
    if args.no_recompute:
        return None
    torch.manual_seed(args.seed)
    s = sizes
    model = make_model(s.L, s.H, s.D, s.q_heads, s.intermediate, s.vocab, s.dtype, device)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"recompute model: random Llama, {n_params:.1f}M params, L={s.L} H_kv={s.H} D={s.D}")
    return model


def batch_rows(B: int, sizes, model, device, base: dict, note: str, seed: int) -> list[dict]:
    """The rows of batch size ``B``: ours, then crop-and-recompute (when ``model`` is set), then copy-realign, all on
    the same accepted counts (drawn with ``seed + B``); ``speedup_of_ours`` is each method's time over ours."""
    s = sizes
    g = torch.Generator().manual_seed(seed + B)
    accepted = torch.randint(0, s.K + 1, (B,), generator=g).to(device)
    dims = (B, s.K, s.L, s.H, s.D, s.T, s.dtype, device, accepted, s.repeats)
    base = dict(base, batch=B)
    backend = "triton" if device.type == "cuda" else "torch-reference"
    (ours, lo, hi), nbytes = bench_ours(*dims)
    rows = [dict(base, method="ragged_prune_commit_append", backend=backend, median_us=ours * 1e3, p20_us=lo * 1e3,
                 p80_us=hi * 1e3, kv_bytes=nbytes, speedup_of_ours=1.0,
                 note=join_notes(note, "no KV bytes move on prune"))]  # fmt: skip
    if model is not None:
        (m, lo, hi), delta = bench_crop(model, *dims)
        rows.append(dict(base, method="crop_to_shortest_recompute", backend="torch+transformers",
                         median_us=m * 1e3, p20_us=lo * 1e3, p80_us=hi * 1e3, kv_bytes="", speedup_of_ours=m / ours,
                         note=join_notes(note, f"recomputes {delta} tokens per row (max-min accepted)")))  # fmt: skip
    (m, lo, hi), nbytes = bench_realign(*dims)
    rows.append(dict(base, method="copy_realign", backend="torch", median_us=m * 1e3, p20_us=lo * 1e3,
                     p80_us=hi * 1e3, kv_bytes=nbytes, speedup_of_ours=m / ours,
                     note=join_notes(note, "vectorised gather unpad/re-pad")))  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    """Print the rows as a table: per-call median and quantiles in microseconds and each method's time over ours."""
    print(f"{'method':<30}{'B':>5}{'K':>3}{'L':>4}{'T':>6}{'median us':>12}{'p20':>11}{'p80':>11}{'ours x':>8}")
    for r in rows:
        print(f"{r['method']:<30}{r['batch']:>5}{r['k']:>3}{r['layers']:>4}{r['kv_len']:>6}{r['median_us']:>12.1f}"
              f"{r['p20_us']:>11.1f}{r['p80_us']:>11.1f}{r['speedup_of_ours']:>8.2f}")  # fmt: skip
    print("'ours x' = this method's time / ours (> 1: ours is faster).")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = pick_device(args.device, parser)
    if device.type != "cuda":
        torch.set_num_threads(args.threads)
    sizes = resolve_sizes(args, device.type == "cuda")
    key = run_key(device)
    note = cpu_note(device)
    print_run_header(key, note)
    model = recompute_model(args, sizes, device)
    base = dict(key, k=sizes.K, layers=sizes.L, kv_heads=sizes.H, head_dim=sizes.D, kv_len=sizes.T,
                dtype=str(sizes.dtype).removeprefix("torch."))  # fmt: skip
    rows = []
    for B in sizes.batch_sizes:
        rows += batch_rows(B, sizes, model, device, base, note, args.seed)
    print_table(rows)
    if not args.no_save:
        save_rows("kv", FIELDS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
