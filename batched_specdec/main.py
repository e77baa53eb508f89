"""``python -m batched_specdec.main``: speculative decoding against target-only decoding on real prompts.

The job, in five steps: parse (flags and config file, every path checked before anything loads), load (target,
draft, prompts), run (each method decodes the whole prompt set, the methods alternating, ``--repeats`` times, so a
noisy machine slows both alike and shows as spread), report (tokens/s, the median speedup and its spread,
acceptance, tokens per target forward, histogram, peak memory, the greedy check) and save (a results JSON).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

# The CLI is offline by design: never let transformers reach for the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from batched_specdec.checks import OptionError
from batched_specdec.config import PROG, RunConfig, build_parser, parse_config  # noqa: F401 (public CLI API)

METHODS = ("baseline", "speculative")
"""The two methods the job compares: target-only decoding and speculative decoding."""


@dataclass
class Loaded:
    """What :func:`load` prepared: the models, the drafter, the prompts, and each method's decode options."""

    model: object
    tokenizer: object
    drafter: object
    device: object
    dtype: object
    texts: list[str]
    prompts: list[list[int]]
    options: dict
    load_s: float
    indices: list[int]
    fields: list[dict]
    writer: object = None


def main(argv: list[str] | None = None) -> int:
    """Entry point. Argument errors (flags, config file, paths) print one line and exit 2 before anything loads, and
    so do prompts the model cannot take (checked once the tokenizer has loaded, before any forward); a model that
    cannot be loaded and other errors print one line and exit 1; never a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config = parse_config(argv)
        check_paths(config)
    except OptionError as exc:
        _fail(f"{' '.join(str(exc).split())} (see --help)", code=2)
    from batched_specdec.distributed import process_group_torn_down
    from batched_specdec.models import ModelLoadError

    try:
        with process_group_torn_down():  # under accelerate launch: every rank leaves the group before exiting
            run(config, command=" ".join([PROG, *argv]))
    except (OptionError, ModelLoadError) as exc:
        if os.environ.get("BATCHED_SPECDEC_DEBUG"):
            raise
        _fail(" ".join(str(exc).split()), code=2 if isinstance(exc, OptionError) else 1)
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    return 0


def check_paths(config: RunConfig) -> None:
    """Every file the run will read, checked before any model loads: the prompts file, and the target and draft
    when they name paths (each error names its flag)."""
    from batched_specdec.models import check_model_spec
    from batched_specdec.prompts import read_prompts_file

    if config.prompts:
        read_prompts_file(config.prompts)
    check_model_spec("--target", config.target, draft=False)
    check_model_spec("--draft", config.draft, draft=True)


def run(config: RunConfig, console=None, command: str | None = None) -> dict:
    """Load, decode with both methods, report and save; returns the results (empty on processes but the main, and
    when a resumed run had nothing left to decode)."""
    from rich.console import Console

    from batched_specdec.distributed import process_state, run_on_prompt_shards

    state = process_state()
    console = console or Console(quiet=not state.is_main_process)
    loaded = load(config, console, state)
    if not loaded.prompts:
        console.print(f"Every prompt is already in {config.output_dir}: nothing to decode.")
        return {}
    warm_up(console, config, loaded)
    try:
        merged, per_process = run_on_prompt_shards(
            loaded.prompts, lambda shard, ids: decode_shard(config, loaded, shard, ids, console))
    finally:
        if loaded.writer is not None:
            loaded.writer.close()
    if not state.is_main_process:
        return {}
    summary = summarise(config, loaded, merged, per_process)
    report(console, config, loaded, summary)
    from batched_specdec.report import results_dict, save

    results = results_dict(config, loaded, summary, command)
    results["path"] = str(save(config, results, console))
    return results


def load(config: RunConfig, console, state) -> Loaded:
    """The target, the draft, the encoded prompts (checked against the model's context and vocabulary, each named
    by its line, before any forward), each method's options and, with ``--no-baseline``, the outputs file."""
    import transformers

    from batched_specdec.devices import is_cuda
    from batched_specdec.drafting import as_drafter
    from batched_specdec.model_info import max_positions, vocab_size
    from batched_specdec.models import load_draft, load_target, resolve_device, resolve_dtype
    from batched_specdec.options import normalise_prompts
    from batched_specdec.processors import make_processor
    from batched_specdec.prompts import encode_prompts

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = resolve_device(config.device)
    if state.num_processes > 1 and is_cuda(device):
        device = state.device  # one GPU per process under accelerate launch
    dtype = resolve_dtype(config.dtype, device)
    records = prompt_records(config)
    console.print(f"Loading target [bold]{config.target}[/] on {device} ({str(dtype).replace('torch.', '')}) ...")
    t0 = time.perf_counter()
    attn = config.attn_implementation
    model, tokenizer = load_target(config.target, device=device, dtype=dtype, attn_implementation=attn)
    draft = load_draft(config.draft, model, device=device, dtype=dtype, attn_implementation=attn,
                       max_ngram=config.ngram_max, min_ngram=config.ngram_min, target_tokenizer=tokenizer)
    load_s = time.perf_counter() - t0
    processor = make_processor(config.temperature, config.top_k, config.top_p)
    options = method_options(config, model, tokenizer, processor)
    drafter = as_drafter(draft, vocab_size(model), attention=config.attention, prefill_chunk=config.prefill_chunk,
                         compile=config.compile)
    texts = [r.text for r in records]
    prompts = normalise_prompts(encode_prompts(tokenizer, texts), vocab_size(model),
                                [config.max_new_tokens] * len(texts), max_positions(model), [r.where for r in records])
    loaded = Loaded(model, tokenizer, drafter, device, dtype, texts, prompts, options, load_s,
                    list(range(len(texts))), [r.fields for r in records])
    if config.no_baseline:
        _open_outputs(config, loaded, state.process_index, console)
    where = f" across {state.num_processes} processes" if state.num_processes > 1 else ""
    slots = f"{config.batch_size} slot" + ("s" if config.batch_size != 1 else "")
    repeats = f"{config.repeats} repeat" + ("s" if config.repeats != 1 else "")
    lengths = f" ({min(map(len, loaded.prompts))}-{max(map(len, loaded.prompts))} tokens)" if loaded.prompts else ""
    console.print(f"Loaded in {load_s:.1f} s. {len(loaded.prompts)} prompts{lengths}, {slots} ({config.schedule})"
                  f"{where}; draft {config.draft}, gamma {config.gamma}, up to {config.max_new_tokens} new tokens, "
                  f"{repeats} of each method." if not config.no_baseline else
                  f"Loaded in {load_s:.1f} s. {len(loaded.prompts)} prompts{lengths} to generate, {slots} "
                  f"({config.schedule}){where}; draft {config.draft}, gamma {config.gamma}, up to "
                  f"{config.max_new_tokens} new tokens, {repeats}.")
    for line in _decoding_lines(config, processor):
        console.print(line)
    return loaded


