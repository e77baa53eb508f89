"""The prepared GPU session, as far as a CPU can check it: the script's syntax and refusals, the kernel check (and
that it can fail), the synthetic-acceptance end-to-end path at toy size, and the CUDA-graph counters.

The whole script at toy size is ``bash benchmarks/gpu_session.sh --cpu-smoke`` (about 1.5 minutes here; not run
in the suite)."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_e2e
import check_exactness
import check_kernels
from common import CudaGraphCounts


def run_script(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False, capture_output=True).returncode == 0


def test_script_refuses_an_unknown_argument_and_a_machine_without_cuda(tmp_path):
    bad = run_script("--gpu")
    assert bad.returncode == 2 and "unknown argument '--gpu'" in bad.stderr
    no_gpu = run_script(env={"OUT": str(tmp_path), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert no_gpu.returncode == 2 and "no CUDA device" in no_gpu.stderr


def test_kernel_check_passes_on_the_interpreter_and_fails_on_a_wrong_kernel(tmp_path, monkeypatch, capsys):
    assert check_kernels.main(["--cpu-smoke", "--json", str(tmp_path / "k.json")]) == 0
    assert '"ok": true' in (tmp_path / "k.json").read_text()
    from batched_specdec.kernels import compact_rows_reference

    def wrong(tensors, keep_rows, *, backend="auto"):  # the "kernel" drops the last kept row
        return compact_rows_reference(tensors, keep_rows[:-1])

    monkeypatch.setattr("batched_specdec.kernels.compact_rows", wrong)
    assert check_kernels.main(["--cpu-smoke"]) == 1
    assert "FAIL compact_rows" in capsys.readouterr().out


def test_attention_check_passes_here_and_fails_when_rows_share_one_mask(monkeypatch):
    """The exactness stage's attention part on CPU: every backend within tolerance of float64; and an attention
    that masks every row with the first row's positions (a batch stride lost) fails it at B = 8, not at B = 1."""
    cpu = torch.device("cpu")
    backends = [("sdpa", "sdpa", None), ("flex", "flex", None)]
    results = list(check_exactness.check_attention(cpu, True, backends))
    assert len(results) == 8 and all(r["ok"] and r["status"] == "checked" for r in results), results
    from batched_specdec.attention import RaggedAttentionInputs

    original = RaggedAttentionInputs.additive_mask

    def first_rows_mask(self, window, n_rep, dtype):
        return original(self, window, n_rep, dtype)[:1].expand(self.positions.shape[0], -1, -1, -1)

    monkeypatch.setattr(RaggedAttentionInputs, "additive_mask", first_rows_mask)
    verdicts = {r["case"]: r["ok"] for r in check_exactness.check_attention(cpu, True, backends[:1])}
    assert verdicts["attention decode B=1 Q=1 float32 sdpa"]
    assert not verdicts["attention decode B=8 Q=1 float32 sdpa"]
    assert not verdicts["attention verify B=8 Q=4 float32 sdpa"]


def test_exactness_check_reports_a_refused_kernel_as_unsupported_and_other_errors_as_failures(monkeypatch):
    """An SDPA kernel that takes no such inputs (here the CPU has no cuDNN kernel) is "unsupported", in the attention
    part and in the engine part alike; any other error fails the check."""
    from torch.nn.attention import SDPBackend

    cpu = torch.device("cpu")
    refused = [("sdpa[cudnn]", "sdpa", [SDPBackend.CUDNN_ATTENTION])]
    attention = list(check_exactness.check_attention(cpu, True, refused))
    engine = list(check_exactness.check_engine(cpu, True, refused))
    assert attention and engine
    assert all(r["ok"] and r["status"] == "unsupported" for r in attention + engine), attention + engine
    verdict = check_exactness.unsupported_or_error("x", RuntimeError("CUDA error: an illegal memory access"))
    assert (verdict["ok"], verdict["status"]) == (False, "error")


