"""Shared helpers for the benchmark scripts: the row key, CSV appends, timing and measured copy bandwidth.

Timing: on CUDA ``triton.testing.do_bench`` or, for kernels whose launch overhead would dominate,
``triton.testing.do_bench_cudagraph`` (median with the 20% and 80% quantiles, warm-up excluded); on CPU a
``timeit`` median over repeats with the 20%/80% quantiles of the per-call times (one warm-up call excluded).
"""

from __future__ import annotations

import csv
import datetime
import faulthandler
import os
import platform
import statistics
import subprocess
import sys
import timeit

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
RESULTS_DIR = os.environ.get("BENCH_RESULTS_DIR") or os.path.join(ROOT, "benchmarks", "results")
"""Where the CSVs are appended: ``benchmarks/results/``, or ``$BENCH_RESULTS_DIR`` (``gpu_session.sh`` sets it)."""
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if os.environ.get("BENCH_DUMP_STACKS_AFTER_S"):
    # gpu_session.sh sets this a few seconds under a stage's time limit: a stage that runs out of time prints where
    # every thread was (compiling, recording graphs, waiting) before it is stopped.
    faulthandler.dump_traceback_later(float(os.environ["BENCH_DUMP_STACKS_AFTER_S"]), exit=False)


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA; ``cpu: <model name> (<n> threads)`` on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name} ({os.cpu_count()} cores)"


def git_commit() -> str:
    """Short hash of HEAD, with ``+dirty`` when benchmarks or library files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "batched_specdec",
                                "benchmarks/*.py"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()  # fmt: skip
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


def run_key(device: torch.device) -> dict:
    """The columns every result row starts with: date, commit, device, torch/triton/transformers versions."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
    }


KEY_FIELDS = ["date", "commit", "device", "torch", "triton", "transformers"]


def print_run_header(key: dict, note: str = "") -> None:
    """Print the run key's device, torch and triton versions and commit on one line, then ``note`` if it is set."""
    print(f"{key['device']} | torch {key['torch']} | triton {key['triton']} | commit {key['commit']}")
    if note:
        print(note)


