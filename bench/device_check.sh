#!/usr/bin/env bash
# The one prepared GPU check: what a session with a lent GPU machine runs, start to end, offline.
#
#   bash bench/device_check.sh OUT_DIR            # on the GPU machine (about 8 minutes at most)
#   bash bench/device_check.sh --dry-run OUT_DIR  # here, on CPU: every step at smoke size
#
# Steps, in order, each under its own `timeout`, each writing its CSV as soon as it ends (a run
# cut short keeps what it finished), each logged with its wall time in OUT_DIR/steps.csv:
#   env       GPU name, clocks, driver, Python/torch/triton versions      -> device_check.log
#   install   the package from this checkout, no network: `pip install --no-deps
#             --no-build-isolation --no-index -e .`, or (if that fails, and always in --dry-run)
#             a shadow tree on PYTHONPATH that mirrors pyproject's package-dir mapping
#   tests     `pytest -m cuda tests` (every CUDA test: kernel parity fp32/fp16/bf16, backends, GPU
#             decode and prefetch, volume) -> tests.csv
#   kernels   bench/bench_kernels.py at N = 8192: eager bf16, torch.compile (static shapes) and
#             the kernels, parity-checked before timing: NCHW tokens at K = 1 and 3, NHWC (the
#             pipeline's) at K = 3 with a per-launch profile               -> kernels.csv
#   encoders, read, slide, volume: bench/bench_<name>.py --csv OUT/<name>.csv, each only if the
#             script exists (other parts of the project provide them; --smoke in --dry-run)
#   kernel_config  the layer kernels with other block sizes side by side (KERNEL_CONFIGS, in
#             HeadLaunchConfig.describe() syntax; kernels.csv, column config), if time is left
# OUT_DIR ends with at most 8 files (the device tool brings back 8): steps.csv, tests.csv,
# kernels.csv, encoders.csv, read.csv, slide.csv, volume.csv and device_check.log (all output).
#
# Knobs (environment): PYTHON (default python3), DEVICE_CHECK_STEPS (space-separated subset of the
# step names), DEVICE_CHECK_BUDGET_S (whole run, default 470 s), BENCH_SLIDE_ARGS (extra arguments
# for bench_slide.py, e.g. "--slide /path/to/a.svs").
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
  shift
fi
if [[ $# -ne 1 ]]; then
  echo "usage: bash bench/device_check.sh [--dry-run] OUT_DIR" >&2
  exit 2
fi
OUT=$1
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
STEPS=${DEVICE_CHECK_STEPS:-env install tests kernels encoders read slide volume kernel_config}
BUDGET=${DEVICE_CHECK_BUDGET_S:-470}
LOG=$OUT/device_check.log
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
if [[ $DRY -eq 1 ]]; then
  # CPU smoke: the kernels run in Triton's interpreter, in the benchmark's own process.
  export CUDA_VISIBLE_DEVICES=""
else
  # A GPU run must never interpret: the kernels would run on CPU (or refuse CUDA tensors).
  unset TRITON_INTERPRET
fi
START=$(date +%s)
: >"$LOG"
echo "step,status,rc,seconds,budget_s,csv_rows" >"$OUT/steps.csv"

log() { echo "$*" | tee -a "$LOG"; }

want() { [[ " $STEPS " == *" $1 "* ]]; }

csv_rows() { # data rows of a CSV (0 if absent)
  if [[ -f "$1" ]]; then echo $(($(wc -l <"$1") - 1)); else echo 0; fi
}

# run_step NAME BUDGET_S CSV COMMAND...: runs COMMAND under `timeout` (capped by what is left of
# the whole budget), appends its output to the log and one row to steps.csv.
run_step() {
  local name=$1 budget=$2 csv=$3
  shift 3
  if ! want "$name"; then
    return 0
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((left < 15)); then
    log "== $name: skipped, ${left}s of the budget left"
    echo "$name,skipped (no time),,0,$budget,0" >>"$OUT/steps.csv"
    return 0
  fi
  ((budget > left)) && budget=$left
  log "== $name (budget ${budget}s): $*"
  local t0=$(date +%s.%N)
  # Through `bash -c` so a step can be one of the (exported) functions below.
  timeout --signal=TERM --kill-after=10 "$budget" bash -c '"$@"' step "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  local status=ok
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
  local rows=0
  [[ -n "$csv" ]] && rows=$(csv_rows "$csv")
  log "== $name: $status (rc $rc) in ${secs}s"
  echo "$name,$status,$rc,$secs,$budget,$rows" >>"$OUT/steps.csv"
}

step_env() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,memory.total \
      --format=csv
  else
    echo "no nvidia-smi"
  fi
  "$PY" - <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sms", p.multi_processor_count, "memory_gib", round(p.total_memory / 2**30, 1))
from importlib.metadata import PackageNotFoundError, version
for name in ("triton", "timm", "tifffile", "scikit-image", "onnxruntime", "pytest", "pytest-xdist",
             "openslide-python", "imagecodecs"):
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "MISSING")
EOF
}