@pytest.mark.parametrize("head", ["model", "eagle3"])
def test_synthetic_acceptance_follows_each_rows_prompt_whatever_the_engines_row_order(capsys, head):
    """alpha = 1 proposes the known continuation of every row's own prompt: every draft is accepted, at batch 1
    and at batch 4 with ragged prompts (which the engine reorders), drafting with the draft model's forwards or an
    EAGLE-3-layout head's (which reads the target's features)."""
    assert bench_e2e.main(["--device", "cpu", "--models", "toy", "--batch-sizes", "1", "4", "--gammas", "3",
                           "--alphas", "1.0", "--max-new-tokens", "16", "--methods", "speculative_ours",
                           "--draft-head", head, "--no-save", "--no-warmup"]) == 0  # fmt: skip
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("speculative_ours")]
    assert len(rows) == 2
    for row in rows:
        acceptance, matches = float(row[7]), row[10]
        assert acceptance == 1.0 and matches == "True", row


def test_expected_acceptance_and_drift():
    assert bench_e2e.expected_acceptance(0.8, 1) == pytest.approx(0.8)
    assert bench_e2e.expected_acceptance(0.8, 2) == pytest.approx((0.8 + 0.64) / 2)
    assert bench_e2e.expected_acceptance(1.0, 4) == 1.0
    assert bench_e2e.expected_acceptance(0.8, "auto") is None  # lengths vary: drift is not judged
    assert (bench_e2e.gamma_arg("3"), bench_e2e.gamma_arg("auto")) == (3, "auto")
    with pytest.raises(argparse.ArgumentTypeError, match="integer >= 1 or 'auto', got '0'"):
        bench_e2e.gamma_arg("0")
    assert bench_e2e.e2e_goal(16, 0.8, 1.5, 0.30, 0.59).startswith("not judged: acceptance drifted")
    assert bench_e2e.e2e_goal(16, 0.8, 1.5, 0.58, 0.59) == ">= 1.3x at B=16: met (1.50x)"
    # gamma auto that never drafted (the H200's B = 16 row of 2026-12-04) measured no speculation: not judged
    assert bench_e2e.e2e_goal(16, 0.8, 1.48, 0.0, None, proposed=0).startswith("not judged: no drafts verified")
    assert bench_e2e.e2e_goal(16, 0.8, 1.48, 0.5, None, proposed=120) == ">= 1.3x at B=16: met (1.48x)"


def test_cuda_graph_counts_count_recordings_and_skips(monkeypatch):
    from torch._dynamo.utils import counters
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    monkeypatch.setattr(CUDAGraphTreeManager, "record_function", lambda self, *a: "recorded")
    with CudaGraphCounts() as cg:
        assert CUDAGraphTreeManager.record_function(None, [], 0) == "recorded"
        CUDAGraphTreeManager.record_function(None, [], 1)
        counters["inductor"]["cudagraph_skips"] += 1
    assert (cg.recordings, cg.skips) == (2, 1)
    assert CUDAGraphTreeManager.record_function(None) == "recorded"  # unwrapped again
    with CudaGraphCounts() as idle:
        pass
    assert (idle.recordings, idle.skips) == (0, 0)


def test_sync_read_row_is_timed_against_the_default_before_and_after(capsys):
    assert bench_e2e.main(["--device", "cpu", "--models", "toy", "--batch-sizes", "2", "--gammas", "2",
                           "--max-new-tokens", "6", "--methods", "target_only_sync_read", "--no-save",
                           "--no-warmup"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("target_only_sync_read")]
    assert len(rows) == 1 and rows[0][-1] == "True", out  # same tokens as the default read
    assert "target-only again" in out


def test_scalar_read_site_names_the_innermost_python_frames():
    from types import SimpleNamespace as Event

    import bench_step_overhead

    outer = Event(name="batched_specdec/decode/session.py(181): step", cpu_parent=None)
    profiler = Event(name="torch/autograd/profiler.py(10): wrapper", cpu_parent=outer)
    inner = Event(name="batched_specdec/decode/batch.py(153): max_live_seq_len", cpu_parent=profiler)
    item = Event(name="aten::item", cpu_parent=inner)
    read = Event(name="aten::_local_scalar_dense", cpu_parent=item)
    assert bench_step_overhead.read_site(read) == ("batched_specdec/decode/batch.py(153): max_live_seq_len <- "
                                                   "batched_specdec/decode/session.py(181): step")
    assert bench_step_overhead.read_site(Event(name="aten::_local_scalar_dense", cpu_parent=None)) == "unknown"
