#!/usr/bin/env bash
# Train an EAGLE-3 head on a GPU machine without network access, from the repository root.
#
#   tools/gpu_train_eagle3.sh [MINUTES] [extra arguments of eaglespec train eagle3]
#   tools/gpu_train_eagle3.sh --stage    only copy what this call carried in .gpu*/ and .whl/ to
#                                        /tmp/eagle3-stage, where a later call on the same (warm)
#                                        machine finds it: inputs too big for one 64 MiB transfer
#                                        travel over several calls
#
# Last run (2026-12-04, commit d86608f, one H200, two runs sharing it, 8.5 min each): 16,384
# padded tokens per batch, lr 6e-4, 100 warm-up steps, 7 unrolled steps, bf16: 1,486 steps in
# 6.6 min (0.25 s/step), held-out acc at unrolled steps 1..7 0.595 .. 0.489, chain tau 2.63,
# peak memory 14 GiB. 64k-token batches had reached 1.92 (443 steps in 3.4 min): optimizer steps
# are the lever, hence the 16k default. docs/training.md, "EAGLE-3 heads".
#
# Inputs (beside the repository):
#   .whl/*.whl                 wheels the machine lacks (gguf, for a GGUF target), installed into /tmp/site
#   .gpu*/target.gguf.part*    the target GGUF in pieces, in any .gpu* folders and in /tmp/eagle3-stage;
#                              joined in name order.
#                              Or .gpu*/target.gguf, or TARGET=PATH (a .gguf file or a transformers folder).
#   DATA=PATH                  the packed training set (default: the first of .gpu*/*.npz,
#                              /tmp/eagle3-stage/*.npz and runs/eagle3/sharegpt-smollm2.npz), written by
#                              `eaglespec train pack`
#   INIT=DIR                   a saved EAGLE-3 head to continue (config.json and model.safetensors, or
#                              model.safetensors.part-* as this script writes them); default: the first
#                              .gpu*/head/ or /tmp/eagle3-stage/head/ holding one. Passed as --init-from;
#                              INIT=none starts a new head.
#   BATCH_TOKENS=N             padded tokens per batch (default 16384)
# Outputs, in "$OUT" (at most 8 files of < 16 MiB come back): metrics.json, train.log, config.json,
# and model.safetensors, cut into model.safetensors.part-aa, -ab, ... when larger than 15 MiB
# (rejoin with `cat model.safetensors.part-* > model.safetensors`).
set -euo pipefail
PY="${PYTHON:-python3}"

STAGE=/tmp/eagle3-stage
if [ "${1:-}" = "--stage" ]; then
    mkdir -p "$STAGE"
    for f in .gpu*/* .whl/*.whl; do
        if [ -f "$f" ]; then cp "$f" "$STAGE"/; fi
    done
    for d in .gpu*/head; do  # a head to continue, kept as a folder
        if [ -d "$d" ]; then mkdir -p "$STAGE/head" && cp "$d"/* "$STAGE/head"/; fi
    done
    ls -lR "$STAGE"
    exit 0
fi
MINUTES="${1:-6}"
shift || true
OUT="${OUT:-runs/eagle3/gpu-out}"
RUN="${RUN:-/tmp/eagle3-run}"
mkdir -p "$OUT" "$RUN"
LOG="$OUT/train.log"
: > "$LOG"
say() { echo "[gpu_train_eagle3] $*" | tee -a "$LOG"; }

wheels=$(ls .whl/*.whl "$STAGE"/*.whl 2>/dev/null | awk -F/ '{print $NF "\t" $0}' | sort -u -k1,1 | cut -f2 || true)
if [ -n "$wheels" ]; then
    "$PY" -m pip install --quiet --no-deps --no-index --no-compile --upgrade --target /tmp/site $wheels >> "$LOG" 2>&1
    say "installed $(for w in $wheels; do basename "$w"; done | tr '\n' ' ')"
fi
export PYTHONPATH="src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export EAGLESPEC_CACHE="${EAGLESPEC_CACHE:-/tmp/eaglespec-cache}"  # where a GGUF target is converted
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

TARGET="${TARGET:-}"
if [ -z "$TARGET" ]; then
    parts=$(ls .gpu*/target.gguf.part* "$STAGE"/target.gguf.part* 2>/dev/null \
            | awk -F/ '{print $NF "\t" $0}' | sort -u -k1,1 | cut -f2 || true)
    if [ -n "$parts" ]; then
        cat $parts > /tmp/target.gguf
        say "joined $(echo $parts | wc -w) pieces: $(stat -c %s /tmp/target.gguf) bytes, md5 $(md5sum /tmp/target.gguf | cut -c1-32)"
        if [ "$(head -c 4 /tmp/target.gguf)" != "GGUF" ]; then
            say "the joined target does not start with GGUF's magic: a piece is missing or out of order"
            exit 2
        fi
        TARGET=/tmp/target.gguf
    elif compgen -G ".gpu*/target.gguf" > /dev/null; then
        TARGET=$(ls .gpu*/target.gguf | head -1)
    else
        say "no target: give .gpu*/target.gguf.part*, .gpu*/target.gguf or TARGET=PATH"
        exit 2
    fi
