#!/usr/bin/env bash
# Builds the Rust crate rustbpe/ into an abi3 wheel (maturin, release) and installs it into the
# virtual environment of the given Python. Called by dev/install.sh; safe to re-run: it skips
# the build when the crate's sources and the installed module are unchanged since last time.
#
#   bash dev/build_rustbpe.sh .venv/bin/python
#
# Where the crates come from: the Rust crate registry when it can be reached; otherwise Debian's
# packaged crate sources under /usr/share/cargo/registry (apt-get installs them if missing),
# through a cargo source replacement written to rustbpe/.cargo/config.toml (gitignored) only
# for that case. The same Cargo.toml serves both.
#
# Also puts the PyPI wheel rustbpe==0.1.0 into .oracle/rustbpe-0.1.0/ (not into the venv: same
# module name); tests/test_rustbpe.py and dev/bench_tokenizer.py compare our merges with it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${1:-.venv/bin/python}
case $PY in  # absolute, since the build runs from inside the crate
    */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;;
    *) PY=$(command -v "$PY") ;;
esac
CRATE=$ROOT/rustbpe
STAMP=$CRATE/target/.build-stamp            # "<sources hash> <installed module hash>"
LOGFILE=$CRATE/target/build.log
ORACLE=$ROOT/.oracle/rustbpe-0.1.0
DEBIAN_REGISTRY=/usr/share/cargo/registry
# Debian bookworm's packages hold the versions Cargo.toml asks for (pyo3 0.17, fancy-regex 0.7).
DEBIAN_CRATES=(pyo3-0.17 fancy-regex-0.7 regex-1 rayon-1 ahash-0.7)
DEBIAN_PACKAGES=(librust-pyo3-dev librust-fancy-regex-dev librust-regex-dev librust-rayon-dev librust-ahash-dev)

log() { echo "[rustbpe] $*"; }
die() { echo "[rustbpe] ERROR: $*" >&2; exit 1; }

if command -v uv >/dev/null 2>&1; then UV=(uv); else UV=(python3 -m uv); fi
pip_install() { "${UV[@]}" pip install --quiet --python "$PY" "$@"; }

# macOS has neither `timeout` nor `sha256sum` by default.
with_timeout() { if command -v timeout >/dev/null 2>&1; then timeout "$@"; else shift; "$@"; fi; }
sha256() { if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi | cut -d' ' -f1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else return 1; fi
}

# Hash of the installed module's shared library ("none" when rustbpe does not import).
installed_hash() {
    local so
    so=$("$PY" -c 'import rustbpe.rustbpe as m; print(m.__file__)' 2>/dev/null) || { echo none; return; }
    sha256 <"$so"
}

sources_hash() {
    (cd "$CRATE" && { cat Cargo.toml pyproject.toml; find src -type f -print0 | LC_ALL=C sort -z | xargs -0 cat; }) | sha256
}

install_oracle() {
    [ -d "$ORACLE/rustbpe" ] && return 0
    if "${UV[@]}" pip install --quiet --python "$PY" --target "$ORACLE" "rustbpe==0.1.0" >/dev/null 2>&1; then
        log "installed the PyPI rustbpe 0.1.0 oracle into ${ORACLE#"$ROOT"/}"
    else
        rm -rf "$ORACLE"
        log "could not fetch PyPI rustbpe 0.1.0 (no package registry?); comparisons against it will be skipped"
    fi
}

use_debian_crates() {
    local missing=0 crate
    for crate in "${DEBIAN_CRATES[@]}"; do
        ls -d "$DEBIAN_REGISTRY/$crate".* >/dev/null 2>&1 || missing=1
    done
    if [ "$missing" = 1 ]; then
        command -v apt-get >/dev/null 2>&1 \
            || die "the Rust crate registry is unreachable and there is no apt-get to install Debian's packaged crates"
        log "installing Debian's packaged Rust crates: ${DEBIAN_PACKAGES[*]}"
        { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${DEBIAN_PACKAGES[@]}"; } \
            >>"$LOGFILE" 2>&1 || die "apt-get install ${DEBIAN_PACKAGES[*]} failed (needs root or sudo); see $LOGFILE"
        for crate in "${DEBIAN_CRATES[@]}"; do
            ls -d "$DEBIAN_REGISTRY/$crate".* >/dev/null 2>&1 \
                || die "Debian's packages do not provide $crate.* (this needs Debian bookworm's versions)"
        done
    fi
    mkdir -p "$CRATE/.cargo"
    cat >"$CRATE/.cargo/config.toml" <<EOF
# Written by dev/build_rustbpe.sh because the Rust crate registry was unreachable: take every
# crate from Debian's packaged sources instead. Deleted again when the registry is reachable.
[source.crates-io]
replace-with = "debian-packaged-crates"

[source.debian-packaged-crates]
directory = "$DEBIAN_REGISTRY"
EOF
}

mkdir -p "$CRATE/target"
install_oracle

want_sources=$(sources_hash)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_sources $(installed_hash)" ]; then
    log "up to date (sources unchanged since the last build); skipping the build"
    exit 0
fi
: >"$LOGFILE"

if ! command -v cargo >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) and re-run"
    log "cargo not found: installing Debian's cargo"
    { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq cargo; } \
        >>"$LOGFILE" 2>&1 || die "apt-get install cargo failed; install Rust (https://rustup.rs) and re-run"
fi
"$PY" -m maturin --version >/dev/null 2>&1 || pip_install "maturin>=1.9.4,<2"

# A lock file or source replacement from an earlier build may belong to the other source, so
# start clean and let cargo resolve again (cheap).
rm -f "$CRATE/Cargo.lock" "$CRATE/.cargo/config.toml"
if (cd "$CRATE" && with_timeout 90 cargo fetch) >>"$LOGFILE" 2>&1; then
    log "building with crates from the Rust crate registry"
else
    log "the Rust crate registry is unreachable: building with Debian's packaged crates"
    rm -f "$CRATE/Cargo.lock"
    use_debian_crates
fi

log "compiling (release; under a minute cold) ..."
start=$(date +%s)
rm -rf "$CRATE/target/wheels"
# maturin runs from inside the crate so that cargo sees rustbpe/.cargo/config.toml.
(cd "$CRATE" && "$PY" -m maturin build --release --interpreter "$PY" --out target/wheels) >>"$LOGFILE" 2>&1 \
    || { tail -n 30 "$LOGFILE" >&2; die "maturin build failed; full log in ${LOGFILE#"$ROOT"/}"; }
wheel=$(ls "$CRATE"/target/wheels/rustbpe-*.whl)
pip_install --reinstall --no-deps "$wheel"
"$PY" -c 'import rustbpe; rustbpe.Tokenizer()' || die "the installed rustbpe does not import"
echo "$want_sources $(installed_hash)" >"$STAMP"
log "built and installed $(basename "$wheel") in $(($(date +%s) - start)) s"
