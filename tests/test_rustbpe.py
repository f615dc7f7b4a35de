"""
rustbpe (our Rust BPE trainer, built from rustbpe/ by dev/build_rustbpe.sh) against references:
- a plain Python BPE trainer below: same regex split (the `regex` module), recount every pair at
  every step, most frequent pair wins, ties go to the smaller pair (as upstream's rustbpe);
- the PyPI wheel rustbpe 0.1.0 (in .oracle/rustbpe-0.1.0, run in a subprocess because the module
  name is the same as ours);
- tiktoken, given our mergeable ranks and pattern.
"""

import collections
import json
import os
import random
import subprocess
import sys

import pytest
import regex
import tiktoken

import rustbpe
from nanochat.tokenizer import SPLIT_PATTERN as NANOCHAT_PATTERN

if not hasattr(rustbpe, "Tokenizer"):  # found the crate directory rustbpe/ as an empty namespace package
    raise ImportError("the rustbpe extension is not installed: run `bash dev/build_rustbpe.sh .venv/bin/python`")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORACLE_DIR = os.path.join(REPO_ROOT, ".oracle", "rustbpe-0.1.0")
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# -----------------------------------------------------------------------------
# Corpora: small, so that the Python reference stays fast

ENGLISH_SENTENCES = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "I don't think we'll make it before sunset, but THEY'RE sure we've got enough time.",
    "It's a truth universally acknowledged that a good tokenizer is worth its weight in gold.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells!",
    "When the rain stopped, the children ran outside and splashed through every puddle.",
    "Researchers measured the temperature at noon, at midnight, and again at dawn.",
    "\"Where are you going?\" asked the old man. \"Home,\" said the traveller, \"at last.\"",
    "Books, maps and letters covered the table: nobody had cleaned it in weeks.",
    "He'd said he'll come, and I'm certain he'd never break a promise like that.",
    "Learning to read is learning to think; learning to write is learning to think twice.",
]


def english_corpus():
    rng = random.Random(0)
    return [" ".join(rng.sample(ENGLISH_SENTENCES, 4)) + "\n" for _ in range(40)]


UNICODE_CORPUS = [
    "自然语言处理是人工智能的一个重要分支。语言模型学习文字的规律。",
    "これは日本語の文章です。東京は日本の首都です。ひらがなとカタカナ。",
    "한국어 문장입니다. 서울은 한국의 수도입니다.",
    "Привет, как дела? Всё хорошо, спасибо! Москва — столица России.",
    "Καλημέρα κόσμε. Η γλώσσα είναι ζωντανή.",
    "مرحبا بالعالم. اللغة العربية جميلة.",
    "नमस्ते दुनिया। हिंदी एक सुंदर भाषा है।",
    "café naïve façade résumé coöperate Ærøskøbing straße",
    "combining: e\u0301 a\u0308 n\u0303 o\u0302 — and precomposed: é ä ñ ô",
] * 6

EMOJI_CORPUS = [
    "I love pizza 🍕🍕 and tacos 🌮! 😀😃😄😁",
    "Thumbs up 👍🏽👍🏿 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵🇧🇷",
    "fire 🔥🔥🔥 heart ❤️ sparkles ✨✨ rocket 🚀 to the moon 🌕",
    "mixed: hello🙂world, emoji-in-word te😀st, and ZWJ 🏳️‍🌈",
] * 10

DIGITS_CORPUS = [
    "1234567890123456789012345678901234567890",
    "pi = 3.14159265358979323846264338327950288419716939937510",
    "Call +1 (555) 123-4567 or 555.987.6543 before 2024-01-31 23:59:59.",
    "000000000000 111111 2222222 99999999999 1000000 1e10 0x1F 0b1010",
    "Arabic-Indic ٠١٢٣٤٥٦٧٨٩ and fullwidth １２３４５ and superscript ²³",
    "invoice 88231, 88232, 88233; totals 1,234,567.89 and 7,654,321.00",
] * 8

WHITESPACE_CORPUS = [
    "a  b\t\tc\n\n\nd \r\n e   \n  f",
    "    indented four\n        indented eight\n\ttab\n\t\ttwo tabs\n",
    "trailing spaces    \nblank line follows\n\n\n\nend   ",
    "no\u00a0break\u00a0\u00a0spaces and ideographic\u3000\u3000space",
    " " * 100 + "x" + "\n" * 30 + "y" + " \t " * 20,
    "line\r\nwindows\r\n\r\nstyle\r\n   \r\n",
] * 8

