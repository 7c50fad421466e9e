#!/usr/bin/env bash
# GPU check of bnscope on a machine with one NVIDIA GPU, in one go (about 8 minutes at most).
#
# Usage, from the repository root:  bash benchmarks/gpu_check.sh
#   OUT=DIR       where logs, Markdown tables and JSON documents go (default ./gpu-out)
#   BUDGET_S=N    hard limit for the whole script in seconds (default 530)
#
# Steps (each under `timeout`, timed; a failure is reported and the next step still runs):
#   1. environment: nvidia-smi, torch and CUDA versions
#   2. python -m pytest -q tests -k cuda            (tests needing CUDA have "cuda" in their names)
#   3. benchmarks/precise.py, ResNet-50-shaped, 224x224, batch 128, 40 batches: float32, then
#      autocast bf16 + channels-last
#   4. benchmarks/analysis.py, ResNet-50-shaped, batch 128, 10 batches, ghost sizes 2,8,32
#   5. the CLI end to end: bnscope demo on CUDA, then precise / inspect / adapt / ghost on its
#      checkpoint with --device cuda --amp bf16, each --json document saved under $OUT
# Prints PASS or FAIL per step and exits 1 when any step failed.
# Python: the repository's .venv when its torch sees CUDA, else the system python (bnscope
# installed with `pip install -e . --no-deps` when it cannot be imported; nothing is downloaded).

set -euo pipefail

OUT="${OUT:-./gpu-out}"
BUDGET_S="${BUDGET_S:-530}"
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
DEMO="$OUT/demo"
rm -rf "$DEMO"  # bnscope demo wants a new (or empty) folder
PASSED=()
FAILED=()
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
export PY OUT DEMO

# -- one step ---------------------------------------------------------------------------------
# step NAME LIMIT_S COMMAND: runs COMMAND (a bash command line) under timeout, at most LIMIT_S
# seconds and never past the deadline; output on the terminal and in $OUT/logs/NN-NAME.log.
step() {
    local name=$1 limit=$2 cmd=$3
    local now left t0 rc log
    STEP=$((STEP + 1))
    now=$(date +%s)
    left=$((DEADLINE - now))
    if [ "$left" -lt 15 ]; then
        echo "FAIL $name (skipped: the ${BUDGET_S}s budget is spent)"
        FAILED+=("$name (skipped)")
        return 0
    fi
    if [ "$limit" -gt "$left" ]; then
        limit=$left
    fi
    log="$OUT/logs/$(printf '%02d' "$STEP")-${name//[^A-Za-z0-9_.-]/_}.log"
    echo
    echo "=== [$STEP] $name (limit ${limit}s)"
    echo "\$ $cmd"
    t0=$(date +%s)
    set +e
    timeout -k 5 "$limit" bash -c "set -o pipefail; $cmd" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    local took=$(($(date +%s) - t0))
    if [ "$rc" -eq 0 ]; then
        echo "PASS $name (${took}s)"
        PASSED+=("$name (${took}s)")
    else
        local why="exit $rc"
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            why="timed out after ${limit}s"
        fi
        echo "FAIL $name ($why, ${took}s)"
        FAILED+=("$name ($why, ${took}s)")
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
    --batches 40 --reps 3 --markdown | tee "$OUT/precise-fp32.md"
'

step precise-bf16-cl 100 '
"$PY" benchmarks/precise.py --device cuda --model resnet50 --batch-size 128 --size 224 \
    --batches 40 --reps 3 --amp bf16 --channels-last --markdown | tee "$OUT/precise-bf16-cl.md"
'

step analysis 90 '
"$PY" benchmarks/analysis.py --device cuda --model resnet50 --batch-size 128 --size 224 \
    --batches 10 --reps 2 --sizes 2,8,32 --markdown | tee "$OUT/analysis.md"
'

step cli-demo 100 '"$PY" -m bnscope demo "$DEMO" --device cuda --quiet'

step cli-precise 45 'cd "$DEMO" && "$PY" -m bnscope precise ckpt.pt --device cuda --amp bf16 \
    --channels-last -o ckpt.gpu.pt --json > "$OUT/precise.json" && '"$JSON_OK"' "$OUT/precise.json"'

step cli-inspect 45 'cd "$DEMO" && "$PY" -m bnscope inspect ckpt.pt --device cuda --amp bf16 \
    --json > "$OUT/inspect.json" && '"$JSON_OK"' "$OUT/inspect.json"'

step cli-adapt 45 'cd "$DEMO" && "$PY" -m bnscope adapt ckpt.pt --data corrupted/train \
    --device cuda --amp bf16 -o ckpt.gpu-adapted.pt --json > "$OUT/adapt.json" \
    && '"$JSON_OK"' "$OUT/adapt.json"'

step cli-ghost 45 'cd "$DEMO" && "$PY" -m bnscope ghost ckpt.pt --device cuda --amp bf16 \
    --sizes 2,8,32 --json > "$OUT/ghost.json" && '"$JSON_OK"' "$OUT/ghost.json"'

# -- summary ----------------------------------------------------------------------------------
echo
echo "=== summary ($(($(date +%s) - START))s in all; logs, tables and JSON in $OUT)"
for s in "${PASSED[@]+"${PASSED[@]}"}"; do echo "PASS $s"; done
for s in "${FAILED[@]+"${FAILED[@]}"}"; do echo "FAIL $s"; done
if [ "${#FAILED[@]}" -gt 0 ]; then
    exit 1
fi
