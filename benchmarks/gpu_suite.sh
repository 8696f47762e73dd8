#!/usr/bin/env bash
# The one-command GPU suite: build for the GPU present, run the whole test suite on CUDA, run
# compute-sanitizer (memcheck, racecheck) over the kernel tests, run every benchmark and draw the
# plots, within 10 minutes. Everything lands in benchmarks/results/<date>-<gpu>/ (logs, JSON, CSV,
# PNG, summary.txt). Every step runs even if an earlier one failed; the exit status is the number
# of failed or timed-out steps (partial and skipped ones, expected in a time box, are counted in
# the last line of the output and of summary.txt).
#
#   bash benchmarks/gpu_suite.sh                 # build, checks, benchmarks, plots
#   bash benchmarks/gpu_suite.sh build tests     # some groups only
#   bash benchmarks/gpu_suite.sh build ncu       # Nsight Compute reports of the goal kernels
#
# Groups: build; tests, sanitize (the correctness checks, run at the same time: pytest spread over
# the cores, the sanitizer beside it); the benchmarks select, pemca, profile, deform, model and
# tune (candidate launch configurations timed against the ones in use, benchmarks/tune_configs.py;
# tier 1 only); plots (the plots, then the goals report: every goal of the issues against the
# results, benchmarks/goals.py). "check" stands for tests sanitize, "bench" for the six
# benchmarks. Two groups run only when named: diagnose (the diagnosis of C++ argument errors,
# benchmarks/diagnose_cpp_errors.py; its question is answered, see the README) and ncu (Nsight
# Compute on the kernels the issues set goals for, benchmarks/ncu_targets.py: why they take what
# the benchmarks measure). Later calls on the same day add to the same folder.
#
# The time box. The suite must fit one 10-minute command on a lent H100 (its time counted from
# the start), so:
#   * The benchmarks run in two tiers. Tier 1: first the rows the issues set goals for (fp32,
#     batch 1: prototype selection, also with IEEE products at 32768 px, PEM-CA forward and
#     forward+backward, the deformable conv) and the model on the ops "auto" picks, so that
#     every benchmark runs; then the investigations (the PEM-CA layer with its selection on the
#     CUDA kernel, and on the Triton kernels only; one profile; tune). Tier 2: the rest
#     (bf16, batch 2 and 8 where not in tier 1,
#     the compiled fused layer, the deterministic deform backward, the compiled model, more
#     profiles, and last the fp32 goal rows with TF32 allowed).
#   * Beside the checks, tier 1's PEM-CA compiles are made ahead into torch.compile's on-disk
#     caches (warm_pem_ca_compiles: bench_pem_ca --warm-compiles), so that its step loads them.
#   * PEM_BENCH_TIME_SCALE (default here 0.4) scales every benchmark's timing budget per row;
#     each row still gets its minimum repeats and records how many it got.
#   * SUITE_DEADLINE_S (default 570; 0 = none): no step runs past it. A step's limit is cut to
#     what is left, a step with under 30 s left is skipped (and reported), and each benchmark is
#     told its own deadline (PEM_BENCH_DEADLINE): it starts no row after it and writes the rows it
#     has (exit status 3, "partial"), instead of being killed with none. plots always runs last,
#     with any time left (5 s suffice).
#   * SUITE_CHECK_S (default 270) boxes the correctness phase, SUITE_MIN_STEP_S (default 30) is
#     the least time a step starts with; SUITE_RESULTS overrides the results folder and
#     SUITE_SANITIZER the compute-sanitizer binary.
#   * Measured on the H100 run of 2026-11-26 (before the changes that followed it): build 44 s;
#     the checks hit the 300 s box (pytest reached 97 % of 1132 tests in 292 s, the CPU tests
#     slowed by 14 workers x 16 threads; each sanitizer step hit its limit); tier 1 272 s (select
#     11, PEM-CA 100, its CUDA-backend rows 41, profile 19, deform 31 + 56, model 14); of tier 2
#     the deform bf16 rows took 20 + 27 s, the deterministic deform 45, the bf16 and Triton models
#     14 and 13, and the compiled model did not finish in 31 s. The whole suite did not fit one
#     call: tier 2 ran in a second one. Since then the tests leave the CPU-only cases to CI and
#     run one thread per worker, the sanitizers run one case per code path, the diagnosis runs
#     only when named, the check box is 270 s and tier 1 compiles only the reference (an
#     estimated 50 s less): how long that takes is not yet measured. Tier 2 will not fit the same
#     call: SUITE_TIERS (default "1 2") picks the tiers, so a second call runs the rest with
#     SUITE_TIERS=2 bash benchmarks/gpu_suite.sh bench plots.
#   * SUITE_ONLY (space-separated step names, as summary.txt names them) runs only those steps
#     of the groups asked for, the others silently left out: a later call runs what an earlier
#     one had no time for, e.g. SUITE_TIERS=2 SUITE_ONLY="bench_deform_conv_deterministic plots
#     goals" bash benchmarks/gpu_suite.sh bench plots.
#   * Measured on the H200 run of 2026-11-26 (compute-sanitizer ran there): build 61 s; checks
#     about 140 s (pytest with 14 workers 110 s: 814 passed, 2 failed; the sanitizer beside it
#     31 + 70 + 38 s, racecheck stopped at its 70 s limit after 74 of its 94 cases, now 54 cases
#     in 80 s); tier 1 258 s (select 16, PEM-CA 85, CUDA-backend rows 14, profile 30, deform
#     34 + 64, model 15); 521 s in all with a 550 s deadline. A second call (285 s) ran tier 2's
#     bf16 selection 15 s, bf16 PEM-CA 117, batch-2 PEM-CA 81 and bf16 profile 26 s; the rest of
#     tier 2 (deform bf16 and deterministic, the bf16, Triton and compiled models, the TF32 rows)
#     has not run yet. Since then tier 2's bf16, batch-2 and TF32 PEM-CA rows run at 32768 and
#     131072 px only (tier 1 keeps all four sizes), an estimated 100 s less: not yet measured.
#   * Measured on the H200 run of 2026-11-27: build 65 s; checks 198 s (pytest 150 s: 1009
#     passed, 19 failed; beside it the sanitizer's steps one after another, 38 + 80 + 54 s;
#     racecheck stopped at its 80 s limit after 48 cases); tier 1 259 s (select 15, PEM-CA
#     103 + 12, deform 38 + 66, model 25); then tune and the profile were skipped with 29 s left
#     of the 570 s deadline, and tier 2 with them: 525 s in all. Since then the Triton memcheck
#     runs beside the other two sanitizer steps (the phase an estimated 150 s, the tests'), and
#     tier 1 adds the IEEE selection (about 10 s) and the layer with the Triton selection (about
#     15 s) and runs the model before its investigations: not yet measured.
#   * Measured on the H200 run of 2026-11-27 (second call, 18:25Z): build 79 s; checks 200 s
#     (pytest 111 s: 1035 passed; memcheck_cuda 41 s, 0 errors; memcheck_triton stopped at its
#     90 s limit after 101 cases and racecheck at its 80 s after 48, no error reported before;
#     warm_pem_ca_compiles 69 s beside them); tier 1 ran whole in 249 s (select 13 + 11,
#     PEM-CA 40 (103 s with cold compile caches), deform 38 + 65, model 27, Triton-select
#     layer 16, Triton layer 20, profile 30, tune 23) and tier 2's bf16 selection 14 s; the
#     rest of tier 2 was skipped with 27 s left: 529 s in all.
#
# For a machine lent by the command (results fetched from $OUT): with OUT=DIR the results folder
# is also written to DIR/gpu-suite-results.tgz after every step, so a command killed from outside
# still leaves what it finished.
#
# The build. pip's editable build compiles everything in a fresh temporary folder, about a
# minute, so "build" is skipped (recorded "cached") when the extension loads with its CUDA
# kernels and the sources, the GPU's arch, torch and PEM_KERNELS_NVCC_FLAGS are those of the
# last successful build here
# (SUITE_BUILD_STAMP, default build/.gpu_suite_build_stamp). Whatever the groups, a call whose
# extension does not load with its CUDA kernels (a machine handed back between calls comes back
# bare) or was built from other sources builds first; if it still does not load, "extension
# FAILED" is recorded: the benchmarks would silently lose their cuda rows or time old kernels.
set -u
cd "$(dirname "$0")/.."
known=" build tests sanitize diagnose select pemca profile deform model tune plots ncu check bench "
for group in "$@"; do
  case "$known" in *" $group "*) ;; *)
    echo "gpu_suite.sh: unknown group '$group'; expected some of:$known" >&2; exit 2 ;;
  esac
