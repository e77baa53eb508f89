"""What the main job reports: per-method totals of the engines' stats, the rich tables, and the device name."""

from __future__ import annotations

from batched_specdec.devices import device_name
from batched_specdec.ragged_batch import add_counts

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


def print_identity(console, identical: int, n_rows: int, dtype: str, differing: list[dict]) -> None:
    """The greedy check's verdict. In float32 identical is the promise; in reduced precision a verify of k + 1
    tokens and a one-token forward run different kernels, so the share of identical rows is reported with, for
    every row that differs, where and at which margin (near-ties are expected there, clear margins are not)."""
    reduced = dtype in ("bfloat16", "float16")
    if not reduced:
        verdict = "[green]identical[/]" if identical == n_rows else "[red]DIFFERENT[/]"
        console.print(f"Greedy outputs {verdict} to target-only decoding for {identical}/{n_rows} prompts.")
    else:
        console.print(f"Greedy outputs in {dtype}: {identical}/{n_rows} prompts ({identical / max(n_rows, 1):.0%}) "
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


class Totals:
    """Sums of per-batch measurements for one method."""

    def __init__(self) -> None:
        self.tokens = 0
        self.wall = 0.0
        self.target_forwards = 0
        self.accepted = 0
        self.proposed = 0
        self.histogram: list[int] = []
        self.row_steps = 0
        self.tpf_weighted = 0.0
        self.peak_memory: int | None = None
        self.peak_memory_kind = ""
        self.time_split: dict[str, float] = {}
        self.draft_lengths: list[int] = []  # gamma auto: steps per chosen draft length
        self.controller_steps = 0
        self.predicted_s = self.measured_s = 0.0

    def add_stats(self, stats) -> None:
        self.target_forwards += int(getattr(stats, "target_forwards", 0) or 0)
        self.accepted += sum(getattr(stats, "accepted", []) or [])
        self.proposed += sum(getattr(stats, "proposed", []) or [])
        hist = list(getattr(stats, "acceptance_histogram", []) or [])
        add_counts(self.histogram, hist)
        weight = sum(hist) or int(getattr(stats, "target_forwards", 0) or 0)
        self.row_steps += weight
        self.tpf_weighted += weight * float(getattr(stats, "tokens_per_target_forward", 0.0) or 0.0)
        peak = getattr(stats, "peak_memory_bytes", None)
        if peak is not None:
            self.peak_memory = max(self.peak_memory or 0, int(peak))
            self.peak_memory_kind = getattr(stats, "peak_memory_kind", "") or self.peak_memory_kind
        for key, value in (getattr(stats, "time_split", None) or {}).items():
            self.time_split[key] = self.time_split.get(key, 0.0) + float(value)
        self.add_controller(getattr(stats, "controller", None))

    def add_controller(self, summary: dict | None) -> None:
        if not summary:
            return
        add_counts(self.draft_lengths, summary["draft_length_histogram"])
        if summary["predicted_step_s_mean"] is not None:
            n = summary["predicted_steps"]
            self.controller_steps += n
            self.predicted_s += n * summary["predicted_step_s_mean"]
            self.measured_s += n * summary["measured_step_s_mean"]

    @classmethod
    def merged(cls, parts: list[Totals]) -> Totals:
        """Totals of processes that ran at the same time: sums, except wall time and peak memory (the maximum)."""
        total = cls()
        for part in parts:
            total.tokens += part.tokens
            total.wall = max(total.wall, part.wall)
            total.target_forwards += part.target_forwards
            total.accepted += part.accepted
            total.proposed += part.proposed
            add_counts(total.histogram, part.histogram)
            total.row_steps += part.row_steps
            total.tpf_weighted += part.tpf_weighted
            if part.peak_memory is not None:
                total.peak_memory = max(total.peak_memory or 0, part.peak_memory)
                total.peak_memory_kind = part.peak_memory_kind
            for key, value in part.time_split.items():
                total.time_split[key] = total.time_split.get(key, 0.0) + value
            add_counts(total.draft_lengths, part.draft_lengths)
            total.controller_steps += part.controller_steps
            total.predicted_s += part.predicted_s
            total.measured_s += part.measured_s
        return total

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else 0.0

    @property
    def tokens_per_target_forward(self) -> float | None:
        return self.tpf_weighted / self.row_steps if self.row_steps else None

    def as_dict(self) -> dict:
        return {
            "generated_tokens": self.tokens,
            "wall_time_s": self.wall,
            "tokens_per_s": self.tokens_per_s,
            "target_forwards": self.target_forwards,
            "tokens_per_target_forward": self.tokens_per_target_forward,
            "accepted": self.accepted,
            "proposed": self.proposed,
            "acceptance_rate": self.accepted / self.proposed if self.proposed else None,
            "acceptance_histogram": self.histogram,
            "peak_memory_bytes": self.peak_memory,
            "peak_memory_kind": self.peak_memory_kind,
            "time_split_s": self.time_split or None,
            "draft_length_histogram": self.draft_lengths or None,
            "controller_predicted_step_s": self.predicted_s / self.controller_steps if self.controller_steps else None,
            "controller_measured_step_s": self.measured_s / self.controller_steps if self.controller_steps else None,
        }

    def controller_line(self) -> str | None:
        """One line on what gamma auto chose: the draft-length mix and predicted against measured step time."""
        if not self.draft_lengths:
            return None
        steps = sum(self.draft_lengths)
        mix = ", ".join(f"{k}: {n / steps:.0%}" for k, n in enumerate(self.draft_lengths) if n)
        mean = sum(k * n for k, n in enumerate(self.draft_lengths)) / steps
        line = f"gamma auto: draft length per step {mean:.2f} on average ({mix} of {steps} steps)"
        if self.controller_steps:
            line += (f"; step time predicted {1e3 * self.predicted_s / self.controller_steps:.1f} ms, measured "
                     f"{1e3 * self.measured_s / self.controller_steps:.1f} ms")
        return line


def print_report(console, config, base, spec, speedup, device) -> None:
    from rich.table import Table

    table = Table(title=f"Speculative decoding vs target-only on {device_name(device)}")
    table.add_column("metric")
    if not config.no_baseline:
        table.add_column("target-only", justify="right")
    table.add_column(f"speculative ({config.draft}, gamma={config.gamma})", justify="right")

    def row(name, b, s):
        table.add_row(name, *([b] if not config.no_baseline else []), s)

    row("generated tokens", f"{base.tokens}", f"{spec.tokens}")
    row("wall time", f"{base.wall:.2f} s", f"{spec.wall:.2f} s")
    row("tokens/s", f"{base.tokens_per_s:.1f}", f"{spec.tokens_per_s:.1f}")
    row("speedup", "1.00x", f"{speedup:.2f}x" if speedup is not None else "n/a (--no-baseline)")
    row("target forwards", f"{base.target_forwards}", f"{spec.target_forwards}")
    tpf = spec.tokens_per_target_forward
    row("tokens per target forward (per row)", "1.00", f"{tpf:.2f}" if tpf is not None else "n/a")
    rate = spec.accepted / spec.proposed if spec.proposed else None
    row("acceptance rate", "-", f"{rate:.1%} ({spec.accepted}/{spec.proposed})" if rate is not None else "n/a")
    kind = spec.peak_memory_kind or base.peak_memory_kind
    row(f"peak memory ({kind or 'n/a'})", _fmt_bytes(base.peak_memory), _fmt_bytes(spec.peak_memory))
    if spec.time_split:
        split = ", ".join(f"{k} {v:.2f} s" for k, v in spec.time_split.items())
        row("time split", "-", split)
    console.print(table)

    if spec.histogram:
        hist = Table(title="Acceptance histogram: (row, step) pairs that accepted j draft tokens")
        total = sum(spec.histogram) or 1
        for j in range(len(spec.histogram)):
            hist.add_column(f"j={j}", justify="right")
        hist.add_row(*(f"{n} ({n / total:.0%})" for n in spec.histogram))
        console.print(hist)
    line = spec.controller_line()
    if line:
        console.print(line)


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


def print_outputs(console, tokenizer, texts, base_out, spec_out, alphas, greedy, no_baseline) -> None:
    from rich.markup import escape
    from rich.panel import Panel

    for i, text in enumerate(texts):
        generated = tokenizer.decode(spec_out[i], skip_special_tokens=True)
        title = f"prompt {i}: acceptance {alphas[i]:.0%}"
        if greedy and not no_baseline:
            same = base_out[i] == spec_out[i]
            title += ", identical to target-only" if same else ", DIFFERS from target-only"
        body = f"[bold]{escape(text)}[/]\n\n{escape(generated)}"
        if not no_baseline and (not greedy or base_out[i] != spec_out[i]):
            body += f"\n\n[dim]target-only:[/] {escape(tokenizer.decode(base_out[i], skip_special_tokens=True))}"
        console.print(Panel(body, title=title, title_align="left"))
