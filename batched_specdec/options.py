"""The decode options: what every entry point resolves, once and before any compute, and passes down.

:func:`resolve_options` turns the arguments of both engines, :func:`~batched_specdec.generate` and the CLI into one
:class:`DecodeOptions`; :func:`resolve_prompts` checks a batch's prompts and per-row budgets. The rules that used
to be written in several places live here once:

* EOS ids (:func:`resolve_eos`): the ones given, else the target's ``generation_config.eos_token_id`` (an int or a
  list), else the tokenizer's ``eos_token_id``, as ``model.generate`` does; ``[]`` means none.
* pad id (:func:`resolve_pad`): the one given, else :data:`DEFAULT_PAD_TOKEN_ID`. It only fills buffer slots past a
  row's length, which are masked, so it never acts as a token.
* seeds (:func:`prompt_seed`): every prompt draws its random numbers under its own Philox key, derived from the
  run's seed and the prompt's index in the prompt set, at counters that follow how far the prompt has got
  (:class:`~batched_specdec.processors.RowDraws`). So a prompt's seeded samples do not depend on its batch, its
  slot, the schedule or the other prompts.
* sampling scheme (:func:`check_sampling_scheme`): ``"rejection"`` (the default) or ``"coupled"``
  (:data:`~batched_specdec.processors.SAMPLING_SCHEMES`): under ``"coupled"`` a seeded sampled output is the same
  as target-only sampling's with that seed, whatever the drafter, gamma, batch or schedule.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from batched_specdec.attention import resolve_attention
from batched_specdec.checks import (
    OptionError,
    check_bool,
    check_optional_bool,
    check_positive_int,
    check_seed,
)
from batched_specdec.controller import AdaptiveSpeculation, check_gamma_option
from batched_specdec.devices import is_cuda
from batched_specdec.model_info import input_device, max_positions, vocab_size
from batched_specdec.processors import SAMPLING_SCHEMES, LogitsProcessor

DEFAULT_PAD_TOKEN_ID = 0
"""Fills buffer slots past a row's length. Those slots are masked, so the id never acts as a real token."""


@dataclass(frozen=True)
class DecodeOptions:
    """Everything a decode needs besides the models, the prompts and the randomness, resolved and checked.

    ``gamma`` is the draft length (an int, ``"auto"``, or a controller instance built by the caller) and
    ``gamma_max`` the largest draft length of ``"auto"`` (None: the default). ``delayed_host_read`` is resolved
    for the target's device (on for CUDA with an integer gamma). ``sampling_scheme`` is ``"rejection"`` or
    ``"coupled"`` (:data:`~batched_specdec.processors.SAMPLING_SCHEMES`; greedy decoding is the same under both).
    ``cuda_graphs`` records decode-sized forwards once and replays them (:mod:`batched_specdec.graphs`; on a CPU its
    checking stand-in).
    """

    processor: LogitsProcessor
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    gamma: object
    gamma_max: int | None
    attention: str
    prefill_chunk: int
    compile: bool
    delayed_host_read: bool
    return_logprobs: bool = False
    collect_stats: bool = False
    progress: bool = False
    sampling_scheme: str = "rejection"
    cuda_graphs: bool = False

    @property
    def adaptive(self) -> bool:
        return self.gamma == "auto" or isinstance(self.gamma, AdaptiveSpeculation)


@dataclass
class DecodeRequest:
    """A checked batch: ``prompts`` as lists of ints, one generation budget per prompt, each prompt's index in its
    prompt set (``keys``, default ``0..B-1``: what its random draws and per-row statistics are keyed by), the
    device."""

    prompts: list[list[int]]
    max_gen_lens: list[int]
    device: torch.device
    keys: list[int] | None = None

    def __post_init__(self) -> None:
        if self.keys is None:
            self.keys = list(range(len(self.prompts)))

    @property
    def max_gen_len(self) -> int:
        return max(self.max_gen_lens)


def resolve_options(target, *, tokenizer=None, logits_processor: LogitsProcessor, eos_tokens_id=None,
                    pad_token_id=None, gamma=1, gamma_max=None, attention: str = "auto", prefill_chunk: int = 128,
                    compile: bool = False, delayed_host_read=None, return_logprobs: bool = False,
                    collect_stats: bool = False, progress: bool = False,
                    sampling_scheme: str = "rejection", cuda_graphs: bool | None = None) -> DecodeOptions:
    """Check every option and resolve the ones that come from the model (EOS ids, pad id, delayed host read).

    Raises
    ------
    OptionError
        Any bad value, named with what was expected.
    """
    check_attention_settings(attention, prefill_chunk)
    check_processor(logits_processor)
    sampling_scheme = check_sampling_scheme(sampling_scheme)
    check_tokenizer(tokenizer)
    gamma, gamma_max = check_gamma_option(gamma, gamma_max)
    compile = check_bool("compile", compile)
    cuda_graphs = resolve_cuda_graphs(cuda_graphs, compile)
    for name, flag in (("return_logprobs", return_logprobs), ("collect_stats", collect_stats),
                       ("progress", progress)):
        check_bool(name, flag)
    vocab = vocab_size(target)
    eos_token_ids = resolve_eos(eos_tokens_id, target, tokenizer, vocab)
    options = DecodeOptions(logits_processor, tuple(eos_token_ids), resolve_pad(pad_token_id, vocab), gamma, gamma_max,
                            attention, prefill_chunk, compile, False, return_logprobs, collect_stats, progress,
                            sampling_scheme)
    delayed = resolve_delayed_host_read(delayed_host_read, input_device(target), options.adaptive, gamma)
    return DecodeOptions(**{**options.__dict__, "delayed_host_read": delayed, "cuda_graphs": cuda_graphs})


