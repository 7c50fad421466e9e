#!/usr/bin/env bash
# GPU check of bnscope on a machine with one NVIDIA GPU, in one go (about 8 minutes at most).
#
# Usage, from the repository root:  bash benchmarks/gpu_check.sh
#   OUT=DIR       where the two result files go (default ./gpu-out): gpu_check.log (every
#                 step's output) and summary.md (the benchmark tables, the CLI's JSON figures)
#   WORK=DIR      scratch folder for the demo and the JSON documents (default a new temp dir)
#   BUDGET_S=N    hard limit for the whole script in seconds (default 530)
#
# Steps (each under `timeout`, timed; a failure is reported and the next step still runs):
#   1. environment: nvidia-smi, torch and CUDA versions
#   2. python -m pytest -q tests -k cuda            (tests needing CUDA have "cuda" in their names)
#   3. benchmarks/precise.py, ResNet-50-shaped, 224x224, batch 128, 40 batches: float32, then
#      autocast bf16 + channels-last
#   4. benchmarks/analysis.py, ResNet-50-shaped, batch 128, 10 batches, ghost sizes 2,8,32
#   5. the CLI end to end (as `python -m bnscope`): bnscope demo on CUDA, then precise /
#      inspect / adapt / ghost on its checkpoint with --device cuda --amp bf16, each --json
#      document saved under $OUT and checked to parse
# Prints PASS or FAIL per step and exits 1 when any step failed.
# Python: the repository's .venv when its torch sees CUDA, else the system python (bnscope
# installed with `pip install -e . --no-deps` when it cannot be imported; nothing is downloaded).

set -euo pipefail

OUT="${OUT:-./gpu-out}"
BUDGET_S="${BUDGET_S:-530}"
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK/logs"
DEMO="$WORK/demo"
rm -rf "$DEMO"  # bnscope demo wants a new (or empty) folder
LOG="$OUT/gpu_check.log"
: > "$LOG"
RESULTS=()  # "PASS name (time)" / "FAIL name (why)", in step order
FAILS=0
STEP=0

# -- python -----------------------------------------------------------------------------------
CUDA_OK='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
if [ -f .venv/bin/activate ] && .venv/bin/python -c "$CUDA_OK" 2>/dev/null; then
    set +u
    # shellcheck disable=SC1091
    . .venv/bin/activate
    set -u
    echo "python: .venv ($(command -v python))"
else
    echo "python: system (.venv missing, not runnable here, or its torch has no CUDA)"
fi
PY=python
command -v python >/dev/null 2>&1 || PY=python3
if ! "$PY" -c "import bnscope" 2>/dev/null; then
    echo "bnscope not importable: pip install -e . --no-deps"
    "$PY" -m pip install -q -e . --no-deps --no-build-isolation \
        || "$PY" -m pip install -q -e . --no-deps || true
fi
if ! "$PY" -c "import bnscope" 2>/dev/null; then
    echo "bnscope still not importable: using PYTHONPATH=$PWD"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PY OUT WORK DEMO

# -- one step ---------------------------------------------------------------------------------
# step NAME LIMIT_S COMMAND: runs COMMAND (a bash command line) under timeout, at most LIMIT_S
# seconds and never past the deadline; output on the terminal, in $WORK/logs/NN-NAME.log and
# appended to $OUT/gpu_check.log.
step() {
    local name=$1 limit=$2 cmd=$3
    local now left t0 rc log
    STEP=$((STEP + 1))
    now=$(date +%s)
    left=$((DEADLINE - now))
    if [ "$left" -lt 15 ]; then
        echo "FAIL $name (skipped: the ${BUDGET_S}s budget is spent)"
        RESULTS+=("FAIL $name (skipped: budget spent)")
        FAILS=$((FAILS + 1))
        return 0
    fi
    if [ "$limit" -gt "$left" ]; then
        limit=$left
    fi
    log="$WORK/logs/$(printf '%02d' "$STEP")-${name//[^A-Za-z0-9_.-]/_}.log"
    echo
    echo "=== [$STEP] $name (limit ${limit}s)"
    echo "\$ $cmd"
    t0=$(date +%s)
    set +e
    timeout -k 5 "$limit" bash -c "set -o pipefail; $cmd" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    { echo "=== [$STEP] $name"; cat "$log"; } >> "$LOG"
    set -e
    local took=$(($(date +%s) - t0))
    if [ "$rc" -eq 0 ]; then
        echo "PASS $name (${took}s)"
        RESULTS+=("PASS $name (${took}s)")
    else
        local why="exit $rc"
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            why="timed out after ${limit}s"
        fi
        echo "FAIL $name ($why, ${took}s)"
        RESULTS+=("FAIL $name ($why, ${took}s)")
        FAILS=$((FAILS + 1))
    fi
}

