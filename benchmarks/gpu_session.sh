#!/usr/bin/env bash
# One GPU session: every GPU number this project records, in one call that ends within 555 s (the device tool allows
# 600 s per command) on one H100/H200.
#
#   bash benchmarks/gpu_session.sh              # on a CUDA machine, from a checkout (no pip install needed)
#   bash benchmarks/gpu_session.sh --cpu-smoke  # every stage at toy size on the CPU: checks the script
#
# Runs from the checkout through PYTHONPATH (no install, no network, no gguf), stage by stage, each under its own
# time limit so that one failure or hang does not eat the rest. What matters most comes first, so it survives any cut:
#   host              the machine: GPU, driver, memory, torch/triton/transformers versions
#   forward_table     ms per decode-sized forward, eager against graphs (cuda_graphs: recorded once, replayed; no
#                     inductor), for the 7B-class target, the 0.5B-class draft and a one-layer feature head (RANDOM
#                     weights, bf16), B 1/16/64, widths 1 and 5 (benchmarks/bench_forward_graphs.py)
#   e2e_graphs        end to end with cuda_graphs=True at B = 1, 16, 64, gamma 3 and auto: target-only and the
#                     0.5B-class draft with synthetic acceptance alpha 0.8 (labelled so in every row); the graphs'
#                     recording count and seconds are in each row's note
#   exactness_graphs  greedy float32 decoding through the graph path against the CPU, B = 8 (check_exactness.py)
#   e2e_eager         end to end at B = 1, 16, 64, gamma 3 and auto, eager; target-only also with the synchronous
#                     host read
#   exactness         attention paths against float64 and eager greedy decoding against the CPU
#   step_overhead     per-step dispatch, host reads (and where scalar reads come from), CUDA-graph recordings and
#                     cudagraph skips (tiny synthetic model); last, on the time left
# Stages whose numbers are settled run only when asked (GPU_STAGES): kernels (every Triton kernel on CUDA against
# its torch reference), microbench (the rejection sampler in GB/s; recorded on an H200, 2026-12-04:
# results/gpu_h200.md) and e2e_compiled (compile=True through inductor, B = 1; its command also runs in the
# background during the untimed exactness and kernels stages, to fill the compile caches). The CPU smoke runs every
# stage. GPU_STAGES="..." picks stages; GPU_SESSION_SECONDS moves the deadline.
# A stage that runs out of time prints every thread's stack 8 s before its limit (BENCH_DUMP_STACKS_AFTER_S).
# Output: one folder per session, $OUT/gpu_session_<UTC stamp> when $OUT is set (the device tool brings $OUT
# back), else benchmarks/results/gpu_session/<UTC stamp>; it holds session.json (device, versions, commit, date,
# each stage's status and seconds), one log per stage and the results CSVs. When the folder is not already under
# benchmarks/results/, it is also copied there. With $OUT set the folder is left there as one archive,
# gpu_session_<stamp>.tgz (the device tool returns at most 8 files). The smoke mode writes to $OUT or a temporary
# folder only.
set -uo pipefail

SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  -h|--help) sed -n '2,/^set -uo/{/^set -uo/!p}' "$0"; exit 0 ;;
  *) echo "gpu_session.sh: unknown argument '$1' (expected --cpu-smoke or nothing)" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
if [[ -n "${OUT:-}" ]]; then
  DIR="$OUT/gpu_session_$STAMP"
elif [[ $SMOKE == 1 ]]; then
  DIR="$(mktemp -d)/gpu_session_$STAMP"
else
  DIR="$ROOT/benchmarks/results/gpu_session/$STAMP"
fi
mkdir -p "$DIR/results" || exit 1
export BENCH_RESULTS_DIR="$DIR/results"
STAGES="$DIR/stages.tsv"
printf 'stage\tstatus\tseconds\tlimit_s\n' > "$STAGES"

