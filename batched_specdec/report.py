"""What the main job reports: the comparison table (median over repeats, speedup spread), the verdict that both
methods gave the same tokens, the per-process table, each output, and the results JSON it saves."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from batched_specdec.devices import device_name

MANTISSA_BITS = {"float32": 23, "bfloat16": 7, "float16": 10}
"""Stored mantissa bits per dtype: a logit's rounding step is ``|logit| * 2**-bits``."""


def divergences(model, prompts: list[list[int]], base_out: list[list[int]], spec_out: list[list[int]]) -> list[dict]:
    """For every row whose speculative output differs from the target-only one: where they part and how close the
    target's choice was there.

    Returns one dict per differing row: ``row``, ``position`` (first differing index of the continuation), the
    two tokens, ``margin`` (the target's top-1 minus top-2 logit at that position, from one plain forward over the
    prompt and the target-only tokens before it) and ``ulps`` (the margin in rounding steps of the top logit in the
    model's dtype: a flip within a few is a near-tie that reduced precision explains; at a clear margin, a bug).
    """
    import torch

    bits = MANTISSA_BITS.get(str(model.dtype).replace("torch.", ""), 23)
    device = model.get_input_embeddings().weight.device
    found = []
    for row, (base, spec) in enumerate(zip(base_out, spec_out)):
        if base == spec:
            continue
        position = next((j for j, (a, b) in enumerate(zip(base, spec)) if a != b), min(len(base), len(spec)))
        ids = torch.tensor([list(prompts[row]) + list(base[:position])], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, -1].float()
        top = logits.topk(2).values
        margin = float(top[0] - top[1])
        step = abs(float(top[0])) * 2.0**-bits or 2.0**-bits
        found.append({"row": row, "position": position,
                      "target_only_token": base[position] if position < len(base) else None,
                      "speculative_token": spec[position] if position < len(spec) else None,
                      "margin": margin, "ulps": margin / step})
    return found


def print_identity(console, identical: int, n_rows: int, dtype: str, differing: list[dict],
                   kind: str = "Greedy") -> None:
    """The verdict of the check that both methods gave the same tokens (``kind``: ``"Greedy"`` or ``"Sampled
    (coupled)"``). In float32 identical is the promise; in reduced precision a verify of k + 1 tokens and a
    one-token forward run different kernels, so the share of identical rows is reported with, for every greedy row
    that differs, where and at which margin (near-ties are expected there, clear margins are not)."""
    reduced = dtype in ("bfloat16", "float16")
    if not reduced:
        verdict = "[green]identical[/]" if identical == n_rows else "[red]DIFFERENT[/]"
        console.print(f"{kind} outputs {verdict} to target-only decoding for {identical}/{n_rows} prompts.")
    else:
        console.print(f"{kind} outputs in {dtype}: {identical}/{n_rows} prompts ({identical / max(n_rows, 1):.0%}) "
                      "identical to target-only decoding; near-tie flips are expected in reduced precision.")
    for d in differing:
        kind = "near-tie" if d["ulps"] <= 4 else "[red]clear margin: a bug[/]"
        console.print(f"  prompt {d['row']}: first differs at token {d['position']} (target-only "
                      f"{d['target_only_token']}, speculative {d['speculative_token']}); top-2 logit margin "
                      f"{d['margin']:.4g} = {d['ulps']:.1f} rounding steps of {dtype} ({kind})")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:,.0f} MiB"


SPREAD_TOO_WIDE = 0.15
"""A speedup whose repeats span more than this fraction of their median is reported as too noisy to trust."""


