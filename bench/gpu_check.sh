#!/usr/bin/env bash
# One call on a lent GPU machine (no network): the GPU tests, then the full benchmark on CUDA,
# then a short summary table; about 6 minutes at most (GPU_CHECK_SECONDS, default 345).
#
#   bash bench/gpu_check.sh                       # from anywhere; uses the checkout it lives in
#   GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh  # rehearsal without a GPU (bench --quick)
#   GPU_CHECK_TESTS=none GPU_CHECK_BENCH_ARGS="--ops ctr_graph_conv --models none" bash bench/gpu_check.sh
#                                                 # a narrower run: skip the tests, fewer cases
#   GPU_CHECK_TESTS="tests/ops/test_layer_norm.py tests/ops/test_cross_attention.py" bash bench/gpu_check.sh
#                                                 # only these test files (paths from the checkout;
#                                                 # pytest node ids, file.py::test[case], work too)
#   GPU_CHECK_GDB="tests/ops/test_x.py::test_y[case]" ...
#                                                 # also run that one test under cuda-gdb, right
#                                                 # after the build, and print the backtrace where
#                                                 # it crashes (at most 150 s); pytest arguments may
#                                                 # follow: "tests/ops/test_x.py -m gpu"
#   GPU_CHECK_PROFILE=1 GPU_CHECK_BENCH=none bash bench/gpu_check.sh
#                                                 # tests, then per-kernel profiles, no benchmark
#   GPU_CHECK_PROFILE=1 GPU_CHECK_PROFILE_ARGS="--host --backend triton" ...
#                                                 # extra bench/profile_ops.py arguments
#   GPU_CHECK_PROFILE_MODEL=1 ...                 # also profile a BHaRNet-E training step
#                                                 # (bench/profile_model.py, at most 150 s)
#   GPU_CHECK_RECOMPUTE=1 ...                     # also time a BHaRNet-E training step with the
#                                                 # convolution outputs recomputed vs kept
#                                                 # (bench/recompute_v.py, at most
#                                                 # GPU_CHECK_AB_SECONDS, default 120 s)
#   GPU_CHECK_STACKED=1 ...                       # also time a BHaRNet-E training step with the
#                                                 # MSTCN's branches stacked vs one by one
#                                                 # (bench/stacked_branches.py, at most
#                                                 # GPU_CHECK_AB_SECONDS, default 120 s)
#   GPU_CHECK_LAYER_BACKENDS="--op ctr_graph_conv --backends triton,cpp" ...
#                                                 # also time a BHaRNet-E training step with that
#                                                 # op's layers on each backend, the rest on auto
#                                                 # (bench/layer_backends.py, at most
#                                                 # GPU_CHECK_AB_SECONDS, default 120 s)
#   GPU_CHECK_TUNE=90 ...                         # also sweep ctr_graph_conv's launch configs
#                                                 # (bench/tune_ctr_graph_conv.py, ~90 s)
#   GPU_CHECK_SANITIZE=1 GPU_CHECK_BENCH=none ... # also run the C++/CUDA kernels under
#                                                 # compute-sanitizer (at most 150 s; with the
#                                                 # benchmark too, raise GPU_CHECK_SECONDS)
#
# Stages, each under its own timeout (SIGINT first, so pytest and the benchmark still report):
#   env      GPU, driver, Python, torch and triton versions
#   setup    the source tree on PYTHONPATH through a shadow package that maps kernels/ to
#            bharnet.kernels as setup.py does (nothing is installed); import check
#   build    JIT-builds the C++/CUDA extension from csrc/ (device code for
#            TORCH_CUDA_ARCH_LIST, default 9.0 here; a stale build lock of a killed build is
#            removed first) and lists the ops with CUDA kernels
#   gdb      only with GPU_CHECK_GDB=<pytest node id or file [pytest arguments]>: that test under
#            cuda-gdb (from PATH, CUDA_HOME or /usr/local/cuda); where the process dies, the
#            backtrace of every thread (C++ frames: a crash inside the extension or torch); at
#            most 150 s
#   tests    pytest -m gpu, one process per test file, GPU_CHECK_TEST_JOBS (default 6) at a
#            time (at most GPU_CHECK_TEST_SECONDS, default 150 s, and no more than leaves the
#            later stages their time: the benchmark GPU_CHECK_BENCH_SECONDS, default 170 s);
#            each file's log is printed when it ends (each file under its own timeout; the
#            whole logs reach $OUT as pytest_logs.tar.gz)
#   profile  only with GPU_CHECK_PROFILE=1: bench/profile_ops.py (per-kernel device time and
#            host overhead of each op's fwd+bwd; at most 120 s)
#   model_profile  only with GPU_CHECK_PROFILE_MODEL=1: bench/profile_model.py (the kernels
#            and ops of a BHaRNet-E bf16 training step: eager, auto, triton; at most 150 s)
#   recompute  only with GPU_CHECK_RECOMPUTE=1: bench/recompute_v.py (a BHaRNet-E bf16 training
#            step, convolution outputs recomputed vs kept, alternating rounds: time, peak and saved memory; at
#            most GPU_CHECK_AB_SECONDS, default 120 s)
#   stacked  only with GPU_CHECK_STACKED=1: bench/stacked_branches.py (a BHaRNet-E bf16 training
#            step, the MSTCN's branches stacked vs one by one, alternating rounds; at most
#            GPU_CHECK_AB_SECONDS, default 120 s)
#   layer_backends  only with GPU_CHECK_LAYER_BACKENDS="<bench/layer_backends.py arguments>": a
#            BHaRNet-E bf16 training step with one op's layers on each backend, alternating
#            rounds (which backend auto should pick for that op in a model); at most
#            GPU_CHECK_AB_SECONDS (default 120 s)
#   sanitize only with GPU_CHECK_SANITIZE=1: bench/sanitize_cuda.py (each op's CUDA kernels
#            once, bf16 and fp32) under compute-sanitizer's racecheck, synccheck, memcheck and
#            initcheck, each run whatever the others found, with PyTorch's caching allocator off
#            (else memcheck misses strays into a neighbouring tensor of the same segment); the
#            toolkit's compute-sanitizer from PATH, CUDA_HOME or /usr/local/cuda; at most 150 s.
#            Reports name the kernel: PyTorch's own can appear too (its initcheck false positives)
#   tune     only with GPU_CHECK_TUNE=<seconds>: bench/tune_ctr_graph_conv.py with that budget
#   bench    bharnet bench --device cuda --compile ops,infer with --budget set to the time
#            left: measurements that do not fit are listed as skipped, never half-run
#   summary  the Performance tables of this run (bench/update_readme.py --stdout), printed last
# The log, this run's CSV, plots and summary, and the test files' logs are copied to $OUT when it
# is set (a CSV or plot only when this run wrote it); results also
# stay in bench/results/<device>.csv and bench/plots/ of this checkout.
# Exit status: 0 when every stage passed, else 1 (the failed stages are listed at the end).
set -euo pipefail
export PYTHONUNBUFFERED=1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TOTAL=${GPU_CHECK_SECONDS:-345}
WORK=$(mktemp -d)
touch "$WORK/started"  # results newer than this are this run's
LOG=$WORK/gpu_check.log
if [[ -n ${OUT:-} ]]; then mkdir -p "$OUT"; LOG=$OUT/gpu_check.log; fi  # kept even if the call is cut
RESULTS=$ROOT/bench/results
PLOTS=$ROOT/bench/plots
export ROOT PY DEVICE WORK RESULTS
export PYTHONPATH=$WORK/src${PYTHONPATH:+:$PYTHONPATH}
FAILED=()
cd "$WORK"  # never the checkout: its bharnet/ (without kernels/) would shadow the package