if [[ $SMOKE == 0 ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_session.sh: no CUDA device here; run with --cpu-smoke to check the script on the CPU" >&2
  exit 2
fi

# Stages to run (GPU_STAGES, space-separated, overrides): by default every stage but the settled ones (kernels,
# microbench, e2e_compiled), which run when named here. The smoke mode runs them all.
GPU_STAGES="${GPU_STAGES:-host forward_table e2e_graphs exactness_graphs e2e_eager exactness step_overhead}"
[[ $SMOKE == 1 ]] && GPU_STAGES="${GPU_STAGES} kernels microbench e2e_compiled"

# The whole call must end within the device tool's 600 s per command, archive included: GPU_SESSION_SECONDS
# (default 555) is the deadline every stage's limit is cut to.
DEADLINE_S="${GPU_SESSION_SECONDS:-555}"

# stage NAME LIMIT_S COMMAND...: runs COMMAND under its limit (cut to the deadline), logs to NAME.log, records the
# outcome.
stage() {
  local name="$1" limit="$2"
  shift 2
  if [[ " $GPU_STAGES " != *" $name "* ]]; then
    echo "== $name: not in GPU_STAGES, skipped"
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$limit" >> "$STAGES"
    return
  fi
  # No stage may run past the call's deadline (the archive must still be written): its limit shrinks to the time
  # left, and a stage with under 20 s left does not start (and fails the session: it did not run).
  local left=$((DEADLINE_S - SECONDS - 25))
  if ((left < 20)); then
    echo "== $name: not started, ${left} s left before the deadline"
    printf '%s\t%s\t%s\t%s\n' "$name" "no time left" 0 "$limit" >> "$STAGES"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  (cd "$ROOT" && BENCH_DUMP_STACKS_AFTER_S=$((limit - 8)) timeout --kill-after=15 "$limit" "$@") > "$DIR/$name.log" 2>&1
  local rc=$? status
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$limit" >> "$STAGES"
  grep -v -e 'FutureWarning' -e 'return forward_call' "$DIR/$name.log" | tail -n 30
  echo "== $name: $status in $((SECONDS - t0)) s"
}

# From a cold cache the 7B pair's compiles take minutes (2026-12-04: the compiled target-only warm-up took 115 s and
# the speculative one had not finished 77 s later), more than e2e_compiled's share of the call. So e2e_compiled's
# own command (with --no-save), when e2e_compiled is asked for, starts in the background before the untimed stages
# (exactness, kernels) and compiles while they run; it is stopped before the next timed stage (and on any exit of
# this script), and the
# kernels and graphs it finished stay in inductor's and Triton's caches on this machine, which e2e_compiled then
# reads. Log: compile_prewarm.log.
PREWARM_PID=""
prewarm_start() {
  [[ " $GPU_STAGES " == *" e2e_compiled "* ]] || return 0
  [[ " $GPU_STAGES " == *" exactness "* || " $GPU_STAGES " == *" kernels "* ]] || return 0
  echo "== compile prewarm (background, untimed): $* --no-save"
  (cd "$ROOT" && exec timeout --kill-after=10 400 "$@" --no-save) > "$DIR/compile_prewarm.log" 2>&1 &
  PREWARM_PID=$!
  trap prewarm_stop EXIT
}
prewarm_stop() {
  [[ -n $PREWARM_PID ]] || return 0
  kill "$PREWARM_PID" 2>/dev/null
  wait "$PREWARM_PID" 2>/dev/null
  PREWARM_PID=""
  echo "== compile prewarm stopped; its last lines:"
  grep -v -e Warning -e 'warnings.warn' -e '^ *File ' "$DIR/compile_prewarm.log" | tail -n 4
}

HOST=("$PY" -c 'import json, subprocess, sys, torch
sys.path.insert(0, "benchmarks")
from common import run_key
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(json.dumps(run_key(device), indent=1))
if device.type == "cuda":
    p = torch.cuda.get_device_properties(device)
    print(f"{p.name}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
    try:
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"nvidia-smi unavailable: {exc}")')

if [[ $SMOKE == 1 ]]; then
  COMPILED=("$PY" benchmarks/bench_e2e.py --device cpu --models toy --compile --batch-sizes 2 --gammas 2
            --alphas 0.8 --max-new-tokens 8 --methods target_only_ours speculative_ours --no-time-split)
  stage host 60 "${HOST[@]}"
  stage forward_table 180 "$PY" benchmarks/bench_forward_graphs.py --device cpu --models toy --batch-sizes 1 4 \
    --repeats 3
  stage e2e_graphs 240 "$PY" benchmarks/bench_e2e.py --device cpu --models toy --cuda-graphs --batch-sizes 1 4 \
    --gammas 2 auto --alphas 0.8 --max-new-tokens 12 --methods target_only_ours speculative_ours --no-time-split
  stage exactness_graphs 240 "$PY" benchmarks/check_exactness.py --cpu-smoke --graphs-only \
    --json "$DIR/exactness_graphs.json"
  stage e2e_eager 240 "$PY" benchmarks/bench_e2e.py --device cpu --models toy --batch-sizes 1 4 --gammas 2 \
    --alphas 0.8 --max-new-tokens 12 --methods target_only_ours target_only_sync_read speculative_ours
  prewarm_start "${COMPILED[@]}"
  stage exactness 240 "$PY" benchmarks/check_exactness.py --cpu-smoke --json "$DIR/exactness.json"
  stage kernels 240 "$PY" benchmarks/check_kernels.py --cpu-smoke --json "$DIR/kernels.json"
  prewarm_stop
  stage microbench 120 "$PY" benchmarks/bench_rejection.py --device cpu --quick
  stage e2e_compiled 300 "${COMPILED[@]}"
  stage step_overhead 240 "$PY" benchmarks/bench_step_overhead.py --device cpu --quick
else
  # Limits, each cut to the deadline (555 s). Nothing of the graph path has run on a GPU yet: the first three
  # limits are estimates (a recording costs about three eager forwards: 34-48 ms each for the 7B target eager on an
  # H200, 2026-12-04). Seen on an H200 (2026-12-04, two sessions): kernels 45-48, microbench 38; exactness ran its
  # attention part and the SDPA engine runs in ~70 s and was stopped at 80 s while inductor compiled the flex engine
  # run; e2e_eager took ~165 s for B = 1, 16, 64 with its time-split reruns (80 of them warm-up); from a cold
  # inductor cache the 7B pair's compiled target-only warm-up took 115 s; step_overhead took 137 s with a warm
  # compile cache. step_overhead runs last, on what is left.
  COMPILED=("$PY" benchmarks/bench_e2e.py --compile --batch-sizes 1 --gammas 3 --alphas 0.8 --max-new-tokens 64
            --methods target_only_ours speculative_ours --no-time-split)
  stage host 30 "${HOST[@]}"
  stage forward_table 120 "$PY" benchmarks/bench_forward_graphs.py --batch-sizes 1 16 64 --widths 1 5
  stage e2e_graphs 150 "$PY" benchmarks/bench_e2e.py --cuda-graphs --batch-sizes 1 16 64 --gammas 3 auto \
    --alphas 0.8 --max-new-tokens 64 --methods target_only_ours speculative_ours --no-time-split
  stage exactness_graphs 60 "$PY" benchmarks/check_exactness.py --graphs-only --json "$DIR/exactness_graphs.json"
  stage e2e_eager 150 "$PY" benchmarks/bench_e2e.py --batch-sizes 1 16 64 --gammas 3 auto --alphas 0.8 \
    --max-new-tokens 64 --methods target_only_ours target_only_sync_read speculative_ours --no-time-split
  prewarm_start "${COMPILED[@]}"
  stage exactness 100 "$PY" benchmarks/check_exactness.py --json "$DIR/exactness.json"
  stage kernels 55 "$PY" benchmarks/check_kernels.py --json "$DIR/kernels.json"
  prewarm_stop
  stage microbench 50 "$PY" benchmarks/bench_rejection.py --batch-sizes 1 8 64 --ks 4 --vocabs 151936 \
    --dtypes fp32 bf16
  stage e2e_compiled 150 "${COMPILED[@]}"
  stage step_overhead 130 "$PY" benchmarks/bench_step_overhead.py --quick
fi

"$PY" - "$DIR" "$SMOKE" <<'EOF'
import csv, json, os, subprocess, sys

sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"].split(":")[0], "benchmarks"))
import torch
from common import run_key

out, smoke = sys.argv[1], sys.argv[2] == "1"
device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
info = {**run_key(device), "cpu_smoke": smoke, "stages": list(csv.DictReader(open(os.path.join(out, "stages.tsv")), delimiter="\t"))}
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    info["nvidia_smi"] = "unavailable"
with open(os.path.join(out, "session.json"), "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps(info["stages"], indent=1))
EOF

if [[ $SMOKE == 0 && "$DIR" != "$ROOT/benchmarks/results/"* ]]; then
  mkdir -p "$ROOT/benchmarks/results/gpu_session" && cp -r "$DIR" "$ROOT/benchmarks/results/gpu_session/$STAMP"
fi
echo "session folder: $DIR"
if [[ -n "${OUT:-}" ]]; then
  # The device tool brings back at most 8 files from $OUT: the whole folder travels as one archive.
  tar czf "$OUT/gpu_session_$STAMP.tgz" -C "$OUT" "gpu_session_$STAMP" && rm -rf "$DIR"
  echo "archived as $OUT/gpu_session_$STAMP.tgz"
  STAGES="$(mktemp)" && tar xzf "$OUT/gpu_session_$STAMP.tgz" -O "gpu_session_$STAMP/stages.tsv" > "$STAGES"
fi
# The session fails when a stage did not finish ok.
! grep -q -v -P '\t(ok|skipped)\t|^stage\t' "$STAGES"
