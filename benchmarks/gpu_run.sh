#!/usr/bin/env bash
# bi_jax on a GPU machine: the GPU test subset, then the benchmark sweeps, bundled into $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh              # tests + every sweep, within TOTAL_S
#   bash benchmarks/gpu_run.sh rmsnorm matmul              # only these steps
#   bash benchmarks/gpu_run.sh tests                       # only the GPU tests
#   PYTEST_ARGS=tests/test_attention.py bash benchmarks/gpu_run.sh tests   # some of them
#
# Steps, in this order: tests rmsnorm rows matmul log_softmax attention decode (default: all).
# Run from anywhere; it works in the repository root with PYTHONPATH=. (nothing is installed).
#
# What lands in $OUT (at most 8 files, nothing nested):
#   results.tar.gz  results/<op>.json, .csv, .png, _summary.txt, _ratios.txt, pytest_gpu.txt
#   summary.txt     step statuses, the GPU test tail, every sweep's tables, ratio tables last
#   gpu_run.log     everything printed
#   <op>.png        the chart of each sweep that ran
#
# Time: the script stops starting work at TOTAL_S seconds (default 480). The tests get at most
# PYTEST_TIMEOUT_S (default 150). The whole GPU subset takes longer than one 600 s device call
# (H100, 2026-11-25: test_attention.py ~60 s, test_reductions.py ~110 s, test_matmul.py over
# 400 s, most of it compiling a kernel per shape): pick files with PYTEST_ARGS, one or two per
# call, e.g. PYTEST_ARGS="tests/test_matmul.py -k mosaic". The time left is split between the
# remaining sweeps by weight and passed as --budget-s: a sweep past its budget skips its
# remaining points (recorded as skipped; x values run coarse-to-fine and the slow reference line
# last, so a cut sweep still spans its x range). For complete sweeps, run one or two steps per
# call.
#
# Environment:
#   OUT               output directory (default gpu_out)
#   TOTAL_S           wall-clock budget of the whole script in seconds (default 480)
#   PYTEST_TIMEOUT_S  limit of the test step in seconds (default 150)
#   PYTEST_ARGS       what pytest collects (default: tests), split into words
#   BENCH_ARGS        extra arguments for every sweep, e.g. "--reps 30"
#   RMSNORM_ARGS ROWS_ARGS MATMUL_ARGS LOG_SOFTMAX_ARGS ATTENTION_ARGS DECODE_ARGS
#                     extra arguments for one sweep, e.g. MATMUL_ARGS="--shapes 4096x4096"
#   PYTHON            interpreter (default python3)
#   BI_JAX_COMMIT     commit recorded in the results (default: git rev-parse HEAD, else unknown)
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-gpu_out}"
PYTHON="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-480}"
PYTEST_TIMEOUT_S="${PYTEST_TIMEOUT_S:-150}"
PYTEST_ARGS="${PYTEST_ARGS:-tests}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${BI_JAX_COMMIT:-}" ]; then
  BI_JAX_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
fi
export BI_JAX_COMMIT

ALL_STEPS=(tests rmsnorm rows matmul log_softmax attention decode)
declare -A WEIGHT=([rmsnorm]=10 [rows]=20 [matmul]=30 [log_softmax]=10 [attention]=25 [decode]=20)
if [ $# -eq 0 ]; then STEPS=("${ALL_STEPS[@]}"); else STEPS=("$@"); fi
for s in "${STEPS[@]}"; do
  case " ${ALL_STEPS[*]} " in
    *" $s "*) ;;
    *) echo "gpu_run.sh: unknown step '$s' (steps: ${ALL_STEPS[*]})" >&2; exit 2 ;;
  esac
done

mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
RES="$WORK/results"
mkdir -p "$RES"
START=$(date +%s)
DEADLINE=$((START + TOTAL_S))

now() { date +%s; }
# result file of a sweep: <op><suffix>, or <op>_quick<suffix> when run with --quick
res() { local c; for c in "$RES/$1$2" "$RES/${1}_quick$2"; do [ -f "$c" ] && { echo "$c"; return 0; }; done; return 1; }
elapsed() { echo $(( $(now) - START )); }