def resolve_cuda_graphs(cuda_graphs, compile: bool) -> bool:
    """Whether decode-sized forwards are recorded once and replayed (:mod:`batched_specdec.graphs`).

    ``None`` (the default) means off on every device for now: the graph path has not been measured on a GPU yet, so
    it is not the default there until it has been measured faster. ``True`` records CUDA graphs on CUDA and, on
    a CPU, runs the checking stand-in (exact, slower than eager: for tests and smoke runs). Not with ``compile``,
    which records its own graphs.
    """
    cuda_graphs = check_optional_bool("cuda_graphs", cuda_graphs)
    if cuda_graphs and compile:
        raise OptionError("cuda_graphs=True cannot be combined with compile=True (compile records its own CUDA "
                          "graphs through inductor); choose one")
    return bool(cuda_graphs)


def resolve_delayed_host_read(delayed, device: torch.device, adaptive: bool, gamma) -> bool:
    """Whether the host reads each step's flags one step late: by default on CUDA with an integer gamma."""
    delayed = check_optional_bool("delayed_host_read", delayed)
    if delayed is None:
        return is_cuda(device) and not adaptive
    if delayed and adaptive:
        raise OptionError(f"delayed_host_read=True needs an integer gamma, got gamma={gamma!r}: the adaptive "
                          "controller reads each step's counts and timings before it plans the next step")
    return delayed


def resolve_prompts(prompts, model, max_gen_len) -> DecodeRequest:
    """Check a batch's prompts against ``model`` (ids in its vocabulary, room in its context) and expand
    ``max_gen_len`` (an int, or one per prompt) into per-row budgets."""
    if isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        max_gen_lens = expand_max_gen_len(max_gen_len, len(prompts))
    else:
        max_gen_lens = []
    rows = normalise_prompts(prompts, vocab_size(model), max_gen_lens, max_positions(model))
    return DecodeRequest(rows, max_gen_lens, input_device(model))


def check_processor(logits_processor) -> LogitsProcessor:
    if not isinstance(logits_processor, LogitsProcessor):
        raise OptionError(f"logits_processor must be a LogitsProcessor, got {type(logits_processor).__name__}")
    return logits_processor


def check_sampling_scheme(sampling_scheme, name: str = "sampling_scheme") -> str:
    """``sampling_scheme`` must be one of :data:`~batched_specdec.processors.SAMPLING_SCHEMES`; ``name`` is what the
    error calls it (a CLI flag, say)."""
    if not isinstance(sampling_scheme, str) or sampling_scheme not in SAMPLING_SCHEMES:
        raise OptionError(f"{name} must be one of {', '.join(map(repr, SAMPLING_SCHEMES))}, got {sampling_scheme!r}")
    return sampling_scheme


