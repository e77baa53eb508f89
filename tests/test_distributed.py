"""accelerate integration: prompt sets split across processes give the single-process results, in order."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_causal_lm

from batched_specdec import MultinomialProcessor, speculative_generate_batch
from batched_specdec.distributed import run_on_prompt_shards, speculative_generate_distributed
from batched_specdec.drafting import as_drafter
from batched_specdec.options import prompt_seed, resolve_options
from batched_specdec.runner import decode_prompt_set

WORKER = Path(__file__).with_name("distributed_worker.py")
GROUP_WORKER = Path(__file__).with_name("process_group_worker.py")


def _free_port() -> int:
    """A port nobody listens on now, so that launches running at the same time do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accelerate_launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *args]


def _single_process_reference(num_prompts: int) -> list[list[int]]:
    target = tiny_causal_lm("llama", seed=0)
    draft = tiny_causal_lm("llama", seed=1, layers=1)
    rng = random.Random(0)
    prompts = [[rng.randrange(96) for _ in range(rng.randint(1, 20))] for _ in range(num_prompts)]
    return speculative_generate_batch(prompts, draft, target, gamma=3, max_gen_len=12, eos_tokens_id=[])[0]


def _launch(tmp_path: Path, *extra: str, num_prompts: int = 5) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "results.json"
    # `--multi_gpu` picks accelerate's torchrun launcher; without CUDA its processes join a gloo group on the CPU.
    # (`--cpu --num_processes 2` would start one process: accelerate needs mpirun for more.)
    cmd = _accelerate_launch(str(WORKER), "--out", str(out), "--num-prompts", str(num_prompts), *extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    return proc, out


def test_single_process_merge_keeps_prompt_order():
    merged, per_process = run_on_prompt_shards(
        ["a", "bb", "ccc"], lambda shard, idx: ({"len": [len(s) for s in shard], "idx": idx}, {"n": len(shard)})
    )
    assert merged == {"len": [1, 2, 3], "idx": [0, 1, 2]}
    assert per_process == [{"process_index": 0, "num_prompts": 3, "n": 3}]


def test_single_process_distributed_equals_batch_call():
    target = tiny_causal_lm("llama", seed=0)
    draft = tiny_causal_lm("llama", seed=1, layers=1)
    prompts = [[1, 2, 3], [4], [5, 6]]
    outputs, alpha, per_process = speculative_generate_distributed(prompts, draft, target, batch_size=2,
                                                                   max_gen_len=6, eos_tokens_id=[])
    assert outputs == speculative_generate_batch(prompts, draft, target, max_gen_len=6, eos_tokens_id=[])[0]
    assert len(alpha) == 3 and per_process[0]["generated_tokens"] == 18
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        speculative_generate_distributed(prompts, draft, target, batch_size=0)


def test_each_prompt_samples_from_its_own_stream():
    """Identical prompts under one seed get different samples, the same ones every run, whatever the batch size
    and schedule: prompt ``i`` draws under its own key ``prompt_seed(seed, i)``, so decoding it alone with index ``i``
    gives its tokens."""
    target = tiny_causal_lm("llama", seed=0, init_std=0.15)  # flat distributions: samples of 12 tokens differ
    draft = tiny_causal_lm("llama", seed=1, layers=1, init_std=0.15)
    prompts = [[1, 2, 3]] * 3
    kwargs = {"gamma": 3, "logits_processor": MultinomialProcessor(1.0), "max_gen_len": 12, "eos_tokens_id": []}
    first, _, _ = speculative_generate_distributed(prompts, draft, target, seed=7, batch_size=1, **kwargs)
    again, _, _ = speculative_generate_distributed(prompts, draft, target, seed=7, batch_size=3, schedule="static",
                                                   **kwargs)
    assert again == first
    assert len({tuple(o) for o in first}) == 3
    options = resolve_options(target, logits_processor=kwargs["logits_processor"], eos_tokens_id=[], gamma=3)
    for i in range(3):
        alone = decode_prompt_set(target, as_drafter(draft, 96), prompts[:1], [12], options, batch_size=1, seed=7,
                                  prompt_ids=[i])
        assert alone.outputs == [first[i]]
    with pytest.raises(ValueError, match="seed must be an int, got 'x'"):
        speculative_generate_distributed(prompts, draft, target, seed="x")


def test_prompt_seeds_differ_across_seeds_and_prompts():
    """Not seed + index: seed s prompt i + 1 and seed s + 1 prompt i get different keys; keys are signed 64-bit."""
    grid = [(s, i) for s in [*range(64), 2**32 - 1] for i in range(64)]
    seeds = [prompt_seed(s, i) for s, i in grid]
    assert len(set(seeds)) == len(grid)
    assert all(-(2**63) <= x < 2**63 for x in seeds)
    assert prompt_seed(2**40, 0) != prompt_seed(2**40 + 1, 0) and -(2**63) <= prompt_seed(-5, 3) < 2**63


@pytest.mark.parametrize("num_prompts", [5, 1])  # uneven split; fewer prompts than processes
def test_two_processes_match_single_process_in_order(tmp_path, num_prompts):
    proc, out = _launch(tmp_path, num_prompts=num_prompts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["outputs"] == _single_process_reference(num_prompts)
    shards = [p["num_prompts"] for p in results["per_process"]]
    assert shards == ([3, 2] if num_prompts == 5 else [1, 0])


@pytest.mark.parametrize("mode", ["context", "script"])
def test_repeated_launches_always_exit_cleanly(mode):
    """Regression (issue 18): without a teardown of the gloo group, about half of these launches ended with a
    rank killed by SIGABRT after its work was done. Five launches per mode, about 3 s each; any failure fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for launch in range(5):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(GROUP_WORKER), "--mode", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
        assert proc.returncode == 0, f"launch {launch} ({mode}) exited {proc.returncode}:\n{proc.stderr[-3000:]}"


def test_failure_in_one_process_fails_the_launch_without_results(tmp_path):
    proc, out = _launch(tmp_path, "--fail-on-process", "1")
    assert proc.returncode != 0
    assert "deliberate failure in process 1" in proc.stderr + proc.stdout
    assert not out.exists()


def test_main_job_under_accelerate_matches_single_process(tmp_path):
    """`accelerate launch -m batched_specdec.main` on 2 CPU processes: same greedy outputs, same order, one report."""
    from test_models import make_tiny_model_dir

    from batched_specdec.main import main

    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown fox jumps over the lazy dog\nhello world\none two three one two three\n"
                       "a cat is in the\nover\n")
    args = ["--target", model_dir, "--draft", model_dir, "--prompts", str(prompts), "--num-prompts", "5",
            "--batch-size", "2", "--max-new-tokens", "10", "--gamma", "3", "--device", "cpu"]
    assert main([*args, "--output-dir", str(tmp_path / "single")]) == 0
    (single_file,) = (tmp_path / "single").glob("results_*.json")
    single = json.loads(single_file.read_text())

    cmd = _accelerate_launch("-m", "batched_specdec.main", *args, "--output-dir", str(tmp_path / "multi"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (multi_file,) = (tmp_path / "multi").glob("results_*.json")  # one merged report, from the main process only
    multi = json.loads(multi_file.read_text())
    assert [r["speculative_tokens"] for r in multi["rows"]] == [r["speculative_tokens"] for r in single["rows"]]
    assert [r["prompt"] for r in multi["rows"]] == [r["prompt"] for r in single["rows"]]
    assert multi["identical_rows"] == 5
    assert [p["num_prompts"] for p in multi["processes"]] == [3, 2]
    assert multi["speculative"]["generated_tokens"] == single["speculative"]["generated_tokens"]
    assert "Per process" in proc.stdout