done
groups=" ${*:-build check bench plots} "
groups=${groups/ check / tests sanitize }
groups=${groups/ bench / select pemca profile deform model tune }
wants() { case " $groups " in *" $1 "*) return 0 ;; esac; return 1; }
export PYTHONUNBUFFERED=1 PEM_BENCH_PROGRESS=0
export PEM_BENCH_TIME_SCALE=${PEM_BENCH_TIME_SCALE:-0.4}
PYTHON=${PYTHON:-python3}
deadline=${SUITE_DEADLINE_S:-570}
probe_log=$(mktemp)
gpu=$($PYTHON -c "import torch; print(torch.cuda.get_device_name(0))" 2> "$probe_log" | tr ' A-Z' '-a-z' | tr -cd 'a-z0-9-')
if [ -z "$gpu" ]; then
  echo "no CUDA GPU visible to torch:"; cat "$probe_log"
  [ -z "${OUT:-}" ] || cp "$probe_log" "$OUT/gpu-probe-error.txt"
  exit 1
fi
rm -f "$probe_log"
results=${SUITE_RESULTS:-benchmarks/results/$(date -u +%Y-%m-%d)-$gpu}
mkdir -p "$results"
summary="$results/summary.txt"
statuses=$(mktemp)  # one outcome per step of this call (steps may run in the background)
echo "# $(date -u +%FT%TZ) gpu_suite.sh$groups(deadline ${deadline}s, time scale $PEM_BENCH_TIME_SCALE)" >> "$summary"
PLOTS_RESERVE_S=20  # kept free for the plots at the end
MIN_STEP_S=${SUITE_MIN_STEP_S:-30}  # a step with less time left is skipped (plots: 5 s)