@dataclass
class Timing:
    """Tokens/s of each repeat of both methods (the same prompts each time; target-only None without a
    baseline), in the order the repeats ran."""

    baseline: list[float] | None
    speculative: list[float]

    @property
    def speedups(self) -> list[float] | None:
        if not self.baseline:
            return None
        return [s / b for s, b in zip(self.speculative, self.baseline) if b > 0]

    @property
    def speedup(self) -> float | None:
        """The median of the per-repeat speedups."""
        ratios = self.speedups
        return statistics.median(ratios) if ratios else None

    @property
    def spread(self) -> tuple[float, float] | None:
        ratios = self.speedups
        return (min(ratios), max(ratios)) if ratios else None

    @property
    def too_noisy(self) -> bool:
        spread, median = self.spread, self.speedup
        return spread is not None and median is not None and (spread[1] - spread[0]) > SPREAD_TOO_WIDE * median

    def as_dict(self) -> dict:
        return {"baseline_tokens_per_s": self.baseline, "speculative_tokens_per_s": self.speculative,
                "speedups": self.speedups, "speedup_median": self.speedup, "speedup_spread": self.spread,
                "too_noisy": self.too_noisy}


def stats_dict(stats, runs: list | None = None) -> dict:
    """The results JSON's summary of one method's merged :class:`~batched_specdec.GenerationStats` (its first run);
    with ``runs`` (every repeat's stats), ``tokens_per_s`` and ``wall_time_s`` are the medians over the repeats, as
    the printed report gives them, and ``*_runs`` list every repeat's figure in the order they ran."""
    controller = stats.controller or {}
    steps = controller.get("predicted_steps") or 0
    runs = runs or [stats]
    rates = [s.tokens_per_s for s in runs]
    walls = [s.wall_time_s for s in runs]
    return {
        "generated_tokens": stats.generated_tokens,
        "wall_time_s": statistics.median(walls),
        "wall_time_s_runs": walls,
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_runs": rates,
        "target_forwards": stats.target_forwards,
        "tokens_per_target_forward": stats.tokens_per_target_forward,
        "accepted": sum(stats.accepted),
        "proposed": sum(stats.proposed),
        "acceptance_rate": stats.acceptance_rate if sum(stats.proposed) else None,
        "acceptance_histogram": stats.acceptance_histogram,
        "peak_memory_bytes": stats.peak_memory_bytes,
        "peak_memory_kind": stats.peak_memory_kind,
        "time_split_s": stats.time_split,
        "draft_length_histogram": controller.get("draft_length_histogram"),
        "controller_predicted_step_s": controller.get("predicted_step_s_mean") if steps else None,
        "controller_measured_step_s": controller.get("measured_step_s_mean") if steps else None,
        "sources": stats.extra.get("sources"),
    }


def controller_line(stats) -> str | None:
    """One line on what gamma auto chose: the draft-length mix and predicted against measured step time."""
    controller = stats.controller or {}
    lengths = controller.get("draft_length_histogram")
    if not lengths or not sum(lengths):
        return None
    steps = sum(lengths)
    mix = ", ".join(f"{k}: {n / steps:.0%}" for k, n in enumerate(lengths) if n)
    mean = sum(k * n for k, n in enumerate(lengths)) / steps
    line = f"gamma auto: draft length per step {mean:.2f} on average ({mix} of {steps} steps)"
    if controller.get("predicted_steps"):
        line += (f"; step time predicted {1e3 * controller['predicted_step_s_mean']:.1f} ms, measured "
                 f"{1e3 * controller['measured_step_s_mean']:.1f} ms")
    return line


def _speedup_cell(timing: Timing) -> str:
    if timing.speedup is None:
        return "n/a (--no-baseline)"
    low, high = timing.spread
    cell = f"{timing.speedup:.2f}x"
    if len(timing.speedups) > 1:
        cell += f" ({low:.2f}-{high:.2f}x over {len(timing.speedups)} repeats)"
    return cell


