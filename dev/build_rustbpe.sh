#!/usr/bin/env bash
# Builds the Rust crate rustbpe/ into an abi3 wheel (maturin, release) and installs it into the
# virtual environment of the given Python. Called by dev/install.sh; safe to re-run: it skips
# the build when the crate's sources, its Cargo.lock and the installed module are unchanged.
#
#   bash dev/build_rustbpe.sh .venv/bin/python
#
# Crate versions are pinned by rustbpe/Cargo.lock (lock format 3, which Debian 12's cargo reads;
# every locked crate builds with its rustc 1.63), and every build passes --locked:
# - online, cargo fetches exactly the locked crates from the Rust crate registry;
# - offline, the crates come from Debian's packaged sources under /usr/share/cargo/registry
#   (apt-get installs them if missing). Debian patches some of their manifests (it drops
#   Windows/Redox/WASI-only dependencies, relaxes a few requirements) and records no checksum
#   for those, so the committed lock cannot serve as is. Instead cargo locks Debian's crates in a
#   scratch copy of the crate (target/debian-crate/), the script checks that every crate there
#   has the committed lock's version (and checksum, where Debian keeps it), and builds that copy.
# With no cargo on the machine: online, rustup installs the current stable toolchain into
# ~/.cargo (as upstream's speedrun did); offline, apt-get installs Debian's cargo.
#
# Also puts the PyPI wheel rustbpe==0.1.0 into .oracle/rustbpe-0.1.0/ (not into the venv: same
# module name); tests/test_rustbpe.py and dev/bench_tokenizer.py compare our merges with it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
CRATE=$ROOT/rustbpe
DEBIAN_CRATE=$CRATE/target/debian-crate     # the scratch copy built from Debian's crates
STAMP=$CRATE/target/.build-stamp            # "<sources hash> <installed module hash>"
LOGFILE=$CRATE/target/build.log
ORACLE=$ROOT/.oracle/rustbpe-0.1.0
DEBIAN_REGISTRY=/usr/share/cargo/registry
# Debian bookworm's packages hold the versions Cargo.lock pins (pyo3 0.17.3, fancy-regex 0.7.1, ...).
DEBIAN_CRATES=(pyo3-0.17 fancy-regex-0.7 regex-1 rayon-1 ahash-0.7)
DEBIAN_PACKAGES=(librust-pyo3-dev librust-fancy-regex-dev librust-regex-dev librust-rayon-dev librust-ahash-dev)
# What Debian's .cargo-checksum.json holds instead of a checksum for a crate it patched.
DEBIAN_NO_CHECKSUM="Could not get crate checksum"
# cargo's phrasings, old and new, for a lock it would have to change or a checksum that differs.
LOCK_ERRORS='--locked was passed|the same as when the lockfile was generated|changed between lock files'

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

