"""
The GPT-2 / GPT-4 reference encodings for tok_eval: reading the rank files
(nanochat.reference_encodings) and fetching them (`python -m dev.offline_data tiktoken`).
Hermetic tests use a tiny made-up rank file registered under a test name; the real rank files
are checked against known token ids only where `python -m dev.offline_data tiktoken` has fetched
them into the default artifact directory (~/.cache/nanochat/tiktoken_refs).
"""

import base64
import gzip
import hashlib
import io
import os
import random
import tarfile

import pytest
import regex

from nanochat.reference_encodings import (
    FETCH_COMMAND, GPT2_PATTERN, REFERENCE_ENCODINGS, REFS_DIRNAME, ReferenceEncoding, ReferenceEncodingUnavailable,
    build_encoding, get_reference_encoding, parse_tiktoken_ranks,
)

from dev.offline_data.fetch import extract_from_sdist
from dev.offline_data.tiktoken_refs import HELLO_WORLD_IDS, RANK_FILE_SOURCES

# where `python -m dev.offline_data tiktoken` puts them by default (the tests' own base dir is a temp dir)
USER_REFS_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nanochat", REFS_DIRNAME)


def tiny_rank_file():
    """256 byte tokens plus the merges 'he', 'll', 'hell', 'hello' in .tiktoken format."""
    tokens = [bytes([i]) for i in range(256)] + [b"he", b"ll", b"hell", b"hello"]
    return b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n" for rank, token in enumerate(tokens))


@pytest.fixture
def tiny_spec(monkeypatch):
    data = tiny_rank_file()
    spec = ReferenceEncoding(filename="tiny.tiktoken", sha256=hashlib.sha256(data).hexdigest(), pat_str=GPT2_PATTERN,
                             special_tokens={"<|endoftext|>": 260})
    monkeypatch.setitem(REFERENCE_ENCODINGS, "tiny-test-encoding", spec)
    return data


def test_parse_tiktoken_ranks_reads_base64_tokens_and_ranks():
    ranks = parse_tiktoken_ranks(tiny_rank_file())
    assert len(ranks) == 260 and ranks[b"\x00"] == 0 and ranks[b"hello"] == 259


def test_rank_file_with_wrong_hash_is_rejected():
    with pytest.raises(ReferenceEncodingUnavailable, match="sha256"):
        build_encoding("gpt2", tiny_rank_file())


def test_unknown_encoding_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown reference encoding"):
        get_reference_encoding("gpt5")


def test_local_rank_file_builds_a_working_encoding(tiny_spec, tmp_path):
    (tmp_path / "tiny.tiktoken").write_bytes(tiny_spec)
    enc = get_reference_encoding("tiny-test-encoding", refs_dir=str(tmp_path))
    assert enc.encode_ordinary("hello") == [259]
    assert enc.encode_ordinary("hello hell") == [259, 32, 258]
    assert enc.n_vocab == 261 and enc.decode(enc.encode_ordinary("hello, wörld")) == "hello, wörld"


def test_missing_rank_file_and_no_tiktoken_source_is_a_clear_error(tiny_spec, tmp_path):
    with pytest.raises(ReferenceEncodingUnavailable, match="python -m dev.offline_data tiktoken") as error:
        get_reference_encoding("tiny-test-encoding", refs_dir=str(tmp_path))
    assert "\n" not in str(error.value) and FETCH_COMMAND == "python -m dev.offline_data tiktoken"


def test_every_reference_encoding_has_a_fetch_source_and_a_self_check():
    assert set(RANK_FILE_SOURCES) == set(HELLO_WORLD_IDS) == set(REFERENCE_ENCODINGS)


def test_extract_from_sdist_finds_the_file_below_the_top_folder(tmp_path):
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        members = [("pkg-1.0/assets/ranks.tiktoken", b"plain"), ("pkg-1.0/data/ranks.tiktoken.gz", gzip.compress(b"zipped"))]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert extract_from_sdist(str(archive), "assets/ranks.tiktoken") == b"plain"
    assert extract_from_sdist(str(archive), "data/ranks.tiktoken.gz") == b"zipped"
    with pytest.raises(FileNotFoundError):
        extract_from_sdist(str(archive), "missing.tiktoken")


def test_gpt2_pattern_splits_like_tiktokens_r50k_pattern():
    from tiktoken_ext.openai_public import r50k_pat_str

    rng = random.Random(0)
    alphabet = list("abcXYZ019 '\n\t\r!?.,-_é你🙂") + ["'s", "'ll", "'ve", "  ", "\u00a0", "\u3000"]
    ours, theirs = regex.compile(GPT2_PATTERN), regex.compile(r50k_pat_str)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert ours.findall(text) == theirs.findall(text), text


@pytest.mark.skipif(not all(os.path.exists(os.path.join(USER_REFS_DIR, spec.filename)) for spec in REFERENCE_ENCODINGS.values()),
                    reason="reference rank files not fetched (run `python -m dev.offline_data tiktoken`)")
def test_fetched_reference_files_encode_known_ids():
    gpt2 = get_reference_encoding("gpt2", refs_dir=USER_REFS_DIR)
    assert gpt2.encode_ordinary("hello world") == [31373, 995]
    assert gpt2.n_vocab == 50257 and gpt2.eot_token == 50256
    cl100k = get_reference_encoding("cl100k_base", refs_dir=USER_REFS_DIR)
    assert cl100k.encode_ordinary("hello world") == [15339, 1917]
    assert cl100k.encode_ordinary("Hello, World!") == [9906, 11, 4435, 0]
    assert cl100k.n_vocab == 100277 and cl100k.eot_token == 100257
