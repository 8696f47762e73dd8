#!/usr/bin/env bash
# The CUDA sources' emulation tests (tests/test_cuda_emulation.py) with the emulation built under
# a sanitizer, the CPU counterpart of compute-sanitizer:
#
#   bash tests/cuda_emulation/sanitize.sh address [pytest args]  # memcheck: reads and writes
#                                                                #   outside the tensors' storage
#   bash tests/cuda_emulation/sanitize.sh thread  [pytest args]  # racecheck: shared memory read
#                                                                #   and written without a barrier
#
# The sanitizer's runtime (and the libstdc++ torch uses, which it must intercept) is preloaded
# into the Python process. Reports go to $REPORT_DIR (default: a new temporary folder); the script
# prints them and fails when there is one. Slow: address about 6 minutes on 2 cores, thread about
# 16 (each emulated thread's accesses are checked). Uses $PYTHON (default .venv/bin/python).
set -euo pipefail
sanitizer=${1:-}
case "$sanitizer" in
  address) runtime=libasan.so; options_var=ASAN_OPTIONS; options="detect_leaks=0" ;;
  # torch is not instrumented: its own threads (autograd) synchronize in ways ThreadSanitizer
  # cannot see, so only accesses from the instrumented emulation are judged.
  thread) runtime=libtsan.so; options_var=TSAN_OPTIONS; options="ignore_noninstrumented_modules=1" ;;
  *) echo "usage: $0 address|thread [pytest args]" >&2; exit 2 ;;
esac
shift
cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}
runtime_path=$(${CXX:-g++} -print-file-name="$runtime")
if [[ ! -e "$runtime_path" ]]; then
  echo "$runtime not found (g++ -print-file-name=$runtime gave '$runtime_path')" >&2
  exit 2
fi
libstdcxx=$("$python" -c "import torch; print(next(line.split()[-1] for line in \
open('/proc/self/maps') if 'libstdc++' in line))")
report_dir=${REPORT_DIR:-$(mktemp -d)}
mkdir -p "$report_dir"
echo "sanitizer $sanitizer: $runtime_path, $libstdcxx; reports in $report_dir"
status=0
env LD_PRELOAD="$runtime_path $libstdcxx" "$options_var=${options:+$options:}log_path=$report_dir/report" \
  PEM_EMULATION_SANITIZER="$sanitizer" \
  "$python" -m pytest -q -s -p no:cacheprovider tests/test_cuda_emulation.py "$@" || status=$?
if compgen -G "$report_dir/report*" > /dev/null; then
  cat "$report_dir"/report*
  echo "sanitizer $sanitizer: reports above" >&2
  exit 1
fi
exit "$status"
