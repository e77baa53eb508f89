"""The main job's greedy identity check in reduced precision: the share of identical rows and, per differing row,
the first differing position and the target's top-2 logit margin there, never a bare DIFFERENT (CPU, bfloat16)."""

from __future__ import annotations

import torch
from rich.console import Console
from tiny_models import greedy_reference, tiny_causal_lm

from batched_specdec.report import divergences, print_identity


def _bf16_case():
    model = tiny_causal_lm("llama", seed=5).to(torch.bfloat16)
    prompts = [[3, 9, 27], [44, 45], [10, 20, 30, 40]]
    base = [greedy_reference(model, p, 6, []) for p in prompts]
    spec = [list(b) for b in base]
    spec[1][2] = (base[1][2] + 1) % 96  # row 1 parts from the target-only output at its third token
    return model, prompts, base, spec


def test_divergences_name_the_first_position_and_the_targets_margin_there():
    model, prompts, base, spec = _bf16_case()
    found = divergences(model, prompts, base, spec)
    assert [(d["row"], d["position"]) for d in found] == [(1, 2)]
    d = found[0]
    assert d["target_only_token"] == base[1][2] and d["speculative_token"] == spec[1][2]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompts[1] + base[1][:2]])).logits[0, -1].float()
    top = logits.topk(2).values
    assert d["margin"] == float(top[0] - top[1]) and d["margin"] > 0
    assert d["ulps"] == d["margin"] / (abs(float(top[0])) * 2.0**-7)
    assert divergences(model, prompts, base, base) == []


def test_reduced_precision_verdict_reports_the_share_and_each_divergence():
    model, prompts, base, spec = _bf16_case()
    console = Console(record=True, width=300)
    print_identity(console, 2, 3, "bfloat16", divergences(model, prompts, base, spec))
    text = console.export_text()
    assert "DIFFERENT" not in text and "Greedy outputs identical" not in text
    assert "2/3 prompts (67%) identical" in text
    assert "prompt 1: first differs at token 2" in text and "top-2 logit margin" in text
    near = {"row": 0, "position": 4, "target_only_token": 1, "speculative_token": 2, "margin": 0.01, "ulps": 0.5}
    clear = dict(near, row=2, margin=3.0, ulps=90.0)
    console = Console(record=True, width=300)
    print_identity(console, 1, 3, "bfloat16", [near, clear])
    text = console.export_text()
    assert "prompt 0" in text and "(near-tie)" in text and "prompt 2" in text and "clear margin: a bug" in text


def test_float32_verdict_stays_identical_or_different():
    console = Console(record=True, width=300)
    print_identity(console, 3, 3, "float32", [])
    assert "Greedy outputs identical to target-only decoding for 3/3 prompts." in console.export_text()
    console = Console(record=True, width=300)
    print_identity(console, 2, 3, "float32", [{"row": 1, "position": 0, "target_only_token": 4,
                                               "speculative_token": 5, "margin": 2.0, "ulps": 1e6}])
    text = console.export_text()
    assert "DIFFERENT" in text and "prompt 1: first differs at token 0" in text