# Every pair occurs equally often: the order of merges is decided by tie-breaking alone.
TIES_CORPUS = ["ab cd ef gh ij kl mn op " * 5, "zy xw vu ts " * 5, "aaaa bbbb aaaa bbbb "] * 20


def random_corpus():
    """Random strings over tricky characters (spaces of every kind, line breaks, marks, emoji)."""
    rng = random.Random(1)
    alphabet = list(" \t\n\r\u00a0\u3000aZé'sSdLtT19٣.,!?-_😀中\u0301\u200d") + ["the", "ing", "  ", "\r\n"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(300)]


CORPORA = {
    "english": english_corpus(),
    "unicode": UNICODE_CORPUS,
    "emoji": EMOJI_CORPUS,
    "digits": DIGITS_CORPUS,
    "whitespace": WHITESPACE_CORPUS,
    "ties": TIES_CORPUS,
    "random": random_corpus(),
}
MERGES_PER_CORPUS = 300

UNSEEN_TEXTS = [
    "",
    "Hello, world! How's it going? I'd say we're fine.",
    "Unseen words: xylophone, quizzical, zephyr 42 4242 424242",
    "多言語テキスト mixed with English and 한국어 and emoji 🤖🦾",
    "   leading spaces and trailing ones   ",
    "\n\n\tweird\r\n\r\nwhitespace \u00a0\u2028 mix",
    "<|bos|> special strings are plain text here <|assistant_end|>",
]


def texts_to_encode(corpus):
    return corpus[:30] + UNSEEN_TEXTS


# -----------------------------------------------------------------------------
# The plain Python reference


def reference_train(texts, vocab_size, pattern):
    """Greedy BPE, recounting every pair at every step. Returns {pair: new_id}."""
    chunk_counts = collections.Counter()
    for text in texts:
        chunk_counts.update(regex.findall(pattern, text))
    words = [(list(chunk.encode("utf-8")), count) for chunk, count in chunk_counts.items()]
    merges = {}
    for new_id in range(256, vocab_size):
        pair_counts = collections.Counter()
        for ids, count in words:
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges[best] = new_id
        words = [(merge_pair(ids, best, new_id), count) for ids, count in words]
    return merges


def merge_pair(ids, pair, new_id):
    """Replace the non-overlapping occurrences of pair, left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_ranks(merges):
    token_bytes = [bytes([b]) for b in range(256)]
    for (a, b), new_id in sorted(merges.items(), key=lambda item: item[1]):
        assert new_id == len(token_bytes)
        token_bytes.append(token_bytes[a] + token_bytes[b])
    return [(token, rank) for rank, token in enumerate(token_bytes)]


def reference_encode(text, merges, pattern):
    """Per chunk: start from bytes, merge the adjacent pair with the lowest merge id until none applies."""
    out = []
    for chunk in regex.findall(pattern, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            candidates = [(merges[pair], i) for i, pair in enumerate(zip(ids, ids[1:])) if pair in merges]
            if not candidates:
                break
            new_id, i = min(candidates)
            ids[i:i + 2] = [new_id]
        out.extend(ids)
    return out


def ranks(tokenizer):
    return [(bytes(token), rank) for token, rank in tokenizer.get_mergeable_ranks()]


def trained(texts, vocab_size, pattern=None, **kwargs):
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(texts, vocab_size, pattern=pattern, **kwargs)
    return tokenizer


@pytest.fixture(scope="module")
def reference_merges():
    """{corpus name: reference merges}, with nanochat's pattern; computed once."""
    return {name: reference_train(texts, 256 + MERGES_PER_CORPUS, NANOCHAT_PATTERN) for name, texts in CORPORA.items()}


# -----------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("name", CORPORA)
def test_merges_equal_python_reference(name, reference_merges):
    ours = trained(CORPORA[name], 256 + MERGES_PER_CORPUS, NANOCHAT_PATTERN)
    assert ranks(ours) == reference_ranks(reference_merges[name])


def test_merges_equal_python_reference_with_default_gpt4_pattern():
    texts = CORPORA["digits"] + CORPORA["english"][:10]
    assert ranks(trained(texts, 400)) == reference_ranks(reference_train(texts, 400, GPT4_PATTERN))


def test_ties_go_to_the_smaller_pair():
    # "ab" and " cd" occur 10 times each: (32, 99) < (97, 98) < (99, 100), then ' cd' and 'ab' tie again.
    tokenizer = trained(["ab cd"] * 10, 259)
    assert [token for token, _ in ranks(tokenizer)[256:]] == [b" c", b"ab", b" cd"]


