#!/usr/bin/env bash
# Train an EAGLE-3 head on a GPU machine without network access, from the repository root.
#
#   tools/gpu_train_eagle3.sh [MINUTES] [extra arguments of python -m eaglespec.train.eagle3]
#
# Inputs (beside the repository):
#   .whl/*.whl                 wheels the machine lacks (gguf, for a GGUF target), installed into /tmp/site
#   .gpu/target.gguf.part*     the target GGUF in pieces (cat in name order), or .gpu/target.gguf,
#                              or TARGET=PATH (a .gguf file or a transformers folder)
#   DATA=PATH                  the packed training set (default: .gpu/sharegpt-smollm2.npz, else
#                              runs/eagle3/sharegpt-smollm2.npz), from `python -m eaglespec.train.pack`
# Outputs, in "$OUT" (at most 8 files of < 16 MiB come back): metrics.json, train.log, config.json,
# and model.safetensors, cut into model.safetensors.part-aa, -ab, ... when larger than 15 MiB
# (rejoin with `cat model.safetensors.part-* > model.safetensors`).
set -euo pipefail

MINUTES="${1:-6}"
shift || true
OUT="${OUT:-runs/eagle3/gpu-out}"
RUN="${RUN:-/tmp/eagle3-run}"
mkdir -p "$OUT" "$RUN"
LOG="$OUT/train.log"
: > "$LOG"
say() { echo "[gpu_train_eagle3] $*" | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install --quiet --no-deps --no-index --target /tmp/site .whl/*.whl >> "$LOG" 2>&1
    say "installed $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
fi
export PYTHONPATH="src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export EAGLESPEC_CACHE="${EAGLESPEC_CACHE:-/tmp/eaglespec-cache}"  # where a GGUF target is converted
export TOKENIZERS_PARALLELISM=false

TARGET="${TARGET:-}"
if [ -z "$TARGET" ]; then
    if compgen -G ".gpu/target.gguf.part*" > /dev/null; then
        cat $(ls .gpu/target.gguf.part* | sort) > /tmp/target.gguf
        TARGET=/tmp/target.gguf
    elif [ -f .gpu/target.gguf ]; then
        TARGET=.gpu/target.gguf
    else
        say "no target: give .gpu/target.gguf.part*, .gpu/target.gguf or TARGET=PATH"
        exit 2
    fi
fi
DATA="${DATA:-}"
if [ -z "$DATA" ]; then
    for f in .gpu/sharegpt-smollm2.npz runs/eagle3/sharegpt-smollm2.npz; do
        if [ -f "$f" ]; then DATA="$f"; break; fi
    done
fi
if [ -z "$DATA" ] || [ ! -f "$DATA" ]; then
    say "no packed data: give DATA=PATH or .gpu/sharegpt-smollm2.npz"
    exit 2
fi
say "target $TARGET ($(du -h "$TARGET" | cut -f1)), data $DATA ($(du -h "$DATA" | cut -f1)), budget $MINUTES min"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader >> "$LOG" 2>&1 || true
python -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" >> "$LOG" 2>&1

# H200 settings: 64k padded tokens per batch (about 50-500 rows, bucketed by length), 7 unrolled
# steps, bf16 autocast; without --max-steps the cosine schedule is sized to fit the budget.
status=0
python -m eaglespec.train.eagle3 --data "$DATA" --target "$TARGET" --out "$RUN" --device "${DEVICE:-cuda}" \
    --max-minutes "$MINUTES" --batch-tokens 65536 --ttt-steps 7 --draft-vocab 8192 --lr 6e-4 \
    --warmup-steps 50 --eval-every 150 --checkpoint-every 150 "$@" 2>&1 \
    | tr '\r' '\n' | awk 'NR % 20 == 1 || !/step\/s|s\/step/' >> "$LOG" || status=$?
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
