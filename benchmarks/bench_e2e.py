"""End-to-end decoding throughput: our speculative decoding vs target-only baselines, side by side in one run.

Methods (all greedy, same prompts, same number of new tokens, in the same process):

* ``target_only_ours``: ``autoregressive_generate_batch`` (our engine, ragged cache, no draft). The baseline of
  every ``speedup`` in the results.
* ``target_only_sync_read``: ``target_only_ours`` with ``delayed_host_read=False`` (the host reads each step's
  flags as soon as the step ends; on CUDA the default reads them a step late, so the host never waits for the
  device). The default runs again right after it; its ``speedup`` is over the mean of the default's two runs at
  that B (``note`` has both).
* ``hf_generate``: ``transformers`` ``model.generate`` target-only (left-padded batch, ``do_sample=False``).
* ``hf_assisted``: ``transformers`` assisted generation (``assistant_model=`` the draft model, or
  ``prompt_lookup_num_tokens=gamma`` when the draft is the n-gram drafter). It supports batch 1 only: for B > 1
  the call is attempted and the error it raises is recorded (``status=refused``).
* ``speculative_ours``: ``speculative_generate_batch`` with the draft, for every gamma.

Rows: ``tokens_per_s`` (generated tokens of all rows / wall time), ``row_ms_per_token`` (wall time / mean tokens
per row: the per-token latency one row sees), ``speedup`` (tokens/s over ``target_only_ours`` at the same B in the
same run), acceptance rate, tokens per target forward, the acceptance histogram (count of (row, step) pairs that
accepted 0..gamma drafts), peak memory, the time split and the non-model fraction
``(sampling + bookkeeping) / (draft + verify + sampling + bookkeeping)`` (columns that sum step phases:
``e2e_report.SPLIT_COLUMNS``), and ``matches_target_only`` (every row's greedy output equals ``target_only_ours``'s,
token for token).

CPU (default without CUDA): the embedded SmolLM2-135M-Instruct target (``batched_specdec.models.load_target``) with
its default draft: the distilled draft (``batched_specdec.draft_model.load_distilled_draft``) when it loads, else
the n-gram drafter; real acceptance (``acceptance_kind=real``). Built-in chat prompts.

GPU (default with CUDA): a Qwen2-style 7B-class target and 0.5B-class draft (real-size configs, bf16, RANDOM
weights: no checkpoint is available). Acceptance is controlled by :class:`SyntheticAcceptanceDrafter`: it runs the
real draft model's forward passes (real cost) and then proposes, per draft slot, the token of the known
continuation (the target-only greedy output, computed first) with probability alpha, else the draft model's own
token. Those rows are labelled ``acceptance_kind=synthetic-acceptance``. Each such row records the acceptance it
would have (``expected_acceptance`` = alpha (1 - alpha^gamma) / ((1 - alpha) gamma), accepted per proposed draft)
next to the measured ``acceptance_rate``: in bf16 a verify forward and a one-token forward can break a near-tie
differently, the row leaves the known continuation and its drafts stop matching, so a row whose measured
acceptance falls below 85% of the expected one is marked as drifted and its goal is not judged. ``--dtype float32``
(TF32 matmuls) keeps the target on the known continuation.

``--compile`` runs both engines with ``compile=True`` (CUDA graphs on CUDA). Before anything is timed, a warm-up
pass runs every batch size and gamma once at the full length (untimed): it fills Triton's cache for each (B, gamma)
and, compiled, records every shape's graphs (span and compaction buckets), so no timed run compiles.

    python benchmarks/bench_e2e.py             # CPU: B 1 4, gamma 2 4, 32 new tokens, SmolLM2 + its default draft
    python benchmarks/bench_e2e.py --quick     # CI size
    python benchmarks/bench_e2e.py             # on CUDA: B 1 4 16 64, gamma 2..8, alpha 0.6 0.8 0.9
    python benchmarks/bench_e2e.py --compile   # both engines compiled
    python benchmarks/bench_e2e.py --cuda-graphs   # both engines with cuda_graphs=True (recorded, no inductor)

``--cuda-graphs`` runs both engines with ``cuda_graphs=True``: every decode-sized forward recorded once after eager
warm-up runs and replayed (``batched_specdec.graphs``; on a CPU its checking stand-in, slower than eager). The
warm-up pass records every shape's graphs; the rows say ``compiled=cuda_graphs`` and their ``note`` how many graphs
the timed run recorded (0 when the warm-up covered it) and the warm-up's recordings and seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import KEY_FIELDS, append_rows, cpu_note, join_notes, pick_device, print_run_header, run_key, synchronize
from e2e_models import E2EModels, embedded_pair, known_tokens, random_pair
from e2e_report import e2e_goal, expected_acceptance, noted, print_report, split_fields, stats_fields

from batched_specdec import graphs
from batched_specdec.engine import autoregressive_generate_batch, speculative_generate_batch
from batched_specdec.processors import GreedyProcessor

FIELDS = KEY_FIELDS + [
    "method", "status", "target", "draft", "acceptance_kind", "alpha", "expected_acceptance", "batch", "gamma",
    "max_new_tokens", "dtype", "compiled",
    "generated_tokens", "wall_s", "tokens_per_s", "row_ms_per_token", "speedup", "acceptance_rate",
    "tokens_per_target_forward", "acceptance_histogram", "target_forwards", "peak_memory_bytes", "peak_memory_kind",
    "draft_s", "verify_s", "sampling_s", "bookkeeping_s", "non_model_frac", "matches_target_only", "goal", "note",
]  # fmt: skip


@dataclasses.dataclass
class E2ERun:
    """One invocation's resolved sweep, device, models and the keyword arguments of every engine call."""

    device: torch.device
    batch_sizes: list[int]
    gammas: list[int | str]
    alphas: list[float]
    max_new: int
    methods: list[str]
    time_split: bool  # on CUDA, a second collect_stats=True run per speculative row measures the time split
    models: E2EModels | None = None
    run_kw: dict = dataclasses.field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="batch sizes B (default: 1 4 16 64 on CUDA, 1 4 on CPU)")
    parser.add_argument("--gammas", type=gamma_arg, nargs="+", default=None,
                        help="draft tokens per step, or auto for the adaptive controller (default: 2..8 on CUDA, "
                             "2 4 on CPU)")
    parser.add_argument("--alphas", type=float, nargs="+", default=None,
                        help="synthetic acceptance probabilities on CUDA (default: 0.6 0.8 0.9); unused on CPU")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="new tokens per row (default: 128 on CUDA, 32 on CPU)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[64, 192], metavar=("MIN", "MAX"),
                        help="random prompt lengths on CUDA (ragged, uniform in [MIN, MAX]); CPU uses built-in prompts")
    parser.add_argument("--methods", nargs="+", default=None,
                        choices=["target_only_ours", "target_only_sync_read", "hf_generate", "hf_assisted",
                                 "speculative_ours"],
                        help="methods to run (default: all)")
    parser.add_argument("--no-time-split", action="store_true",
                        help="on CUDA, skip the extra collect_stats=True run that measures the time split "
                        "(it synchronises between phases, so tokens/s come from a separate run)")
    parser.add_argument("--models", choices=["auto", "real-size", "toy"], default="auto",
                        help="auto: the real-size random-weight Qwen2 pair with synthetic acceptance on CUDA, the "
                             "embedded model and its draft on CPU; toy: the synthetic-acceptance path with tiny "
                             "random Qwen2 shapes on any device (checks the script, times nothing of interest)")
    parser.add_argument("--compile", action="store_true",
                        help="run both engines with compile=True (CUDA graphs on CUDA); every shape compiles in the "
                             "untimed warm-up pass")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="run both engines with cuda_graphs=True (decode forwards recorded once and replayed, no "
                             "inductor); the untimed warm-up pass records every shape's graphs")
    parser.add_argument("--draft-head", choices=["model", "eagle3"], default="model",
                        help="synthetic acceptance: "
                             "draft with the random 0.5B-class model (model) or an EAGLE-3-layout "
                             "head over the target's layers (eagle3, random weights; hf_assisted then uses prompt "
                             "lookup)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of the random-weight CUDA models (float32 allows TF32 matmuls); CPU runs fp32")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the warm-up pass over every (B, gamma) (then first runs include compilation)")
    parser.add_argument("--quick", action="store_true", help="CI size: B 1, gamma 2, 8 new tokens")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the shared CPU machines oversubscribe badly with more)")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts, weights and the synthetic drafter")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to results/e2e.csv")
    return parser


