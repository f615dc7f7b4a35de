#!/usr/bin/env bash
# Sets up everything nanochat needs in ./.venv, idempotently:
#   uv (from PyPI if missing) -> .venv -> torch (CUDA build on a GPU box, CPU build otherwise)
#   -> nanochat and its dependencies -> the Rust crate rustbpe/ built by maturin
#   -> Debian's chromium and shellcheck for the web UI and shell lint tests (as root where apt-get
#      exists; else those tests skip).
# Called by dev/runcpu.sh, speedrun.sh and dev/run_tests.sh; safe to re-run.
#
#   bash dev/install.sh            # GPU node: the pinned runtime; CPU box: runtime + test dependencies
#   bash dev/install.sh --dev      # also the test dependencies on a GPU node
#   TORCH_INDEX_URL=... bash dev/install.sh   # take torch from a specific wheel index
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WITH_DEV=0
[ "${1:-}" = "--dev" ] && WITH_DEV=1

log() { echo "[install] $*"; }

# --- uv ---------------------------------------------------------------------------------
if command -v uv >/dev/null 2>&1; then
    UV=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
    UV=(python3 -m uv)
else
    log "installing uv from PyPI"
    python3 -m pip install --quiet uv
    UV=(python3 -m uv)
fi

# uv ignores pip's configuration; hand it pip's find-links so a local torch wheel is seen.
if [ -n "${PIP_FIND_LINKS:-}" ] && [ -z "${UV_FIND_LINKS:-}" ]; then
    export UV_FIND_LINKS="${PIP_FIND_LINKS// /,}"
fi

# --- virtual environment ----------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    log "creating .venv (Python $(cat .python-version))"
    "${UV[@]}" venv --quiet --python "$(cat .python-version)" .venv
fi
export VIRTUAL_ENV="$ROOT/.venv"
PY="$VIRTUAL_ENV/bin/python"
uv_pip() { "${UV[@]}" pip "$@" --python "$PY"; }

HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then HAS_GPU=1; fi

# --- torch ------------------------------------------------------------------------------
# On a GPU node torch is pinned to 2.9.1 and kernels to 0.11.7 (dev/constraints/gpu.txt): upstream's
# proven pair, for which the hub's Hopper FA3 build exists. An unpinned install takes the newest
# torch, whose CUDA may need a newer driver than the node has (torch then sees no GPU at all).
TORCH_GPU_VERSION=2.9.1
torch_version() { "$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo none; }
if [ "$HAS_GPU" = 1 ]; then
    if [ "$(torch_version)" != "$TORCH_GPU_VERSION" ]; then
        index=${TORCH_INDEX_URL:-$(bash dev/torch_index.sh)}  # the CUDA build this driver runs
        log "GPU found: installing torch $TORCH_GPU_VERSION from $index"
        uv_pip install --quiet --index-url "$index" "torch==$TORCH_GPU_VERSION"
    fi
elif ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # No GPU. Prefer a CPU wheel that pip's find-links already holds (e.g. /opt/wheels),
    # otherwise the given CPU index; plain PyPI would pull several GB of CUDA libraries.
    local_wheel=""
    for dir in ${UV_FIND_LINKS//,/ }; do
        pyver=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
        wheels=("$dir"/torch-*-"$pyver"-*.whl)  # sorted by the glob; unexpanded if none match
        [ -e "${wheels[-1]}" ] && local_wheel="${wheels[-1]}"
        [ -n "$local_wheel" ] && break
    done
    if [ -n "$local_wheel" ]; then
        log "no GPU: installing the CPU build of torch from $local_wheel"
        uv_pip install --quiet "$local_wheel"
    else
        log "no GPU: installing torch${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
        uv_pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch>=2.9.0"
    fi
fi

# --- nanochat and its Python dependencies, at the versions in dev/constraints/ --------------
# GPU node: the runtime (+ Flash Attention through kernels, + plots); --dev adds the test extras,
# whose transformers needs a newer huggingface-hub than the pinned runtime, so it resolves them anew.
# CPU box: runtime + test extras, pinned to what the tests ran with. Where the pins cannot install
# (another OS or Python), the dependencies resolve without them, with a warning.
install_pinned() {
    local constraints=$1 extras=$2
    uv_pip install --quiet -e ".[$extras]" -c "$constraints" && return 0
    log "WARNING: the versions in $constraints do not install here; resolving the dependencies anew"
    uv_pip install --quiet -e ".[$extras]"
}
log "installing nanochat and its dependencies"
if [ "$HAS_GPU" = 1 ]; then
    install_pinned dev/constraints/gpu.txt gpu,plots
    if [ "$WITH_DEV" = 1 ]; then
        printf 'torch==%s\nkernels==0.11.7\n' "$TORCH_GPU_VERSION" >"$ROOT/.venv/gpu-pins.txt"
        uv_pip install --quiet -e ".[gpu,plots,dev]" -c "$ROOT/.venv/gpu-pins.txt"
    fi
else
    install_pinned dev/constraints/cpu.txt dev
fi

# --- rustbpe (Rust crate -> Python module) ----------------------------------------------
bash dev/build_rustbpe.sh "$PY"

# --- Debian packages only a test needs (the test skips without them) -----------------------
# test_package PACKAGE BINARY TEST: install PACKAGE unless BINARY (a name or a path) is there.
test_package() {
    local package=$1 binary=$2 test=$3
    command -v "$binary" >/dev/null 2>&1 && return 0
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        log "installing Debian's $package for $test"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null; }; then
            log "could not install $package; $test will skip"
        fi
    else
        log "no $binary and no apt-get as root to install it; $test will skip"
    fi
}
if [ "$HAS_GPU" = 0 ] || [ "$WITH_DEV" = 1 ]; then
    test_package chromium /usr/bin/chromium "the web UI test"  # playwright drives Debian's browser
    test_package shellcheck shellcheck "the shell-script lint test"
fi

log "done: activate with 'source .venv/bin/activate'"
