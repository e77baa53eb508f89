"""Plots from the recorded CSVs: speedup against batch size, and acceptance rate with tokens/s against gamma.

Reads ``benchmarks/results/e2e.csv`` and, for each device, the most recent run (the latest ``date`` of that
device) unless ``--all-runs``; writes one pair of PNGs per device into ``benchmarks/results/``:

* ``e2e_speedup_vs_batch_<device>.png``: tokens/s over ``target_only_ours`` (same run, same B) against B, for
  ``hf_generate``, ``hf_assisted`` and ``speculative_ours`` (one line per gamma, and per alpha on GPU rows).
* ``e2e_gamma_<device>.png``: acceptance rate and tokens/s of ``speculative_ours`` against gamma, one line per B
  (and alpha).

    python benchmarks/plot.py
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections import defaultdict

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40]


def num(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def load(path: str, all_runs: bool) -> dict[str, list[dict]]:
    """Rows grouped by device; only each device's latest run unless ``all_runs``."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    by_device: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_device[r["device"]].append(r)
    if not all_runs:
        for dev, rs in by_device.items():
            latest = max(r["date"] for r in rs)
            by_device[dev] = [r for r in rs if r["date"] == latest]
    return by_device


def label_of(r: dict) -> str:
    if r["method"] != "speculative_ours":
        return r["method"]
    alpha = f" alpha={r['alpha']}" if r.get("alpha") else ""
    return f"speculative_ours gamma={r['gamma']}{alpha}"


def plot_device(plt, device: str, rows: list[dict], out_dir: str) -> list[str]:
    measured = [r for r in rows if r.get("status") == "measured"]
    title = f"{device}\n{rows[0]['target']} | commit {rows[0]['commit']} | {rows[0]['date']}"
    kind = "CPU (shared, noisy)" if device.startswith("cpu") else "GPU"
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    lines = defaultdict(list)
    for r in measured:
        if r["method"] == "target_only_ours" or num(r.get("speedup")) is None:
            continue
        lines[label_of(r)].append((int(r["batch"]), num(r["speedup"])))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="target_only_ours")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("speedup over target-only (tokens/s ratio, same run)")
    ax.set_title(f"Speedup vs batch size [{kind}]\n{title}", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path = os.path.join(out_dir, f"e2e_speedup_vs_batch_{slug(device)}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    spec = [r for r in measured if r["method"] == "speculative_ours"]
    if spec:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        groups = defaultdict(list)
        for r in spec:
            alpha = f" alpha={r['alpha']}" if r.get("alpha") else ""
            groups[f"B={r['batch']}{alpha}"].append((int(r["gamma"]), num(r["acceptance_rate"]),
                                                     num(r["tokens_per_s"])))
        for label, pts in sorted(groups.items(), key=lambda kv: kv[0]):
            pts.sort()
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
        ax1.set_xlabel("gamma (draft tokens per step)")
        ax1.set_ylabel("acceptance rate")
        ax1.set_ylim(0, 1)
        ax2.set_xlabel("gamma (draft tokens per step)")
        ax2.set_ylabel("tokens/s (all rows)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"speculative_ours vs gamma [{kind}]\n{title}", fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"e2e_gamma_{slug(device)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default=os.path.join(RESULTS, "e2e.csv"), help="end-to-end results CSV to read")
    parser.add_argument("--out-dir", default=RESULTS, help="where the PNGs go")
    parser.add_argument("--all-runs", action="store_true", help="plot every recorded run of a device, not the latest")
    args = parser.parse_args(argv)
    if not os.path.exists(args.csv):
        print(f"{args.csv} does not exist: run benchmarks/bench_e2e.py first", file=sys.stderr)
        return 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for device, rows in load(args.csv, args.all_runs).items():
        for path in plot_device(plt, device, rows, args.out_dir):
            print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