def gamma_arg(text: str) -> int | str:
    """``--gammas`` values: an integer >= 1, or ``auto`` (the adaptive controller)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}")
    return value


def resolve_run(args: argparse.Namespace, device: torch.device) -> E2ERun:
    """The sweep: each flag's values, else the CUDA or CPU defaults; ``--quick`` is B 1, gamma 2, the first alpha and
    8 new tokens. Methods default to all but ``target_only_sync_read``."""
    gpu = device.type == "cuda"
    run = E2ERun(device=device, batch_sizes=args.batch_sizes or ([1, 4, 16, 64] if gpu else [1, 4]),
                 gammas=args.gammas or (list(range(2, 9)) if gpu else [2, 4]), alphas=args.alphas or [0.6, 0.8, 0.9],
                 max_new=args.max_new_tokens or (128 if gpu else 32),
                 methods=args.methods or ["target_only_ours", "hf_generate", "hf_assisted", "speculative_ours"],
                 time_split=not args.no_time_split)  # fmt: skip
    if args.quick:
        run.batch_sizes, run.gammas, run.alphas, run.max_new = [1], [2], run.alphas[:1], 8
    return run


def load_models(run: E2ERun, args: argparse.Namespace) -> None:
    """Set ``run.models``: the random-weight pair with synthetic acceptance (``--models toy`` or ``real-size``, or
    ``auto`` on CUDA), else the embedded target and its default draft; and ``run.run_kw``: greedy, ``max_new`` tokens,
    the models' EOS and pad ids, ``--compile`` and ``--cuda-graphs``."""
    synthetic = args.models == "toy" or args.models == "real-size" or run.gpu
    n_prompts = max(run.batch_sizes)
    models = random_pair(args, run.device, n_prompts) if synthetic else embedded_pair(n_prompts, args.seed)
    print(f"target: {models.target_name} | draft: {models.draft_name}")
    run.models = models
    run.run_kw = {"logits_processor": GreedyProcessor(), "max_gen_len": run.max_new, "eos_tokens_id": models.eos,
                  "pad_token_id": models.pad, "compile": args.compile, "cuda_graphs": args.cuda_graphs}  # fmt: skip


