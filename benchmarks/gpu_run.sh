#!/usr/bin/env bash
# The prepared GPU run: one command for a fresh H100/H200 machine that has torch, triton,
# torchvision and pytest-xdist installed and nothing else (nothing is installed, nothing
# downloaded; the C++ extension is not built: the GPU path needs only Triton). In about
# six minutes of wall time it
#   1. runs the Triton kernels' tests on CUDA tensors (float32, bfloat16, float16; fixed
#      block sizes, so that each kernel variant compiles once), while the benchmark's
#      kernels compile in parallel processes (they land in Triton's cache);
#   2. times the layer suites against the PyTorch pair in both memory formats, recording
#      whether cuDNN or PyTorch's own depthwise kernel ran for the pair;
#   3. times torchvision's mobilenet_v2 and the zoo's through sepconv.fuse end to end,
#      and two A/Bs: the wide layers' forward with the depthwise split off, NCHW's
#      forward with its taps read channel-fast;
# and writes into OUT: log.txt, tests.txt, failures.txt (if a test failed) and
# results.tar.gz (the result folder, benchmarks/results/<gpu>/, to unpack into the repo).
#
#   bash benchmarks/gpu_run.sh OUT             # on the GPU machine
#   bash benchmarks/gpu_run.sh OUT --dry-run   # CI, on CPU: the same steps, tiny
#
# SEPCONV_GPU_DEADLINE (seconds, default 470) bounds the whole run; SEPCONV_GPU_SKIP leaves
# named steps out (a rerun after a first call); SEPCONV_GPU_AUTOTUNE=1 also times
# mobilenet_v2 with the autotuned block sizes.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_run.sh OUT [--dry-run]}
DRY=$([[ ${2:-} == --dry-run ]] && echo 1 || echo 0)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 SEPCONV_TRITON_AUTOTUNE=0
PY=${PYTHON:-python3}
SKIP=${SEPCONV_GPU_SKIP:-}  # step names to leave out, e.g. "tests models fwd-bfloat16-b32"
FAILED=()

step() {  # step NAME TIMEOUT_S COMMAND...: run within the deadline, log, go on
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    [[ " $SKIP " == *" $name "* ]] && { echo "== $name: skipped (SEPCONV_GPU_SKIP)"; return; }
    ((limit > DEADLINE - SECONDS)) && limit=$((DEADLINE - SECONDS))
    if ((limit < 20)); then
        echo "== $name: skipped, the deadline is near"
        FAILED+=("$name (skipped)")
        return
    fi
    echo "== $name: $*"
    timeout "$limit" "$@"
    rc=$?
    echo "== $name: rc=$rc, $((SECONDS - t0)) s"
    [[ $rc == 0 ]] || FAILED+=("$name (rc=$rc)")
}

# The package as it is in the checkout: sepconv.triton_kernels is installed from
# triton_kernels/, so without an install it needs a link inside sepconv/.
if ! $PY -c "import sepconv.triton_kernels" 2>/dev/null; then
    ln -sfn ../triton_kernels sepconv/triton_kernels
    trap 'rm -f sepconv/triton_kernels; rm -rf "$WORK"' EXIT
else
    trap 'rm -rf "$WORK"' EXIT
fi
$PY -c "import sepconv.triton_kernels" || { echo "sepconv.triton_kernels does not import"; exit 1; }

if [[ $DRY == 1 ]]; then
    DEV=cpu; B=(1 2); SUITES=(convnext); MODELS=(mobilenet_v2); MODEL_ARGS=(--model-batch 2 --resolution 64)
    TEST_K="triton and base"; XDIST=(); DT=(float32 float64); LIMIT=120; DEADLINE=300
else
    DEV=cuda; B=(32 128); SUITES=(mobilenet_v1 mobilenet_v2 convnext)
    MODELS=(torchvision_mobilenet_v2 mobilenet_v2); MODEL_ARGS=(--model-batch 32)
    TEST_K="triton"; XDIST=(-n 8); DT=(bfloat16 float16); LIMIT=150; DEADLINE=${SEPCONV_GPU_DEADLINE:-470}
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
fi
$PY -c "import torch, triton, sepconv, json; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); \
print(json.dumps(sepconv.backend_info()))"
NAME=$($PY -c "from benchmarks.machine import describe, machine_name; \
print(machine_name(describe('$DEV')))" 2>/dev/null)
RES=$WORK/results/$NAME
BENCH=($PY -m benchmarks --device "$DEV" --quick --format both)
LAYERS=("${BENCH[@]}" --out "$RES" --suite "${SUITES[@]}")