# The package must import from THIS checkout. pip without network or build isolation; if that is
# not possible, a `sitecustomize` on PYTHONPATH that maps the package-dir entries (pyproject's,
# and the root folders kernels/ and export/ that ship as fastinsight.kernels / .export)
# (fastinsight.kernels -> kernels/ ...) the way setuptools' editable finder does, ahead of any
# other installed copy, with the checkout itself first on PYTHONPATH.
importable() {
  "$PY" -c "import sys, fastinsight, fastinsight.kernels as k; \
import os.path as p; sys.exit(0 if p.realpath(k.__file__).startswith('$REPO/') else 1)" 2>/dev/null
}

shadow_tree() {
  local shadow=$OUT/.shadow
  [[ $DRY -eq 0 ]] && shadow=/tmp/fastinsight-path
  mkdir -p "$shadow" || return 1
  "$PY" - "$REPO" "$shadow" <<'EOF' || return 1
import json, os, sys, tomllib
repo, shadow = sys.argv[1:]
with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
    mapping = tomllib.load(f).get("tool", {}).get("setuptools", {}).get("package-dir", {})
mapping = {k: os.path.join(repo, v) for k, v in mapping.items() if k.startswith("fastinsight.")}
# setup.py may hold the mapping instead: root folders that ship inside the fastinsight namespace.
for name in ("kernels", "export"):
    if os.path.isdir(os.path.join(repo, name)) and not os.path.isdir(os.path.join(repo, "fastinsight", name)):
        mapping.setdefault(f"fastinsight.{name}", os.path.join(repo, name))
code = f"""# written by bench/device_check.sh: the package-dir mapping of {repo}/pyproject.toml
import importlib.abc, importlib.util, os, sys
_MAP = {json.dumps(mapping)}
class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        src = _MAP.get(name)
        if src is None:
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(src, "__init__.py"), submodule_search_locations=[src])
sys.meta_path.insert(0, _Finder())
"""
with open(os.path.join(shadow, "sitecustomize.py"), "w") as f:
    f.write(code)
print("package-dir finder in", shadow, "->", sorted(mapping))
EOF
  export PYTHONPATH="$REPO:$shadow${PYTHONPATH:+:$PYTHONPATH}"
}

step_install() {
  if importable; then
    echo "fastinsight already imports from $REPO"
    return 0
  fi
  if [[ $DRY -eq 0 ]]; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . && importable && return 0
    echo "pip install -e . failed or did not take; using a shadow tree on PYTHONPATH"
  fi
  return 1
}

step_tests() {
  local xdist=()
  if [[ $DRY -eq 0 ]] && "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 8 --dist load); fi
  "$PY" -m pytest -v -p no:cacheprovider -m cuda "${xdist[@]}" tests 2>&1 |
    tee "$OUT/.tests.log"
  local rc=${PIPESTATUS[0]}
  # One row per test, from the verbose log (survives a timeout, unlike a JUnit file).
  "$PY" - "$OUT/.tests.log" "$OUT/tests.csv" <<'EOF'
import csv, re, sys
pat = re.compile(r"(?:(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\s+(tests/\S+))|(?:(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS))")
rows = {}
for line in open(sys.argv[1], errors="replace"):
    m = pat.search(line)
    if m:
        outcome, test = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        rows[test] = outcome
summary = [l.strip() for l in open(sys.argv[1], errors="replace") if re.match(r"^=+ .*(passed|failed|skipped|error|deselected)", l)]
with open(sys.argv[2], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["test", "outcome"])
    w.writerows(sorted(rows.items()))
    w.writerow(["summary", summary[-1].strip("= ") if summary else "none (cut short?)"])
EOF
  rm -f "$OUT/.tests.log"
  # 5: nothing collected (no test marked cuda); not an error of the check itself.
  ((rc == 5)) && rc=0
  return "$rc"
}

hook() { # hook NAME BUDGET [extra args...]: bench/bench_NAME.py, if another part provides it
  local name=$1 budget=$2
  shift 2
  local script=bench/bench_$name.py
  if ! want "$name"; then return 0; fi
  if [[ ! -f $script ]]; then
    log "== $name: $script not in this checkout, skipped"
    echo "$name,absent,,0,$budget,0" >>"$OUT/steps.csv"
    return 0
  fi
  local size=()
  [[ $DRY -eq 1 ]] && size=(--smoke)
  run_step "$name" "$budget" "$OUT/$name.csv" "$PY" "$script" "${size[@]}" --csv "$OUT/$name.csv" "$@"
}

