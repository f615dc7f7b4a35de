"""
The Rust build (dev/build_rustbpe.sh, rustbpe/Cargo.toml, rustbpe/Cargo.lock) holds online and
offline, on the oldest toolchain we claim (Debian 12: rustc 1.63):
- the lock: format 3, every crate from the registry with its checksum; Debian bookworm's versions
  with Debian's checksums where Debian keeps them, plus the crates only the registry's manifests
  ask for; Cargo.toml's rust-version is at most 1.63;
- offline: the script locks Debian's packaged crates in a scratch crate, finds them equal to
  Cargo.lock (and stops when they are not), and that lock builds with --locked --offline;
- with no cargo: rustup when its site answers, else Debian's cargo; shown with fake curl/apt-get/
  sudo/cargo on a PATH without cargo, which record their calls (nothing is installed).
CPU only, no network. The cargo builds need Debian's packaged crates (dev/install.sh installs them
on a machine that cannot reach the crate registry) and skip without them.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CRATE = REPO_ROOT / "rustbpe"
SCRIPT = REPO_ROOT / "dev" / "build_rustbpe.sh"
DEBIAN_REGISTRY = Path("/usr/share/cargo/registry")
REGISTRY_SOURCE = "registry+https://github.com/rust-lang/crates.io-index"
DEBIAN_NO_CHECKSUM = "Could not get crate checksum"  # Debian's placeholder for the crates it patched
BASH = shutil.which("bash")

# Locked crates that Debian bookworm does not package, because its patches drop them from the
# manifests that ask for them (non-Linux targets: parking_lot_core's windows-sys and
# redox_syscall, getrandom's wasi, num_cpus's hermit-abi; crossbeam-epoch's memoffset 0.7, relaxed
# to 0.6). The registry's manifests keep them, so an online --locked build fails without them.
REGISTRY_ONLY = {
    ("memoffset", "0.7.1"),
    ("windows-sys", "0.36.1"),
    ("windows_aarch64_msvc", "0.36.1"),
    ("windows_i686_gnu", "0.36.1"),
    ("windows_i686_msvc", "0.36.1"),
    ("windows_x86_64_gnu", "0.36.1"),
    ("windows_x86_64_msvc", "0.36.1"),
    ("redox_syscall", "0.2.16"),
    ("bitflags", "1.3.2"),
    ("wasi", "0.11.0+wasi-snapshot-preview1"),
    ("hermit-abi", "0.1.19"),
}

needs_debian_crates = pytest.mark.skipif(
    not (DEBIAN_REGISTRY / "pyo3-0.17.3").is_dir(),
    reason="Debian's packaged crates are not installed (dev/install.sh installs them when the crate registry is unreachable)",
)
needs_cargo = pytest.mark.skipif(shutil.which("cargo") is None, reason="cargo is not installed")


def load_lock(path=CRATE / "Cargo.lock"):
    with open(path, "rb") as f:
        return tomllib.load(f)


def registry_crates(lock):
    return {(p["name"], p["version"]): p for p in lock["package"] if "source" in p}


def run_sourced(commands, env=None, **kwargs):
    """Source the build script (which defines its functions and runs nothing) and run `commands`."""
    return subprocess.run([BASH, "-c", f'source "{SCRIPT}"\n{commands}'], env=env, capture_output=True, text=True,
                          timeout=120, **kwargs)


# -----------------------------------------------------------------------------
# The manifest and the lock


def test_rust_version_is_set_and_at_most_debian_12s_rustc():
    with open(CRATE / "Cargo.toml", "rb") as f:
        rust_version = tomllib.load(f)["package"]["rust-version"]
    assert tuple(int(part) for part in rust_version.split(".")) <= (1, 63)


def test_lock_is_format_3_and_every_crate_comes_from_the_registry_with_a_checksum():
    lock = load_lock()
    assert lock["version"] == 3  # Debian 12's cargo (1.65) reads formats up to 3
    crates = [p for p in lock["package"] if p["name"] != "rustbpe"]
    assert len(crates) == len(registry_crates(lock)) > 30
    for p in crates:
        assert p["source"] == REGISTRY_SOURCE, p
        assert re.fullmatch(r"[0-9a-f]{64}", p["checksum"]), p


@needs_debian_crates
def test_lock_pins_debians_crates_with_debians_checksums():
    matched, patched, not_packaged = 0, set(), set()
    for (name, version), p in registry_crates(load_lock()).items():
        packaged = DEBIAN_REGISTRY / f"{name}-{version}"
        if not packaged.is_dir():
            not_packaged.add((name, version))
            continue
        checksum = json.loads((packaged / ".cargo-checksum.json").read_text())["package"]
        if checksum == DEBIAN_NO_CHECKSUM:  # Debian patched it; its version still is the locked one
            patched.add(name)
            continue
        assert p["checksum"] == checksum, f"{name} {version}: the lock's checksum is not the one Debian recorded"
        matched += 1
    assert not_packaged == REGISTRY_ONLY
    assert matched >= 20 and "pyo3" in patched


# -----------------------------------------------------------------------------
# Offline: Debian's packaged crates, checked against the lock, built --locked


def prepare_debian_crate(tmp_path):
    """The script's scratch crate for the offline build, under tmp_path; fails if the script stops."""
    scratch = tmp_path / "debian-crate"
    result = run_sourced(f'LOGFILE="{tmp_path}/build.log"; prepare_debian_crate "{scratch}"')
    assert result.returncode == 0, result.stderr + (tmp_path / "build.log").read_text()
    return scratch