def append_rows(name: str, fields: list[str], rows: list[dict]) -> str:
    """Append ``rows`` to ``benchmarks/results/<name>.csv`` (header written once); never rewrites existing rows.

    If the file exists with a different header, rows go to ``<name>.v2.csv`` etc. instead of corrupting it.
    """
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.csv")
    n = 1
    while os.path.exists(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header == fields:
            break
        n += 1
        path = os.path.join(RESULTS_DIR, f"{name}.v{n}.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="raise")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: fmt(r.get(k, "")) for k in fields})
    return path


def join_notes(*notes: str | None) -> str:
    """The non-empty ``notes`` joined with ``"; "`` (a row's ``note`` column)."""
    return "; ".join(n for n in notes if n)


def save_rows(name: str, fields: list[str], rows: list[dict]) -> str:
    """:func:`append_rows`, then print how many rows went to which file (path relative to the working directory)."""
    path = append_rows(name, fields, rows)
    print(f"appended {len(rows)} rows to {os.path.relpath(path)}")
    return path


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def do_bench(fn, device: torch.device, *, repeats: int = 15, number: int | None = None,
             cudagraph: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds per call of ``fn``; warm-up excluded.

    CUDA: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])``, or with ``cudagraph=True``
    ``triton.testing.do_bench_cudagraph`` (``fn`` replayed from a CUDA graph, so launch overhead is not timed; ``fn``
    must not synchronise with the host). CPU: ``repeats`` timeit samples of ``number`` calls each (chosen so a
    sample lasts about 20 ms, at least 1), per-call times, median and the 20%/80% quantiles.
    """
    if device.type == "cuda":
        import triton.testing

        bench = triton.testing.do_bench_cudagraph if cudagraph else triton.testing.do_bench
        med, lo, hi = bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(lo), float(hi)
    t0 = timeit.default_timer()
    fn()  # warm-up, also sizes `number`
    once = max(timeit.default_timer() - t0, 1e-7)
    if number is None:
        number = max(1, min(1000, int(0.02 / once)))
    times = [t / number * 1e3 for t in timeit.repeat(fn, number=number, repeat=repeats)]
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=5, method="inclusive")  # 20/40/60/80 %
    return statistics.median(times), q[0], q[3]


def timed(fn, device: torch.device, *, repeats: int = 15, cudagraph: bool = False) -> tuple[float, float, float, str]:
    """:func:`do_bench` plus the ``timer`` column: ``timeit`` on CPU, ``do_bench_cudagraph`` or ``do_bench`` on
    CUDA. A call that cannot be captured in a CUDA graph (it synchronises with the host) is timed with
    ``do_bench`` instead, and its timer says so."""
    if device.type != "cuda":
        return (*do_bench(fn, device, repeats=repeats), "timeit")
    if cudagraph:
        try:
            return (*do_bench(fn, device, repeats=repeats, cudagraph=True), "do_bench_cudagraph")
        except RuntimeError as exc:  # capture refused (a host sync inside fn)
            reason = " ".join(str(exc).split())[:80]
            return (*do_bench(fn, device, repeats=repeats), f"do_bench (graph capture failed: {reason})")
    return (*do_bench(fn, device, repeats=repeats), "do_bench")


class CudaGraphCounts:
    """Counts, while active, the CUDA graphs torch.compile's cudagraph trees record and the graphs they skip
    (``counters["inductor"]["cudagraph_skips"]``: a compiled graph run without CUDA graphs, e.g. for a CPU input).
    Recordings are counted by wrapping ``CUDAGraphTreeManager.record_function`` (a private API: when it is
    missing, ``recordings`` stays None rather than a false 0)."""

    def __init__(self) -> None:
        self.recordings: int | None = None
        self.skips = 0

    def __enter__(self):
        from torch._dynamo.utils import counters

        self._counters = counters
        self._skips0 = counters["inductor"]["cudagraph_skips"]
        try:
            from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
        except ImportError:
            self._manager = None
            return self
        self._manager, self._record = CUDAGraphTreeManager, CUDAGraphTreeManager.record_function
        self.recordings = 0
        record = self._record

        def counting(manager, *args, **kwargs):
            self.recordings += 1
            return record(manager, *args, **kwargs)

        CUDAGraphTreeManager.record_function = counting
        return self

    def __exit__(self, *exc) -> None:
        if self._manager is not None:
            self._manager.record_function = self._record
        self.skips = self._counters["inductor"]["cudagraph_skips"] - self._skips0


def copy_bandwidth_gbs(nbytes: int, device: torch.device, *, repeats: int = 15, cudagraph: bool = False) -> float:
    """Measured device copy bandwidth (GB/s, 1e9) for a copy of ``nbytes``: read + write, i.e. 2 * nbytes moved.
    Timed as the kernels it is compared with are (``cudagraph``)."""
    n = max(1, nbytes // 4)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    med, _, _ = do_bench(lambda: dst.copy_(src), device, repeats=repeats, cudagraph=cudagraph)
    return 2 * n * 4 / (med * 1e-3) / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_device(cpu_smoke: bool, script: str) -> torch.device | None:
    """The device of a correctness check: the CPU with ``--cpu-smoke``, else CUDA; None (after saying so on stderr)
    when there is no CUDA device."""
    if cpu_smoke:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    print(f"{script}: no CUDA device; use --cpu-smoke to check the script on the CPU", file=sys.stderr)
    return None


def pick_device(arg: str | None, parser) -> torch.device:
    """``--device`` resolved: default cuda when available; an error naming the value if cuda is asked for but absent."""
    name = arg or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name!r} requested but CUDA is not available on this machine")
    return device


def cpu_note(device: torch.device) -> str:
    """Label for CPU rows: this team's CPU machines are small and shared, so timings are noisy."""
    if device.type == "cuda":
        return ""
    return f"CPU {os.cpu_count()} cores, torch threads={torch.get_num_threads()}, shared machine: timings noisy"