fi
DATA="${DATA:-}"
if [ -z "$DATA" ]; then
    for f in .gpu*/*.npz "$STAGE"/*.npz runs/eagle3/sharegpt-smollm2.npz; do
        if [ -f "$f" ]; then DATA="$f"; break; fi
    done
fi
if [ -z "$DATA" ] || [ ! -f "$DATA" ]; then
    say "no packed data: give DATA=PATH or .gpu*/sharegpt-smollm2.npz"
    exit 2
fi
INIT="${INIT:-}"
if [ -z "$INIT" ]; then
    for d in .gpu*/head "$STAGE"/head; do
        if [ -f "$d/config.json" ]; then INIT="$d"; break; fi
    done
fi
init_args=()
if [ -n "$INIT" ] && [ "$INIT" != "none" ]; then
    if [ ! -f "$INIT/model.safetensors" ] && compgen -G "$INIT/model.safetensors.part-*" > /dev/null; then
        rm -rf /tmp/eagle3-init && mkdir -p /tmp/eagle3-init  # a head that travelled in pieces: joined outside the carried folder
        cp "$INIT/config.json" /tmp/eagle3-init/
        cat "$INIT"/model.safetensors.part-* > /tmp/eagle3-init/model.safetensors
        INIT=/tmp/eagle3-init
    fi
    if [ ! -f "$INIT/config.json" ] || [ ! -f "$INIT/model.safetensors" ]; then
        say "INIT=$INIT: no config.json and model.safetensors there"
        exit 2
    fi
    init_args=(--init-from "$INIT")
    say "continuing the head in $INIT ($(md5sum "$INIT/model.safetensors" | cut -c1-32))"
fi
BATCH_TOKENS="${BATCH_TOKENS:-16384}"
say "target $TARGET ($(du -h "$TARGET" | cut -f1)), data $DATA ($(du -h "$DATA" | cut -f1)), budget $MINUTES min, $BATCH_TOKENS tokens per batch"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader >> "$LOG" 2>&1 || true
"$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" >> "$LOG" 2>&1

# H200 settings: 16k padded tokens per batch (about 15-130 rows, bucketed by length), 7 unrolled
# steps, bf16 autocast; without --max-steps the cosine schedule is sized to fit the budget. The
# draft vocabulary: 8192 for a new head, the continued head's own with INIT.
status=0  # the log is written as it goes (a run killed at its time limit keeps it)
started=$(date +%s)
train() {  # train BATCH_TOKENS MINUTES RUN_DIR [extra...]
    local tokens=$1 minutes=$2 run=$3; shift 3
    "$PY" -m eaglespec.cli train eagle3 --data "$DATA" --target "$TARGET" --out "$run" --device "${DEVICE:-cuda}" \
        --max-minutes "$minutes" --batch-tokens "$tokens" --ttt-steps 7 --lr 6e-4 \
        --warmup-steps 100 --eval-every 500 --checkpoint-every 500 ${init_args[@]+"${init_args[@]}"} "$@" >> "$LOG" 2>&1
}
train "$BATCH_TOKENS" "$MINUTES" "$RUN" "$@" || status=$?
if [ "$status" -ne 0 ] && grep -qi "out of memory" "$LOG"; then
    # one retry at half the batch, in the time left: a borrowed GPU has no second chance
    half=$((BATCH_TOKENS / 2))
    left=$(awk -v m="$MINUTES" -v s="$(( $(date +%s) - started ))" 'BEGIN { printf "%.1f", m - s / 60 - 0.3 }')
    say "out of memory at $BATCH_TOKENS tokens per batch: retrying at $half for $left min"
    RUN="$RUN-$half"; mkdir -p "$RUN"; status=0
    train "$half" "$left" "$RUN" "$@" || status=$?
fi
say "training exited with status $status"

[ -f "$RUN/metrics.json" ] && cp "$RUN/metrics.json" "$OUT/"
if [ -f "$RUN/final/model.safetensors" ]; then
    cp "$RUN/final/config.json" "$OUT/"
    size=$(stat -c %s "$RUN/final/model.safetensors")
    if [ "$size" -gt $((15 * 1024 * 1024)) ]; then
        split -b 15m "$RUN/final/model.safetensors" "$OUT/model.safetensors.part-"
    else
        cp "$RUN/final/model.safetensors" "$OUT/"
    fi
    (cd "$RUN/final" && sha256sum model.safetensors) > "$OUT/model.safetensors.sha256"
    say "head: $size bytes -> $(ls "$OUT" | tr '\n' ' ')"
fi
exit "$status"
