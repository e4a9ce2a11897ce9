#!/usr/bin/env bash
# The C++ sources must also compile against the GPU machine's torch (ENVIRONMENT.md: 2.11.0), whose
# headers differ from the pinned one's (there `Tensor::sum({0, 2})` is ambiguous: a JIT build on
# the H100 failed on it). A syntax check of every csrc/*.cpp against that release's headers,
# taken from its wheel (downloaded once per run; a failed download skips the check with a notice).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${GPU_MACHINE_TORCH:-2.11.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! python -m pip download --quiet --no-deps --only-binary=:all: -d "$work" "torch==$TORCH_VERSION" 2> "$work/pip.log"; then
  echo "torch $TORCH_VERSION headers check skipped: the wheel could not be downloaded ($(tail -n 1 "$work/pip.log"))"
  exit 0
fi
python - "$work" <<'PY'  # only the headers (the wheel holds ~1.5 GB)
import sys, zipfile
from pathlib import Path
work = Path(sys.argv[1])
with zipfile.ZipFile(next(work.glob("torch-*.whl"))) as wheel:
    wheel.extractall(work / "wheel", [name for name in wheel.namelist() if name.startswith("torch/include/")])
PY
include=$work/wheel/torch/include
python_include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
cuda_include=()
if [[ -d /usr/local/cuda/include ]]; then cuda_include=(-isystem /usr/local/cuda/include); fi
sources=()
for source in csrc/*.cpp; do
  if [[ $source == *_cuda.cpp && ${#cuda_include[@]} -eq 0 ]]; then continue; fi
  sources+=("$source")
done
printf '%s\n' "${sources[@]}" | xargs -P "$(nproc)" -I{} \
  g++ -std=c++17 -fsyntax-only -fopenmp -DTORCH_EXTENSION_NAME=bharnet_C -DTORCH_API_INCLUDE_EXTENSION_H \
    -isystem "$include" -isystem "$include/torch/csrc/api/include" -isystem "$python_include" \
    "${cuda_include[@]}" {}
echo "csrc/*.cpp compile against torch $TORCH_VERSION's headers"
