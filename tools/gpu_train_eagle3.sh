#!/usr/bin/env bash
# Train an EAGLE-3 head on a GPU machine without network access, from the repository root.
#
#   tools/gpu_train_eagle3.sh [MINUTES] [extra arguments of python -m eaglespec.train.eagle3]
#   tools/gpu_train_eagle3.sh --stage    only copy what this call carried in .gpu*/ and .whl/ to
#                                        /tmp/eagle3-stage, where a later call on the same (warm)
#                                        machine finds it: inputs too big for one 64 MiB transfer
#                                        travel over several calls
#
# Inputs (beside the repository):
#   .whl/*.whl                 wheels the machine lacks (gguf, for a GGUF target), installed into /tmp/site
#   .gpu*/target.gguf.part*    the target GGUF in pieces, in any .gpu* folders and in /tmp/eagle3-stage;
#                              joined in name order.
#                              Or .gpu*/target.gguf, or TARGET=PATH (a .gguf file or a transformers folder).
#   DATA=PATH                  the packed training set (default: the first of .gpu*/*.npz,
#                              /tmp/eagle3-stage/*.npz and runs/eagle3/sharegpt-smollm2.npz), written by
#                              `python -m eaglespec.train.pack`
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
    ls -l "$STAGE"
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
say "target $TARGET ($(du -h "$TARGET" | cut -f1)), data $DATA ($(du -h "$DATA" | cut -f1)), budget $MINUTES min"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader >> "$LOG" 2>&1 || true
"$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" >> "$LOG" 2>&1

# H200 settings: 64k padded tokens per batch (about 50-500 rows, bucketed by length), 7 unrolled
# steps, bf16 autocast; without --max-steps the cosine schedule is sized to fit the budget.
status=0  # the log is written as it goes (a run killed at its time limit keeps it)
started=$(date +%s)
train() {  # train BATCH_TOKENS MINUTES RUN_DIR [extra...]
    local tokens=$1 minutes=$2 run=$3; shift 3
    "$PY" -m eaglespec.train.eagle3 --data "$DATA" --target "$TARGET" --out "$run" --device "${DEVICE:-cuda}" \
        --max-minutes "$minutes" --batch-tokens "$tokens" --ttt-steps 7 --draft-vocab 8192 --lr 6e-4 \
        --warmup-steps 50 --eval-every 150 --checkpoint-every 150 "$@" >> "$LOG" 2>&1
}
train 65536 "$MINUTES" "$RUN" "$@" || status=$?
if [ "$status" -ne 0 ] && grep -qi "out of memory" "$LOG"; then
    # one retry at half the batch, in the time left: a borrowed GPU has no second chance
    left=$(awk -v m="$MINUTES" -v s="$(( $(date +%s) - started ))" 'BEGIN { printf "%.1f", m - s / 60 - 0.3 }')
    say "out of memory at 64k tokens per batch: retrying at 32k for $left min"
    RUN="$RUN-32k"; mkdir -p "$RUN"; status=0
    train 32768 "$left" "$RUN" "$@" || status=$?
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