export PY OUT DRY REPO LOG
export -f step_env step_install step_tests importable
run_step env 40 "" step_env
if want install; then
  run_step install 60 "" step_install
  if ! importable; then
    shadow_tree >>"$LOG" 2>&1  # not in a pipe: it exports PYTHONPATH for the steps below
    tail -1 "$LOG"
    status=ok
    importable || status=failed
    echo "install_fallback,$status,,0,0,0" >>"$OUT/steps.csv"
  fi
  importable || { log "fastinsight does not import from $REPO; stopping"; exit 1; }
fi

run_step tests 120 "$OUT/tests.csv" step_tests

if [[ $DRY -eq 1 ]]; then
  KBENCH=(--smoke --grid 4 4 --channels 64)
  KNHWC=(--smoke --grid 4 4 --channels 64 --classes 1 --layers --providers kernels_bf16)
else
  KBENCH=(--tiles 8192 --classes 1 3)
  KNHWC=(--tiles 8192 --classes 3 --profile --layers --providers eager_bf16 compile_bf16 kernels_bf16)
fi
# NCHW tokens (feature files) at K = 1 and 3, then the slide pipeline's NHWC tokens at K = 3 with
# the per-launch profile of the kernels.
step_kernels() {
  "$PY" bench/bench_kernels.py "${KBENCH[@]}" --providers eager_bf16 compile_bf16 kernels_bf16 \
    --csv "$OUT/kernels.csv" || return
  "$PY" bench/bench_kernels.py "${KNHWC[@]}" --layout nhwc --csv "$OUT/kernels.csv"
}
export -f step_kernels
export KBENCH_S="${KBENCH[*]}" KNHWC_S="${KNHWC[*]}"
run_step kernels 200 "$OUT/kernels.csv" bash -c 'KBENCH=($KBENCH_S); KNHWC=($KNHWC_S); step_kernels'
want kernels && [[ $DRY -eq 0 ]] && step_env 2>&1 | head -2 | tee -a "$LOG" # clocks after the bench

hook encoders 45
hook read 30
# shellcheck disable=SC2086  # BENCH_SLIDE_ARGS is a word list on purpose
hook slide 45 ${BENCH_SLIDE_ARGS:-}
hook volume 30

# Block-size variants of the layer kernels side by side (HeadLaunchConfig.describe() syntax);
# -c<tiles> -o1: smaller chunks with each chunk's reduce on a side stream beside the previous
# chunk's chains (-c1024 alone separates the chunk size's own effect); -W8: the reduce and the
# 128-wide layers at 8 warps, so they can take 128-cell blocks (half the weight traffic per cell,
# kernels.head.traffic_bytes) while the 64-wide layers keep 64-cell blocks of 4 warps; -T1: the
# per-position tables in fp16 (about a quarter of the modelled traffic; 255 -> 188 registers in
# the 128-wide layers); -X256-R256-W16: the hypothesis pushed to its end, 256-cell blocks of 16
# warps (a quarter of the default's weight passes; one program per SM; `kernels check`: 128
# registers, no spill in the loops). Each config is parity-checked before it is timed.
CONFIGS=${KERNEL_CONFIGS:-M64-X64-R64-K64-w4-s3 M64-X64-R64-K64-w4-s3-c1024-o1 M64-X64-R64-K64-w4-s3-c1024 M64-X64-R64-K128-w4-s3 M64-X64-R128-K64-w4-s3-W8 M64-X128-R128-K64-w4-s3-W8 M128-X128-R128-K64-w4-s3-W8 M64-X64-R64-K64-w4-s3-T1 M64-X128-R128-K64-w4-s3-W8-T1 M64-X256-R256-K64-w4-s3-W16-T1}
if [[ $DRY -eq 1 ]]; then
  KCFG=(--smoke --grid 4 4 --channels 64 --classes 1)
  CONFIGS="M64-X64-R64-K64-w4-s1-W8-T1"
else
  KCFG=(--tiles 8192 --classes 3)
fi
# shellcheck disable=SC2086  # CONFIGS is a word list on purpose
run_step kernel_config 150 "$OUT/kernels.csv" "$PY" bench/bench_kernels.py "${KCFG[@]}" \
  --providers kernels_bf16 --kernel-config $CONFIGS --layers --csv "$OUT/kernels.csv"

rm -rf "$OUT/.shadow"
log "== done in $(($(date +%s) - START))s; CSVs in $OUT"
cat "$OUT/steps.csv" | tee -a "$LOG"