# 1. Tests, while the benchmark's kernels compile in parallel processes (into Triton's
# cache; --out none: their timings are not kept). Failures are logged as they happen.
if [[ " $SKIP " != *" tests "* ]]; then
    SEPCONV_FAILURE_LOG=$OUT/failures.txt timeout $((DEADLINE / 2)) $PY -m pytest -v \
        --tb=short -p no:cacheprovider "${XDIST[@]}" tests/test_triton.py \
        tests/test_functional.py -k "$TEST_K" > "$OUT/tests.txt" 2>&1 &
    tests=$!
fi
warm=()
for s in "${SUITES[@]}"; do
    for m in fwd fwdbwd; do
        timeout $((LIMIT + 60)) "${BENCH[@]}" --out none --suite "$s" --mode "$m" --batch 2 \
            > "$WORK/warm_${s}_$m.txt" 2>&1 &
        warm+=($!)
    done
done
for p in "${warm[@]}"; do wait "$p" || echo "a warm-up process failed (the timed run says why)"; done
if [[ -n ${tests:-} ]]; then
    wait "$tests"; rc=$?
    echo "== tests: rc=$rc, $SECONDS s since the start"
    [[ $rc == 0 ]] || FAILED+=("tests (rc=$rc)")
    grep -E "passed|failed" "$OUT/tests.txt" | tail -n 1
    grep -c " PASSED" "$OUT/tests.txt" | sed 's/^/passed so far: /'
    grep " FAILED" "$OUT/tests.txt" | sed 's/.* FAILED //' | head -n 30
fi

# 2. Layers and networks, the most telling first: the deadline may cut the last ones.
step "fwd-${DT[0]}-b${B[0]}" "$LIMIT" "${LAYERS[@]}" --dtype "${DT[0]}" --batch "${B[0]}"
step "fwdbwd-${DT[0]}-b${B[0]}" "$LIMIT" "${LAYERS[@]}" --dtype "${DT[0]}" --batch "${B[0]}" \
    --mode fwdbwd
step models "$LIMIT" "${BENCH[@]}" --out "$RES" --suite models --model "${MODELS[@]}" \
    "${MODEL_ARGS[@]}" --dtype "${DT[0]}"
step "fwd-${DT[0]}-b${B[1]}" "$LIMIT" "${LAYERS[@]}" --dtype "${DT[0]}" --batch "${B[1]}"
# The same forward with the depthwise recomputed per column block (the split off), for
# the layers that split: the A/B of triton_kernels/forward.py's splits_depthwise.
SEPCONV_TRITON_SPLIT=never step "fwd-unsplit" "$LIMIT" "${BENCH[@]}" --out "$RES-unsplit" \
    --suite "${SUITES[0]}" "${SUITES[-1]}" --dtype "${DT[0]}" --batch "${B[1]}"
# NCHW's depthwise taps read as [pixels, channels] tiles, as before pixel_fast: the A/B
# of triton_kernels/_common.py's pixel_fast.
SEPCONV_TRITON_PIXEL_FAST=never step "fwd-nchw-channel-fast" "$LIMIT" "${BENCH[@]}" \
    --out "$RES-channel-fast" --suite "${SUITES[0]}" --format nchw --dtype "${DT[0]}" \
    --batch "${B[1]}"
# NCHW with the depthwise always split: benchmarks/triton_estimate.py predicts that the
# NCHW layers left fused (64 output channels a block) lose more to recomputing it.
SEPCONV_TRITON_SPLIT=always step "fwd-nchw-split" "$LIMIT" "${BENCH[@]}" --out "$RES-split" \
    --suite "${SUITES[@]:0:2}" --format nchw --dtype "${DT[0]}" --batch "${B[1]}"
step "fwdbwd-${DT[0]}-b${B[1]}" "$LIMIT" "${LAYERS[@]}" --dtype "${DT[0]}" --batch "${B[1]}" \
    --mode fwdbwd
if [[ ${SEPCONV_GPU_AUTOTUNE:-0} == 1 ]]; then
    SEPCONV_TRITON_AUTOTUNE=1 step "fwd-autotuned" "$LIMIT" "${BENCH[@]}" --out "$RES-autotuned" \
        --suite mobilenet_v2 --dtype "${DT[0]}" --batch "${B[1]}"
fi
step "fwd-${DT[1]}-b${B[1]}" "$LIMIT" "${LAYERS[@]}" --dtype "${DT[1]}" --batch "${B[1]}"

tar -czf "$OUT/results.tar.gz" -C "$WORK/results" .
echo "== results: $(tar -tzf "$OUT/results.tar.gz" | grep -c '\.json$') result files in results.tar.gz"
for f in "$RES"*/*.md; do echo "-- ${f#"$WORK/results/"}"; grep -E "^## " "$f"; done
if ((${#FAILED[@]})); then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "gpu_run: all steps passed"