publish() {  # one tarball of the results folder in $OUT (when set), so that it survives a kill
  # (one file: the device tool returns only a limited number of files); written aside and moved,
  # since steps in the background publish too
  # tar exits 1 when a log it read grew meanwhile (a step beside it): the archive is still good.
  if [ -n "${OUT:-}" ]; then
    local partial="$OUT/.results.$BASHPID.tgz"
    tar czf "$partial" --warning=no-file-changed "$results" 2>/dev/null
    if [ "$?" -le 1 ]; then mv -f "$partial" "$OUT/gpu-suite-results.tgz"; else rm -f "$partial"; fi
  fi
}

record() {  # record NAME STATUS SECONDS TEXT [OUTCOME]: a summary line, and the step's outcome
  # (ok, failed, timeout, partial, skipped; default: from STATUS) for the count at the end
  printf '%-44s %-8s %4ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$summary"
  local outcome=${5:-}
  if [ -z "$outcome" ]; then
    case "$2" in
      rc=0|cached) outcome=ok ;; timeout) outcome=timeout ;; partial) outcome=partial ;;
      SKIPPED) outcome=skipped ;; *) outcome=failed ;;
    esac
  fi
  echo "$outcome" >> "$statuses"
}

# step NAME LIMIT_S COMMAND...: runs one step under `timeout`, logs it to NAME.log, records its
# status and time. RESERVE_S (default 0) seconds before the deadline are kept for later steps;
# STEP_MIN_S (default MIN_STEP_S) is the least time left the step starts with. Both, given as
# `VAR=... step ...`, would reach the command's environment: it runs without them (a suite run
# by the tests would otherwise inherit this one's reserve).
step() {
  local name=$1 limit=$2; shift 2
  local reserve=${RESERVE_S:-0} least=${STEP_MIN_S:-$MIN_STEP_S}
  case " ${SUITE_ONLY:-$name} " in *" $name "*) ;; *) return ;; esac
  if [ "$deadline" -gt 0 ]; then
    local left=$((deadline - reserve - SECONDS))
    if [ "$left" -lt "$least" ]; then
      record "$name" SKIPPED 0 "(${left}s left: ${deadline}s deadline, ${reserve}s kept for later steps) $*"
      publish
      return
    fi
    local slack=$((left / 4 < 10 ? left / 4 : 10))  # for `timeout -k` to end a stuck step
    [ "$limit" -le $((left - slack)) ] || limit=$((left - slack))
  fi
  local started=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  # Benchmarks stop starting rows 25 s (or a quarter of a short limit) before they would be
  # killed, and write what they have. Only benchmark steps get the deadline: the benchmark
  # scripts the tests run must run whole.
  local margin=$((limit / 4 < 25 ? limit / 4 : 25)) bench_deadline=()
  [ "${BENCHMARK:-0}" = 1 ] && bench_deadline=(PEM_BENCH_DEADLINE=$(($(date +%s) + limit - margin)))
  # SIGINT first: pytest then still prints the summary of the tests it ran, Python programs
  # unwind; whatever is left 15 s later is killed.
  env -u RESERVE_S -u STEP_MIN_S -u BENCHMARK -u SUITE_ONLY -u SUITE_TIERS \
    "${bench_deadline[@]}" timeout -s INT -k 15 "$limit" "$@" > "$results/$name.log" 2>&1 \
    < /dev/null
  local rc=$?
  last_rc=$rc
  tail -n 3 "$results/$name.log"
  local status="rc=$rc"
  [ "$rc" -eq 3 ] && [ "${BENCHMARK:-0}" = 1 ] && status="partial"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="timeout"
  record "$name" "$status" "$((SECONDS - started))" "$*"
  publish
}

