#!/usr/bin/env bash
# The one-command GPU suite: build for the GPU present, run the whole test suite on CUDA, run
# compute-sanitizer (memcheck, racecheck) over the kernel tests, and run every benchmark.
# Everything lands in benchmarks/results/<date>-<gpu>/ (logs, JSON, CSV, summary.txt). Every step
# runs even if an earlier one failed; the exit status is the number of failed or skipped steps.
#
#   bash benchmarks/gpu_suite.sh            # on a machine with a CUDA GPU and torch installed
#   bash benchmarks/gpu_suite.sh build tests sanitize     # only some groups, e.g. when one
#   bash benchmarks/gpu_suite.sh kernels model plots      # command may run 10 minutes at most
#
# Groups, in order: build, diagnose (why C++ argument errors crashed the first GPU machine),
# tests, sanitize, select (prototype selection benchmark), pemca (PEM-CA benchmarks), profile
# (host vs device time and slowest kernels of one PEM-CA call), deform (deformable conv
# benchmark), model (whole-model benchmark), plots; "kernels" stands for select pemca deform. Later calls add to the same folder. On a machine that
# may have been handed back between calls, start every call with "build": with the objects still
# there it only relinks, on a fresh machine it rebuilds.
#
# For a machine lent by the command (a hard limit per command, results fetched from $OUT):
#   SUITE_DEADLINE_S=N   no step may run past N seconds after the start: each step's timeout is
#                        cut to what is left, and a step with under 30 s left is skipped (and
#                        counted); default 570 when $OUT is set, otherwise none.
#   OUT=DIR              after every step the results folder is written to
#                        DIR/gpu-suite-results.tgz, so a command killed from outside still leaves
#                        what it finished.
set -u
groups=" ${*:-build diagnose tests sanitize kernels profile model plots} "
groups=${groups/ kernels / select pemca deform }
wants() { case " $groups " in *" $1 "*) return 0 ;; esac; return 1; }
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PEM_BENCH_PROGRESS=0
PYTHON=${PYTHON:-python3}
deadline=${SUITE_DEADLINE_S:-}
if [ -z "$deadline" ] && [ -n "${OUT:-}" ]; then deadline=570; fi
gpu=$($PYTHON -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null | tr ' A-Z' '-a-z' | tr -cd 'a-z0-9-')
[ -n "$gpu" ] || { echo "no CUDA GPU visible to torch"; exit 1; }
results="benchmarks/results/$(date -u +%Y-%m-%d)-$gpu"
mkdir -p "$results"
summary="$results/summary.txt"
touch "$summary"
failures=0

publish() {  # one tarball of the results folder in $OUT (when set), so that it survives a kill
  # (one file: the device tool returns only a limited number of files)
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu-suite-results.tgz" "$results" 2>/dev/null; fi
}

step() {  # step NAME TIMEOUT_S COMMAND...: runs one step, logs it, records pass/fail and time
  local name=$1 limit=$2; shift 2
  if [ -n "$deadline" ]; then
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 30 ]; then
      printf '%-28s SKIPPED (%ss left of the %ss deadline)  %s\n' "$name" "$left" "$deadline" "$*" | tee -a "$summary"
      failures=$((failures + 1))
      publish
      return
    fi
    [ "$limit" -le $((left - 10)) ] || limit=$((left - 10))
  fi
  local started=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout -k 15 "$limit" "$@" > "$results/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$results/$name.log"
  printf '%-28s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - started))" "$*" | tee -a "$summary"
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
  publish
}

