"""What the end-to-end benchmark's rows say (``bench_e2e.py``): the columns taken from a run's statistics and time
split, the acceptance a synthetic row should have, its goal verdict, and the printed table.
"""

from __future__ import annotations

import functools

from common import join_notes

SPLIT_COLUMNS = {"draft_s": ("plan", "draft"), "verify_s": ("verify",), "sampling_s": ("accept",),
                 "bookkeeping_s": ("commit", "sync")}
"""The time-split columns of ``results/e2e.csv`` and the step phases (:data:`batched_specdec.glossary.STEP_PHASES`)
each sums: the columns keep the names of the recorded runs."""


def split_fields(split: dict | None) -> dict:
    """The time-split columns (:data:`SPLIT_COLUMNS`) of a run's ``time_split`` (seconds per phase) and its
    non-model fraction (accept, commit and sync over the whole step)."""
    if not split:
        return {}
    row = {column: sum(split[phase] for phase in phases) for column, phases in SPLIT_COLUMNS.items()}
    total = sum(row.values())
    row["non_model_frac"] = (row["sampling_s"] + row["bookkeeping_s"]) / total if total > 0 else None
    return row


def noted(row: dict, stats) -> dict:
    """``row`` with what the run's graph path recorded and replayed added to its ``note`` (``--cuda-graphs``)."""
    if "graphs_recorded" in stats.extra:
        extra = stats.extra
        graph = (f"this run recorded {extra['graphs_recorded']} graphs ({extra['graph_recording_s']:.2f} s), "
                 f"replayed {extra['graph_replays']}")
        row["note"] = join_notes(row.get("note"), graph)
    return row


def stats_fields(stats, batch: int) -> dict:
    """The columns a run's statistics give at batch size ``batch``: tokens, wall time, rates and peak memory."""
    per_row = stats.generated_tokens / batch
    return {"generated_tokens": stats.generated_tokens, "wall_s": stats.wall_time_s,
            "tokens_per_s": stats.tokens_per_s,
            "row_ms_per_token": 1e3 * stats.wall_time_s / per_row if per_row else None,
            "tokens_per_target_forward": stats.tokens_per_target_forward, "target_forwards": stats.target_forwards,
            "peak_memory_bytes": stats.peak_memory_bytes, "peak_memory_kind": stats.peak_memory_kind}


def expected_acceptance(alpha: float, gamma: int | str) -> float | None:
    """Accepted per proposed draft when each of ``gamma`` drafts is right with probability ``alpha`` and verification
    stops at the first wrong one: E[accepted] / gamma = alpha (1 - alpha^gamma) / ((1 - alpha) gamma). None for
    ``gamma="auto"``, whose draft lengths vary from step to step."""
    if gamma == "auto":
        return None
    if alpha >= 1:
        return 1.0
    return alpha * (1 - alpha**gamma) / ((1 - alpha) * gamma)


def drifted(measured: float | None, expected: float) -> bool:
    """True when a synthetic row's measured acceptance is below 85% of the expected one (the target left the known
    continuation; ``bench_e2e.py``'s docstring says why)."""
    return measured is not None and measured < 0.85 * expected


def e2e_goal(batch: int, alpha, speedup: float, measured=None, expected=None, proposed: int | None = None) -> str:
    """End-to-end goals (H100-class, alpha 0.8) this row can speak to; not judged when the acceptance drifted or
    when no draft was verified (``proposed == 0``: gamma auto chose plain target steps throughout, so the row
    measures the engine without speculation, and its ratio to target-only is run-to-run variation)."""
    if alpha != 0.8:
        return ""
    if proposed == 0:
        return "not judged: no drafts verified (plain target steps only)"
    if expected is not None and drifted(measured, expected):
        return f"not judged: acceptance drifted ({measured:.2f} measured, {expected:.2f} expected)"
    need = {1: 2.0, 16: 1.3, 64: 1.0}.get(batch)
    if need is None:
        return ""
    return f">= {need}x at B={batch}: {'met' if speedup >= need else 'NOT met'} ({speedup:.2f}x)"


def cell(row: dict, key: str, spec: str) -> str:
    """``row[key]`` formatted with ``spec`` when it is a number (not a bool), else as text ("" for None or absent)."""
    v = row.get(key)
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v or "")


def print_report(rows: list[dict], gpu: bool, synthetic: bool) -> None:
    """Print the rows as a table (a row that was not measured shows its status), each speculative row's time split,
    and, on a CPU, that the GPU goals were not measured."""
    print(f"{'method':<22}{'B':>4}{'gam':>5}{'alpha':>6}{'tok/s':>9}{'ms/tok/row':>11}{'speedup':>8}{'acc':>6}"
          f"{'tok/fwd':>8}{'non-model':>10}{'match':>7}  histogram / status")  # fmt: skip
    for r in rows:
        if r["status"] != "measured":
            print(f"{r['method']:<22}{r['batch']:>4}{r.get('gamma', ''):>5}{'':>66}  {r['status']}")
            continue
        f = functools.partial(cell, r)
        print(f"{r['method']:<22}{r['batch']:>4}{r.get('gamma', '') or '':>5}{f('alpha', '.1f'):>6}"
              f"{f('tokens_per_s', '.1f'):>9}{f('row_ms_per_token', '.1f'):>11}{f('speedup', '.2f'):>8}"
              f"{f('acceptance_rate', '.2f'):>6}{f('tokens_per_target_forward', '.2f'):>8}"
              f"{f('non_model_frac', '.1%'):>10}{r.get('matches_target_only', '')!s:>7}  "
              f"{r.get('acceptance_histogram', '')} {r.get('goal', '')}")  # fmt: skip
    for r in rows:
        if r["method"] == "speculative_ours" and r.get("draft_s") is not None:
            print(f"time split B={r['batch']} gamma={r['gamma']} alpha={r.get('alpha')}: draft {r['draft_s']:.3f}s "
                  f"verify {r['verify_s']:.3f}s sampling {r['sampling_s']:.3f}s bookkeeping {r['bookkeeping_s']:.3f}s"
                  f" -> non-model {r['non_model_frac']:.1%}")  # fmt: skip
    if not gpu:
        print("GPU goals NOT measured: no CUDA device; these are CPU rows"
              + (" with synthetic acceptance (random-weight models)." if synthetic else " with real acceptance."))