@contextlib.contextmanager
def progress(what: str, device):
    """Print ``what`` and, once the block has run (device synchronised), its seconds: a run stopped at a time limit
    shows how far it got."""
    print(f"  {what} ...", end="", flush=True)
    t0 = time.perf_counter()
    yield
    synchronize(device)
    print(f" {time.perf_counter() - t0:.1f} s", flush=True)


def warm_up(run: E2ERun) -> str:
    """Run every batch size and gamma once, untimed, at the timed runs' length: Triton compiles each kernel
    specialisation here and, with ``compile=True``, every shape's graphs (span and compaction buckets) are compiled
    and recorded here, not in a timed run. Returns (and prints), with ``cuda_graphs=True``, how many graphs it
    recorded and in how many seconds; else ""."""
    models, device = run.models, run.device
    before = graphs.COUNTS.snapshot()
    t0 = time.perf_counter()
    for B in run.batch_sizes:
        prompts = models.prompts[:B]
        with progress(f"warm-up B={B} target-only", device):
            ref_out = autoregressive_generate_batch(prompts, models.target, **run.run_kw)
        known = known_tokens(ref_out, device) if models.synthetic else None
        for g in run.gammas:
            with progress(f"warm-up B={B} gamma={g}", device):
                speculative_generate_batch(prompts, models.drafter(max(run.alphas), known, prompts), models.target,
                                           gamma=g, **run.run_kw)  # fmt: skip
    synchronize(device)
    print(f"warm-up (every B and gamma once, untimed): {time.perf_counter() - t0:.1f} s")
    if not run.run_kw["cuda_graphs"]:
        return ""
    counts = graphs.COUNTS.since(before)
    recorded = f"warm-up recorded {counts['graphs_recorded']} graphs in {counts['graph_recording_s']:.1f} s"
    print(recorded)
    return recorded


def truncate(tokens: list[int], eos: list[int], n: int) -> list[int]:
    out = []
    for t in tokens[:n]:
        out.append(t)
        if t in eos:
            break
    return out


