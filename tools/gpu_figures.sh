#!/usr/bin/env bash
# The GPU figures of docs/PERFORMANCE.md in one go, for a session that is lent a GPU machine for
# minutes: the machine has torch, timm and accelerate but no network, so the few pure-Python
# packages the benchmarks also need travel as wheels (made here first, with `wheels`).
#
#   bash tools/gpu_figures.sh wheels                # here, with PyPI: fills .gpu-wheels/ (ignored by git)
#   bash tools/gpu_figures.sh [PART ...]            # there: PARTs info step smoke data checkpoint compile
#                                                   # (default: all but compile, ~5 min on an H100)
#
# Each part writes PART.json (the benchmark's --json object) and PART.log into $OUT (default
# ./gpu-figures) and prints its summary lines. A part that fails is reported and the next one
# runs. QUICK=1 DEVICE=cpu runs every part on tiny inputs on a CPU (tests/test_gpu_figures.py).
set -u
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
OUT="${OUT:-gpu-figures}"
DEVICE="${DEVICE:-cuda}"
GRID=grids/table2b.yaml
ROW=2b-6 # DeiT-B-distilled/384 <- ConvNeXt-B/384, hard distillation: the issue's MFU row
WHEELS=.gpu-wheels
# What the benchmarks import beyond the GPU image's packages, at the versions tested here.
PACKAGES=(omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 timm==1.0.31)

if [[ "${1:-}" == wheels ]]; then
    mkdir -p "$WHEELS"
    # antlr4-python3-runtime 4.9.3 is published as a source archive only: build its wheel here.
    exec "$PY" -m pip wheel --no-deps --quiet -w "$WHEELS" "${PACKAGES[@]}"
fi

if [[ "${QUICK:-0}" == 1 ]]; then # every part on tiny inputs: checks this script, not speed
    SIZE=(--smoke) STEP=(--steps 2 --warmup 1 --repeats 1) DATA=(--generate 64 --image-px 48 --batches 4)
    BATCH=8 CKPT=(--repeats 1) WORKERS=1
else
    SIZE=() STEP=(--steps 20 --warmup 10 --repeats 5) DATA=(--generate 2048 --image-px 500 --batches 60)
    BATCH=64 CKPT=(--repeats 3) WORKERS=8
fi

mkdir -p "$OUT"
if ! "$PY" -c "import omegaconf, timm" 2>/dev/null; then
    echo "== installing ${PACKAGES[*]} from $WHEELS"
    "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" "${PACKAGES[@]}" ||
        echo "   could not install them: run 'bash tools/gpu_figures.sh wheels' first and carry $WHEELS"
fi

failed=0
bench() { # bench PART ARGS...: launch/bench.py ARGS --json > $OUT/PART.json
    local part=$1
    shift
    echo "== $part: launch/bench.py $*"
    if "$PY" launch/bench.py "$@" --json >"$OUT/$part.json" 2>"$OUT/$part.log"; then
        "$PY" - "$OUT/$part.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("device", "batch_size", "precision", "compile", "project_img_per_s", "plain_img_per_s",
        "ratio", "teacher_share", "achieved_tflops", "peak_tflops", "mfu", "workers",
        "loader_img_per_s", "demand_img_per_s", "keeps_up", "next_epoch_first_batch_s",
        "test_first_pass_img_per_s", "test_second_pass_img_per_s", "bytes_per_epoch",
        "in_loop_s", "background_blocking_s", "background_write_s",
        "step_time_ratio_during_write")
print("   " + ", ".join(f"{k} {r[k]:.4g}" if isinstance(r[k], float) else f"{k} {r[k]}"
                        for k in keys if k in r))
EOF
    else
        echo "   FAILED (exit $?); last lines of $OUT/$part.log:"
        tail -5 "$OUT/$part.log" | sed 's/^/   /'
        failed=$((failed + 1))
    fi
}

demand() { # the big step's measured img/s, for the loader to keep up with
    "$PY" -c "import json; print(round(json.load(open('$OUT/step.json'))['project_img_per_s']))" \
        2>/dev/null || echo 0
}

parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(info step smoke data checkpoint)
for part in "${parts[@]}"; do
    case "$part" in
    info)
        { nvidia-smi 2>&1 || echo "no nvidia-smi"; nproc; free -g; "$PY" -c \
            "import torch, timm, accelerate; print(torch.__version__, timm.__version__, accelerate.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"; } \
            >"$OUT/info.txt" 2>&1
        tail -1 "$OUT/info.txt"
        ;;
    step) bench step step "$GRID" --row "$ROW" "${SIZE[@]}" --batch-size "$BATCH" --device "$DEVICE" "${STEP[@]}" --no-compile ;;
    compile) bench compile step "$GRID" --row "$ROW" "${SIZE[@]}" --batch-size "$BATCH" --device "$DEVICE" "${STEP[@]}" --compile ;;
    smoke) bench smoke step "$GRID" --row "$ROW" --smoke --device "$DEVICE" "${STEP[@]}" ;; # the issue's tiny ratio row
    data)
        d=$(demand)
        bench data data "$GRID" --row "$ROW" "${SIZE[@]}" --workers "$WORKERS" "${DATA[@]}" --test \
            $([[ "$d" != 0 ]] && echo --demand "$d")
        ;;
    checkpoint) bench checkpoint checkpoint "$GRID" --row "$ROW" "${SIZE[@]}" --device "$DEVICE" --batch-size "$BATCH" "${CKPT[@]}" ;;
    *)
        echo "unknown part '$part' (parts: info step smoke data checkpoint compile)"
        failed=$((failed + 1))
        ;;
    esac
done
echo "figures in $OUT; $failed part(s) failed"
[[ $failed -eq 0 ]]