arch=$($PYTHON -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
extension_ok() {  # pem_kernels imports with its compiled CUDA kernels
  $PYTHON -c "import sys, pem_kernels
from pem_kernels._extension import has_kernel
sys.exit(0 if pem_kernels.EXTENSION_LOADED and has_kernel('prototype_select', 'CUDA') else 1)" \
    > /dev/null 2>&1
}
build_stamp_file=${SUITE_BUILD_STAMP:-build/.gpu_suite_build_stamp}
build_stamp=$({ find csrc setup.py pyproject.toml -type f | LC_ALL=C sort | xargs sha1sum
  echo "arch $arch"; $PYTHON -c "import torch; print(torch.__version__)"
  echo "nvcc flags ${PEM_KERNELS_NVCC_FLAGS:-}"; } | sha1sum)
if extension_ok && [ "$(cat "$build_stamp_file" 2>/dev/null)" = "$build_stamp" ]; then
  if wants build; then
    record build cached 0 "the extension loads, built here from these sources for sm_$arch"
  fi
else
  # Never left out by SUITE_ONLY: every later step needs the extension.
  last_rc=1
  SUITE_ONLY=build step build 300 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 \
    PEM_KERNELS_CUDA=1 $PYTHON -m pip install -v --no-build-isolation --no-deps -e .
  # Stamped only after a successful build: a failed one may leave an older extension that
  # still loads, which must not pass for this build the next time.
  rm -f "$build_stamp_file"
  if ! extension_ok; then
    record extension FAILED 0 "pem_kernels._C does not load with its CUDA kernels (see build.log): the benchmarks' cuda rows will be missing"
  elif [ "$last_rc" = 0 ]; then
    mkdir -p "$(dirname "$build_stamp_file")" && echo "$build_stamp" > "$build_stamp_file"
  fi
fi

# ---- Correctness: pytest, the sanitizer and the diagnosis at the same time ----------------------
CHECK_S=${SUITE_CHECK_S:-270}  # the phase's time box; the tests are its long pole
check_end=$((SECONDS + CHECK_S))
cores=$(nproc 2>/dev/null || echo 8)
[ "$cores" -le 16 ] || cores=16

run_tests() {
  # pytest-xdist (on the GPU image) spreads the suite over the cores, two left for the steps
  # beside it; the GPU is shared. Most of the time goes to compiling (Triton, torch.compile), so
  # every worker compiles in its own process instead of each starting a pool of compile workers.
  local parallel="" per_test="" workers=$((cores - 2))
  [ "$workers" -ge 2 ] || workers=2
  if $PYTHON -c "import xdist" 2>/dev/null; then parallel="-n $workers"; fi
  # pytest-timeout (also on the image): one hung test fails alone instead of eating the step.
  # -v: every test's outcome is in the log as it finishes, even if the step is stopped.
  if $PYTHON -c "import pytest_timeout" 2>/dev/null; then per_test="--timeout 180"; fi
  # Left to CI, which runs them on every push: the CPU emulation of the CUDA sources (here the
  # real kernels run) and the tests whose ids name the CPU (the CPU parametrizations, the CPU
  # training runs). One thread per worker: 14 workers each starting a thread per core made the
  # CPU tests of the 2026-11-26 H100 run 5-10 times slower than alone.
  OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 RESERVE_S=$((deadline - check_end)) \
    step tests "$CHECK_S" $PYTHON -m pytest -v -rsfE --durations=40 $parallel $per_test \
    --ignore=tests/test_cuda_emulation.py -k "not cpu" tests
}

run_sanitizer() {
  # $SUITE_SANITIZER, else compute-sanitizer from PATH, else from the toolkit next to nvcc;
  # gVisor machines (the H200) cannot run it at all, which is recorded as a skip.
  local sanitizer=${SUITE_SANITIZER:-}
  [ -n "$sanitizer" ] || sanitizer=$(command -v compute-sanitizer ||
    echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if ! "$sanitizer" --version > "$results/sanitizer_version.log" 2>&1; then
    record sanitize SKIPPED 0 "$sanitizer cannot run here (see sanitizer_version.log)"
    return
  fi
  # The caching allocator would hide out-of-bounds accesses inside its large segments from
  # memcheck: every tensor gets its own cudaMalloc. No -x: a plain test failure must not end the
  # sweep; --error-exitcode 86 flags sanitizer reports (pytest's own failures exit 1). One case per code path, small shapes: the
  # PEM-size tests, the random sweeps, gradcheck and the low-precision repeats reach the same
  # kernels and took minutes under the sanitizer (the 2026-11-26 H100 run got through 91 of 234
  # memcheck cases in 128 s); the out-of-range index test provokes a device-side assert on
  # purpose. The C++ CUDA kernels' tests carry "cuda" in their ids.
  local small="not pem_size and not pem_decoder and not out_of_range and not compile and not opcheck"
  small+=" and not gradcheck and not random and not low_precision"
  small+=" and not forward_matches_reference_and_torchvision"
  local cuda_tests="tests/test_prototype_select.py tests/test_deform_conv.py"
  # The row kernels of PEM-CA's projections and attention (one barrier pattern each; the CUDA
  # emulation runs them under TSan) get memcheck only: racecheck is at its time limit already.
  local row_kernel_tests="tests/test_query_projection.py tests/test_prototype_attention_cuda.py"
  local triton_tests="tests/test_prototype_select_triton.py tests/test_prototype_attention_triton.py
    tests/test_deform_conv_triton.py tests/test_local_representation.py"
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  # The Triton kernels' memcheck runs beside the C++ kernels' two sanitizer steps (one after
  # the other, 38 + 80 s on the H200 on 2026-11-27, where memcheck_triton's 54 s came after
  # them and made the sanitizer the check phase's long pole: 198 s, the tests 150 s).
  RESERVE_S=$((deadline - check_end)) step memcheck_triton 90 "$sanitizer" --tool memcheck \
    --error-exitcode 86 $PYTHON -m pytest -q -k "not cpu and $small" $triton_tests &
  local triton_memcheck=$!
  RESERVE_S=$((deadline - check_end)) step memcheck_cuda 100 "$sanitizer" --tool memcheck \
    --error-exitcode 86 $PYTHON -m pytest -q -k "cuda and $small" $cuda_tests $row_kernel_tests
  # racecheck is the slowest (74 of these 94 cases in 70 s on the 2026-11-26 H200): it skips the
  # float64 cases, whose kernels share their shared-memory code with the float32 ones (54 left).
  RESERVE_S=$((deadline - check_end)) step racecheck_cuda 80 "$sanitizer" --tool racecheck \
    --error-exitcode 86 $PYTHON -m pytest -q -k "cuda and $small and not float64 and not fp64" \
    $cuda_tests
  wait "$triton_memcheck"
}

warm_compiles() {
  # Tier 1's PEM-CA step compiles the reference with torch.compile at four sizes, forward and
  # forward+backward: most of its 103 s on the H200 on 2026-11-27. The same compiles made here,
  # beside the checks on two compile threads, land in torch.compile's on-disk caches, from which
  # that step then loads them. Checked on a CPU (2048 px, forward and forward+backward): the
  # sweep took 27 s in-process with cold caches and 4.4 s after the warm-up (3 FX-graph and 2
  # AOTAutograd cache hits). Nothing that enters the graphs may differ from the step's run:
  # with OMP_NUM_THREADS=1 the CPU graphs differed and every lookup missed (the compile threads
  # are not part of the cache key).
  TORCHINDUCTOR_COMPILE_THREADS=2 RESERVE_S=$((deadline - check_end)) \
    step warm_pem_ca_compiles "$CHECK_S" $PYTHON -m benchmarks.bench_pem_ca --device cuda \
    --dtype float32 --providers compiled --modes forward,forward+backward --warm-compiles
}

pids=()
if wants tests; then run_tests & pids+=($!); fi
if wants sanitize; then run_sanitizer & pids+=($!); fi
case " ${SUITE_TIERS:-1 2} " in *" 1 "*)
  if wants tests && wants pemca; then warm_compiles & pids+=($!); fi ;;
esac
if wants diagnose; then
  RESERVE_S=$((deadline - check_end)) step diagnose_cpp_errors 240 $PYTHON -m benchmarks.diagnose_cpp_errors &
  pids+=($!)
fi
[ "${#pids[@]}" -eq 0 ] || wait "${pids[@]}"

# ---- Benchmarks: tier 1 (the goal rows), then tier 2, then the plots ----------------------------
export BENCHMARK=1 RESERVE_S=$PLOTS_RESERVE_S

bench_select() {  # the prototype selection alone: every backend vs the eager reference
  local dtype=float32
  [ "$1" = 1 ] || dtype=bfloat16
  step "bench_prototype_select_$dtype" 120 $PYTHON -m benchmarks.bench_prototype_select \
    --device cuda --dtype "$dtype" --out-dir "$results/prototype_select_$dtype"
  if [ "$1" = 1 ]; then
    # fp32 with the kernels' IEEE products (FMAs) instead of their default 3xTF32, at the goal's
    # size (tier 1: about 10 s): on the H200 the CUDA selection's device time went from 0.187 ms
    # with FMAs (2026-11-26) to 0.217 with 3xTF32 on tensor cores (2026-11-27), where the
    # Triton one went from 0.185 to 0.111; this row tells the products' share from the rest.
    step bench_prototype_select_float32_ieee 60 env PEM_KERNELS_FP32_DOT=ieee \
      $PYTHON -m benchmarks.bench_prototype_select --device cuda --dtype float32 \
      --sizes 32768 --backends reference,triton,cuda \
      --out-dir "$results/prototype_select_float32_ieee"
  fi
}

bench_pemca() {  # the main job: PEM-CA vs masked cross-attention over resolutions
  if [ "$1" = 1 ]; then
    # torch.compile's compiles (every size and mode) were most of these steps' time on the H100
    # (PEM-CA 100 s, its CUDA-backend rows 41 s): torch.compile of the fused layer runs only at
    # two sizes, forward only (bench_pem_ca_float32_both_compiled below).
    # The fused layer on "auto" (every op on its CUDA C++ kernel since 2026-11-27), what a user
    # gets; the issue's goal is read from this file, baselines of the same call.
    step bench_pem_ca_float32 200 $PYTHON -m benchmarks.bench_pem_ca --device cuda \
      --dtype float32 --providers fused,reference,compiled,mask2former,sdpa \
      --modes forward,forward+backward --out-dir "$results/pem_ca_float32_b1"
  elif [ "$1" = investigate ]; then
    # The "auto" layer with its selection on the CUDA kernel (the other ops as "auto" picks
    # them): "auto" takes the Triton selection for fp32 since the H200 run of 2026-11-27, where
    # the layer with it took 0.487 ms at 32768 px against 0.582 with the CUDA one (1.499 against
    # 1.826 at 131072, a tie at 8192), in separate steps of one call; this step keeps the
    # comparison in every run. About 15 s, no compiles.
    step bench_pem_ca_cuda_select 60 env PEM_KERNELS_BACKEND_PROTOTYPE_SELECT=cuda \
      $PYTHON -m benchmarks.bench_pem_ca --device cuda --providers fused,mask2former \
      --sizes 8192,32768,131072 --modes forward \
      --out-dir "$results/pem_ca_float32_b1_cuda_select"
    # The layer on the Triton kernels, against the C++ one above: on the H200 on 2026-11-27 it
    # was the faster on the device and the slower per call up to 32768 px (host time).
    step bench_pem_ca_triton_backend 90 $PYTHON -m benchmarks.bench_pem_ca --device cuda \
      --fused-backend triton --providers fused,mask2former \
      --modes forward,forward+backward --out-dir "$results/pem_ca_float32_b1_triton_backend"
  else
    # Both layers compiled, at the goal's size and the largest: the fused layer's latency was
    # host-bound on the H200 (1.005 ms per call, 0.557 ms on the device), and compiled in bf16
    # it was 1.33x the compiled reference where uncompiled it was 0.53x. (Tier 2: no goal is
    # set on it, and its compiles took an estimated 60 s of tier 1.)
    step bench_pem_ca_float32_both_compiled 90 $PYTHON -m benchmarks.bench_pem_ca --device cuda \
      --dtype float32 --providers compiled,fused_compiled --sizes 32768,131072 \
      --modes forward --out-dir "$results/pem_ca_float32_b1_both_compiled"
    # bf16 and batch 2 at the two sizes where the layers differ most (tier 1 has every size):
    # their torch.compile compiles, one per size and mode, were most of their 117 and 81 s on
    # the H200 at four sizes.
    step bench_pem_ca_bfloat16 150 $PYTHON -m benchmarks.bench_pem_ca --device cuda \
      --dtype bfloat16 --sizes 32768,131072 --modes forward,forward+backward \
      --out-dir "$results/pem_ca_bfloat16_b1"
    step bench_pem_ca_b2 150 $PYTHON -m benchmarks.bench_pem_ca --device cuda --batch 2 \
      --sizes 32768,131072 --providers fused,reference,compiled,mask2former,sdpa \
      --modes forward,forward+backward --out-dir "$results/pem_ca_float32_b2"
  fi
}

bench_profile() {  # host vs device time of one PEM-CA call and its slowest kernels
  local dtype=float32
  [ "$1" = 1 ] || dtype=bfloat16
  # forward+backward too: on the H100 the fused layer's was slower than the eager reference's on
  # the triton backend (5.26 vs 4.08 ms at 32768 px), and only the forward had been profiled.
  step "profile_pem_ca_$dtype" 90 $PYTHON -m benchmarks.profile_pem_ca --device cuda \
    --dtype "$dtype" --sizes 2048,32768 --modes forward,forward+backward \
    --out-dir "$results/pem_ca_profile_$dtype"
}

bench_deform() {  # every shape of issue #4 (B = 1 and 8): each backend vs torchvision
  if [ "$1" = 1 ]; then
    for mode in forward forward+backward; do
      step "bench_deform_conv_float32_${mode/+/_}" 120 $PYTHON -m benchmarks.bench_deform_conv \
        --device cuda --dtype float32 --mode "$mode" --profile \
        --out-dir "$results/deform_conv_float32_${mode/+/_}"
    done
  else
    # torchvision has no bf16 kernel: these rows compare against the reference only.
    for mode in forward forward+backward; do
      step "bench_deform_conv_bfloat16_${mode/+/_}" 120 $PYTHON -m benchmarks.bench_deform_conv \
        --device cuda --dtype bfloat16 --mode "$mode" \
        --out-dir "$results/deform_conv_bfloat16_${mode/+/_}"
    done
    # The cuda forward with IEEE products (its FMA kernel) instead of its tensor-core kernel.
    step bench_deform_conv_float32_forward_ieee 90 env PEM_KERNELS_FP32_DOT=ieee \
      $PYTHON -m benchmarks.bench_deform_conv --device cuda --dtype float32 --mode forward \
      --backends torchvision,cuda --out-dir "$results/deform_conv_float32_forward_ieee"
    # The backward in deterministic mode (sorted gather instead of atomics): what it costs
    # (torchvision's row is the plot's baseline).
    step bench_deform_conv_deterministic 90 $PYTHON -m benchmarks.bench_deform_conv --device cuda \
      --mode forward+backward --deterministic --backends torchvision,cuda,triton --profile \
      --out-dir "$results/deform_conv_float32_forward_backward_deterministic"
  fi
}

bench_model() {  # the whole PEM (R50, 512x512 and 1024x2048, batch 1)
  if [ "$1" = 1 ]; then
    # As users get it by default: backend "auto" (the ops "auto" picks on a GPU). --profile:
    # host vs device time and host syncs per forward (the H200 run's fused model took 32.9 ms at
    # 512x512 and 21.2 at 1024x2048, unexplained).
    step bench_model_float32_auto 120 $PYTHON -m benchmarks.bench_model --device cuda \
      --fused-backend auto --providers fused,reference --profile \
      --out-dir "$results/model_float32_auto"
  else
    step bench_model_bfloat16_auto 120 $PYTHON -m benchmarks.bench_model --device cuda \
      --dtype bfloat16 --fused-backend auto --providers fused,reference \
      --out-dir "$results/model_bfloat16_auto"
    step bench_model_float32_triton 120 $PYTHON -m benchmarks.bench_model --device cuda \
      --fused-backend triton --providers fused --out-dir "$results/model_float32_triton"
    # torch.compile of the reference at 1024x2048 alone (its compile is the slow part).
    step bench_model_compiled 150 $PYTHON -m benchmarks.bench_model --device cuda \
      --providers reference,compiled --sizes 1024x2048 --out-dir "$results/model_float32_compiled"
  fi
}

bench_tune() {  # the evidence for changing a launch default (tier 1; not run on a GPU yet:
  # an estimated 30 s, five experiments, the one of the whole PEM-CA layer compiling two paths)
  [ "$1" = 1 ] || return 0
  step tune 90 $PYTHON -m benchmarks.tune_configs --device cuda --out-dir "$results/tune"
}

bench_tf32() {  # the fp32 goal rows again with TF32 allowed (torch's "high" matmul precision),
  # for PyTorch's matmuls and the Triton kernels alike: what tensor cores give fp32 inputs
  step bench_prototype_select_float32_tf32 90 $PYTHON -m benchmarks.bench_prototype_select \
    --device cuda --dtype float32 --matmul-precision high \
    --out-dir "$results/prototype_select_float32_tf32"
  step bench_pem_ca_float32_tf32 120 $PYTHON -m benchmarks.bench_pem_ca --device cuda \
    --dtype float32 --matmul-precision high --sizes 32768,131072 \
    --providers fused,reference,compiled,mask2former --out-dir "$results/pem_ca_float32_b1_tf32"
}

for tier in ${SUITE_TIERS:-1 2}; do
  # Tier 1: the rows the issues set goals for first (selection, PEM-CA, deformable conv) and
  # the model, so that a short call keeps every benchmark, then the investigations (the layer
  # with its selection on the CUDA kernel, or all of it on Triton; where its time goes; the
  # launch configurations). GROUP:ARGUMENT runs bench_GROUP ARGUMENT.
  order="select:1 pemca:1 deform:1 model:1 pemca:investigate profile:1 tune:1"
  [ "$tier" = 1 ] || order="select:2 pemca:2 profile:2 deform:2 model:2"
  for entry in $order; do
    group=${entry%%:*}
    if wants "$group"; then "bench_$group" "${entry#*:}"; fi
  done
  # Tier 2 ends with the fp32 goal rows under TF32.
  if [ "$tier" = 2 ] && wants select && wants pemca; then bench_tf32; fi
done

run_ncu() {
  # One report per target (a text file of ncu's sections) on a launch after the warm-up calls.
  # $SUITE_NCU, else ncu from PATH, else from the toolkit next to nvcc.
  local ncu=${SUITE_NCU:-}
  [ -n "$ncu" ] || ncu=$(command -v ncu || echo "${CUDA_HOME:-/usr/local/cuda}/bin/ncu")
  if ! "$ncu" --version > "$results/ncu_version.log" 2>&1; then
    record ncu SKIPPED 0 "$ncu cannot run here (see ncu_version.log)"
    return
  fi
  local targets target kernels
  if ! targets=$($PYTHON -c "from benchmarks.ncu_targets import TARGETS
for target, kernels in TARGETS.items(): print(target, kernels)" 2> "$results/ncu_targets.log") ||
    [ -z "$targets" ]; then
    record ncu FAILED 0 "no ncu targets: benchmarks.ncu_targets did not list them (see ncu_targets.log)"
    return
  fi
  # --clock-control none: ncu would otherwise lock the clocks to base for its runs, and the
  # card's settings are to be left alone (the device notes); the reports then also describe the
  # clocks the benchmarks ran at.
  while read -r target kernels; do
    step "ncu_$target" 90 "$ncu" --clock-control none --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis -k "regex:$kernels" \
      --launch-skip 2 --launch-count 2 $PYTHON -m benchmarks.ncu_targets "$target"
  done <<< "$targets"
}
if wants ncu; then RESERVE_S=$PLOTS_RESERVE_S run_ncu; fi

if wants plots; then
  # A few seconds draw them: the plots start with any time left (MIN_STEP_S does not apply).
  RESERVE_S=0 STEP_MIN_S=5 step plots 60 $PYTHON -m benchmarks plots "$results"
  # Every goal of the issues against the files, met or not (goals.md, goals.json): JSON only,
  # about a second.
  RESERVE_S=0 STEP_MIN_S=2 step goals 30 $PYTHON -m benchmarks goals "$results"
fi
nvidia-smi > "$results/nvidia-smi.txt" 2>&1
count() { grep -cx "$1" "$statuses"; }
failed=$(count failed) timed_out=$(count timeout)
echo "steps: $(count ok) ok, $failed failed, $timed_out timed out, $(count partial) partial," \
  "$(count skipped) skipped (total ${SECONDS}s)" | tee -a "$summary"
rm -f "$statuses"
publish
exit $((failed + timed_out))
