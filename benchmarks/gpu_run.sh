#!/usr/bin/env bash
# The GPU measurement (docs/performance.md, "On a GPU"): Keras under JAX with CUDA vs
# PyTorch, the parts of the step, and a device trace of the full step. Run it from the
# repository root in an environment with the project's requirements and JAX with CUDA:
#
#   python -m pip install -r requirements.txt -r requirements-dev.txt
#   python -m pip install "jax[cuda12]==0.10.2"
#   bash benchmarks/gpu_run.sh          # writes under $OUT (or /tmp/gpu_out)
#
# Phases run most important first, each under its own time limit (about 11 minutes
# in all), so a slow compile costs the later phases, not the whole run. It writes
# gpu_run.log, bf16.json, parts.json, trace.json, perfetto_trace.json.gz, f32.json,
# fixmatch.json.
set -u -o pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_run.log
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# JAX takes 75% of the GPU's memory at start by default; leave room for PyTorch.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
# GPU_RUN_ARGS: extra options, e.g. "--quick" for a smoke run on a CPU.
BENCH="python3 benchmarks/train_throughput.py --steps 50 --rounds 5 --warmup 5"
BENCH="$BENCH ${GPU_RUN_ARGS:-}"

phase() {  # phase SECONDS COMMAND...: run with a limit, log, go on whatever happens
  local limit=$1
  shift
  echo "== $* (limit ${limit}s)" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import jax, keras, torch; print(jax.devices(), 'jax', jax.__version__,
'keras', keras.__version__, 'torch', torch.__version__)"
} 2>&1 | tee -a "$LOG"

# 1. The goals' table: bf16, batch 32 and 256, full step and plain model,
#    Keras-JAX vs PyTorch eager and torch.compile.
phase 210 $BENCH --precisions mixed_bfloat16 --json "$OUT/bf16.json"
# 2. Where the time goes: transfer, RandomAffine alone, BN variants.
phase 150 $BENCH --profile-parts --precisions mixed_bfloat16 --json "$OUT/parts.json"
# 3. Kernel-level: a jax.profiler trace of the full step at batch 256, summarised.
rm -rf /tmp/trace
phase 60 $BENCH --batch-sizes 256 --precisions mixed_bfloat16 --no-keras --no-torch \
  --trace /tmp/trace --json "$OUT/trace.json"
trace=$(find /tmp/trace -name perfetto_trace.json.gz 2>/dev/null | tail -1)
if [ -n "$trace" ] && [ "$(stat -c %s "$trace")" -lt 16000000 ]; then
  cp "$trace" "$OUT/perfetto_trace.json.gz"
fi
# 4. float32 for the record (PyTorch eager only: compile time is spent above).
phase 120 $BENCH --precisions float32 --torch-modes eager --json "$OUT/f32.json"
# 5. The FixMatch and FreeMatch steps (mu = 7) beside the supervised full step
#    (self_training's step is the supervised one).
phase 120 $BENCH --precisions mixed_bfloat16 --augment on,fixmatch,freematch --no-torch \
  --json "$OUT/fixmatch.json"
