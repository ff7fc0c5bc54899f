#!/usr/bin/env bash
# What one lent GPU can tell, in one command of at most eight minutes (benchmarks/README.md, "GPU check"):
#
#   benchmarks/gpu_check.sh                       # every part on the CUDA device; report under $OUT
#   benchmarks/gpu_check.sh --dry                 # the same on the CPU at tiny sizes (CI runs it)
#   benchmarks/gpu_check.sh --parts=steps,v2      # some parts only (env always runs first)
#
# Writes $OUT/report.md, $OUT/gpu_check.json and $OUT/gpu_check.log ($OUT defaults to bench_out/gpu_check). Each
# part (benchmarks/gpu_check.py) runs in its own process under its own `timeout`, so a part that fails or runs out
# of time loses only its unfinished rows; a one-line summary is printed as each part ends. The timeouts add up to
# 7 min 40 s on a GPU.
#
# Python: $PYTHON, else the checkout's .venv, else python3; it needs torch, torchvision, timm, numpy, pillow, pyyaml,
# tqdm and scipy (pytest for the CUDA tests, onnxruntime for its row), which the lent machines' image has. hafis runs
# from src/ (nothing is installed). A missing package can travel as wheels in .whl/ (installed into a temporary
# folder: pip download --only-binary=:all: for the machine's Python and platform, then carry .whl/).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

DRY=""
ONLY=""
for arg in "$@"; do
    case $arg in
        --dry) DRY="--dry" ;;
        --parts=*) ONLY=",${arg#--parts=}," ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (--dry, --parts=a,b, --help)" >&2; exit 2 ;;
    esac
done

OUT=${OUT:-bench_out/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG="$OUT/gpu_check.log"
: >"$LOG"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HAFIS_CACHE="$WORK/cache"
NEEDED="torch torchvision timm numpy PIL yaml tqdm scipy"
check='import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))'
missing=$("$PY" -c "$check" $NEEDED 2>/dev/null) || missing="python ($PY does not run)"
if [ -n "$missing" ] && [ -d "$ROOT/.whl" ]; then
    echo "[gpu_check] installing the wheels of .whl/ for: $missing"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$ROOT"/.whl/*.whl \
        >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:$WORK/site"
    missing=$("$PY" -c "$check" $NEEDED 2>/dev/null) || missing="python"
fi
if [ -n "$missing" ]; then
    echo "gpu_check.sh: $PY lacks: $missing (set PYTHON, or bring wheels in .whl/)" >&2
    exit 2
fi

# part:timeout in seconds, in the order they run (the GPU's figures first, the compile, which may take minutes, last)
if [ -n "$DRY" ]; then
    PLAN="env:120 cuda_tests:120 drift:120 steps:120 v2:120 loaders:120 predict:120 compile:180"
else
    PLAN="env:25 cuda_tests:40 drift:60 steps:75 v2:90 loaders:40 predict:30 compile:100"
fi
echo "[gpu_check] $("$PY" -c 'import platform, torch; print(platform.node(), "torch", torch.__version__)')," \
     "work folder $WORK, report in $OUT${DRY:+ (--dry)}"
for item in $PLAN; do
    part=${item%%:*}
    limit=${item##*:}
    if [ -n "$ONLY" ] && [ "$part" != env ] && [[ $ONLY != *",$part,"* ]]; then
        continue
    fi
    start=$(date +%s)
    echo "===== $part (timeout $limit s)" >>"$LOG"
    timeout --kill-after=10 "$limit" "$PY" benchmarks/gpu_check.py run "$part" --work "$WORK" --budget "$limit" \
        $DRY >>"$LOG" 2>&1
    rc=$?
    "$PY" benchmarks/gpu_check.py summary "$part" --work "$WORK" --rc "$rc" --seconds "$(( $(date +%s) - start ))" \
        --timeout "$limit"
    if [ "$rc" -ne 0 ]; then
        echo "[gpu_check]   the end of its log:"
        sed -n "/^===== $part /,\$p" "$LOG" | tail -n 6 | sed 's/^/    /'
    fi
done
"$PY" benchmarks/gpu_check.py report --work "$WORK" --out "$OUT" $DRY
echo "[gpu_check] wrote $OUT/report.md, $OUT/gpu_check.json, $OUT/gpu_check.log"
rm -rf "$WORK"