apt_install() {
    { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@"; } >>"$LOGFILE" 2>&1
}

# Hash of the installed module's shared library ("none" when rustbpe does not import).
installed_hash() {
    local so
    so=$("$PY" -c 'import rustbpe.rustbpe as m; print(m.__file__)' 2>/dev/null) || { echo none; return; }
    sha256 <"$so"
}

sources_hash() {
    (cd "$CRATE" && { cat Cargo.toml Cargo.lock pyproject.toml; find src -type f -print0 | LC_ALL=C sort -z | xargs -0 cat; }) | sha256
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

# With no cargo: rustup's current stable when rustup's site answers, else Debian's cargo.
ensure_cargo() {
    command -v cargo >/dev/null 2>&1 && return 0
    if command -v curl >/dev/null 2>&1 \
        && curl --proto '=https' --tlsv1.2 -fsS --max-time 10 -o /dev/null https://sh.rustup.rs >>"$LOGFILE" 2>&1; then
        log "cargo not found: installing the current stable Rust toolchain with rustup into ~/.cargo"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
            | sh -s -- -y --profile minimal --default-toolchain stable >>"$LOGFILE" 2>&1 \
            || die "the rustup install failed; see $LOGFILE, or install Rust yourself (https://rustup.rs) and re-run"
        export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    elif command -v apt-get >/dev/null 2>&1; then
        log "cargo not found and rustup's site is unreachable: installing Debian's cargo"
        apt_install cargo || die "apt-get install cargo failed (needs root or sudo); see $LOGFILE"
    else
        die "cargo not found, rustup's site is unreachable and there is no apt-get: install Rust (https://rustup.rs) and re-run"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo is still not on PATH after installing it; see $LOGFILE"
}

# True when cargo can fetch the locked crates from the registry. A lock that no longer matches
# Cargo.toml or the registry is an error to fix, not a reason to fall back to Debian's crates.
registry_reachable() {
    local out
    out=$(cd "$CRATE" && with_timeout 90 cargo fetch --locked 2>&1) && { echo "$out" >>"$LOGFILE"; return 0; }
    echo "$out" >>"$LOGFILE"
    if grep -qE -- "$LOCK_ERRORS" <<<"$out"; then
        die "rustbpe/Cargo.lock does not match rustbpe/Cargo.toml or the crate registry: $(grep -m1 -E -- "$LOCK_ERRORS" <<<"$out")
(see the README's note on the Rust build before changing the lock; full log in $LOGFILE)"
    fi
    return 1
}

install_debian_crates() {
    local missing=0 crate
    for crate in "${DEBIAN_CRATES[@]}"; do
        ls -d "$DEBIAN_REGISTRY/$crate".* >/dev/null 2>&1 || missing=1
    done
    [ "$missing" = 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 \
        || die "the Rust crate registry is unreachable and there is no apt-get to install Debian's packaged crates"
    log "installing Debian's packaged Rust crates: ${DEBIAN_PACKAGES[*]}"
    apt_install "${DEBIAN_PACKAGES[@]}" \
        || die "apt-get install ${DEBIAN_PACKAGES[*]} failed (needs root or sudo); see $LOGFILE"
}

# "name<TAB>version<TAB>checksum" for every registry crate in a Cargo.lock.
lock_crates() {
    awk -F'"' '/^\[\[package\]\]/ { name = version = source = "" }
        $1 == "name = " { name = $2 } $1 == "version = " { version = $2 } $1 == "source = " { source = $2 }
        $1 == "checksum = " && source != "" { print name "\t" version "\t" $2 }' "$1"
}

# Lines naming each crate of the Debian lock ($1) that the committed lock does not pin as is.
debian_lock_differences() {
    awk -F'\t' -v no_checksum="$DEBIAN_NO_CHECKSUM" '
        NR == FNR { locked[$1 " " $2] = $3; next }
        !(($1 " " $2) in locked) { print "  " $1 " " $2 ": Cargo.lock pins another version"; next }
        $3 != no_checksum && $3 != locked[$1 " " $2] { print "  " $1 " " $2 ": checksum differs from Cargo.lock" }' \
        <(lock_crates "$CRATE/Cargo.lock") <(lock_crates "$1")
}

# Writes the scratch crate $1 (sources linked, not copied), locks it to Debian's crates and checks
# that lock against the committed one. Its target/ is kept, so rebuilds stay incremental.
prepare_debian_crate() {
    local dir=$1 differences
    mkdir -p "$dir/.cargo"
    cp "$CRATE/Cargo.toml" "$CRATE/pyproject.toml" "$dir/"
    ln -sfn "$CRATE/src" "$dir/src"
    cat >"$dir/.cargo/config.toml" <<EOF
# Written by dev/build_rustbpe.sh because the Rust crate registry was unreachable: take every
# crate from Debian's packaged sources.
[source.crates-io]
replace-with = "debian-packaged-crates"

[source.debian-packaged-crates]
directory = "$DEBIAN_REGISTRY"
EOF
    rm -f "$dir/Cargo.lock"
    (cd "$dir" && cargo generate-lockfile --offline) >>"$LOGFILE" 2>&1 \
        || die "cargo cannot lock rustbpe's dependencies to Debian's packaged crates (this needs Debian bookworm's librust-*-dev); see $LOGFILE"
    differences=$(debian_lock_differences "$dir/Cargo.lock")
    [ -z "$differences" ] || die "Debian's packaged crates differ from rustbpe/Cargo.lock (this needs Debian bookworm's versions, or a reachable crate registry):
$differences"
}

main() {
    PY=${1:-.venv/bin/python}
    case $PY in  # absolute, since the build runs from inside the crate
        */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;;
        *) PY=$(command -v "$PY") ;;
    esac
    mkdir -p "$CRATE/target"
    install_oracle

    local want_sources build_dir wheel start
    want_sources=$(sources_hash)
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_sources $(installed_hash)" ]; then
        log "up to date (sources and Cargo.lock unchanged since the last build); skipping the build"
        exit 0
    fi
    : >"$LOGFILE"

    ensure_cargo
    "$PY" -m maturin --version >/dev/null 2>&1 || pip_install "maturin>=1.9.4,<2"

    # Earlier versions of this script wrote their source replacement into the crate itself.
    rm -f "$CRATE/.cargo/config.toml"
    if registry_reachable; then
        log "building with crates from the Rust crate registry, as locked"
        build_dir=$CRATE
    else
        log "the Rust crate registry is unreachable: building with Debian's packaged crates, checked against Cargo.lock"
        install_debian_crates
        prepare_debian_crate "$DEBIAN_CRATE"
        build_dir=$DEBIAN_CRATE
    fi

    log "compiling (release; under a minute cold) ..."
    start=$(date +%s)
    rm -rf "$CRATE/target/wheels"
    # maturin runs from inside the crate so that cargo sees its .cargo/config.toml.
    (cd "$build_dir" && "$PY" -m maturin build --release --locked --interpreter "$PY" --out "$CRATE/target/wheels") \
        >>"$LOGFILE" 2>&1 || { tail -n 30 "$LOGFILE" >&2; die "maturin build failed; full log in ${LOGFILE#"$ROOT"/}"; }
    wheel=$(ls "$CRATE"/target/wheels/rustbpe-*.whl)
    pip_install --reinstall --no-deps "$wheel"
    "$PY" -c 'import rustbpe; rustbpe.Tokenizer()' || die "the installed rustbpe does not import"
    echo "$want_sources $(installed_hash)" >"$STAMP"
    log "built and installed $(basename "$wheel") in $(($(date +%s) - start)) s"
}

# Sourcing the script (as tests/test_rustbpe_build.py does) defines the functions and runs nothing.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
