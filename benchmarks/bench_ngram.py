"""Per-step cost of the n-gram drafter's lookup, next to one forward of a small model draft.

The lookup (``batched_specdec.ngram.ngram_lookup``) runs once per decode step on the whole batch. A model draft
runs ``gamma`` one-token forwards per step; this script times ONE such forward (random-weight Llama, KV cache of
length S) so that the two are compared at the same batch size and context length: a model-draft step costs about
``gamma`` times the reported forward.

Timing: ``triton.testing.do_bench`` medians (quantiles 0.5, 0.2, 0.8, warm-up excluded) on CUDA; on CPU a
``timeit`` median over repeats. Rows are appended to ``benchmarks/results/ngram.csv`` keyed by device, versions,
commit and date.

    python benchmarks/bench_ngram.py                      # CPU: small sizes
    python benchmarks/bench_ngram.py --batch-sizes 1 8 64 --seq-lens 512 2048   # the GPU sweep (default on CUDA)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import timeit

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from batched_specdec.ngram import ngram_lookup

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ngram.csv")
FIELDS = [
    "date", "commit", "device", "torch", "triton", "transformers", "method", "batch", "seq_len", "gamma",
    "max_ngram", "median_ms", "p20_ms", "p80_ms", "note",
]  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def git_commit() -> str:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


def bench(fn, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds per call."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up
    number = 5
    times = [t / number * 1e3 for t in timeit.repeat(fn, number=number, repeat=repeats)]
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


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


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="cuda" if cuda else "cpu", help="device to run on (default: cuda if available)"
    )
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
    parser.add_argument("--no-save", action="store_true", help=f"do not append rows to {os.path.relpath(RESULTS)}")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu and not cuda:
        parser.error(f"--device {args.device!r} requested but CUDA is not available")
    torch.set_num_threads(args.threads)
    batch_sizes = args.batch_sizes or ([1, 8, 64] if on_gpu else [1, 8])
    seq_lens = args.seq_lens or ([512, 2048] if on_gpu else [512])
    hidden = args.draft_hidden or (768 if on_gpu else 128)
    layers = args.draft_layers or (12 if on_gpu else 2)

    key = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
    }
    print(f"{key['device']} | torch {key['torch']} | triton {key['triton']} | commit {key['commit']}")

    rows = []
    model = None
    if not args.no_model:
        torch.manual_seed(0)
        model = make_draft_model(args.vocab, hidden, layers, max(seq_lens) + 8, device)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        model_note = f"ONE 1-token forward, random Llama {n_params:.1f}M params (h={hidden}, L={layers}), KV len S"

    for batch in batch_sizes:
        for seq_len in seq_lens:
            g = torch.Generator().manual_seed(0)
            # Small-vocabulary tokens so that matches happen; the cost does not depend on the data.
            buf = torch.randint(0, 8, (batch, seq_len), generator=g).to(device)
            lens = torch.full((batch,), seq_len, dtype=torch.long, device=device)

            def lookup(buf=buf, lens=lens):
                return ngram_lookup(buf, lens, args.gamma, args.max_ngram, args.min_ngram)

            med, lo, hi = bench(lookup, device, args.repeats)
            rows.append(
                dict(
                    key,
                    method="ngram_lookup",
                    batch=batch,
                    seq_len=seq_len,
                    gamma=args.gamma,
                    max_ngram=args.max_ngram,
                    median_ms=med,
                    p20_ms=lo,
                    p80_ms=hi,
                    note="whole step: all rows, up to gamma drafts each",
                )
            )
            if model is not None:
                med, lo, hi = bench(model_step_fn(model, batch, seq_len, device), device, args.repeats)
                rows.append(
                    dict(
                        key,
                        method="model_draft_forward",
                        batch=batch,
                        seq_len=seq_len,
                        gamma=args.gamma,
                        max_ngram="",
                        median_ms=med,
                        p20_ms=lo,
                        p80_ms=hi,
                        note=model_note,
                    )
                )

    print(f"{'method':<22}{'B':>5}{'S':>7}{'gamma':>7}{'median ms':>12}{'p20':>10}{'p80':>10}")
    for r in rows:
        print(
            f"{r['method']:<22}{r['batch']:>5}{r['seq_len']:>7}{r['gamma']:>7}"
            f"{r['median_ms']:>12.4f}{r['p20_ms']:>10.4f}{r['p80_ms']:>10.4f}"
        )
    if model is not None:
        print(f"model_draft_forward = {model_note}; a model-draft step runs gamma={args.gamma} of them.")

    if not args.no_save:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        new = not os.path.exists(RESULTS)
        with open(RESULTS, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            for r in rows:
                writer.writerow({k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in r.items()})
        print(f"appended {len(rows)} rows to {os.path.relpath(RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