def check_tokenizer(tokenizer) -> None:
    """The seed API takes ``tokenizer`` 4th, so ``speculative_generate_batch(p, d, t, 5)`` is a likely slip."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, (bool, numbers.Number)) or isinstance(tokenizer, str) and tokenizer == "auto":
        raise OptionError(f"tokenizer must be a tokenizer or None, got {type(tokenizer).__name__} {tokenizer!r}; "
                          f"did you mean gamma={tokenizer!r}? (pass gamma by keyword)")
    if not hasattr(tokenizer, "eos_token_id"):
        raise OptionError(f"tokenizer must be a tokenizer (with eos_token_id) or None, got "
                          f"{type(tokenizer).__name__}")


def check_attention_settings(attention, prefill_chunk) -> None:
    """``attention`` must name a backend of :mod:`batched_specdec.attention`; ``prefill_chunk`` an int >= 1
    (prompt tokens per row per prefill forward)."""
    resolve_attention(attention, torch.device("cpu"))
    check_positive_int("prefill_chunk", prefill_chunk)


def _is_token_id(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def _prompt_ids(name: str, prompt) -> list[int]:
    if isinstance(prompt, Tensor) or hasattr(prompt, "__array__") and hasattr(prompt, "ndim"):
        if prompt.ndim != 1 or not (str(prompt.dtype).startswith(("torch.int", "torch.uint", "int", "uint"))):
            raise OptionError(f"{name} must be a 1-D integer tensor or array, got shape {tuple(prompt.shape)} "
                              f"and dtype {prompt.dtype}")
        return [int(t) for t in prompt.tolist()]
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
        raise OptionError(f"{name} must be a list of token ids, got {type(prompt).__name__} "
                          "(for text use batched_specdec.generate, which tokenizes)")
    return list(prompt)


def normalise_prompts(prompts, vocab: int, max_gen_lens: list[int], positions: int | None,
                      labels: Sequence[str] | None = None) -> list[list[int]]:
    """Prompts as lists of ints in ``[0, vocab)``, each with room for its budget within ``positions``. Errors name
    prompt ``i`` as ``labels[i]`` (the CLI: its line in the prompt file), else ``"prompt i"``."""
    if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)):
        raise OptionError(f"prompts must be a list of token-id lists or 1-D tensors, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise OptionError("prompts is empty: expected at least one prompt")
    rows = []
    for i, prompt in enumerate(prompts):
        name = f"prompt {i}" if labels is None else labels[i]
        ids = _prompt_ids(name, prompt)
        if len(ids) == 0:
            raise OptionError(f"{name} is empty: every prompt needs at least one token")
        for t in ids:
            if not _is_token_id(t) or not 0 <= t < vocab:
                raise OptionError(f"{name} has token id {t!r}, expected an int in [0, {vocab})")
        need = len(ids) + max_gen_lens[i]
        if positions is not None and need > positions:
            raise OptionError(
                f"{name} has {len(ids)} tokens; with max_gen_len={max_gen_lens[i]} it needs {need} positions, "
                f"but the model supports max_position_embeddings={positions}. Shorten the prompt or lower "
                "max_gen_len."
            )
        rows.append([int(t) for t in ids])
    return rows


def expand_max_gen_len(max_gen_len, num_prompts: int) -> list[int]:
    """An int for every row, or one int per prompt."""
    if isinstance(max_gen_len, (list, tuple)):
        if len(max_gen_len) != num_prompts:
            raise OptionError(f"max_gen_len has {len(max_gen_len)} entries, expected one per prompt ({num_prompts})")
        return [check_positive_int(f"max_gen_len[{i}]", m) for i, m in enumerate(max_gen_len)]
    return [check_positive_int("max_gen_len", max_gen_len)] * num_prompts


def _as_id_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, Tensor) or hasattr(value, "ndim") and hasattr(value, "tolist"):  # torch / numpy ids
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def resolve_eos(eos_token_ids, model, tokenizer, vocab: int) -> list[int]:
    """The EOS rule: ``eos_token_ids`` (the engines' ``eos_tokens_id``) when given; ``None`` means the model's
    ``generation_config.eos_token_id`` (an int or a list), else the tokenizer's; ``[]`` means no EOS (every row runs
    to its budget). Errors name the engines' argument."""
    source = "eos_tokens_id"
    if eos_token_ids is None:
        eos_token_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        source = "eos_tokens_id (from the target's generation_config.eos_token_id)"
        if eos_token_ids is None and tokenizer is not None:
            eos_token_ids = tokenizer.eos_token_id
            source = "eos_tokens_id (from tokenizer.eos_token_id)"
    ids = []
    for t in _as_id_list(eos_token_ids):
        if not _is_token_id(t) or not 0 <= t < vocab:
            raise OptionError(f"{source} has {t!r}, expected ints in [0, {vocab})")
        if int(t) not in ids:
            ids.append(int(t))
    return ids


def resolve_pad(pad_token_id, vocab: int) -> int:
    """The pad rule: ``pad_token_id`` when given, else :data:`DEFAULT_PAD_TOKEN_ID`."""
    if pad_token_id is None:
        return DEFAULT_PAD_TOKEN_ID
    if not _is_token_id(pad_token_id) or not 0 <= pad_token_id < vocab:
        raise OptionError(f"pad_token_id must be None or an int in [0, {vocab}), got {pad_token_id!r}")
    return int(pad_token_id)


def run_seed(seed, generator) -> int:
    """The run's seed: ``seed``; else one draw from ``generator`` (one host read per call); else one draw from
    torch's default generator (so ``torch.manual_seed`` reproduces a run)."""
    seed = check_seed(seed)
    if seed is not None and generator is not None:
        raise OptionError("give either seed or generator, not both")
    if seed is not None:
        return seed
    if generator is not None and not isinstance(generator, torch.Generator):
        raise OptionError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device))


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit integers that spreads every input bit over the output."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The Philox key (a signed 64-bit int) of the prompt at ``prompt_index`` in a prompt set decoded with ``seed``.

    ``(seed, index)`` is packed into 64 bits (seed in the high half, index in the low half), which is injective for
    seeds and indices in ``[0, 2**32)``, then mixed by a bijection. So seed ``s`` prompt ``i`` never gets the key of
    seed ``s + 1`` prompt ``j`` (as ``seed + i`` would), and neighbouring seeds or prompts get unrelated streams.
    Seeds outside ``[0, 2**32)`` are first hashed into it.
    """
    seed = int(seed)
    if not 0 <= seed < 1 << 32:
        seed = _mix64(seed & _MASK64) >> 32
    key = _mix64((seed << 32) | (int(prompt_index) & 0xFFFFFFFF))
    return key - (1 << 64) if key >= 1 << 63 else key