def hf_generate(model, prompts, max_new, eos, pad, device, **kwargs):
    """Left-padded ``model.generate``; returns (outputs truncated after the first EOS, wall seconds)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=0,
                             do_sample=False, pad_token_id=pad, eos_token_id=eos or None, **kwargs)  # fmt: skip
    synchronize(device)
    wall = time.perf_counter() - t0
    return [truncate(row, eos, max_new) for row in out[:, width:].tolist()], wall


def generated_fields(out: list[list[int]], wall: float, base_tps: float, ref_out: list[list[int]]) -> dict:
    """The columns of a ``transformers`` run that generated ``out`` in ``wall`` seconds, next to target-only's
    ``base_tps`` tokens/s and outputs ``ref_out``."""
    n = sum(len(o) for o in out)
    return {"generated_tokens": n, "wall_s": wall, "tokens_per_s": n / wall,
            "row_ms_per_token": 1e3 * wall * len(out) / n, "speedup": (n / wall) / base_tps,
            "matches_target_only": out == ref_out}  # fmt: skip


def hf_generate_row(run: E2ERun, base: dict, prompts, ref_out, base_tps: float) -> dict:
    """The ``hf_generate`` row: target-only ``model.generate``, with its peak allocated memory on CUDA."""
    models = run.models
    if run.gpu:
        torch.cuda.reset_peak_memory_stats(run.device)
    out, wall = hf_generate(models.target, prompts, run.max_new, models.eos, models.pad, run.device)
    return dict(base, method="hf_generate", status="measured", acceptance_kind="none",
                **generated_fields(out, wall, base_tps, ref_out),
                peak_memory_bytes=torch.cuda.max_memory_allocated(run.device) if run.gpu else "",
                peak_memory_kind="cuda_max_allocated" if run.gpu else "")  # fmt: skip


def hf_assisted_row(run: E2ERun, base: dict, prompts, ref_out, base_tps: float) -> dict:
    """The ``hf_assisted`` row: assisted generation with the draft model, or prompt lookup with the first integer
    gamma (3 if none) for the n-gram drafter; ``status=refused`` and the error's words when ``transformers``
    refuses the batch."""
    models = run.models
    g = next((x for x in run.gammas if x != "auto"), 3)
    kwargs = ({"assistant_model": models.draft_model} if models.draft_model is not None
              else {"prompt_lookup_num_tokens": g})  # fmt: skip
    how = "assistant_model=draft" if models.draft_model is not None else f"prompt_lookup_num_tokens={g}"
    row = dict(base, method="hf_assisted", gamma=g, draft=how,
               acceptance_kind="random-weight draft (HF cannot use synthetic acceptance)" if models.synthetic
               else "real")  # fmt: skip
    try:
        out, wall = hf_generate(models.target, prompts, run.max_new, models.eos, models.pad, run.device, **kwargs)
        row.update(status="measured", **generated_fields(out, wall, base_tps, ref_out))
    except Exception as exc:  # noqa: BLE001 -- transformers refuses batched assisted generation; record its words
        msg = " ".join(str(exc).split())[:300]
        row.update(status="refused", note=join_notes(base["note"], f"{type(exc).__name__}: {msg}"))
        print(f"hf_assisted B={len(prompts)}: refused: {type(exc).__name__}: {msg}")
    return row


def sync_read_row(run: E2ERun, base: dict, prompts, ref_out, base_tps: float) -> dict:
    """The ``target_only_sync_read`` row: target-only decoding with ``delayed_host_read=False``, then the default
    (delayed on CUDA) once more, so that the speedup is over the mean of the default's runs before and after it
    (whatever runs first at a batch size is not favoured)."""
    B, target, run_kw = len(prompts), run.models.target, run.run_kw
    with progress(f"B={B} target-only, synchronous host read", run.device):
        out, st = autoregressive_generate_batch(prompts, target, return_stats=True, delayed_host_read=False, **run_kw)
    with progress(f"B={B} target-only again", run.device):
        again = autoregressive_generate_batch(prompts, target, return_stats=True, **run_kw)[1].tokens_per_s
    note = f"default read before / after: {base_tps:.1f} / {again:.1f} tok/s"
    return noted(dict(base, method="target_only_sync_read", status="measured", acceptance_kind="none",
                      speedup=st.tokens_per_s / ((base_tps + again) / 2), matches_target_only=out == ref_out,
                      **stats_fields(st, B), note=join_notes(base.get("note"), note)), st)  # fmt: skip


def speculative_row(run: E2ERun, base: dict, gamma, alpha, stats, split, speedup: float, matches: bool) -> dict:
    """One ``speculative_ours`` row from a run's statistics and time split; on CUDA with its goal verdict."""
    models, B = run.models, base["batch"]
    expected = expected_acceptance(alpha, gamma) if models.synthetic else None
    goal = e2e_goal(B, alpha, speedup, stats.acceptance_rate, expected, sum(stats.proposed)) if run.gpu else ""
    return noted(dict(base, method="speculative_ours", status="measured", gamma=gamma, draft=models.draft_name,
                      alpha=alpha if models.synthetic else "", expected_acceptance=expected,
                      acceptance_kind="synthetic-acceptance" if models.synthetic else "real",
                      speedup=speedup, acceptance_rate=stats.acceptance_rate,
                      acceptance_histogram=" ".join(map(str, stats.acceptance_histogram)),
                      matches_target_only=matches, goal=goal,
                      **stats_fields(stats, B), **split_fields(split)), stats)  # fmt: skip