arch=$($PYTHON -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
if wants build; then
  step build 400 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 PEM_KERNELS_CUDA=1 \
    $PYTHON -m pip install -v --no-build-isolation --no-deps -e .
fi
if wants diagnose; then
  step diagnose_cpp_errors 240 $PYTHON -m benchmarks.diagnose_cpp_errors
fi
if wants tests; then
  # pytest-xdist (the GPU image has it) spreads the suite over the CPU cores (up to 16); the GPU
  # is shared. Most of the time goes to compiling (Triton, torch.compile), so every worker
  # compiles in its own process instead of each starting a pool of compile workers.
  parallel=""
  workers=$(nproc 2>/dev/null || echo 8)
  [ "$workers" -le 16 ] || workers=16
  if $PYTHON -c "import xdist" 2>/dev/null; then parallel="-n $workers"; fi
  export TORCHINDUCTOR_COMPILE_THREADS=1
  # pytest-timeout (also on the image): one hung test (a GPU hang, a stuck torchrun) fails alone
  # instead of eating the whole step, and -rfE names every failure at the end of the log;
  # --durations lists the slowest tests (the suite should fit 10 minutes on an H100).
  per_test=""
  if $PYTHON -c "import pytest_timeout" 2>/dev/null; then per_test="--timeout 240"; fi
  step tests 400 $PYTHON -m pytest -q -rsfE --durations=40 $parallel $per_test tests
  unset TORCHINDUCTOR_COMPILE_THREADS
fi
if wants sanitize; then
  # compute-sanitizer from PATH, else from the toolkit next to nvcc.
  sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  # The caching allocator would hide out-of-bounds accesses inside its large segments from
  # memcheck: every tensor gets its own cudaMalloc here. No -x: a plain test failure must not end
  # the sweep; --error-exitcode flags sanitizer reports.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  # The C++ CUDA kernels' tests carry "cuda" in their ids; the Triton test files run on the GPU
  # whole (their device is the GPU whenever one exists), local_representation's by backend.
  cuda_tests="tests/test_prototype_select.py tests/test_deform_conv.py"
  triton_tests="tests/test_prototype_select_triton.py tests/test_prototype_attention_triton.py \
    tests/test_deform_conv_triton.py"
  # The PEM-size tests (pem_size*, pem_decoder*) are left out: under the sanitizer their
  # full-size problems take minutes, and the small shapes reach the same code paths.
  # The out-of-range index test provokes a device-side assert on purpose (in a child process).
  small="not pem_size and not pem_decoder and not out_of_range"
  step memcheck_cuda 240 "$sanitizer" --tool memcheck --error-exitcode 1 \
    $PYTHON -m pytest -q -k "cuda and not compile and not opcheck and $small" $cuda_tests
  step racecheck_cuda 200 "$sanitizer" --tool racecheck --error-exitcode 1 \
    $PYTHON -m pytest -q -k "cuda and not compile and not opcheck and not gradcheck and $small" \
    $cuda_tests
  step memcheck_triton 240 "$sanitizer" --tool memcheck --error-exitcode 1 \
    $PYTHON -m pytest -q -k "not compile and not opcheck and not gradcheck and $small" \
    $triton_tests
  step memcheck_triton_local_repr 120 "$sanitizer" --tool memcheck --error-exitcode 1 \
    $PYTHON -m pytest -q -k "triton and not compile and not opcheck" tests/test_local_representation.py
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
fi
if wants select; then
  for dtype in float32 bfloat16; do
    step "bench_prototype_select_$dtype" 300 $PYTHON -m benchmarks.bench_prototype_select \
      --device cuda --dtype "$dtype" --out-dir "$results/prototype_select_$dtype"
  done
fi
if wants pemca; then
  for dtype in float32 bfloat16; do
    step "bench_pem_ca_$dtype" 400 $PYTHON -m benchmarks.bench_pem_ca --device cuda --dtype "$dtype" \
      --modes forward,forward+backward --out-dir "$results/pem_ca_${dtype}_b1"
  done
  step bench_pem_ca_b2 300 $PYTHON -m benchmarks.bench_pem_ca --device cuda --batch 2 \
    --providers fused,reference,compiled,mask2former,sdpa --modes forward,forward+backward \
    --out-dir "$results/pem_ca_float32_b2"
  # The layer on the CUDA C++ prototype_select + cuBLAS prototype attention, against the Triton
  # one above: which of the two "auto" should pick.
  step bench_pem_ca_cuda_backend 200 $PYTHON -m benchmarks.bench_pem_ca --device cuda \
    --fused-backend cuda --providers fused,mask2former --modes forward,forward+backward \
    --out-dir "$results/pem_ca_float32_b1_cuda_backend"
fi
if wants profile; then
  for dtype in float32 bfloat16; do
    step "profile_pem_ca_$dtype" 200 $PYTHON -m benchmarks.profile_pem_ca --device cuda \
      --dtype "$dtype" --sizes 2048,32768 --out-dir "$results/pem_ca_profile_$dtype"
  done
fi
if wants deform; then
  # Every shape of issue #4 (B = 1 and 8) in both modes and both dtypes (torchvision has no
  # bf16 kernel: those runs note that and compare against the reference only); fp32 also
  # profiled (host vs device time, slowest kernels of each backend).
  for dtype in float32 bfloat16; do
    profile=""
    [ "$dtype" = float32 ] && profile="--profile"
    for mode in forward forward+backward; do
      step "bench_deform_conv_${dtype}_${mode/+/_}" 200 $PYTHON -m benchmarks.bench_deform_conv \
        --device cuda --dtype "$dtype" --mode "$mode" $profile \
        --out-dir "$results/deform_conv_${dtype}_${mode/+/_}"
    done
  done
  # The backward in deterministic mode (sorted gather instead of atomics), what it costs.
  step bench_deform_conv_deterministic 200 $PYTHON -m benchmarks.bench_deform_conv --device cuda \
    --mode forward+backward --deterministic --backends cuda,triton --profile \
    --out-dir "$results/deform_conv_float32_forward_backward_deterministic"
fi
if wants model; then
  # Whole model (R50, 512x512 and 1024x2048, batch 1), fused (triton) vs reference in both
  # dtypes, then torch.compile of the reference at 1024x2048 alone (its compile is the slow part).
  for dtype in float32 bfloat16; do
    step "bench_model_$dtype" 240 $PYTHON -m benchmarks.bench_model --device cuda --dtype "$dtype" \
      --providers fused,reference --out-dir "$results/model_$dtype"
  done
  # The model as users get it by default (backend "auto": the ops "auto" picks on a GPU).
  step bench_model_auto 240 $PYTHON -m benchmarks.bench_model --device cuda --fused-backend auto \
    --providers fused,reference --out-dir "$results/model_float32_auto"
  step bench_model_compiled 300 $PYTHON -m benchmarks.bench_model --device cuda \
    --providers reference,compiled --sizes 1024x2048 --out-dir "$results/model_float32_compiled"
fi
if wants plots; then
  step plots 120 $PYTHON -m benchmarks plots "$results"
fi
nvidia-smi > "$results/nvidia-smi.txt" 2>&1
echo "failed or skipped steps: $failures" | tee -a "$summary"
publish
exit "$failures"
