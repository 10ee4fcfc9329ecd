#!/usr/bin/env bash
# The device check of issue #28, as one short command on a GPU machine (docs/benchmarks.md): installs the
# wheels carried in .whl (packages the machine lacks: MONAI, nibabel, pydantic), runs the GPU benchmarks and
# the GPU-relevant tests, and copies the results to $OUT (default /tmp/gpu_check). About 4 minutes on one H200.
#   bash benchmarks/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
status=0
LOG="$OUT/gpu_check.log"
keep() { cp "$@" "$OUT/" 2>/dev/null || true; }  # results come back even if a later step runs out of time
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; uptime; } 2>&1 | tee "$LOG"
$PY -c "import torch, monai, nibabel, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__)" 2>&1 | tee -a "$LOG" || exit 1
echo "== bench_3d_gpu" | tee -a "$LOG"
timeout 240 $PY benchmarks/bench_3d_gpu.py 2>&1 | tee -a "$LOG" || status=1
keep benchmarks/results/3d_gpu.json
echo "== bench_warmup (GPU)" | tee -a "$LOG"
timeout 90 $PY benchmarks/bench_warmup.py 2>&1 | tee -a "$LOG" || status=1
keep benchmarks/results/warmup_cuda.json
echo "== tests" | tee -a "$LOG"
timeout 150 $PY -m pytest -q -p no:cacheprovider -m "not slow" -rs tests/test_models.py tests/test_preprocess.py \
  2>&1 | tee -a "$LOG" || status=1
# the same machine's idle CPU cores, for the CPU figures (this project's own machine is shared)
echo "== bench_warmup (CPU)" | tee -a "$LOG"
CUDA_VISIBLE_DEVICES= timeout 90 $PY benchmarks/bench_warmup.py 2>&1 | tee -a "$LOG" || status=1
keep benchmarks/results/warmup_cpu.json
if [ "${WITH_DATA3D:-1}" = 1 ]; then
  echo "== bench_data3d (CPU)" | tee -a "$LOG"
  CUDA_VISIBLE_DEVICES= timeout 150 $PY benchmarks/bench_data3d.py 2>&1 | tee -a "$LOG" || status=1
  keep benchmarks/results/data3d.json
fi
echo "gpu_check: exit $status" | tee -a "$LOG"
exit $status
