"""One check per argument, written once: every entry point (both engines, ``generate``, the CLI, the multi-process
path) validates an argument with the same function, so a bad value raises the same error with the same message
wherever it enters, before any compute.

Every check raises :class:`OptionError`, which is a ``ValueError`` and a ``TypeError`` (a bad value and a value of
the wrong type are one kind of mistake here; code that catches either keeps working).
"""

from __future__ import annotations

import math
import numbers

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager")
"""Attention implementations a model is loaded with for the ragged KV cache: both take its ready-made 4D additive
masks (flash kernels take none). ``auto`` picks per model (:func:`batched_specdec.models.resolve_attn_implementation`)."""

GAMMA_MAX_DEFAULT = 8
"""Largest draft length of ``gamma="auto"`` when ``gamma_max`` is not given."""


class OptionError(ValueError, TypeError):
    """A bad argument: the message names it, the value given and what was expected."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> int:
    """``value`` as an int >= 1."""
    if not _is_int(value) or value < 1:
        raise OptionError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{name} must be True or False, got {value!r}")
    return value


def check_optional_bool(name: str, value) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise OptionError(f"{name} must be True, False or None, got {value!r}")
    return value


def check_gamma(gamma) -> int | str:
    """The draft length: an int >= 1, or ``"auto"`` (the adaptive controller)."""
    if gamma == "auto":
        return "auto"
    if not _is_int(gamma) or gamma < 1:
        raise OptionError(f"gamma must be an int >= 1 or 'auto', got {gamma!r}")
    return int(gamma)


def check_gamma_max(gamma_max, gamma) -> int | None:
    """The largest draft length of ``gamma="auto"``; None (the default, :data:`GAMMA_MAX_DEFAULT` with auto) or an
    int >= 1, and only with ``gamma="auto"``."""
    if gamma_max is None:
        return None
    if gamma != "auto":
        raise OptionError(f"gamma_max={gamma_max!r} only applies with gamma='auto', got gamma={gamma!r}")
    return check_positive_int("gamma_max", gamma_max)


def check_seed(seed) -> int | None:
    if seed is not None and not _is_int(seed):
        raise OptionError(f"seed must be an int, got {seed!r}")
    return None if seed is None else int(seed)


def check_temperature(temperature) -> float:
    """A sampling temperature >= 0; 0 means greedy decoding."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0 \
            or math.isinf(temperature):
        raise OptionError(f"temperature must be a float >= 0 (0: greedy decoding), got {temperature!r}")
    return float(temperature)


def check_top_k(top_k) -> int | None:
    """None (off) or an int >= 1."""
    return None if top_k is None else check_positive_int("top_k", top_k)


def check_top_p(top_p) -> float | None:
    """None (off) or a float in (0, 1]."""
    if top_p is None:
        return None
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise OptionError(f"top_p must be a float in (0, 1], got {top_p!r}")
    return float(top_p)


def check_sampling(temperature, top_k, top_p) -> tuple[float, int | None, float | None]:
    """Temperature, top-k and top-p together: top-k and top-p need sampling (temperature > 0)."""
    temperature, top_k, top_p = check_temperature(temperature), check_top_k(top_k), check_top_p(top_p)
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise OptionError(f"top_k/top_p need sampling (got top_k={top_k!r}, top_p={top_p!r}): set temperature > 0 "
                          "(temperature 0 means greedy decoding)")
    return temperature, top_k, top_p


def check_ngram_sizes(max_ngram, min_ngram) -> tuple[int, int]:
    """``1 <= min_ngram <= max_ngram``."""
    min_ngram = check_positive_int("min_ngram", min_ngram)
    max_ngram = check_positive_int("max_ngram", max_ngram)
    if max_ngram < min_ngram:
        raise OptionError(f"max_ngram must be >= min_ngram ({min_ngram}), got {max_ngram!r}")
    return max_ngram, min_ngram
