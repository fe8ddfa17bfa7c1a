#!/usr/bin/env bash
# The TensorRT check for a machine with an NVIDIA GPU, in one command (about 5-8 minutes after the install):
#   1. a virtual environment with the project and its 'tensorrt' and 'dev' extras (and the base CPU runtime);
#   2. the GPU tests (tests/test_tensorrt.py: plans from a tiny bundle, parity with ONNX Runtime, refusals);
#   3. benchmarks/trt_check.py on a copy of BUNDLE: FP16 and INT8 plans for this GPU, parity against ONNX Runtime
#      on real cells, timing at batch 1 and 64; OUT/trt_check.json and a table.
#
# usage: benchmarks/gpu_check.sh [BUNDLE_DIR] [OUT_DIR]
#   BUNDLE_DIR  default: edge/models/default (the shipped bundle)
#   OUT_DIR     default: benchmarks/out/gpu_check
# environment:
#   PYTHON  interpreter to build the venv from (default python3); the venv sees its site-packages, so an image
#           that already has torch, onnxruntime or tensorrt is reused as is
#   VENV    venv folder (default ~/.cache/cytoedge/venv-gpu; reused when it exists)
#   WHEELS  folder of wheels for an offline install (pip --no-index --find-links WHEELS)
#   CELLS   folder of cell images for the parity check (default ../shared/data/pbc, else edge/demo)
# exit status: 0 all passed; 1 a test or check failed; 2 no usable TensorRT/pycuda/GPU here.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE=${1:-$ROOT/edge/models/default}
OUT=${2:-$ROOT/benchmarks/out/gpu_check}
VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cytoedge/venv-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

echo "== 1/3 environment ($VENV)"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader \
  || echo "nvidia-smi: not available"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv --system-site-packages "$VENV" || { echo "cannot create $VENV"; exit 2; }
fi
PY="$VENV/bin/python"
PIP_OPTS=(-q)
[ -n "${WHEELS:-}" ] && PIP_OPTS+=(--no-index --find-links "$WHEELS")
"$PY" -m pip install "${PIP_OPTS[@]}" -e "$ROOT[tensorrt,dev]" 2>&1 | tail -5 \
  || echo "pip install failed; going on with what is installed"
# the checkout itself is importable even when the editable install could not run (offline machine)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "
import sys
from edge.backends.tensorrt import gpu_runtime
from edge.errors import BackendError
try:
    print('using', gpu_runtime()[2])
except BackendError as exc:
    sys.exit(str(exc))"; then
  echo "no usable TensorRT + pycuda + CUDA GPU in $VENV: install 'cytoedge[tensorrt]' (or give WHEELS) and retry"
  exit 2
fi

status=0
echo "== 2/3 tests (tests/test_tensorrt.py, GPU tiers included)"
cd "$ROOT"
timeout 180 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_tensorrt.py 2>&1 | tee "$OUT/pytest.log" \
  || status=1

echo "== 3/3 build, parity and timing on $BUNDLE"
timeout 330 "$PY" benchmarks/trt_check.py --bundle "$BUNDLE" --out "$OUT" ${CELLS:+--cells "$CELLS"} \
  2>&1 | tee "$OUT/trt_check.log" || status=1

echo "== done: $([ $status -eq 0 ] && echo PASSED || echo FAILED); logs and trt_check.json in $OUT"
exit $status
