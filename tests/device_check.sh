#!/usr/bin/env bash
# The GPU-machine checks, as one script (the device tool runs it in the repository root with
# $OUT for results; on a cluster GPU node, run it the same way with OUT=some/folder):
#
#   bash tests/device_check.sh [path/to/horovod-0.28.1.tar.gz]
#
# Fetch what travels with it where the index is reachable (Python 3.12 node shown):
#   pip download --no-deps --no-binary :all: horovod==0.28.1 -d .dev
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .dev cffi pycparser
#
# 1. the CUDA tests (tests/test_gpu.py), the GPU step benchmark (ours vs a plain PyTorch loop,
#    fp32 and bf16) and one GPU worker's profile for the performance model (bf16 and fp32);
#    the performance model's validation on the node's CPU cores at 1, 2, 4 and 8 workers;
# 2. meanwhile, Horovod built from the sdist (CPU/gloo operations; the node needs no index:
#    put the wheels of cffi and pycparser beside the sdist);
# 3. with Horovod: the training-step benchmark (lazy vs synchronous vs DistributedOptimizer)
#    and the all-reduce benchmark, 2 processes x 1 compute thread on a node with idle cores.
# Every step has its own time limit and log in $OUT; a failed step does not stop the others, but
# the script exits non-zero if any failed, and at once (before any step) where torch sees no GPU:
# there every GPU test would skip and prove nothing.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
sdist=${1:-}
failed=()
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, report the status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || failed+=("$name")
}
junit_all_passed() {  # junit_all_passed XML: true when pytest ran >= 1 test and none skipped or failed
  "$PY" - "$1" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
try:
    s = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    sys.exit(f"device_check: no pytest report {sys.argv[1]} ({e})")
s = s if s.tag == "testsuite" else s.find("testsuite")
n = {k: int(s.get(k, 0)) for k in ("tests", "skipped", "failures", "errors")}
if n["tests"] == 0 or n["skipped"] or n["failures"] or n["errors"]:
    sys.exit(f"device_check: FAIL: {sys.argv[1]}: {n} (a skipped GPU test counts as a failure here)")
PYEOF
}

# First of all: without a GPU torch can use, the checks below would skip and prove nothing.
if ! why=$("$PY" - 2>&1 <<'PYEOF'
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"{sys.executable} cannot import torch ({e}): set PYTHON to the environment's python")
if not torch.cuda.is_available():
    sys.exit(f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
             f"{torch.version.cuda}): no GPU is visible, so every GPU test would skip; run this "
             "on a GPU node (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
PYEOF
); then
  echo "device_check: FAIL: $why" >&2
  exit 1
fi

# Python packages the node's image lacks (jsonschema for the config), as wheels in .dev/wheels:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .dev/wheels jsonschema
if ls .dev/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --find-links .dev/wheels jsonschema 2>&1 | tail -n 3
fi

{ nvidia-smi -L; "$PY" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())'
  nproc; command -v g++ make ninja cmake; } 2>&1 | tee "$OUT/info.log"

if [ -n "$sdist" ]; then
  # Wheels beside the sdist (cffi and pycparser, Horovod's setup_requires) install first: the
  # node cannot reach the index.
  if ls "$(dirname "$sdist")"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps "$(dirname "$sdist")"/*.whl 2>&1 | tail -n 3
  fi
  ( HOROVOD_SDIST="$sdist" DEEPIMAGE_HOROVOD_GPU=0 PYTHON="$PY" timeout 420 bash envs/build_horovod.sh \
      > "$OUT/horovod_build.log" 2>&1; echo $? > "$OUT/horovod_build.rc" ) &
fi

step test_gpu 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -rs --junitxml="$OUT/test_gpu.xml"
junit_all_passed "$OUT/test_gpu.xml" || failed+=(test_gpu_skipped)
step gpu_step 180 "$PY" -m deepimage.bench.gpu_step --json
# One GPU worker's profile of the paper's model at perfmodel.resolutions (256, 512 px), for the
# projection's compute (deepimage/hardware/gpu_cluster_2025.yaml's `profile:`).
step gpu_profile_bf16 120 "$PY" -m deepimage.perfmodel profile --device cuda --bf16 --out "$OUT/gpu_profile_bf16.json"
step gpu_profile_fp32 120 "$PY" -m deepimage.perfmodel profile --device cuda --out "$OUT/gpu_profile_fp32.json"
# The performance model's validation on the node's CPU cores at up to 8 workers (one core each,
# torchrun: no Horovod needed), where the node has the cores. 16 points, each with its own
# concurrent profile and 8-worker launches: more than 280 s on a 16-core node, so 450 s.
if [ "$(nproc)" -ge 8 ]; then
  DEEPIMAGE_VALIDATION_NP="1 2 4 8" DEEPIMAGE_VALIDATION_LAUNCHER=torchrun \
    step perfmodel_validation_np8 450 "$PY" -m pytest -q -rP -m validation -p no:cacheprovider tests/test_perfmodel.py
fi

if [ -n "$sdist" ]; then
  wait
  echo "== horovod build: exit $(cat "$OUT/horovod_build.rc")"; tail -n 5 "$OUT/horovod_build.log"
  [ "$(cat "$OUT/horovod_build.rc")" = 0 ] || failed+=(horovod_build)
  if "$PY" -c 'import horovod.torch' 2>/dev/null; then
    step train_step 150 "$PY" -m deepimage.bench.train_step --json
    step train_step_fc4096 200 "$PY" -m deepimage.bench.train_step --fc-hidden 4096 4096 --rounds 5 --json
    step train_step_fc4096_nice0 200 "$PY" -m deepimage.bench.train_step --fc-hidden 4096 4096 --rounds 5 \
      --compute-nice 0 --json
    step allreduce 120 "$PY" -m deepimage.bench.allreduce --sizes 4 16 32 64 --json
  else
    failed+=(horovod_import)
  fi
fi
echo "== done in $SECONDS s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "device_check: FAIL: ${failed[*]} (logs in $OUT)" >&2
  exit 1
fi
