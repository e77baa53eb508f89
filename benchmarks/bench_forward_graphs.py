"""Per-forward cost, eager against graphs: milliseconds of one decode-sized forward through the ragged cache.

For each model, batch size B and width (queries per row): a ragged cache whose rows hold ``--context`` entries, and
one forward of ``width`` new tokens per row, repeated (the lengths are not advanced, so every repeat rewrites the same
entries and reads the same span):

* ``eager``: :func:`batched_specdec.forwards.model_forward` as the engine runs it without graphs;
* ``graphs``: the same forward through the graph path (``cuda_graphs=True``, :mod:`batched_specdec.graphs`): the
  first call records it after eager warm-up runs (its seconds are ``record_s``), every later call copies the inputs
  into the recording's static buffers and replays it. On a CPU this is the checking stand-in (slower than eager:
  it checks the script, it does not time anything of interest).

Models (GPU, or ``--models real-size``): the Qwen2-7B-class target and 0.5B-class draft of ``bench_e2e.py``
(real-size configs, RANDOM weights, bf16) and a feature head (one decoder layer of the target's width over the
target's hidden states, as the library's feature drafter runs it). ``--models toy``: tiny shapes. The target's
forward keeps the logits of every query (a verify), the draft's and the head's of the last one (a draft step).
Medians over ``--repeats`` calls, each timed from a synchronised device to a synchronised device (latency, host
launch cost included). Rows are printed as measured and appended to ``results/forward_graphs.csv``.

    python benchmarks/bench_forward_graphs.py                       # on CUDA: B 1 16 64, widths 1 5
    python benchmarks/bench_forward_graphs.py --device cpu --models toy --batch-sizes 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import KEY_FIELDS, append_rows, cpu_note, pick_device, run_key, synchronize
from e2e_models import random_qwen2

from batched_specdec import capture, graphs
from batched_specdec.forwards import model_forward
from batched_specdec.ragged_cache import RaggedKVCache

FIELDS = KEY_FIELDS + ["model", "weights", "dtype", "batch", "width", "context", "repeats", "eager_ms", "graphs_ms",
                       "speedup", "record_s", "note"]


def feature_head(target, device):
    """A one-layer feature head of the target's width (random layer; the target's embedding and head rows)."""
    from batched_specdec.drafting.heads import FeatureHeadDraft
    from batched_specdec.training.save import draft_config_from_target

    with torch.device(device):
        head = FeatureHeadDraft(draft_config_from_target(target.config, 1), target,
                                torch.arange(target.config.vocab_size))
    return head.eval().requires_grad_(False)


def timed(fn, device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, each from a synchronised device to a synchronised
    device."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def forward_ms(model, kind: str, batch: int, width: int, context: int, use_graphs: bool, device, repeats: int):
    """``(ms per forward, seconds the first call took)`` of ``kind``'s forward (``"target"``: verify logits of
    every query; ``"draft"``: last logits; ``"head"``: last logits and the hidden states, reading features)."""
    vocab = model.config.vocab_size
    cache = RaggedKVCache(model.config, batch, context + 64, device, graphs=use_graphs, role=f"bench.{kind}")
    g = torch.Generator(device="cpu").manual_seed(batch * 100 + width)
    ids = torch.randint(0, vocab, (batch, width), generator=g).to(device)
    extra = {}
    if kind in ("head", "eagle3"):  # the target's features: an EAGLE-3 head's three layers go through its fc
        features = torch.randn(batch, width, model.feature_size, generator=g).to(device, model.dtype)
        extra = {"features": features, "return_hidden": True}
    keep = 0 if kind == "target" else 1
    model_forward(model, cache, ids, logits_to_keep=keep, compile=False, **extra)  # allocates the buffers
    cache.set_lens(torch.full((batch,), context, dtype=torch.int64, device=device))
    cache.set_span(context + width)

    def run():
        model_forward(model, cache, ids, logits_to_keep=keep, **extra)

    synchronize(device)
    t0 = time.perf_counter()
    run()  # eager: cuDNN plans and Triton specialisations; graphs: the recording
    synchronize(device)
    first = time.perf_counter() - t0
    if not use_graphs:
        run()
    return timed(run, device, repeats), first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    parser.add_argument("--models", choices=["auto", "real-size", "toy"], default="auto",
                        help="auto: real-size on CUDA, toy on CPU; toy: tiny shapes (checks the script)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64], help="batch sizes B")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 5], help="queries per row")
    parser.add_argument("--context", type=int, default=256, help="entries every row holds before the forward")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per configuration (median)")
    parser.add_argument("--kinds", nargs="+", choices=["target", "draft", "head", "eagle3"],
                        default=["target", "draft", "head", "eagle3"],
                        help="which forwards to time (eagle3: an EAGLE-3-layout head over three target layers, a "
                             "32,000-id draft vocabulary, RANDOM weights; its features go through its fc)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    device = pick_device(args.device, parser)
    toy = args.models == "toy" or (args.models == "auto" and device.type != "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    key, note = run_key(device), cpu_note(device)
    print(f"{key['device']} | torch {key['torch']} | triton {key['triton']} | commit {key['commit']}", flush=True)
    vocab = 512 if toy else 152064
    torch.manual_seed(0)
    target = random_qwen2("toy-target" if toy else "7b", vocab, dtype, device)
    models = {"target": target}
    if "draft" in args.kinds:
        models["draft"] = random_qwen2("toy-draft" if toy else "0.5b", vocab, dtype, device)
    if "head" in args.kinds:
        models["head"] = feature_head(target, device)
    if "eagle3" in args.kinds:
        from e2e_models import eagle3_head

        models["eagle3"] = eagle3_head(target, 64 if toy else 32000, 0)
    names = {"target": "Qwen2-7B-class target", "draft": "Qwen2-0.5B-class draft", "head": "feature head (1 layer)",
             "eagle3": "EAGLE-3-layout head (1 layer, 32k draft vocabulary)"}
    print(f"{'model':<30}{'B':>4}{'width':>6}{'eager ms':>10}{'graphs ms':>10}{'speedup':>9}{'record s':>10}",
          flush=True)
    rows = []
    for kind in args.kinds:
        for batch in args.batch_sizes:
            for width in args.widths:
                eager, _ = forward_ms(models[kind], kind, batch, width, args.context, False, device, args.repeats)
                graphed, record = forward_ms(models[kind], kind, batch, width, args.context, True, device,
                                             args.repeats)
                label = names[kind] + (" (toy)" if toy else "")
                print(f"{label:<30}{batch:>4}{width:>6}{eager:>10.3f}{graphed:>10.3f}{eager / graphed:>8.2f}x"
                      f"{record:>10.2f}", flush=True)
                rows.append(dict(key, model=label, weights="random", dtype=str(dtype).removeprefix("torch."),
                                 batch=batch, width=width, context=args.context, repeats=args.repeats,
                                 eager_ms=eager, graphs_ms=graphed, speedup=eager / graphed, record_s=record,
                                 note=note))
                capture.BUFFERS.release()
            graphs.release()  # this batch size's recordings and their pools
        if not args.no_save:  # each model's rows as they finish (a stopped run keeps them)
            path = append_rows("forward_graphs", FIELDS, rows)
            rows = []
    if device.type != "cuda":
        print("GPU numbers NOT measured: CPU rows, graphs through the checking stand-in")
    if not args.no_save:
        print(f"rows appended to {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