def print_report(console, config, base, spec, timing: Timing, device) -> None:
    """The comparison table: tokens/s (median over the repeats), speedup with its spread, acceptance, tokens per
    target forward, peak memory; then the acceptance histogram and what gamma auto chose."""
    from rich.table import Table

    table = Table(title=f"Speculative decoding vs target-only on {device_name(device)}")
    table.add_column("metric")
    if base is not None:
        table.add_column("target-only", justify="right")
    table.add_column(f"speculative ({config.draft}, gamma={config.gamma})", justify="right")

    def row(name, b, s):
        table.add_row(name, *([b] if base is not None else []), s)

    b = base if base is not None else spec  # the baseline column is absent without a baseline
    row("generated tokens", f"{b.generated_tokens}", f"{spec.generated_tokens}")
    row("tokens/s (median)", f"{statistics.median(timing.baseline or [0]):.1f}",
        f"{statistics.median(timing.speculative):.1f}")
    row("speedup", "1.00x", _speedup_cell(timing))
    row("target forwards", f"{b.target_forwards}", f"{spec.target_forwards}")
    row("tokens per target forward (per row)", "1.00", f"{spec.tokens_per_target_forward:.2f}")
    accepted, proposed = sum(spec.accepted), sum(spec.proposed)
    rate = f"{accepted / proposed:.1%} ({accepted}/{proposed})" if proposed else "n/a"
    row("acceptance rate", "-", rate)
    kind = spec.peak_memory_kind or b.peak_memory_kind
    row(f"peak memory ({kind or 'n/a'})", _fmt_bytes(b.peak_memory_bytes), _fmt_bytes(spec.peak_memory_bytes))
    if spec.time_split:
        row("time split", "-", ", ".join(f"{k} {v:.2f} s" for k, v in spec.time_split.items()))
    console.print(table)
    if timing.too_noisy:
        console.print(f"[yellow]The repeats' speedups span {timing.spread[0]:.2f}-{timing.spread[1]:.2f}x: too wide "
                      "to trust (another job shares the machine?); rerun with more --repeats on a quiet machine.[/]")
    if spec.acceptance_histogram and proposed:
        hist = Table(title="Acceptance histogram: (row, step) pairs that accepted j draft tokens")
        total = sum(spec.acceptance_histogram) or 1
        for j in range(len(spec.acceptance_histogram)):
            hist.add_column(f"j={j}", justify="right")
        hist.add_row(*(f"{n} ({n / total:.0%})" for n in spec.acceptance_histogram))
        console.print(hist)
    for line in (controller_line(spec), sources_line(spec)):
        if line:
            console.print(line)


def sources_line(stats) -> str | None:
    """Where the accepted draft tokens came from, for a drafter with several sources (the hybrid drafter's model and
    n-gram sources, the n-gram drafter's match lengths ``ngram1``..``ngram3``); each
    row's share is in the results JSON (``accepted_by_source``) and, with ``--show-output``, above its text."""
    sources = stats.extra.get("sources")
    if not sources:
        return None
    total = sum(v["accepted"] for v in sources.values()) or 1
    parts = [f"{name}: {v['accepted']} accepted of {v['proposed']} verified drafts in {v['rows']} (row, step) pairs "
             f"({v['accepted'] / total:.0%} of accepted tokens)" for name, v in sources.items()]
    return "draft sources: " + "; ".join(parts)


def print_processes(console, processes: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="Per process (accelerate)")
    for name in ("process", "prompts", "target-only tokens/s", "speculative tokens/s", "speculative wall time"):
        table.add_column(name, justify="right")
    for p in processes:
        base = p["baseline_tokens_per_s"]
        table.add_row(
            str(p["process_index"]),
            str(p["num_prompts"]),
            "-" if base is None else f"{base:.1f}",
            f"{p['speculative_tokens_per_s']:.1f}",
            f"{p['speculative_wall_time_s']:.2f} s",
        )
    console.print(table)