@needs_debian_crates
@needs_cargo
def test_debians_crates_lock_to_the_versions_in_cargo_lock(tmp_path):
    scratch = prepare_debian_crate(tmp_path)
    debian = registry_crates(load_lock(scratch / "Cargo.lock"))
    assert set(debian) <= set(registry_crates(load_lock())) and len(debian) > 30
    # cargo resolves the build to exactly that lock: --locked fails if it would change a line.
    resolved = subprocess.run(["cargo", "metadata", "--locked", "--offline", "--format-version", "1"],
                              cwd=scratch, capture_output=True, text=True, timeout=120)
    assert resolved.returncode == 0, resolved.stderr
    assert {(p["name"], p["version"]) for p in json.loads(resolved.stdout)["packages"]} - {("rustbpe", "0.1.0")} == set(debian)


@pytest.mark.slow  # a cold compile (20-30 s on 2 cores); under a second warm, in rustbpe/target/test-check-locked
@needs_debian_crates
@needs_cargo
def test_debians_crates_build_locked_offline(tmp_path):
    scratch = prepare_debian_crate(tmp_path)
    lock_before = (scratch / "Cargo.lock").read_text()
    env = dict(os.environ, CARGO_TARGET_DIR=str(CRATE / "target" / "test-check-locked"), PYO3_PYTHON=sys.executable)
    check = subprocess.run(["cargo", "check", "--locked", "--offline", "--lib", "--features", "extension-module"],
                           cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stderr[-3000:]
    assert (scratch / "Cargo.lock").read_text() == lock_before


@needs_debian_crates
@needs_cargo
@pytest.mark.parametrize("change, message", [
    (lambda s: s.replace('name = "rayon"\nversion = "1.6.1"', 'name = "rayon"\nversion = "1.6.0"'),
     "rayon 1.6.1: Cargo.lock pins another version"),
    (lambda s: re.sub(r'(name = "libc"\nversion = "[^"]+"\nsource = "[^"]+"\nchecksum = ")[0-9a-f]{8}', r"\g<1>00000000", s),
     "checksum differs from Cargo.lock"),
], ids=["another version", "another checksum"])
def test_debians_crates_that_differ_from_the_lock_stop_the_build(tmp_path, change, message):
    crate = tmp_path / "rustbpe"
    shutil.copytree(CRATE, crate, ignore=shutil.ignore_patterns("target"))
    lock = crate / "Cargo.lock"
    changed = change(lock.read_text())
    assert changed != lock.read_text()
    lock.write_text(changed)
    result = run_sourced(f'CRATE="{crate}"; LOGFILE="{tmp_path}/build.log"; prepare_debian_crate "{tmp_path}/scratch"')
    assert result.returncode == 1
    assert "Debian's packaged crates differ from rustbpe/Cargo.lock" in result.stderr and message in result.stderr


def test_build_stamp_changes_with_the_lock(tmp_path):
    crate = tmp_path / "rustbpe"
    shutil.copytree(CRATE, crate, ignore=shutil.ignore_patterns("target"))
    hash_sources = f'CRATE="{crate}"; sources_hash'
    before = run_sourced(hash_sources).stdout
    with open(crate / "Cargo.lock", "a") as f:
        f.write("\n")
    after = run_sourced(hash_sources).stdout
    assert len(before.strip()) == 64 and before != after


# -----------------------------------------------------------------------------
# Which toolchain gets installed when there is no cargo, and which crate source is used


FAKE_CURL = r"""#!/bin/bash
echo "curl $*" >>"$CALLS"
case " $* " in *" -o /dev/null "*) exit "${CURL_PROBE_RC:-0}" ;; esac
# The installer download: a stand-in for rustup's shell script, run by `sh -s -- <args>`.
cat <<'EOF'
echo "rustup-init $*" >>"$CALLS"
mkdir -p "$HOME/.cargo/bin"
printf '#!/bin/bash\necho "cargo $*" >>"$CALLS"\n' >"$HOME/.cargo/bin/cargo"
chmod +x "$HOME/.cargo/bin/cargo"
EOF
"""
FAKE_APT_GET = r"""#!/bin/bash
echo "apt-get $*" >>"$CALLS"
case " $* " in *" install "*)
    printf '#!/bin/bash\necho "cargo $*" >>"$CALLS"\n' >"$(dirname "$0")/cargo"
    chmod +x "$(dirname "$0")/cargo" ;;
esac
"""
FAKE_SUDO = '#!/bin/bash\n[ "$1" = -n ] && shift\nexec "$@"\n'  # when the tests do not run as root


def fake_machine(tmp_path, fakes):
    """A PATH with the given fake commands and a few real tools, but no cargo; a fresh HOME."""
    fake_bin, tools = tmp_path / "fake-bin", tmp_path / "tools"
    fake_bin.mkdir()
    tools.mkdir()
    for name, text in fakes.items():
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    for tool in ("bash", "sh", "dirname", "id", "mkdir", "chmod", "cat", "grep"):
        (tools / tool).symlink_to(shutil.which(tool))
    (tmp_path / "home").mkdir()
    env = {"PATH": f"{fake_bin}:{tools}", "HOME": str(tmp_path / "home"), "CALLS": str(tmp_path / "calls")}
    (tmp_path / "calls").touch()
    return env, fake_bin


@pytest.mark.parametrize("case", ["online", "rustup site unreachable", "no curl"])
def test_missing_cargo_installs_rustup_online_and_debians_cargo_offline(tmp_path, case):
    fakes = {"apt-get": FAKE_APT_GET, "sudo": FAKE_SUDO}
    if case != "no curl":
        fakes["curl"] = FAKE_CURL
    env, fake_bin = fake_machine(tmp_path, fakes)
    if case == "rustup site unreachable":
        env["CURL_PROBE_RC"] = "6"  # curl's "could not resolve host"
    result = run_sourced(f'LOGFILE="{tmp_path}/build.log"; ensure_cargo; command -v cargo', env=env)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    if case == "online":
        assert calls[0].startswith("curl ") and calls[0].endswith("-o /dev/null https://sh.rustup.rs")
        assert calls[1].startswith("curl ") and calls[1].endswith("https://sh.rustup.rs")
        assert calls[2:] == ["rustup-init -y --profile minimal --default-toolchain stable"]
        assert result.stdout.strip().endswith(f"{env['HOME']}/.cargo/bin/cargo")
    else:
        assert all("-o /dev/null" in call for call in calls if call.startswith("curl "))  # the probe at most
        assert not any(call.startswith("rustup-init") for call in calls)
        assert calls[-2:] == ["apt-get update -qq", "apt-get install -y -qq cargo"]
        assert result.stdout.strip().endswith(f"{fake_bin}/cargo")


def test_missing_cargo_with_no_way_to_install_it_says_what_to_do(tmp_path):
    env, _ = fake_machine(tmp_path, {})
    result = run_sourced(f'LOGFILE="{tmp_path}/build.log"; ensure_cargo', env=env)
    assert result.returncode == 1
    assert "install Rust (https://rustup.rs) and re-run" in result.stderr


FAKE_CARGO_FETCH = '#!/bin/bash\necho "cargo $*" >>"$CALLS"\necho "$FETCH_OUTPUT" >&2\nexit "$FETCH_RC"\n'


@pytest.mark.parametrize("fetch_output, fetch_rc, expected", [
    ("", 0, "online"),
    ("warning: spurious network error: [6] Could not resolve hostname", 101, "offline"),
    ("error: cannot update the lock file rustbpe/Cargo.lock because --locked was passed to prevent this", 101, "stop"),
    ("error: the lock file rustbpe/Cargo.lock needs to be updated but --locked was passed to prevent this", 101, "stop"),
    ("unable to verify that `memoffset v0.7.1` is the same as when the lockfile was generated", 101, "stop"),
])
def test_crate_source_is_the_registry_when_fetch_works_debian_when_unreachable(tmp_path, fetch_output, fetch_rc, expected):
    env, _ = fake_machine(tmp_path, {"cargo": FAKE_CARGO_FETCH})
    env.update(FETCH_OUTPUT=fetch_output, FETCH_RC=str(fetch_rc))
    result = run_sourced(f'LOGFILE="{tmp_path}/build.log"; if registry_reachable; then echo online; else echo offline; fi',
                         env=env)
    assert (tmp_path / "calls").read_text() == "cargo fetch --locked\n"
    if expected == "stop":  # a lock that cargo would change is a bug to fix, not a reason to go offline
        assert result.returncode == 1 and "rustbpe/Cargo.lock does not match" in result.stderr
    else:
        assert result.returncode == 0 and result.stdout.strip() == expected


# -----------------------------------------------------------------------------
# Debian 12's own toolchain (only where it is installed: apt-get install cargo rustc)


def debian_rustc_version():
    try:
        return subprocess.run(["/usr/bin/rustc", "--version"], capture_output=True, text=True).stdout.split()[1]
    except (OSError, IndexError):
        return None


@pytest.mark.slow
@needs_debian_crates
@pytest.mark.skipif(debian_rustc_version() != "1.63.0", reason="Debian 12's rustc 1.63 is not in /usr/bin")
def test_debian_12s_cargo_and_rustc_build_the_lock_locked_offline(tmp_path):
    scratch = prepare_debian_crate(tmp_path)
    env = dict(os.environ, PATH="/usr/bin:/bin", RUSTC="/usr/bin/rustc", PYO3_PYTHON=sys.executable,
               CARGO_TARGET_DIR=str(CRATE / "target" / "test-check-rustc-1.63"))
    check = subprocess.run(["/usr/bin/cargo", "check", "--locked", "--offline", "--lib", "--features", "extension-module"],
                           cwd=scratch, env=env, capture_output=True, text=True, timeout=900)
    assert check.returncode == 0, check.stderr[-3000:]