def prompt_records(config: RunConfig) -> list:
    """The prompts the run decodes: every prompt of ``--prompts FILE`` (or the first ``--num-prompts``), else the
    first ``--num-prompts`` of the built-in set (default :data:`~batched_specdec.prompts.BUILTIN_NUM_PROMPTS`)."""
    from batched_specdec.outputs import check_reserved_fields
    from batched_specdec.prompts import (
        BUILTIN_NUM_PROMPTS,
        builtin_prompt_records,
        read_prompt_records,
        select_prompts,
    )

    if config.prompts:
        records = select_prompts(read_prompt_records(config.prompts), config.num_prompts,
                                 f"--prompts {config.prompts}")
        check_reserved_fields([r.fields for r in records], [r.where for r in records])
        return records
    return select_prompts(builtin_prompt_records(), config.num_prompts or BUILTIN_NUM_PROMPTS,
                          "the built-in prompt set")


def _open_outputs(config: RunConfig, loaded: Loaded, process_index: int, console) -> None:
    """Keep only the prompts a resumed run has not written yet, and open this process' outputs file."""
    from batched_specdec.outputs import OutputWriter, outputs_path, prepare, prompts_digest

    done = prepare(config, prompts_digest(loaded.texts, loaded.fields), len(loaded.texts))
    if done:
        console.print(f"Resuming: {len(done)} of {len(loaded.texts)} prompts are already in {config.output_dir}.")
    keep = [i for i in loaded.indices if i not in done]
    loaded.indices, loaded.fields = keep, [loaded.fields[i] for i in keep]
    loaded.texts, loaded.prompts = [loaded.texts[i] for i in keep], [loaded.prompts[i] for i in keep]
    if keep:
        loaded.writer = OutputWriter(outputs_path(config.output_dir, process_index), loaded.tokenizer,
                                     loaded.indices, loaded.fields)