left() { echo $((TOTAL - SECONDS)); }
# capped CAP: CAP seconds, or what is left but the 15 s that a stage's timeout may add to its limit
capped() { echo $(( $(left) - 15 < $1 ? $(left) - 15 : $1 )); }

# stage NAME LIMIT_S COMMAND...: run under a timeout, log to $LOG; a failure is recorded, and
# the script goes on to the next stage.
stage() {
  local name=$1 limit=$2 rc=0
  shift 2
  echo "=== [${SECONDS}s] stage $name (limit ${limit}s)" | tee -a "$LOG"
  if ((limit < 5)); then
    echo "=== $name: skipped, no time left" | tee -a "$LOG"
    FAILED+=("$name")
    return 0
  fi
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG" || rc=$?
  if ((rc == 0)); then
    echo "=== $name: ok" | tee -a "$LOG"
  else
    echo "=== $name: FAILED (exit $rc; 124 = timed out)" | tee -a "$LOG"
    FAILED+=("$name")
  fi
}

environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi: not available"
  "$PY" -c 'import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
}

setup_tree() {
  local shadow=$WORK/src/bharnet entry
  mkdir -p "$shadow"
  for entry in "$ROOT"/bharnet/*; do ln -s "$entry" "$shadow/"; done
  ln -s "$ROOT/kernels" "$shadow/kernels"
  "$PY" -c 'import os, torch, bharnet, bharnet.kernels, bharnet.bench
assert os.environ["DEVICE"] == "cpu" or torch.cuda.is_available(), "CUDA is not available"
print("bharnet", bharnet.__version__, "from", bharnet.__path__[0])'
}

build_extension() {
  "$PY" -c 'import os, time, torch
start = time.perf_counter()
from bharnet import _ext
for name in ("bharnet_C_cuda", "bharnet_C"):  # a build killed earlier on this machine left its lock
    lock = os.path.join(_ext.build_directory(name), "lock")
    if os.path.exists(lock):
        os.remove(lock)
        print("removed a stale build lock:", lock)
_ext.load()
with_cuda = [op for op in ("ctr_graph_conv_cpp", "deformable_temporal_conv_cpp", "cross_attention_core_cpp")
             if _ext.cuda_availability(op) is None]
print(f"extension ready in {time.perf_counter() - start:.0f} s; CUDA kernels: {with_cuda or None}")
assert with_cuda or torch.device("'"$DEVICE"'").type == "cpu", "built without CUDA kernels"'
}

# pytest_file FILE: the GPU tests of one file, its log printed in one piece at the end without
# the passed tests' lines. pyproject's addopts are dropped: their -n 2 needs pytest-xdist, which
# the GPU machine may lack (the files run in parallel here anyway), and their -q. Verbose (-vv),
# so a test that crashes the process is named on the last line before the crash. pytest exits 5
# when no test is marked gpu: nothing to run is not a failure.
pytest_file() {
  local rc=0 log
  log=$WORK/pytest_$(basename "$1" .py).log
  # its own timeout, up to the stage's deadline: pytest processes left running when the stage's
  # timeout interrupts xargs would hold the stage's pipe (tee) open until they end
  local seconds=$(( ${TEST_DEADLINE:-$(( $(date +%s) + 150 ))} - $(date +%s) ))
  if ((seconds < 5)); then echo "--- ${1#"$ROOT"/} skipped: no time left"; return 1; fi
  timeout --signal=INT --kill-after=5 "$seconds" \
    "$PY" -m pytest "$1" -o addopts= -m gpu -vv -p no:cacheprovider > "$log" 2>&1 || rc=$?
  if ((rc == 5)); then rc=0; fi
  echo "--- ${1#"$ROOT"/} (exit $rc, ${SECONDS}s, $(grep -c " PASSED" "$log") passed)"
  grep -v " PASSED\|^  warnings.warn\|Warning: \|^$\|^platform \|^rootdir: \|^configfile: \|^collecting \|test session starts" \
    "$log" | tail -n 40
  return "$rc"
}

gpu_tests() {
  local files
  if [[ ${GPU_CHECK_TESTS:-all} == none ]]; then echo "GPU tests skipped (GPU_CHECK_TESTS=none)"; return 0; fi
  if [[ ${GPU_CHECK_TESTS:-all} == all ]]; then
    mapfile -t files < <(grep -rl --include='test_*.py' "mark.gpu\|pytestmark.*gpu" "$ROOT/tests" | sort)
  else
    read -r -a files <<< "$GPU_CHECK_TESTS"
    files=("${files[@]/#/$ROOT/}")
  fi
  printf '%s\n' "${files[@]}" | xargs -P "${GPU_CHECK_TEST_JOBS:-6}" -I{} bash -c 'pytest_file "$1"' _ {}
}

sanitize() {
  local sanitizer tool rc=0
  sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null || true)
  if [[ -z $sanitizer ]]; then echo "compute-sanitizer not found"; return 1; fi
  for tool in racecheck synccheck memcheck initcheck; do
    echo "--- $tool"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 3 \
      "$PY" "$ROOT/bench/sanitize_cuda.py" || rc=$?
  done
  return "$rc"
}

# cuda_gdb NODE_ID [PYTEST ARGS...]: pytest on that node id or file (from the checkout; GPU-marked
# or not) under cuda-gdb, batch mode, e.g. "tests/ops/test_x.py -m gpu" for a crash that needs the
# tests before it; the backtraces where it stops, whole in cuda_gdb.log ($OUT when set). Passes
# when the test process exited normally (pytest's own status is in the log).
cuda_gdb() {
  local gdb log=${OUT:-$WORK}/cuda_gdb.log target=$1
  shift
  gdb=$(command -v cuda-gdb || ls "${CUDA_HOME:-/usr/local/cuda}/bin/cuda-gdb" 2>/dev/null || true)
  if [[ -z $gdb ]]; then echo "cuda-gdb not found"; return 1; fi
  "$gdb" -batch -ex "set pagination off" -ex "set confirm off" -ex run -ex "thread apply all bt 30" \
    --args "$PY" -m pytest "$ROOT/$target" "$@" -o addopts= -vv -p no:cacheprovider > "$log" 2>&1 || true
  grep -v "^\[New Thread\|^\[Thread .* exited\|^\[Detaching" "$log" | tail -n 150
  grep -q "exited normally" "$log"
}

# the newest CSV this run wrote (none when no benchmark ran: a checkout's committed files tie)
latest_csv() { find "$RESULTS" -maxdepth 1 -name "$DEVICE-*.csv" -newer "$WORK/started" -printf '%T@ %p\n' 2>/dev/null \
  | sort -rn | head -n 1 | cut -d' ' -f2-; }

summary() {
  local csv
  csv=$(latest_csv)
  if [[ -z $csv ]]; then echo "no $DEVICE results in $RESULTS"; return 1; fi
  "$PY" "$ROOT/bench/update_readme.py" --stdout "$csv" | tee "$WORK/summary.md"
}

copy_out() {
  local csv pngs
  mkdir -p "$OUT"
  csv=$(latest_csv || true)
  if [[ -n $csv ]]; then cp "$csv" "$OUT/"; fi
  if [[ -f $WORK/summary.md ]]; then cp "$WORK/summary.md" "$OUT/"; fi
  mapfile -t pngs < <(find "$PLOTS" -maxdepth 1 -name "$DEVICE-*.png" -newer "$WORK/started" 2>/dev/null || true)
  # $OUT takes at most 8 files: the log, a CSV, the summary, cuda_gdb.log, the test logs' archive
  if ((${#pngs[@]} > 3)); then
    tar -czf "$OUT/plots.tar.gz" -C "$PLOTS" "${pngs[@]##*/}"
  elif ((${#pngs[@]} > 0)); then
    cp "${pngs[@]}" "$OUT/"
  fi
  if compgen -G "$WORK/pytest_*.log" > /dev/null; then  # each test file's whole log
    tar -czf "$OUT/pytest_logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls pytest_*.log)
  fi
  echo "copied to $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
}
export -f environment setup_tree build_extension pytest_file gpu_tests sanitize cuda_gdb latest_csv summary

if [[ $DEVICE == cpu ]]; then BENCH_OPTS=(--device cpu --quick); else BENCH_OPTS=(--device cuda --compile ops,infer); fi
read -r -a EXTRA_BENCH_OPTS <<< "${GPU_CHECK_BENCH_ARGS:-}"
BENCH_OPTS+=("${EXTRA_BENCH_OPTS[@]}")

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # this card only: a third of the nvcc time
stage env 30 bash -c environment
stage setup 60 bash -c setup_tree
stage build 240 bash -c build_extension
if [[ " ${FAILED[*]} " == *" setup "* ]]; then
  echo "=== cannot import bharnet: stopping" | tee -a "$LOG"
  if [[ -n ${OUT:-} ]]; then copy_out; fi
  exit 1
fi
if [[ -n ${GPU_CHECK_GDB:-} ]]; then  # first after the build: the reason for such a call
  read -r -a GDB_ARGS <<< "$GPU_CHECK_GDB"
  stage gdb "$(capped 150)" bash -c 'cuda_gdb "$@"' _ "${GDB_ARGS[@]}"
fi
AB_SECONDS=${GPU_CHECK_AB_SECONDS:-120}  # each A/B training-step stage (recompute, stacked, layer_backends)
RESERVED=20  # seconds kept for the stages after the tests (each + the 15 s its timeout may add)
if [[ ${GPU_CHECK_BENCH:-all} != none ]]; then RESERVED=$((RESERVED + ${GPU_CHECK_BENCH_SECONDS:-170} + 15)); fi
if [[ ${GPU_CHECK_PROFILE:-0} == 1 ]]; then RESERVED=$((RESERVED + 135)); fi
if [[ -n ${GPU_CHECK_TUNE:-} ]]; then RESERVED=$((RESERVED + GPU_CHECK_TUNE + 60)); fi
if [[ ${GPU_CHECK_PROFILE_MODEL:-0} == 1 ]]; then RESERVED=$((RESERVED + 165)); fi
if [[ ${GPU_CHECK_RECOMPUTE:-0} == 1 ]]; then RESERVED=$((RESERVED + AB_SECONDS + 15)); fi
if [[ ${GPU_CHECK_STACKED:-0} == 1 ]]; then RESERVED=$((RESERVED + AB_SECONDS + 15)); fi
if [[ ${GPU_CHECK_SANITIZE:-0} == 1 ]]; then RESERVED=$((RESERVED + 165)); fi
if [[ -n ${GPU_CHECK_LAYER_BACKENDS:-} ]]; then RESERVED=$((RESERVED + AB_SECONDS + 15)); fi
TEST_CAP=${GPU_CHECK_TEST_SECONDS:-150}
TEST_LIMIT=$(( $(left) - RESERVED < TEST_CAP ? $(left) - RESERVED : TEST_CAP ))
if [[ ${GPU_CHECK_TESTS:-all} == none ]]; then TEST_LIMIT=10; fi
export TEST_DEADLINE=$(( $(date +%s) + TEST_LIMIT - 8 ))  # each file's timeout ends by then
stage tests "$TEST_LIMIT" bash -c gpu_tests
if [[ ${GPU_CHECK_PROFILE:-0} == 1 ]]; then
  PROFILE_ARGS=(--device "$DEVICE")
  if [[ $DEVICE == cpu ]]; then PROFILE_ARGS+=(--quick --iters 2 --backend reference); fi
  read -r -a EXTRA_PROFILE_ARGS <<< "${GPU_CHECK_PROFILE_ARGS:-}"
  PROFILE_ARGS+=("${EXTRA_PROFILE_ARGS[@]}")
  stage profile "$(capped 120)" "$PY" "$ROOT/bench/profile_ops.py" "${PROFILE_ARGS[@]}"
fi
if [[ ${GPU_CHECK_PROFILE_MODEL:-0} == 1 ]]; then
  MODEL_PROFILE_ARGS=(--device "$DEVICE")
  if [[ $DEVICE == cpu ]]; then  # no Triton without a GPU
    MODEL_PROFILE_ARGS+=(--preset small --frames 16 --clips 2 --iters 1 --top 5 --backend reference --backend auto)
  fi
  stage model_profile "$(capped 150)" "$PY" "$ROOT/bench/profile_model.py" "${MODEL_PROFILE_ARGS[@]}"
fi
# the A/B scripts' training step (bharnet.bench.alternating's options): a small one on the CPU
AB_STEP_ARGS=(--device "$DEVICE")
if [[ $DEVICE == cpu ]]; then AB_STEP_ARGS+=(--preset small --frames 16 --clips 2 --dtype fp32 --rounds 1); fi
if [[ ${GPU_CHECK_RECOMPUTE:-0} == 1 ]]; then
  stage recompute "$(capped "$AB_SECONDS")" "$PY" "$ROOT/bench/recompute_v.py" "${AB_STEP_ARGS[@]}"
fi
if [[ ${GPU_CHECK_STACKED:-0} == 1 ]]; then
  stage stacked "$(capped "$AB_SECONDS")" "$PY" "$ROOT/bench/stacked_branches.py" "${AB_STEP_ARGS[@]}"
fi
if [[ -n ${GPU_CHECK_LAYER_BACKENDS:-} ]]; then
  read -r -a LAYER_ARGS <<< "$GPU_CHECK_LAYER_BACKENDS"
  stage layer_backends "$(capped "$AB_SECONDS")" "$PY" "$ROOT/bench/layer_backends.py" "${AB_STEP_ARGS[@]}" "${LAYER_ARGS[@]}"
fi
if [[ ${GPU_CHECK_SANITIZE:-0} == 1 ]]; then
  stage sanitize "$(capped 150)" bash -c sanitize
fi
if [[ -n ${GPU_CHECK_TUNE:-} ]]; then
  stage tune $((GPU_CHECK_TUNE + 45)) "$PY" "$ROOT/bench/tune_ctr_graph_conv.py" --budget "$GPU_CHECK_TUNE"
fi
if [[ ${GPU_CHECK_BENCH:-all} != none ]]; then
  BENCH_LIMIT=$(( $(left) - 30 ))
  stage bench "$BENCH_LIMIT" "$PY" "$ROOT/bench/run.py" "${BENCH_OPTS[@]}" \
    --budget $((BENCH_LIMIT > 90 ? BENCH_LIMIT - 45 : 45)) --results-dir "$RESULTS" --plots-dir "$PLOTS"
  stage summary 20 bash -c summary
fi
if [[ -n ${OUT:-} ]]; then copy_out 2>&1 | tee -a "$LOG"; fi

echo "=== gpu_check finished in ${SECONDS}s"
if ((${#FAILED[@]})); then
  echo "=== failed stages: ${FAILED[*]}"
  exit 1
fi
echo "=== all stages passed"