def test_custom_pattern_equals_python_reference():
    pattern = r"[a-zA-Z]+|[0-9]+|\s+|[^\sa-zA-Z0-9]+"
    texts = CORPORA["english"][:10] + CORPORA["digits"][:6]
    assert ranks(trained(texts, 350, pattern)) == reference_ranks(reference_train(texts, 350, pattern))


def test_fast_split_path_equals_generic_regex_engine():
    # The GPT-4 style pattern runs on a fast path (rustbpe/src/split.rs); wrapping it in a group
    # changes nothing about its meaning but sends it through fancy-regex.
    texts = [text for corpus in CORPORA.values() for text in corpus]
    for pattern in (NANOCHAT_PATTERN, GPT4_PATTERN):
        fast, generic = trained(texts, 1200, pattern), trained(texts, 1200, f"(?:{pattern})")
        assert ranks(fast) == ranks(generic)
        assert generic.get_pattern() == f"(?:{pattern})"
        for text in texts + UNSEEN_TEXTS:
            assert fast.encode(text) == generic.encode(text)


def test_buffer_size_does_not_change_merges():
    texts = CORPORA["english"] + CORPORA["unicode"]
    assert ranks(trained(texts, 600, buffer_size=3)) == ranks(trained(texts, 600))
    assert ranks(trained(iter(texts), 600, buffer_size=1)) == ranks(trained(texts, 600))


def test_mergeable_ranks_layout_and_vocab_size():
    tokenizer = trained(CORPORA["english"], 500)
    ranks_list = ranks(tokenizer)
    assert ranks_list[:256] == [(bytes([b]), b) for b in range(256)]
    assert [rank for _, rank in ranks_list] == list(range(500))
    assert tokenizer.vocab_size == 500
    assert tokenizer.get_pattern() == GPT4_PATTERN


def test_training_stops_when_no_pair_is_left():
    tokenizer = trained(["ab ab ab"], 1000)  # chunks "ab" and " ab" (twice)
    assert [token for token, _ in ranks(tokenizer)[256:]] == [b"ab", b" ab"]
    assert tokenizer.vocab_size == 258


def test_fresh_tokenizer_and_retraining_replaces_everything():
    tokenizer = rustbpe.Tokenizer()
    assert tokenizer.vocab_size == 256 and tokenizer.get_pattern() == "" and tokenizer.encode("") == []
    tokenizer.train_from_iterator(CORPORA["english"], 400)
    tokenizer.train_from_iterator(["xyxyxy"], 300, pattern=r"\w+")
    assert tokenizer.get_pattern() == r"\w+"
    assert [token for token, _ in ranks(tokenizer)[256:]] == [b"xy", b"xyxy", b"xyxyxy"]


# -----------------------------------------------------------------------------
# Against PyPI rustbpe 0.1.0

ORACLE_SCRIPT = """
import json, sys
import rustbpe
assert rustbpe.__file__.startswith(sys.argv[1]), f"expected the oracle, got {rustbpe.__file__}"
jobs = json.load(sys.stdin)
out = []
for texts, vocab_size, pattern in jobs:
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(texts, vocab_size, pattern=pattern)
    out.append([[bytes(token).hex(), rank] for token, rank in tokenizer.get_mergeable_ranks()])
json.dump(out, sys.stdout)
"""


def oracle_ranks(jobs):
    """Train PyPI rustbpe 0.1.0 on each (texts, vocab_size, pattern) in a subprocess."""
    if not os.path.isdir(os.path.join(ORACLE_DIR, "rustbpe")):
        pytest.skip(f"PyPI rustbpe 0.1.0 is not installed in {ORACLE_DIR} (dev/build_rustbpe.sh puts it there "
                    "when a package registry is reachable)")
    env = dict(os.environ, PYTHONPATH=ORACLE_DIR)
    result = subprocess.run([sys.executable, "-c", ORACLE_SCRIPT, ORACLE_DIR], input=json.dumps(jobs),
                            capture_output=True, text=True, env=env, check=True)
    return [[(bytes.fromhex(token), rank) for token, rank in one] for one in json.loads(result.stdout)]


def test_merges_equal_pypi_rustbpe():
    everything = [text for corpus in CORPORA.values() for text in corpus]
    jobs = [(texts, 256 + 2 * MERGES_PER_CORPUS, pattern)
            for texts in CORPORA.values() for pattern in (None, NANOCHAT_PATTERN)]
    jobs += [(everything, 3000, None), (everything, 3000, NANOCHAT_PATTERN), (everything, 256, None)]
    for (texts, vocab_size, pattern), expected in zip(jobs, oracle_ranks(jobs)):
        assert ranks(trained(texts, vocab_size, pattern)) == expected, (vocab_size, pattern, texts[:2])