def method_options(config: RunConfig, model, tokenizer, processor) -> dict:
    """Each method's :class:`~batched_specdec.options.DecodeOptions`, resolved by the library's rules (EOS ids
    from the generation config first, as :func:`~batched_specdec.generate` does)."""
    from batched_specdec.options import resolve_options

    common = {"tokenizer": tokenizer, "logits_processor": processor, "attention": config.attention,
              "prefill_chunk": config.prefill_chunk, "compile": config.compile,
              "sampling_scheme": config.sampling_scheme, "cuda_graphs": config.cuda_graphs or None}
    return {"baseline": resolve_options(model, **common),
            "speculative": resolve_options(model, gamma=config.gamma, gamma_max=config.gamma_max,
                                           collect_stats=config.time_split, return_logprobs=config.logprobs,
                                           **common)}


def _decoding_lines(config: RunConfig, processor) -> list[str]:
    """What the run samples with, whether outputs are compared, and top-k/top-p that greedy decoding ignores."""
    from batched_specdec.checks import ignored_under_greedy

    lines = []
    ignored = ignored_under_greedy(config.temperature, config.top_k, config.top_p, ("--top-k", "--top-p"))
    if ignored:
        lines.append(f"[yellow]Ignoring {' and '.join(s.replace('=', ' ') for s in ignored)}: --temperature 0 decodes "
                     "greedily, which does not sample (as model.generate ignores them without do_sample).[/]")
    if processor.is_greedy:
        compared = " (outputs of both methods are compared token for token)" if not config.no_baseline else ""
        return lines + [f"Decoding: greedy{compared}."]
    if config.sampling_scheme == "coupled":
        compared = "; outputs of both methods are compared token for token" if not config.no_baseline else ""
        line = (f"Decoding: {processor.describe()}, coupled sampling from --seed {config.seed}: every output is the "
                f"one target-only sampling draws with this seed{compared}.")
        return lines + [line]
    gamma_note = "seeds reproduce outputs with an integer --gamma" if config.gamma != "auto" else \
        "--gamma auto follows measured timings, so outputs differ between runs (each drawn from the target; " \
        "--sampling-scheme coupled makes them reproducible)"
    compared = "; outputs are not compared under rejection sampling (both are samples of the same distribution)" \
        if not config.no_baseline else ""
    line = f"Decoding: {processor.describe()}, drawn on the device from --seed {config.seed}{compared}; {gamma_note}."
    return lines + [line]


def _decode(method: str, config: RunConfig, loaded: Loaded, rows: list[list[int]], ids: list[int] | None = None,
            budget: int | None = None, on_prompt=None, on_result=None):
    """One method over ``rows`` (``loaded.prompts[ids]``, each keyed by its index in the prompt set):
    ``(PromptSetResult, seconds)`` with the device synchronised around it."""
    from batched_specdec.devices import reset_peak_memory, synchronize
    from batched_specdec.runner import decode_prompt_set

    drafter = loaded.drafter if method == "speculative" else None
    reset_peak_memory(loaded.device)
    synchronize(loaded.device)
    t = time.perf_counter()
    result = decode_prompt_set(loaded.model, drafter, rows, [budget or config.max_new_tokens] * len(rows),
                               loaded.options[method], batch_size=config.batch_size, seed=config.seed,
                               schedule=config.schedule, on_prompt=on_prompt, on_result=on_result,
                               prompt_ids=None if ids is None else [loaded.indices[i] for i in ids])
    synchronize(loaded.device)
    return result, time.perf_counter() - t


def warm_up(console, config: RunConfig, loaded: Loaded) -> None:
    """Run both methods once untimed, so one-time costs do not land in the first timed run: one short row, or
    with ``--compile`` the first whole batch, so that its shapes are compiled before the clock runs."""
    rows, budget = ([loaded.prompts[0]], 2) if not config.compile else (loaded.prompts[: config.batch_size], None)
    t0, graphs = time.perf_counter(), 0
    for method in METHODS:
        result, _ = _decode(method, config, loaded, rows, list(range(len(rows))), budget=budget)
        graphs += sum(s.extra["graphs_compiled"] for s in result.batch_stats)
    if config.compile:
        console.print(f"Warm-up compiled {graphs} graphs in {time.perf_counter() - t0:.1f} s (later shapes compile "
                      "inside the timed runs).")


def _method_order(config: RunConfig, repeat: int) -> list[str]:
    """Alternate which method goes first, so neither always runs on a warmer (or a busier) machine."""
    methods = [m for m in METHODS if m != "baseline" or not config.no_baseline]
    return methods if repeat % 2 == 0 else methods[::-1]


