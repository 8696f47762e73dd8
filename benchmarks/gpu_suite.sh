#!/usr/bin/env bash
# The one-command GPU suite: build for the GPU present, run the whole test suite on CUDA, run
# compute-sanitizer (memcheck, racecheck) over the CUDA kernel tests, and run every benchmark.
# Everything lands in benchmarks/results/<date>-<gpu>/ (logs, JSON, CSV, summary.txt); when $OUT
# is set (the device tool) a tarball of that folder is copied there too. Every step runs even if
# an earlier one failed; the exit status is the number of failed steps.
#
#   bash benchmarks/gpu_suite.sh            # on a machine with a CUDA GPU and torch installed
#   bash benchmarks/gpu_suite.sh build tests sanitize     # only some groups, e.g. when one
#   bash benchmarks/gpu_suite.sh kernels model plots      # command may run 10 minutes at most
#
# Groups, in order: build, tests, sanitize, kernels (prototype selection, PEM-CA and deformable
# conv benchmarks), model (whole-model benchmark), plots. Later calls add to the same folder.
set -u
groups=${*:-build tests sanitize kernels model plots}
wants() { case " $groups " in *" $1 "*) return 0 ;; esac; return 1; }
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PEM_BENCH_PROGRESS=0
PYTHON=${PYTHON:-python3}
gpu=$($PYTHON -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null | tr ' A-Z' '-a-z' | tr -cd 'a-z0-9-')
[ -n "$gpu" ] || { echo "no CUDA GPU visible to torch"; exit 1; }
results="benchmarks/results/$(date -u +%Y-%m-%d)-$gpu"
mkdir -p "$results"
summary="$results/summary.txt"
touch "$summary"
failures=0

step() {  # step NAME TIMEOUT_S COMMAND...: runs one step, logs it, records pass/fail and time
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" > "$results/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$results/$name.log"
  printf '%-28s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - started))" "$*" | tee -a "$summary"
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
}

arch=$($PYTHON -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
if wants build; then
  step build 400 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 PEM_KERNELS_CUDA=1 \
    $PYTHON -m pip install --no-build-isolation --no-deps -e .
fi
if wants tests; then
  # pytest-xdist (the GPU image has it) spreads the suite over the CPU cores; the GPU is shared.
  parallel=""
  if $PYTHON -c "import xdist" 2>/dev/null; then parallel="-n 8"; fi
  step tests 400 $PYTHON -m pytest -q -rs $parallel tests
fi
if wants sanitize; then
  # The C++ CUDA kernels' tests carry "cuda" in their ids; the Triton test files run on the GPU
  # whole (their device is the GPU whenever one exists).
  cuda_tests="tests/test_prototype_select.py tests/test_deform_conv.py"
  triton_tests="tests/test_prototype_select_triton.py tests/test_prototype_attention_triton.py \
    tests/test_deform_conv_triton.py tests/test_local_representation_triton.py"
  # The PEM-size tests (pem_size*, pem_decoder*) are left out: under the sanitizer their
  # full-size problems take minutes, and the small shapes reach the same code paths.
  small="not pem_size and not pem_decoder"
  step memcheck_cuda 300 compute-sanitizer --tool memcheck --error-exitcode 1 \
    $PYTHON -m pytest -q -x -k "cuda and not compile and not opcheck and $small" $cuda_tests
  step racecheck_cuda 300 compute-sanitizer --tool racecheck --error-exitcode 1 \
    $PYTHON -m pytest -q -x -k "cuda and not compile and not opcheck and not gradcheck and $small" \
    $cuda_tests
  step memcheck_triton 300 compute-sanitizer --tool memcheck --error-exitcode 1 \
    $PYTHON -m pytest -q -x -k "not compile and not opcheck and not gradcheck and $small" \
    $triton_tests
fi
if wants kernels; then
  for dtype in float32 bfloat16; do
    step "bench_prototype_select_$dtype" 300 $PYTHON -m benchmarks.bench_prototype_select \
      --device cuda --dtype "$dtype" --out-dir "$results/prototype_select_$dtype"
    step "bench_pem_ca_$dtype" 400 $PYTHON -m benchmarks.bench_pem_ca --device cuda --dtype "$dtype" \
      --modes forward,forward+backward --out-dir "$results/pem_ca_${dtype}_b1"
  done
  step bench_pem_ca_b2 300 $PYTHON -m benchmarks.bench_pem_ca --device cuda --batch 2 \
    --modes forward,forward+backward --out-dir "$results/pem_ca_float32_b2"
  step bench_deform_conv 400 $PYTHON -m benchmarks.bench_deform_conv --device cuda \
    --mode forward+backward --out-dir "$results/deform_conv"
fi
if wants model; then
  # Whole model (R50, 512x512 and 1024x2048, batch 1), fused (triton) vs reference in both
  # dtypes, then torch.compile of the reference at 1024x2048 alone (its compile is the slow part).
  for dtype in float32 bfloat16; do
    step "bench_model_$dtype" 240 $PYTHON -m benchmarks.bench_model --device cuda --dtype "$dtype" \
      --providers fused,reference --out-dir "$results/model_$dtype"
  done
  step bench_model_compiled 300 $PYTHON -m benchmarks.bench_model --device cuda \
    --providers reference,compiled --sizes 1024x2048 --out-dir "$results/model_float32_compiled"
fi
if wants plots; then
  step plots 120 $PYTHON -m benchmarks plots "$results"
fi
nvidia-smi > "$results/nvidia-smi.txt" 2>&1
echo "failed steps: $failures" | tee -a "$summary"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu-suite-results.tgz" "$results" && cp "$summary" "$OUT/"
fi
exit "$failures"
