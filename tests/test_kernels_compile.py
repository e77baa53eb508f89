"""Every Triton kernel compiles for an H100 (sm_90), checked on a CPU-only machine.

The other kernel tests run under the Triton interpreter, which does not type-check the way the compiler does (a
non-constexpr global read inside a kernel, for one, runs fine there and fails to compile). This test compiles every
launch the public wrappers make, with their real GPU launch configs, down to cubin with Triton's bundled ptxas.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.is_file(), reason=f"this Triton build has no bundled ptxas at {PTXAS}")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_kernels_for_gpu.py"), "--arch", "90"],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    compiled = [line for line in proc.stdout.splitlines() if line.startswith("sm_90 ")]
    names = {line.split()[1].split("(")[0] for line in compiled}
    assert names == {
        "_rejection_sample_kernel", "_split_stats_kernel", "_split_race_kernel", "_split_finish_kernel",
        "_scatter_kv_at_offsets_kernel", "_compact_rows_kernel", "_commit_emitted_tokens_kernel",
        "_coupled_verify_kernel",
    }, proc.stdout
