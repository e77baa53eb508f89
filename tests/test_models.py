"""Model loading: specs, offline errors, dtype/device resolution, and the embedded GGUF with its cache."""

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tiny_models import tiny_causal_lm

from batched_specdec import models
from batched_specdec.models import ModelLoadError, load_draft, load_target, resolve_device, resolve_dtype
from batched_specdec.options import DEFAULT_PAD_TOKEN_ID, resolve_eos, resolve_pad

WORDS = [
    "the",
    "a",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "cat",
    "hello",
    "world",
    "again",
    "and",
    "is",
    "of",
    "to",
    "in",
    "one",
    "two",
    "three",
]


def make_tiny_model_dir(path, *, vocab_extra: int = 0, seed: int = 0) -> str:
    """Save a tiny random-weight Llama and a whitespace word-level tokenizer to ``path``; return it as str."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    )
    model = tiny_causal_lm("llama", vocab_size=len(vocab) + vocab_extra, seed=seed, eos_token_id=1, pad_token_id=2,
                           bos_token_id=None)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


def test_load_local_dir(tiny_dir):
    model, tokenizer = load_target(tiny_dir, device="cpu")
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert resolve_eos(None, model, tokenizer, model.config.vocab_size) == [1]
    assert resolve_pad(None, model.config.vocab_size) == DEFAULT_PAD_TOKEN_ID
    draft = load_draft(tiny_dir, model, device="cpu")
    assert draft is not model and draft.config.vocab_size == model.config.vocab_size


def test_load_draft_ngram_is_default(tiny_dir):
    from batched_specdec.drafting.ngram import NGramDrafter

    assert isinstance(load_draft(None, None), NGramDrafter)
    assert isinstance(load_draft("ngram", None), NGramDrafter)


def test_draft_vocab_mismatch(tiny_dir, tmp_path):
    target, _ = load_target(tiny_dir)
    other = make_tiny_model_dir(tmp_path / "other", vocab_extra=5)
    with pytest.raises(ModelLoadError, match="vocabulary"):
        load_draft(other, target)


def test_hf_id_not_available_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelLoadError, match="not available offline") as info:
        load_target("someorg/some-model-that-is-not-cached")
    assert "local" in str(info.value)


def test_bad_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_target(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_target("./no/such/dir/anywhere")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_target(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_target(str(tmp_path / "empty"))


def test_embedded_gguf_loads_and_cache_is_reused(capsys):
    """The real SmolLM2-135M-Instruct GGUF: converted once (~30-60 s on 2 cores), then loaded from the cache.

    Uses the user cache (``$BATCHED_SPECDEC_CACHE`` or ``~/.cache/batched_specdec``) so that it is paid once per
    machine; on a fresh CI machine the first call converts.
    """
    from batched_specdec import GreedyProcessor, autoregressive_generate_batch, gguf_cache
    from batched_specdec.prompts import encode_prompts

    gguf = models.embedded_gguf_path()
    assert gguf.is_file()
    model, tokenizer = load_target("embedded", device="cpu")
    cache_dir = gguf_cache._gguf_cache_dir(gguf)
    assert gguf_cache._cache_is_valid(cache_dir, gguf)
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    capsys.readouterr()

    t0 = time.perf_counter()
    model2, _ = load_target("smollm2", device="cpu")
    reload_s = time.perf_counter() - t0
    assert "Converting" not in capsys.readouterr().err
    assert reload_s < 30, f"loading from the cache took {reload_s:.1f} s"
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)

    eos = resolve_eos(None, model, tokenizer, model.config.vocab_size)
    assert tokenizer.convert_ids_to_tokens(eos[0]) == "<|im_end|>"
    prompt = encode_prompts(tokenizer, ["What is 2+3? Answer with just the number."])
    out = autoregressive_generate_batch(
        prompt,
        model,
        GreedyProcessor(),
        max_gen_len=8,
        eos_tokens_id=eos,
    )
    assert "5" in tokenizer.decode(out[0], skip_special_tokens=True)