def print_outputs(console, tokenizer, texts, base_out, spec_out, alphas, greedy, no_baseline,
                  sources: dict | None = None) -> None:
    """Every prompt and its generation in a panel: the verdict against target-only in the title (short, so it is
    never cut), the acceptance on the body's first line."""
    from rich.markup import escape
    from rich.panel import Panel

    for i, text in enumerate(texts):
        generated = tokenizer.decode(spec_out[i], skip_special_tokens=True)
        title = f"prompt {i}"
        if greedy and not no_baseline:
            title += ": identical to target-only" if base_out[i] == spec_out[i] else ": DIFFERS from target-only"
        detail = f"acceptance {alphas[i]:.0%}"
        if sources:
            detail += " (accepted from " + ", ".join(f"{name} {c['accepted_per_prompt'][i]}"
                                                     for name, c in sources.items()) + ")"
        body = f"[dim]{detail}[/]\n[bold]{escape(text)}[/]\n\n{escape(generated)}"
        if not no_baseline and (not greedy or base_out[i] != spec_out[i]):
            body += f"\n\n[dim]target-only:[/] {escape(tokenizer.decode(base_out[i], skip_special_tokens=True))}"
        console.print(Panel(body, title=title, title_align="left"))


def process_rows(per_process: list[dict]) -> list[dict]:
    """One row per process of a multi-process run: its prompts, both methods' tokens/s and its wall time."""
    rows = []
    for p in per_process:
        base, spec = p["runs"]["baseline"], p["runs"]["speculative"]
        rows.append({"process_index": p["process_index"], "num_prompts": p["num_prompts"],
                     "baseline_tokens_per_s": base[0].tokens_per_s if base else None,
                     "speculative_tokens_per_s": spec[0].tokens_per_s, "speculative_wall_time_s": spec[0].wall_time_s})
    return rows


def results_dict(config, loaded, summary, command: str | None) -> dict:
    """The results JSON of a main-job run (``loaded``, ``summary``: :mod:`batched_specdec.main`'s): config,
    environment, both methods' stats, every run's timing, and every prompt's outputs."""
    import torch
    import transformers

    from batched_specdec.devices import device_name

    tok, merged = loaded.tokenizer, summary.merged
    return {
        "command": command,
        "config": config.as_dict(),
        "environment": {"device": device_name(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
                        "commit": _git_commit(), "python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
        "load_time_s": loaded.load_s,
        "processes": process_rows(summary.per_process),
        "eos_token_ids": list(loaded.options["speculative"].eos_token_ids),
        "baseline": None if summary.base is None else stats_dict(summary.base, summary.runs["baseline"]),
        "speculative": stats_dict(summary.spec, summary.runs["speculative"]),
        "timing": summary.timing.as_dict(),
        "speedup": summary.timing.speedup,
        "sampling_scheme": config.sampling_scheme,
        "identical_rows": summary.identical,
        "greedy_divergences": summary.differing,
        "rows": [
            {"index": loaded.indices[i], **loaded.fields[i], "prompt": loaded.texts[i],
             "prompt_tokens": len(loaded.prompts[i]),
             "speculative_tokens": merged["spec_out"][i],
             "speculative_text": tok.decode(merged["spec_out"][i], skip_special_tokens=True),
             "baseline_tokens": merged["base_out"][i],
             "baseline_text": None if merged["base_out"][i] is None else
             tok.decode(merged["base_out"][i], skip_special_tokens=True),
             "acceptance_rate": merged["alphas"][i],
             "accepted_by_source": {name: c["accepted_per_prompt"][i]
                                    for name, c in summary.spec.extra.get("sources", {}).items()} or None,
             "identical_to_baseline": None if summary.identical is None else
             merged["base_out"][i] == merged["spec_out"][i]}
            for i in range(len(loaded.prompts))
        ],
    }


def save(config, results: dict, console) -> Path:
    """Write the results JSON to ``--output-dir`` whole (a temporary file renamed into place)."""
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"results_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    console.print(f"Results written to {path}")
    return path


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], check=False,
                             cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