@pytest.mark.slow
def test_merges_equal_pypi_rustbpe_on_a_larger_corpus():
    rng = random.Random(2)
    pieces = [text for corpus in CORPORA.values() for text in corpus]
    texts = ["".join(rng.choice(pieces)[: rng.randint(1, 200)] for _ in range(30)) for _ in range(2000)]
    jobs = [(texts, 4096, NANOCHAT_PATTERN)]
    assert ranks(trained(texts, 4096, NANOCHAT_PATTERN)) == oracle_ranks(jobs)[0]


# -----------------------------------------------------------------------------
# Encoding and decoding


@pytest.mark.parametrize("name", CORPORA)
def test_encode_equals_python_reference(name, reference_merges):
    tokenizer = trained(CORPORA[name], 256 + MERGES_PER_CORPUS, NANOCHAT_PATTERN)
    for text in texts_to_encode(CORPORA[name]):
        assert tokenizer.encode(text) == reference_encode(text, reference_merges[name], NANOCHAT_PATTERN), text


@pytest.mark.parametrize("name", CORPORA)
def test_tiktoken_from_mergeable_ranks_encodes_like_rustbpe(name):
    tokenizer = trained(CORPORA[name], 256 + MERGES_PER_CORPUS, NANOCHAT_PATTERN)
    token_ranks = ranks(tokenizer)
    assert len({token for token, _ in token_ranks}) == len(token_ranks)  # else tiktoken would drop one
    encoding = tiktoken.Encoding(name="test", pat_str=tokenizer.get_pattern(), mergeable_ranks=dict(token_ranks),
                                 special_tokens={})
    for text in texts_to_encode(CORPORA[name]):
        assert encoding.encode_ordinary(text) == tokenizer.encode(text), text


def test_batch_encode_equals_encode_of_each_text():
    tokenizer = trained(CORPORA["english"] + CORPORA["emoji"], 500)
    texts = ["", *CORPORA["emoji"][:4], *UNSEEN_TEXTS, ""]
    assert tokenizer.batch_encode(texts) == [tokenizer.encode(text) for text in texts]
    assert tokenizer.batch_encode([]) == []


def test_decode_round_trips():
    tokenizer = trained([text for corpus in CORPORA.values() for text in corpus], 800)
    for corpus in CORPORA.values():
        for text in texts_to_encode(corpus):
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_rejects_unknown_ids_and_broken_utf8():
    tokenizer = trained(CORPORA["english"], 300)
    with pytest.raises(ValueError, match="Unknown token id: 300"):
        tokenizer.decode([104, 300])
    with pytest.raises(UnicodeDecodeError):
        tokenizer.decode([0xE4, 0xB8])  # the first two bytes of a three-byte character


# -----------------------------------------------------------------------------
# Bad input is a Python exception, never a crash


def test_bad_input_raises_clear_python_exceptions():
    tokenizer = trained(CORPORA["english"], 300)
    with pytest.raises(ValueError, match="vocab_size must be at least 256"):
        tokenizer.train_from_iterator(["abc"], 255)
    with pytest.raises(ValueError, match="Invalid regex pattern"):
        tokenizer.train_from_iterator(["abc"], 300, pattern="(unclosed")
    with pytest.raises(TypeError, match="item 2 of the iterator is of type int"):
        tokenizer.train_from_iterator(["a", "b", 3, "d"], 300)
    with pytest.raises(TypeError, match="item 0 of the iterator is of type bytes"):
        tokenizer.train_from_iterator([b"abc"], 300)
    with pytest.raises(TypeError, match="expected an iterable of str, got int"):
        tokenizer.train_from_iterator(5, 300)
    with pytest.raises(ValueError, match="buffer_size must be at least 1"):
        tokenizer.train_from_iterator(["abc"], 300, buffer_size=0)
    with pytest.raises(OverflowError):
        tokenizer.train_from_iterator(["abc"], -1)
    with pytest.raises(TypeError, match="single str"):
        tokenizer.batch_encode("abc")
    with pytest.raises(TypeError):
        tokenizer.batch_encode(["abc", 5])
    with pytest.raises(TypeError):
        tokenizer.encode(5)
    # None of the failures touched the trained state.
    assert tokenizer.vocab_size == 300 and tokenizer.get_pattern() == GPT4_PATTERN


def test_errors_raised_by_the_iterator_propagate():
    def texts():
        yield "fine"
        raise KeyError("broken source")

    with pytest.raises(KeyError, match="broken source"):
        rustbpe.Tokenizer().train_from_iterator(texts(), 300)
