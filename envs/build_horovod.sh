#!/usr/bin/env bash
# Build (once per machine) and install Horovod 0.28.1 into the active Python environment.
#
#   bash envs/build_horovod.sh            # uses $DEEPIMAGE_WHEEL_CACHE or ~/.cache/deepimage/wheels
#
# HOROVOD_SDIST=path/horovod-0.28.1.tar.gz builds from that file (a node without the index);
# DEEPIMAGE_HOROVOD_GPU=0 builds CPU (gloo) operations only on a CUDA node.
#
# Horovod 0.28.1 ships only as an sdist whose CMake files ask for C++14; PyTorch >= 2.1 headers
# need C++17. We patch the standard to 17, build a wheel against the torch already installed,
# and cache the wheel outside the checkout keyed by the torch version and CUDA availability, so
# a second set-up on the same machine installs in seconds. Measured here: 3 min 13 s for the
# first build (2 cores, gcc 12, CMake 3.25); 78 s for a whole `make setup` with the wheel cached.
set -euo pipefail

HOROVOD_VERSION=0.28.1
PY=${PYTHON:-python}
cache=${DEEPIMAGE_WHEEL_CACHE:-$HOME/.cache/deepimage/wheels}

die() { echo "build_horovod: $*" >&2; exit 1; }

torch_tag=$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))') \
  || die "torch is not importable from $PY; install it first (pip install torch==2.13.0)"
have_cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
[ "${DEEPIMAGE_HOROVOD_GPU:-1}" = 0 ] && have_cuda=0
variant="torch${torch_tag}-$([ "$have_cuda" = 1 ] && echo nccl || echo gloo)"
dest="$cache/$variant"

if "$PY" -c 'import horovod.torch' 2>/dev/null; then
  echo "build_horovod: horovod already installed in $PY"; exit 0
fi

wheel=$(ls "$dest"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ]; then
  echo "build_horovod: installing cached wheel $wheel"
  "$PY" -m pip install --no-deps -q "$wheel"
  exit 0
fi

for tool in cmake g++; do
  command -v "$tool" >/dev/null || die "'$tool' not found; install it (Debian: apt-get install cmake g++ make)"
done
if ! command -v make >/dev/null; then
  command -v ninja >/dev/null || die "neither make nor ninja found; install one (Debian: apt-get install make)"
  export CMAKE_GENERATOR=Ninja
fi
"$PY" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || die "Python headers (Python.h) not found; install the python3-dev package for $PY"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "build_horovod: building horovod $HOROVOD_VERSION for $variant in $work (about 3-4 min on 2 cores)"
if [ -n "${HOROVOD_SDIST:-}" ]; then
  cp "$HOROVOD_SDIST" "$work/horovod-$HOROVOD_VERSION.tar.gz" || die "HOROVOD_SDIST: cannot read $HOROVOD_SDIST"
else
  "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work" \
    || die "could not download the horovod $HOROVOD_VERSION sdist from the package index"
fi
tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
src="$work/horovod-$HOROVOD_VERSION"
sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" || die "C++17 patch did not apply"

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export HOROVOD_WITH_GLOO=1 HOROVOD_CPU_OPERATIONS=GLOO
export CMAKE_POLICY_VERSION_MINIMUM=3.5
export CXXFLAGS="${CXXFLAGS:-} -include string -include cstdint -include stdexcept"
export MAKEFLAGS="-j$(nproc)"
command -v mpicxx >/dev/null || export HOROVOD_WITHOUT_MPI=1
if [ "$have_cuda" = 1 ]; then
  export HOROVOD_GPU_OPERATIONS=NCCL
  # NCCL from the nvidia-nccl pip wheel that CUDA builds of torch pull in: Horovod wants an
  # include dir and a lib dir holding libnccl.so (the wheel ships only libnccl.so.2).
  nccl_root=$("$PY" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null || true)
  if [ -z "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_LIB:-}" ] && [ -n "$nccl_root" ]; then
    mkdir -p "$work/nccl-lib" && ln -sf "$nccl_root/lib/libnccl.so.2" "$work/nccl-lib/libnccl.so"
    export HOROVOD_NCCL_INCLUDE="$nccl_root/include" HOROVOD_NCCL_LIB="$work/nccl-lib"
    export LD_LIBRARY_PATH="$nccl_root/lib:${LD_LIBRARY_PATH:-}"
  fi
  cc=$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')
  export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-$cc}  # this node's GPUs only
fi

mkdir -p "$dest"
"$PY" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" "$src" > "$work/build.log" 2>&1 \
  || { tail -n 40 "$work/build.log" >&2; die "horovod build failed (full log above); it needs cmake, g++ and make (apt-get install cmake g++ make)"; }
cp "$work"/dist/horovod-*.whl "$dest/"
"$PY" -m pip install --no-deps -q "$dest"/horovod-*.whl
echo "build_horovod: cached $(ls "$dest"/horovod-*.whl)"