# JSON check appended to each CLI step: the document must parse
JSON_OK='"$PY" -c "import json, sys; json.load(open(sys.argv[1]))"'

# -- the steps --------------------------------------------------------------------------------
step env 30 '
nvidia-smi --query-gpu=name,memory.total --format=csv
"$PY" -c "import sys, torch; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"cuDNN\", torch.backends.cudnn.version()); print(\"cuda available:\", torch.cuda.is_available()); print(torch.cuda.get_device_name(0)); print(\"bf16 supported:\", torch.cuda.is_bf16_supported())"
'

step pytest-cuda 90 '
"$PY" -m pytest -q tests -k cuda
rc=$?
if [ "$rc" -eq 5 ]; then echo "(no test with cuda in its name was collected)"; exit 0; fi
exit "$rc"
'

step precise-fp32 110 '
"$PY" benchmarks/precise.py --device cuda --model resnet50 --batch-size 128 --size 224 \
    --batches 40 --reps 3 --markdown | tee "$WORK/precise-fp32.md"
'

step precise-bf16-cl 100 '
"$PY" benchmarks/precise.py --device cuda --model resnet50 --batch-size 128 --size 224 \
    --batches 40 --reps 3 --amp bf16 --channels-last --markdown | tee "$WORK/precise-bf16-cl.md"
'

step analysis 90 '
"$PY" benchmarks/analysis.py --device cuda --model resnet50 --batch-size 128 --size 224 \
    --batches 10 --reps 2 --sizes 2,8,32 --markdown | tee "$WORK/analysis.md"
'

step cli-demo 100 '"$PY" -m bnscope demo "$DEMO" --device cuda --quiet > "$WORK/demo.txt"
rc=$?
tail -n 12 "$WORK/demo.txt"  # the summary; the full output is in $WORK/demo.txt
exit "$rc"
'

step cli-precise 45 'cd "$DEMO" && "$PY" -m bnscope precise ckpt.pt --device cuda --amp bf16 \
    --channels-last -o ckpt.gpu.pt --json > "$WORK/precise.json" && '"$JSON_OK"' "$WORK/precise.json"'

step cli-inspect 45 'cd "$DEMO" && "$PY" -m bnscope inspect ckpt.pt --device cuda --amp bf16 \
    --json > "$WORK/inspect.json" && '"$JSON_OK"' "$WORK/inspect.json"'

step cli-adapt 45 'cd "$DEMO" && "$PY" -m bnscope adapt ckpt.pt --data corrupted/train \
    --device cuda --amp bf16 -o ckpt.gpu-adapted.pt --json > "$WORK/adapt.json" \
    && '"$JSON_OK"' "$WORK/adapt.json"'

step cli-ghost 45 'cd "$DEMO" && "$PY" -m bnscope ghost ckpt.pt --device cuda --amp bf16 \
    --sizes 2,8,32 --json > "$WORK/ghost.json" && '"$JSON_OK"' "$WORK/ghost.json"'

# -- summary ----------------------------------------------------------------------------------
{
    echo "# GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
    for md in precise-fp32 precise-bf16-cl analysis; do
        if [ -f "$WORK/$md.md" ]; then echo; echo "## $md"; cat "$WORK/$md.md"; fi
    done
    echo
    echo "## CLI (--device cuda --amp bf16)"
    for doc in precise inspect adapt ghost; do
        if [ -f "$WORK/$doc.json" ]; then
            "$PY" -c "
import json, sys
d = json.load(open(sys.argv[1]))
keep = ('device', 'amp', 'channels_last', 'batches', 'samples', 'forwards', 'verdict', 'output')
print(sys.argv[2], {k: d[k] for k in keep if k in d}, 'metrics' if 'metrics' in d else '')
" "$WORK/$doc.json" "$doc" || true
        fi
    done
    echo
    for line in "${RESULTS[@]}"; do echo "- $line"; done
} > "$OUT/summary.md"
echo
echo "=== summary ($(($(date +%s) - START))s in all; $OUT/summary.md, $OUT/gpu_check.log)"
for line in "${RESULTS[@]}"; do echo "$line"; done
if [ "$FAILS" -gt 0 ]; then
    echo "$FAILS step(s) failed"
    exit 1
fi
echo "all steps passed"
