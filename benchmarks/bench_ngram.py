"""Per-step cost of the n-gram drafter's lookup, next to one forward of a small model draft.

The lookup (``batched_specdec.ngram.ngram_lookup``) runs once per decode step on the whole batch. A model draft
runs ``gamma`` one-token forwards per step; this script times ONE such forward (random-weight Llama, KV cache of
length S) so that the two are compared at the same batch size and context length: a model-draft step costs about
``gamma`` times the reported forward.

Timing: ``common.do_bench`` (as in every benchmark here). Rows are appended to ``benchmarks/results/ngram.csv``
keyed by device, versions, commit and date (``common.run_key``, ``common.append_rows``).

    python benchmarks/bench_ngram.py                      # CPU: small sizes
    python benchmarks/bench_ngram.py --batch-sizes 1 8 64 --seq-lens 512 2048   # the GPU sweep (default on CUDA)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import KEY_FIELDS, do_bench, pick_device, print_run_header, run_key, save_rows

from batched_specdec.drafting.ngram import ngram_lookup

FIELDS = KEY_FIELDS + [
    "method", "batch", "seq_len", "gamma", "max_ngram", "median_ms", "p20_ms", "p80_ms", "note",
]  # fmt: skip


def make_draft_model(vocab: int, hidden: int, layers: int, max_pos: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_pos,
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def model_step_fn(model, batch: int, seq_len: int, device: torch.device):
    """One 1-token forward with a KV cache of length ``seq_len``; the cache is cropped back after each call."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, vocab, (batch, seq_len), device=device), past_key_values=cache, use_cache=True)
    token = torch.randint(0, vocab, (batch, 1), device=device)

    @torch.no_grad()
    def step():
        model(token, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the token just written (negative crop works across transformers 5.x)

    return step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="batch sizes B (default: 1 8 64 on CUDA, 1 8 on CPU)"
    )
    parser.add_argument(
        "--seq-lens",
        type=int,
        nargs="+",
        default=None,
        help="committed lengths S of every row (default: 512 2048 on CUDA, 512 on CPU)",
    )
    parser.add_argument("--gamma", type=int, default=5, help="draft tokens proposed per step")
    parser.add_argument("--max-ngram", type=int, default=3, help="longest n-gram tried by the lookup")
    parser.add_argument("--min-ngram", type=int, default=1, help="shortest n-gram tried by the lookup")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the random tokens and the draft")
    parser.add_argument(
        "--draft-hidden",
        type=int,
        default=None,
        help="hidden size of the random Llama draft (default: 768 on CUDA, 128 on CPU)",
    )
    parser.add_argument(
        "--draft-layers",
        type=int,
        default=None,
        help="layers of the random Llama draft (default: 12 on CUDA, 2 on CPU)",
    )
    parser.add_argument("--no-model", action="store_true", help="skip the model-draft forward comparison")
    parser.add_argument("--repeats", type=int, default=7, help="timeit repeats on CPU (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CPU machines are shared)")
    parser.add_argument("--no-save", action="store_true", help="do not append rows to benchmarks/results/ngram.csv")
    return parser


def draft_model(args: argparse.Namespace, max_seq_len: int, device: torch.device):
    """The random Llama draft (``--draft-hidden``, ``--draft-layers``, else the CUDA or CPU defaults; seed 0) and its
    rows' note, or (None, None) with ``--no-model``."""
    if args.no_model:
        return None, None
    on_gpu = device.type == "cuda"
    hidden = args.draft_hidden or (768 if on_gpu else 128)
    layers = args.draft_layers or (12 if on_gpu else 2)
    torch.manual_seed(0)
    model = make_draft_model(args.vocab, hidden, layers, max_seq_len + 8, device)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    return model, f"ONE 1-token forward, random Llama {n_params:.1f}M params (h={hidden}, L={layers}), KV len S"


def lookup_row(args: argparse.Namespace, key: dict, batch: int, seq_len: int, device: torch.device) -> dict:
    """Time one ``ngram_lookup`` over a batch of ``batch`` rows of ``seq_len`` tokens (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    # Small-vocabulary tokens so that matches happen; the cost does not depend on the data.
    buf = torch.randint(0, 8, (batch, seq_len), generator=g).to(device)
    lens = torch.full((batch,), seq_len, dtype=torch.long, device=device)

    def lookup():
        return ngram_lookup(buf, lens, args.gamma, args.max_ngram, args.min_ngram)

    med, lo, hi = do_bench(lookup, device, repeats=args.repeats)
    return dict(key, method="ngram_lookup", batch=batch, seq_len=seq_len, gamma=args.gamma, max_ngram=args.max_ngram,
                median_ms=med, p20_ms=lo, p80_ms=hi, note="whole step: all rows, up to gamma drafts each")  # fmt: skip


def model_row(args, key: dict, model, note: str, batch: int, seq_len: int, device: torch.device) -> dict:
    """Time one 1-token forward of the draft ``model`` at batch ``batch`` with a KV cache of ``seq_len``."""
    med, lo, hi = do_bench(model_step_fn(model, batch, seq_len, device), device, repeats=args.repeats)
    return dict(key, method="model_draft_forward", batch=batch, seq_len=seq_len, gamma=args.gamma, max_ngram="",
                median_ms=med, p20_ms=lo, p80_ms=hi, note=note)  # fmt: skip


def print_table(rows: list[dict]) -> None:
    """Print the rows as a table: per-step median and quantiles in milliseconds."""
    print(f"{'method':<22}{'B':>5}{'S':>7}{'gamma':>7}{'median ms':>12}{'p20':>10}{'p80':>10}")
    for r in rows:
        print(
            f"{r['method']:<22}{r['batch']:>5}{r['seq_len']:>7}{r['gamma']:>7}"
            f"{r['median_ms']:>12.4f}{r['p20_ms']:>10.4f}{r['p80_ms']:>10.4f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = pick_device(args.device, parser)
    on_gpu = device.type == "cuda"
    torch.set_num_threads(args.threads)
    batch_sizes = args.batch_sizes or ([1, 8, 64] if on_gpu else [1, 8])
    seq_lens = args.seq_lens or ([512, 2048] if on_gpu else [512])
    key = run_key(device)
    print_run_header(key)
    model, model_note = draft_model(args, max(seq_lens), device)
    rows = []
    for batch in batch_sizes:
        for seq_len in seq_lens:
            rows.append(lookup_row(args, key, batch, seq_len, device))
            if model is not None:
                rows.append(model_row(args, key, model, model_note, batch, seq_len, device))
    print_table(rows)
    if model is not None:
        print(f"model_draft_forward = {model_note}; a model-draft step runs gamma={args.gamma} of them.")
    if not args.no_save:
        save_rows("ngram", FIELDS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