def speculative_rows(run: E2ERun, base: dict, prompts, ref_out, base_tps: float) -> list[dict]:
    """The ``speculative_ours`` rows: every alpha (synthetic acceptance) and gamma. On CPU the timed run collects the
    time split; on CUDA a second run with ``collect_stats=True`` does (it synchronises between phases), unless
    ``--no-time-split``."""
    models, B = run.models, len(prompts)
    known = known_tokens(ref_out, run.device) if models.synthetic else None
    rows = []
    for alpha in run.alphas if models.synthetic else [None]:
        for g in run.gammas:
            gc.collect()
            with progress(f"B={B} gamma={g} alpha={alpha}", run.device):
                out, _, st = speculative_generate_batch(prompts, models.drafter(alpha, known, prompts), models.target,
                                                        gamma=g, collect_stats=not run.gpu, **run.run_kw)  # fmt: skip
            split = st.time_split
            if run.gpu and run.time_split:
                split = speculative_generate_batch(prompts, models.drafter(alpha, known, prompts), models.target,
                                                   gamma=g, collect_stats=True, **run.run_kw)[2].time_split  # fmt: skip
            rows.append(speculative_row(run, base, g, alpha, st, split, st.tokens_per_s / base_tps, out == ref_out))
    return rows


def measure_batch(run: E2ERun, base: dict) -> list[dict]:
    """Every asked-for method's rows at batch size ``base["batch"]``. Target-only runs first even when not asked for:
    every speedup is relative to it, and it is the known continuation of the synthetic drafter."""
    B = base["batch"]
    prompts = run.models.prompts[:B]
    with progress(f"B={B} target-only", run.device):
        ref_out, ref = autoregressive_generate_batch(prompts, run.models.target, return_stats=True, **run.run_kw)
    rows = []
    if "target_only_ours" in run.methods:
        rows.append(noted(dict(base, method="target_only_ours", status="measured", acceptance_kind="none",
                               speedup=1.0, **stats_fields(ref, B)), ref))  # fmt: skip
    measures = {"target_only_sync_read": sync_read_row, "hf_generate": hf_generate_row,
                "hf_assisted": hf_assisted_row}  # fmt: skip
    for method, measure in measures.items():
        if method in run.methods:
            rows.append(measure(run, base, prompts, ref_out, ref.tokens_per_s))
    if "speculative_ours" in run.methods:
        rows += speculative_rows(run, base, prompts, ref_out, ref.tokens_per_s)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compile and args.cuda_graphs:
        parser.error("--compile and --cuda-graphs exclude each other (compile records its own graphs)")
    device = pick_device(args.device, parser)
    if device.type != "cuda":
        torch.set_num_threads(args.threads)
    run = resolve_run(args, device)
    key = run_key(device)
    note = cpu_note(device)
    print_run_header(key, note)
    torch.manual_seed(args.seed)
    load_models(run, args)
    if not args.no_warmup:
        note = join_notes(note, warm_up(run))
    base = dict(key, target=run.models.target_name, draft="", max_new_tokens=run.max_new, note=note,
                dtype=run.models.dtype, compiled="cuda_graphs" if args.cuda_graphs else args.compile)  # fmt: skip
    rows, saved = [], 0
    for B in run.batch_sizes:
        if not args.no_save:  # the previous batch size's rows, saved as they finish (a killed run keeps them)
            append_rows("e2e", FIELDS, rows[saved:])
            saved = len(rows)
        rows += measure_batch(run, dict(base, batch=B))
    print_report(rows, run.gpu, run.models.synthetic)
    if not args.no_save:
        path = append_rows("e2e", FIELDS, rows[saved:])
        print(f"appended {len(rows)} rows to {os.path.relpath(path)} (each batch size's as it finished)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
