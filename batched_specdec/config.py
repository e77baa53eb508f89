"""Run configuration of ``python -m batched_specdec.main``: defaults, JSON/YAML config files, validation.

Precedence: built-in defaults < config file < command-line flags. Keys are the long flag names with ``_`` or
``-`` (``batch_size`` or ``batch-size``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager")
"""Attention implementations the ragged KV cache works with: both take its ready-made 4D additive masks (flash
kernels take none). ``auto`` picks per model (``batched_specdec.models.resolve_attn_implementation``)."""


class ConfigError(ValueError):
    """A user error in the configuration; the message is one line that names the bad value."""


@dataclass
class RunConfig:
    target: str = "embedded"
    draft: str = "auto"
    ngram_max: int = 3
    ngram_min: int = 1
    gamma: int | str = "auto"
    gamma_max: int = 8
    batch_size: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    attention: str = "auto"
    prefill_chunk: int = 128
    compile: bool = False
    num_prompts: int = 8
    prompts: str | None = None
    output_dir: str = "outputs"
    show_output: bool = False
    no_baseline: bool = False
    time_split: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    """``"auto"`` or an integer (given as an int or a string of digits)."""
    if value == "auto":
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"gamma must be an integer >= 1 or 'auto', got {value!r}")
    return value


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


def build_config(file_values: dict[str, Any] | None = None, cli_values: dict[str, Any] | None = None) -> RunConfig:
    """Merge defaults, config-file values and explicitly given CLI values (``None`` means not given), then check."""
    merged = RunConfig().as_dict()
    merged.update(file_values or {})
    merged.update({k: v for k, v in (cli_values or {}).items() if v is not None})
    merged["gamma"] = parse_gamma(merged["gamma"])
    config = RunConfig(**merged)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(config.gamma == "auto" or config.gamma >= 1, f"gamma must be >= 1 or 'auto', got {config.gamma}")
    need(config.gamma_max >= 1, f"gamma_max must be >= 1, got {config.gamma_max}")
    need(
        config.gamma == "auto" or config.gamma_max == RunConfig.gamma_max,
        f"gamma_max applies to gamma 'auto' only, but gamma is {config.gamma}",
    )
    need(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
    need(config.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {config.max_new_tokens}")
    need(config.num_prompts >= 1, f"num_prompts must be >= 1, got {config.num_prompts}")
    need(config.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {config.temperature}")
    need(config.top_k is None or config.top_k >= 1, f"top_k must be >= 1, got {config.top_k}")
    need(config.top_p is None or 0 < config.top_p <= 1, f"top_p must be in (0, 1], got {config.top_p}")
    need(
        config.temperature > 0 or (config.top_k is None and config.top_p is None),
        "top_k/top_p need sampling: set temperature > 0 (temperature 0 means greedy decoding)",
    )
    need(
        config.device == "auto" or config.device == "cpu" or config.device.startswith("cuda"),
        f"unknown device {config.device!r}: expected auto, cpu, cuda or cuda:N",
    )
    need(
        config.attn_implementation in ATTN_IMPLEMENTATIONS,
        f"unknown attn_implementation {config.attn_implementation!r}: expected one of "
        f"{', '.join(ATTN_IMPLEMENTATIONS)}",
    )
    from batched_specdec.attention import ATTENTION_BACKENDS

    need(
        config.attention in ATTENTION_BACKENDS,
        f"unknown attention backend {config.attention!r}: expected one of {', '.join(ATTENTION_BACKENDS)}",
    )
    need(config.prefill_chunk >= 1, f"prefill_chunk must be >= 1, got {config.prefill_chunk}")
    need(bool(config.target), "target must not be empty")
    need(bool(config.draft), "draft must not be empty")
    need(config.ngram_min >= 1, f"ngram_min must be >= 1, got {config.ngram_min}")
    need(
        config.ngram_max >= config.ngram_min,
        f"ngram_max must be >= ngram_min ({config.ngram_min}), got {config.ngram_max}",
    )
    need(
        config.draft.lower() in ("ngram", "hybrid", "auto")
        or (config.ngram_max, config.ngram_min) == (RunConfig.ngram_max, RunConfig.ngram_min),
        f"ngram_max/ngram_min apply to --draft ngram, hybrid and auto only, but the draft is {config.draft!r}",
    )