main() {
  echo "== bi_jax gpu_run: steps ${STEPS[*]}; budget ${TOTAL_S}s; commit ${BI_JAX_COMMIT}; $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "(nvidia-smi unavailable)"
  if ! "$PYTHON" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"; then
    echo "gpu_run.sh: jax does not import"; return 1
  fi

  local -A status
  local step remaining t rc wsum seen s share budget var extra f
  for step in "${STEPS[@]}"; do
    remaining=$(( DEADLINE - $(now) ))
    if [ "$step" = tests ]; then
      t=$(( PYTEST_TIMEOUT_S < remaining ? PYTEST_TIMEOUT_S : remaining ))
      if [ "$t" -lt 10 ]; then status[$step]="skipped (no time left)"; continue; fi
      echo; echo "== [$(elapsed)s] GPU tests: $PYTHON -m pytest -m gpu -q $PYTEST_ARGS (limit ${t}s)"
      # shellcheck disable=SC2086  # PYTEST_ARGS is split into words on purpose
      timeout --signal=INT --kill-after=15 "$t" \
        "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider $PYTEST_ARGS 2>&1 | tee "$RES/pytest_gpu.txt"
      rc=${PIPESTATUS[0]}
      if [ "$rc" -eq 124 ]; then echo "GPU tests stopped at the ${t}s limit (PYTEST_TIMEOUT_S)"; fi
      status[$step]="rc=$rc"
      continue
    fi
    # Split the time left between this sweep and the sweeps after it, by weight.
    wsum=0; seen=0
    for s in "${STEPS[@]}"; do
      [ "$s" = "$step" ] && seen=1
      if [ "$seen" -eq 1 ] && [ "$s" != tests ]; then wsum=$(( wsum + ${WEIGHT[$s]} )); fi
    done
    share=$(( (remaining - 20) * ${WEIGHT[$step]} / wsum ))
    if [ "$share" -lt 25 ]; then
      echo; echo "== [$(elapsed)s] $step: skipped, ${remaining}s of TOTAL_S=${TOTAL_S}s left"
      status[$step]="skipped (no time left)"
      continue
    fi
    budget=$(( share - 15 ))  # python start, imports, copy-bandwidth measurement, writing
    var="$(echo "$step" | tr '[:lower:]' '[:upper:]')_ARGS"
    extra="${!var:-}"
    echo; echo "== [$(elapsed)s] $step: $PYTHON -m benchmarks.run $step --budget-s $budget ${BENCH_ARGS:-} $extra"
    # shellcheck disable=SC2086  # BENCH_ARGS and <OP>_ARGS are split into words on purpose
    timeout --signal=INT --kill-after=20 $(( share + 60 )) \
      "$PYTHON" -m benchmarks.run "$step" --out "$RES" --budget-s "$budget" ${BENCH_ARGS:-} $extra
    rc=$?
    case "$rc" in
      0) status[$step]="ok" ;;
      1) status[$step]="rc=1: a bi_jax line errored or was not invariant (see its summary)" ;;
      124|130) status[$step]="rc=$rc: stopped by the time limit (partial results)" ;;
      *) status[$step]="rc=$rc: failed" ;;
    esac
  done

  echo; echo "== [$(elapsed)s] bundling into $OUT"
  {
    echo "bi_jax gpu_run $(date -u +%FT%TZ), commit ${BI_JAX_COMMIT}, wall $(elapsed)s"
    for step in "${STEPS[@]}"; do echo "  $step: ${status[$step]:-not run}"; done
    if [ -f "$RES/pytest_gpu.txt" ]; then
      echo; echo "== GPU tests (last 40 lines)"; tail -n 40 "$RES/pytest_gpu.txt"
    fi
    for step in "${STEPS[@]}"; do
      if f=$(res "$step" _summary.txt); then echo; cat "$f"; fi
    done
    echo; echo "==================== ratio tables ===================="
    for step in "${STEPS[@]}"; do
      if f=$(res "$step" _ratios.txt); then echo; cat "$f"; fi
    done
  } > "$OUT/summary.txt"
  for step in "${STEPS[@]}"; do
    if f=$(res "$step" .png); then cp "$f" "$OUT/"; fi
  done
  tar -czf "$OUT/results.tar.gz" -C "$WORK" results
  ls -la "$OUT"

  echo; echo "==================== ratio tables (all sweeps) ===================="
  for step in "${STEPS[@]}"; do
    if f=$(res "$step" _ratios.txt); then echo; cat "$f"; fi
  done
  rm -rf "$WORK"
  echo; echo "== [$(elapsed)s] step status"
  local failed=0
  for step in "${STEPS[@]}"; do
    echo "  $step: ${status[$step]:-not run}"
    case "${status[$step]:-}" in ok|rc=0) ;; *) failed=1 ;; esac
  done
  return "$failed"
}

main 2>&1 | tee "$OUT/gpu_run.log"
exit "${PIPESTATUS[0]}"
