"""Every common model family used as it is: greedy speculative output equals transformers' own ``generate``.

Each family is a tiny random-weight model (tests/tiny_models.py) with the feature that sets it apart (Llama-3's EOS
list and llama3 rope scaling, Qwen3's q/k norms, Gemma-2's soft-capping and alternating sliding windows, Gemma-3's
mixed layers, a composite Gemma-3 config, ...). EOS comes from the model's generation config only: no eos or pad
argument is passed. Also: layer types the ragged cache cannot express are errors, and the loaders pick an attention
implementation each family accepts. CPU, float32.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random

import pytest
import torch
from tiny_models import save_tiny_model_dir, tiny_causal_lm, tiny_gemma3_multimodal

from batched_specdec import GreedyProcessor, autoregressive_generate_batch, generate, speculative_generate_batch
from batched_specdec.config import ConfigError, build_config
from batched_specdec.drafting.ngram import NGramDrafter
from batched_specdec.main import build_parser, method_options, parse_config
from batched_specdec.models import ModelLoadError, load_draft, load_target, resolve_attn_implementation
from batched_specdec.ragged_cache import RaggedKVCache
from batched_specdec.runner import decode_prompt_set

VOCAB = 128
MAX_NEW = 20
FAMILIES = ["llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gemma3-multimodal"]
FAMILY_OVERRIDES = {"mistral": {"sliding_window": 8}}  # every layer sliding, and the window is reached


def _family_pair(family: str):
    """A target (4 layers) and a different, shallower draft (2 layers, other weights) of the same family."""
    if family == "gemma3-multimodal":
        return tiny_gemma3_multimodal(vocab_size=VOCAB, seed=10), tiny_gemma3_multimodal(vocab_size=VOCAB, seed=11,
                                                                                         layers=2)
    overrides = FAMILY_OVERRIDES.get(family, {})
    target = tiny_causal_lm(family, vocab_size=VOCAB, seed=10, layers=4, **overrides)
    draft = tiny_causal_lm(family, vocab_size=VOCAB, seed=11, layers=2, **overrides)
    return target, draft


def _ragged_prompts() -> list[list[int]]:
    """Lengths 1..22, ids clear of the special ids at either end of the vocabulary (Gemma-3's image tokens)."""
    rng = random.Random(0)
    return [[rng.randrange(5, 100) for _ in range(n)] for n in (1, 6, 22, 13, 3)]


@torch.no_grad()
def _hf_greedy(model, prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
    """transformers' greedy ``generate`` for one prompt (no padding anywhere); the continuation only."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new)
    return out[0, len(prompt):].tolist()


def _eos_ids(value) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _mid_row_token(rows: list[list[int]], avoid: list[int]) -> int:
    """A token some row emits for the first time in the middle of its output: as an EOS it cuts that row short."""
    for row in rows:
        for j in range(3, len(row) - 3):
            if row[j] not in row[:j] and row[j] not in avoid:
                return row[j]
    raise AssertionError(f"no row emits a new token mid-row: {rows}")


FLEX_FAMILIES = ["llama3", "gemma2", "gemma3"]
"""Flex compiles once per shape on CPU: GQA, soft-capping with sliding windows, and mixed layer types suffice."""
CASES = [(f, "auto") for f in FAMILIES] + [(f, "dense") for f in FAMILIES] + [(f, "flex") for f in FLEX_FAMILIES]


@pytest.mark.parametrize("family, attention", CASES)
def test_family_greedy_matches_generate_with_eos_from_generation_config(family, attention):
    """Every attention backend: the ragged ones (auto = sdpa, flex) and the dense-mask reference."""
    target, draft = _family_pair(family)
    prompts = _ragged_prompts()
    defaults = _eos_ids(target.generation_config.eos_token_id)
    stop = _mid_row_token([_hf_greedy(target, p) for p in prompts], defaults)
    target.generation_config.eos_token_id = defaults + [stop]
    assert len(target.generation_config.eos_token_id) >= 2

    expected = [_hf_greedy(target, p) for p in prompts]
    assert any(row[-1] == stop and len(row) < MAX_NEW for row in expected), "the EOS never ends a row early"
    assert any(len(row) == MAX_NEW for row in expected), "every row stopped early: nothing checks the long rows"
    for drafter in (draft, NGramDrafter()):
        outputs, _, stats = speculative_generate_batch(prompts, drafter, target, gamma=3, max_gen_len=MAX_NEW,
                                                       attention=attention)
        assert outputs == expected, type(drafter).__name__
        assert sum(stats.proposed) > 0
    assert autoregressive_generate_batch(prompts, target, max_gen_len=MAX_NEW, attention=attention) == expected


class _Tokenizer:
    """What generate() and the CLI read of a tokenizer for token-id prompts: an EOS id and decoding."""

    chat_template = None

    def __init__(self, eos_token_id: int) -> None:
        self.eos_token_id = eos_token_id

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in rows]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cli_and_generate_stop_on_the_same_eos_ids(family):
    """The generation config names the EOS ids; the model config and the tokenizer name another id, which the
    rows emit mid-row (a rule that took their union would cut those rows short). The CLI's options and generate()
    stop exactly where model.generate does."""
    target, _ = _family_pair(family)
    prompts = _ragged_prompts()
    free = [_hf_greedy(target, p) for p in prompts]
    configured = _eos_ids(target.generation_config.eos_token_id)
    other = _mid_row_token(free, configured)
    target.config.get_text_config().eos_token_id = other
    tokenizer = _Tokenizer(other)
    expected = [_hf_greedy(target, p) for p in prompts]
    assert any(other in row[:-1] for row in expected), "the other id never occurs: the test could not fail"

    options = method_options(parse_config(["--gamma", "2"]), target, tokenizer, GreedyProcessor())
    assert options["speculative"].eos_token_ids == options["baseline"].eos_token_ids == tuple(configured)
    for method in ("baseline", "speculative"):
        drafter = NGramDrafter() if method == "speculative" else None
        cli = decode_prompt_set(target, drafter, prompts, [MAX_NEW] * len(prompts), options[method], batch_size=2)
        assert cli.outputs == expected, method
    assert generate(prompts, target, draft=None, tokenizer=tokenizer, max_new_tokens=MAX_NEW).token_ids == expected
    assert generate(prompts, target, draft="ngram", tokenizer=tokenizer, gamma=2,
                    max_new_tokens=MAX_NEW).token_ids == expected


def test_composite_config_keeps_decoder_settings_in_the_text_config():
    """The multimodal family above exercises get_text_config(): its top-level config has no decoder fields."""
    target, _ = _family_pair("gemma3-multimodal")
    assert not hasattr(target.config, "num_hidden_layers") and not hasattr(target.config, "vocab_size")
    text = target.config.get_text_config()
    assert {"sliding_attention", "full_attention"} == set(text.layer_types)
    cache = RaggedKVCache(target.config, 2, 16, torch.device("cpu"))
    assert cache.windows == [8 if t == "sliding_attention" else None for t in text.layer_types]
    mask = cache.dense_mask(cache.positions(1), torch.float32)
    assert set(mask) == {"full_attention", "sliding_attention"}


@pytest.mark.parametrize("layer_type", ["chunked_attention", "linear_attention"])
def test_layer_type_the_cache_does_not_understand_is_an_error(layer_type):
    target = tiny_causal_lm("qwen2", vocab_size=VOCAB, layers=3)
    target.config.layer_types = ["full_attention", layer_type, "full_attention"]
    message = rf"layer 1 of Qwen2Config has layer type '{layer_type}'"
    with pytest.raises(ValueError, match=message):
        speculative_generate_batch([[5, 6, 7]], NGramDrafter(), target, max_gen_len=4)
    with pytest.raises(ValueError, match=message):
        autoregressive_generate_batch([[5, 6, 7]], target, max_gen_len=4)


def test_composite_config_with_unknown_layer_type_is_an_error():
    target = tiny_gemma3_multimodal(vocab_size=VOCAB, layers=2)
    target.config.get_text_config().layer_types = ["sliding_attention", "chunked_attention"]
    with pytest.raises(ValueError, match="layer 1 of Gemma3TextConfig has layer type 'chunked_attention'"):
        speculative_generate_batch([[5, 6, 7]], NGramDrafter(), target, max_gen_len=4)


def test_chunked_attention_without_layer_types_and_windowless_sliding_layers_are_errors():
    llama = tiny_causal_lm("llama", vocab_size=VOCAB)
    llama.config.attention_chunk_size = 8
    with pytest.raises(ValueError, match="chunked attention"):
        RaggedKVCache(llama.config, 1, 16, torch.device("cpu"))
    gemma = tiny_causal_lm("gemma3", vocab_size=VOCAB)
    gemma.config.sliding_window = None
    with pytest.raises(ValueError, match="layer 0 of Gemma3TextConfig is a sliding_attention layer but the config "
                                         "has no sliding_window"):
        RaggedKVCache(gemma.config, 1, 16, torch.device("cpu"))


@pytest.fixture(scope="module")
def gemma2_dirs(tmp_path_factory):
    """A Gemma-2 target, a draft with a prefix vocabulary and one with a larger vocabulary, saved with
    save_pretrained (the attention implementation is not part of a saved config)."""
    root = tmp_path_factory.mktemp("gemma2")
    target = tiny_causal_lm("gemma2", vocab_size=VOCAB, seed=20, layers=2)
    small = tiny_causal_lm("gemma2", vocab_size=VOCAB - 8, seed=21, layers=1)
    large = tiny_causal_lm("gemma2", vocab_size=VOCAB + 8, seed=22, layers=1)
    dirs = {name: save_tiny_model_dir(m, root / name) for name, m in
            (("target", target), ("small", small), ("large", large))}
    return target, dirs


def test_auto_attention_loads_a_saved_gemma2_with_eager(gemma2_dirs):
    saved, dirs = gemma2_dirs
    model, tokenizer = load_target(dirs["target"])
    assert model.config._attn_implementation == "eager"
    assert tokenizer.eos_token_id == 1
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, saved(ids).logits)
    draft = load_draft(dirs["small"], model)
    assert draft.config._attn_implementation == "eager"
    prompts = _ragged_prompts()[:3]
    outputs, _, _ = speculative_generate_batch(prompts, draft, model, gamma=3, max_gen_len=8)
    assert outputs == [_hf_greedy(model, p, 8) for p in prompts]
    assert any(t >= VOCAB - 8 for row in outputs for t in row), "the target never emits an id the draft lacks"


def test_attention_choice_and_its_errors(gemma2_dirs, tmp_path):
    _, dirs = gemma2_dirs
    assert load_target(dirs["target"], attn_implementation="eager")[0].config._attn_implementation == "eager"
    with pytest.raises(ModelLoadError, match="Gemma2ForCausalLM does not support sdpa attention"):
        load_target(dirs["target"], attn_implementation="sdpa")
    with pytest.raises(ModelLoadError, match="unknown attn_implementation 'flash_attention_2'"):
        load_target(dirs["target"], attn_implementation="flash_attention_2")
    llama_dir = save_tiny_model_dir(tiny_causal_lm("llama3", vocab_size=VOCAB), tmp_path / "llama3")
    assert resolve_attn_implementation(llama_dir) == "sdpa"
    assert load_target(llama_dir)[0].config._attn_implementation == "sdpa"
    assert load_target(llama_dir, attn_implementation="eager")[0].config._attn_implementation == "eager"


def test_load_draft_vocabulary_rule(gemma2_dirs):
    _, dirs = gemma2_dirs
    target, _ = load_target(dirs["target"])
    assert load_draft(dirs["small"], target).get_output_embeddings().weight.shape[0] == VOCAB - 8
    with pytest.raises(ModelLoadError, match=f"vocabulary of {VOCAB + 8} tokens, more than the target's {VOCAB}"):
        load_draft(dirs["large"], target)


def test_cli_attn_implementation_flag():
    assert parse_config([]).attn_implementation == "auto"
    assert parse_config(["--attn-implementation", "eager"]).attn_implementation == "eager"
    with pytest.raises(SystemExit) as info:  # argparse's choices: one line, exit 2
        parse_config(["--attn-implementation", "flash"])
    assert info.value.code == 2
    with pytest.raises(ConfigError, match="attn_implementation \\(config file 'c.yaml'\\) 'flash' is not one of auto"):
        build_config({"attn_implementation": "flash"}, {}, "c.yaml")
    assert "--attn-implementation" in build_parser().format_help()