def decode_shard(config: RunConfig, loaded: Loaded, shard: list[list[int]], ids: list[int], console):
    """This process' prompts: ``config.repeats`` runs of each method over the whole shard, alternating; the first
    speculative run writes each prompt to the outputs file as it finishes (``--no-baseline``). Returns the first
    run's outputs per prompt and, per method, every run's merged stats with the run's wall time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from batched_specdec.distributed import process_state

    runs: dict[str, list] = {m: [] for m in METHODS}
    outputs: dict[str, list] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
               TextColumn("{task.fields[seconds]:.1f} s decoding"))
    total = len(shard) * config.repeats
    with Progress(*columns, console=console, disable=not process_state().is_main_process) as progress:
        tasks = {m: progress.add_task("target-only" if m == "baseline" else "speculative", total=total, seconds=0.0)
                 for m in _method_order(config, 0)}
        for repeat in range(config.repeats):
            for method in _method_order(config, repeat):
                done = progress.tasks[tasks[method]].completed
                writing = loaded.writer is not None and method == "speculative" and repeat == 0
                result, seconds = _decode(method, config, loaded, shard, ids, on_prompt=lambda n, _t, m=method, d=done:
                                          progress.update(tasks[m], completed=d + n),
                                          on_result=(lambda r: loaded.writer.write(ids[r.index], r.token_ids,
                                                                                   r.finish_reason, r.logprobs))
                                          if writing else None)
                result.stats.wall_time_s = seconds
                runs[method].append(result.stats)
                outputs.setdefault(method, result.outputs)
                progress.update(tasks[method], seconds=progress.tasks[tasks[method]].fields["seconds"] + seconds)
    spec = runs["speculative"][0]
    per_prompt = {"base_out": outputs.get("baseline", [None] * len(shard)), "spec_out": outputs["speculative"],
                  "alphas": spec.acceptance_rates}
    return per_prompt, {"runs": runs, "prompt_ids": ids}


@dataclass
class Summary:
    """The job's measurements over every process: per method, the first run's merged stats; the timing of every
    run; the outputs; the greedy verdict."""

    base: object
    spec: object
    runs: dict
    timing: object
    merged: dict
    per_process: list
    identical: int | None
    differing: list


def summarise(config: RunConfig, loaded: Loaded, merged: dict, per_process: list[dict]) -> Summary:
    """Merge the processes' runs (they ran at the same time: the slowest sets each run's wall time) and check the
    greedy outputs."""
    from batched_specdec.decode.stats import merge_stats
    from batched_specdec.report import Timing, divergences

    n = len(loaded.prompts)
    shards = [p["prompt_ids"] for p in per_process]

    def run_stats(method: str, repeat: int):
        return merge_stats([p["runs"][method][repeat] for p in per_process], shards, n, parallel=True)

    methods = _method_order(config, 0)
    stats = {m: [run_stats(m, r) for r in range(config.repeats)] for m in methods}
    tokens_per_s = {m: [s.tokens_per_s for s in runs] for m, runs in stats.items()}
    timing = Timing(tokens_per_s.get("baseline"), tokens_per_s["speculative"])
    identical, differing = None, []
    if compares_outputs(config, loaded):
        identical = sum(merged["base_out"][i] == merged["spec_out"][i] for i in range(n))
        if loaded.options["speculative"].processor.is_greedy:  # the logit margin diagnoses greedy choices only
            differing = divergences(loaded.model, loaded.prompts, merged["base_out"], merged["spec_out"])
    base = stats["baseline"][0] if "baseline" in stats else None
    return Summary(base, stats["speculative"][0], stats, timing, merged, per_process, identical, differing)


def compares_outputs(config: RunConfig, loaded: Loaded) -> bool:
    """Whether both methods must give the same tokens: greedy decoding, or sampling with the coupled scheme."""
    greedy = loaded.options["speculative"].processor.is_greedy
    return not config.no_baseline and (greedy or config.sampling_scheme == "coupled")


def report(console, config: RunConfig, loaded: Loaded, summary: Summary) -> None:
    """Print the comparison, the greedy verdict, the per-process table and, with ``--show-output``, every output."""
    from batched_specdec.report import print_identity, print_outputs, print_processes, print_report, process_rows

    print_report(console, config, summary.base, summary.spec, summary.timing, loaded.device)
    if summary.identical is not None:
        kind = "Greedy" if loaded.options["speculative"].processor.is_greedy else "Sampled (coupled)"
        print_identity(console, summary.identical, len(loaded.prompts), str(loaded.dtype).replace("torch.", ""),
                       summary.differing, kind)
    if len(summary.per_process) > 1:
        print_processes(console, process_rows(summary.per_process))
    if config.show_output:
        merged = summary.merged
        print_outputs(console, loaded.tokenizer, loaded.texts, merged["base_out"], merged["spec_out"],
                      merged["alphas"], summary.identical is not None, config.no_baseline,
                      summary.spec.extra.get("sources"))


def _fail(message: str, code: int = 1):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
