"""One check per argument, written once: every entry point (both engines, ``generate``, the CLI, the multi-process
path) validates an argument with the same function, so a bad value raises the same error with the same message
wherever it enters, before any compute. A check that needs a class of a later layer lives beside that class and is
the only check of its argument: ``gamma`` as a controller instance
(:func:`batched_specdec.controller.check_gamma_option`, which calls :func:`check_gamma` otherwise).

Every check raises :class:`OptionError`, which is a ``ValueError`` and a ``TypeError`` (a bad value and a value of
the wrong type are one kind of mistake here; code that catches either keeps working).
"""

from __future__ import annotations

import math
import numbers

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager")
"""Attention implementations a model is loaded with for the ragged KV cache: both take its ready-made 4D additive
masks (flash kernels take none). ``auto`` picks per model
(:func:`batched_specdec.models.resolve_attn_implementation`)."""

ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "dense")
"""Values of ``attention=``: the attention backend of every forward through the ragged cache
(:mod:`batched_specdec.attention`)."""

SAMPLING_SCHEMES = ("rejection", "coupled")
"""How sampled tokens are drawn and drafts verified (:mod:`batched_specdec.processors`): ``"rejection"`` (Leviathan
et al.: accept with min(1, p/q), resample from (p - q)+) or ``"coupled"`` (Gumbel-max noise keyed by the seed, the
prompt and the position: seeded samples equal target-only sampling's); ``"rejection"`` is the default."""

SCHEDULES = ("continuous", "static")
"""How a prompt set is batched (:mod:`batched_specdec.runner`)."""

GAMMA_MAX_DEFAULT = 8
"""Largest draft length of ``gamma="auto"`` when ``gamma_max`` is not given, for a drafter with a model; a
model-free drafter (n-gram) may draft up to :data:`batched_specdec.controller.COPY_GAMMA_MAX_DEFAULT` (16)."""


class OptionError(ValueError, TypeError):
    """A bad argument: the message names it, the value given and what was expected."""


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded offline; the message says what to do instead."""


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


def check_gamma_max(gamma_max, gamma, names: tuple[str, str] = ("gamma_max", "gamma")) -> int | None:
    """The largest draft length of ``gamma="auto"``; None (the default, :data:`GAMMA_MAX_DEFAULT` with auto) or an
    int >= 1, and only with ``gamma="auto"``. ``names`` are how errors name the two (the CLI: its flags)."""
    if gamma_max is None:
        return None
    if gamma != "auto":
        raise OptionError(f"{names[0]} {gamma_max!r} only applies with {names[1]} 'auto', got {names[1]} {gamma!r}")
    return check_positive_int(names[0], gamma_max)


def check_seed(seed) -> int | None:
    if seed is not None and not _is_int(seed):
        raise OptionError(f"seed must be an int, got {seed!r}")
    return None if seed is None else int(seed)


def check_temperature(temperature, name: str = "temperature") -> float:
    """A sampling temperature >= 0; 0 means greedy decoding."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0 \
            or math.isinf(temperature):
        raise OptionError(f"{name} must be a float >= 0 (0: greedy decoding), got {temperature!r}")
    return float(temperature)


def check_top_k(top_k, name: str = "top_k") -> int | None:
    """None (off) or an int >= 1."""
    return None if top_k is None else check_positive_int(name, top_k)


def check_top_p(top_p, name: str = "top_p") -> float | None:
    """None (off) or a float in (0, 1]."""
    if top_p is None:
        return None
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise OptionError(f"{name} must be a float in (0, 1], got {top_p!r}")
    return float(top_p)


def check_sampling(temperature, top_k, top_p, names: tuple[str, str, str] = ("temperature", "top_k", "top_p")
                   ) -> tuple[float, int | None, float | None]:
    """Temperature, top-k and top-p, each checked. With temperature 0 (greedy decoding) top-k and top-p change
    nothing and are ignored, as ``model.generate`` ignores them without ``do_sample``
    (:func:`ignored_under_greedy` names them for a warning)."""
    return (check_temperature(temperature, names[0]), check_top_k(top_k, names[1]), check_top_p(top_p, names[2]))


def ignored_under_greedy(temperature, top_k, top_p, names: tuple[str, str] = ("top_k", "top_p")) -> list[str]:
    """``"name=value"`` of each of top-k and top-p that is set although temperature 0 decodes greedily."""
    if temperature != 0:
        return []
    return [f"{name}={value!r}" for name, value in zip(names, (top_k, top_p)) if value is not None]


def check_ngram_sizes(max_ngram, min_ngram, names: tuple[str, str] = ("max_ngram", "min_ngram")) -> tuple[int, int]:
    """``1 <= min_ngram <= max_ngram``; ``names`` are how errors name the two (the CLI: its flags)."""
    min_ngram = check_positive_int(names[1], min_ngram)
    max_ngram = check_positive_int(names[0], max_ngram)
    if max_ngram < min_ngram:
        raise OptionError(f"{names[0]} must be >= {names[1]} ({min_ngram}), got {max_ngram!r}")
    return max_ngram, min_ngram
