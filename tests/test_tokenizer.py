"""
nanochat.tokenizer: a tiny tokenizer trained in-process on generated text (no files, no network).
Checks the encoding contract (round trips, special tokens, prepend/append, batching), the chat
rendering and its masks against hand-built references, every malformed-conversation error,
token_bytes, save/load, and the HuggingFaceTokenizer wrapper.
"""

import random

import pytest
import torch

from nanochat.tokenizer import (
    SPECIAL_TOKENS, SPLIT_PATTERN, HuggingFaceTokenizer, RustBPETokenizer, compute_token_bytes,
    get_token_bytes, get_tokenizer,
)

VOCAB_SIZE = 512


def make_corpus(num_docs=600, seed=0):
    """Zipf-distributed made-up words plus contractions, numbers, punctuation and non-Latin scripts."""
    rng = random.Random(seed)
    syllables = ["ka", "ro", "mi", "te", "su", "lan", "dor", "vi", "ex", "qu", "th", "ing", "er", "on", "al", "st"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    weights = [1 / (rank + 1) for rank in range(len(words))]
    extras = ["I'm", "you're", "don't", "3.14", "2024", "1,000", "ünïcödé", "你好", "世界", "Привет", "🙂",
              "—", "...", "(x)", "{y}", "\n", "\t", "  "]
    docs = []
    for _ in range(num_docs):
        pieces = [rng.choices(words, weights)[0] if rng.random() < 0.85 else rng.choice(extras)
                  for _ in range(rng.randint(20, 120))]
        docs.append(" ".join(pieces).capitalize() + rng.choice([".", "!", "?", "\n"]))
    return docs


def random_unicode_strings(count, seed=0):
    """Strings mixing ASCII, whitespace, Latin, Cyrillic, CJK, Hangul, emoji, combining marks and any scalar value."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x00, 0x20), (0xA0, 0x24F), (0x400, 0x4FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
              (0x1F300, 0x1FAFF), (0x300, 0x36F), (0x0, 0x10FFFF)]

    def code_point():
        while True:
            low, high = rng.choice(ranges)
            cp = rng.randint(low, high)
            if not 0xD800 <= cp <= 0xDFFF:  # surrogates are not valid in UTF-8 text
                return chr(cp)

    return ["".join(code_point() for _ in range(rng.randint(0, 30))) for _ in range(count)]


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return RustBPETokenizer.train_from_iterator(iter(corpus), VOCAB_SIZE)


@pytest.fixture(scope="module")
def hf_tokenizer(corpus):
    return HuggingFaceTokenizer.train_from_iterator(iter(corpus), VOCAB_SIZE)


SAMPLE_TEXTS = ["", " ", "hello world", "Kalandor ro mite!", "I'm 12345 years old...\n\n\tindented",
                "你好，世界 🙂 Привет", "<|bos|> is not special here", "trailing spaces   ", "\r\n\r\n"]


# -----------------------------------------------------------------------------
# Training and encoding


def test_vocab_size_is_exactly_what_was_asked(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB_SIZE


def test_first_256_tokens_are_the_single_bytes(tokenizer):
    assert all(tokenizer.decode_single_token_bytes(i) == bytes([i]) for i in range(256))


def test_too_small_vocab_is_rejected_with_a_clear_error(corpus):
    with pytest.raises(ValueError, match="at least 265"):
        RustBPETokenizer.train_from_iterator(iter(corpus[:5]), 256 + len(SPECIAL_TOKENS) - 1)


def test_tiktoken_encoding_matches_the_rustbpe_trainer(tokenizer, corpus):
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(corpus), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    assert trainer.get_pattern() == SPLIT_PATTERN
    for text in SAMPLE_TEXTS + corpus[:50]:
        assert tokenizer.encode(text) == trainer.encode(text)


def test_round_trip_on_sample_texts(tokenizer):
    for text in SAMPLE_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_on_random_unicode(tokenizer):
    for text in random_unicode_strings(1000):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_take_the_last_ids_in_order(tokenizer):
    ids = [tokenizer.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB_SIZE - len(SPECIAL_TOKENS), VOCAB_SIZE))
    assert tokenizer.get_special_tokens() == set(SPECIAL_TOKENS)
    assert tokenizer.get_bos_token_id() == tokenizer.encode_special("<|bos|>")
    assert [tokenizer.id_to_token(i) for i in ids] == SPECIAL_TOKENS


def test_special_token_strings_in_text_are_plain_text(tokenizer):
    special_ids = {tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
    text = "".join(SPECIAL_TOKENS) + " hi <|assistant_end|>"
    ids = tokenizer.encode(text)
    assert not special_ids & set(ids)
    assert tokenizer.decode(ids) == text


def test_prepend_and_append_accept_an_id_or_a_special_string(tokenizer):
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    plain = tokenizer.encode("hello world")
    assert tokenizer.encode("hello world", prepend=bos, append=end) == [bos] + plain + [end]
    assert tokenizer.encode("hello world", prepend="<|bos|>", append="<|assistant_end|>") == [bos] + plain + [end]
    assert tokenizer("hello world", prepend="<|bos|>") == [bos] + plain
    rows = tokenizer.encode(["a b", "", "c"], prepend="<|bos|>", append=end)
    assert rows == [[bos] + tokenizer.encode(t) + [end] for t in ["a b", "", "c"]]


def test_batch_encode_equals_one_by_one(tokenizer, corpus):
    texts = SAMPLE_TEXTS + corpus[:100]
    assert tokenizer.encode(texts, num_threads=2) == [tokenizer.encode(t) for t in texts]


def test_encode_rejects_other_input_types(tokenizer):
    with pytest.raises(TypeError, match="str or a list"):
        tokenizer.encode(("a", "b"))


# -----------------------------------------------------------------------------
# Conversations


def special(tok, name):
    return tok.encode_special(name)


def reference_render(tok, turns):
    """Plain reference: [(role, [(kind, text)])] -> ids, mask, written out token by token."""
    ids, mask = [tok.get_bos_token_id()], [0]
    for role, parts in turns:
        if role == "user":
            body = [special(tok, "<|user_start|>")] + tok.encode(parts) + [special(tok, "<|user_end|>")]
            ids += body
            mask += [0] * len(body)
            continue
        ids.append(special(tok, "<|assistant_start|>"))
        mask.append(0)
        for kind, text in parts:
            if kind == "text":
                body, m = tok.encode(text), 1
            elif kind == "python":
                body, m = [special(tok, "<|python_start|>")] + tok.encode(text) + [special(tok, "<|python_end|>")], 1
            else:
                body, m = [special(tok, "<|output_start|>")] + tok.encode(text) + [special(tok, "<|output_end|>")], 0
            ids += body
            mask += [m] * len(body)
        ids.append(special(tok, "<|assistant_end|>"))
        mask.append(1)
    return ids, mask


CHAT = {"messages": [
    {"role": "user", "content": "What is 12 * 34?"},
    {"role": "assistant", "content": "It is 408."},
    {"role": "user", "content": "And 5 ** 3?"},
    {"role": "assistant", "content": "That is 125!"},
]}

TOOL_CHAT = {"messages": [
    {"role": "user", "content": "Compute 1234 + 4321 please."},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me check: "},
        {"type": "python", "text": "1234 + 4321"},
        {"type": "python_output", "text": "5555"},
        {"type": "text", "text": " so the answer is 5555."},
    ]},
]}


@pytest.mark.parametrize("tok_name", ["tokenizer", "hf_tokenizer"])
def test_render_matches_the_reference_token_by_token(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    expected = reference_render(tok, [("user", "What is 12 * 34?"), ("assistant", [("text", "It is 408.")]),
                                      ("user", "And 5 ** 3?"), ("assistant", [("text", "That is 125!")])])
    assert tok.render_conversation(CHAT) == expected


def test_mask_covers_exactly_the_assistant_content_and_its_end_token(tokenizer):
    ids, mask = tokenizer.render_conversation(CHAT)
    assert len(ids) == len(mask)
    trained = [i for i, m in zip(ids, mask) if m == 1]
    end = "<|assistant_end|>"
    assert tokenizer.decode(trained) == "It is 408." + end + "That is 125!" + end
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m == 0]).startswith("<|bos|><|user_start|>What is")


def test_tool_parts_have_exact_ids_and_masks(tokenizer):
    ids, mask = tokenizer.render_conversation(TOOL_CHAT)
    expected = reference_render(tokenizer, [
        ("user", "Compute 1234 + 4321 please."),
        ("assistant", [("text", "Let me check: "), ("python", "1234 + 4321"), ("python_output", "5555"),
                       ("text", " so the answer is 5555.")]),
    ])
    assert (ids, mask) == expected
    # The tool's output (with its delimiters) is never trained on; the python call is.
    output_start, output_end = special(tokenizer, "<|output_start|>"), special(tokenizer, "<|output_end|>")
    span = slice(ids.index(output_start), ids.index(output_end) + 1)
    assert set(mask[span]) == {0}
    python_start, python_end = special(tokenizer, "<|python_start|>"), special(tokenizer, "<|python_end|>")
    assert set(mask[ids.index(python_start):ids.index(python_end) + 1]) == {1}


def test_system_message_is_merged_into_the_first_user_message(tokenizer):
    with_system = {"messages": [{"role": "system", "content": "You are terse."}] + CHAT["messages"]}
    merged = {"messages": [{"role": "user", "content": "You are terse.\n\nWhat is 12 * 34?"}] + CHAT["messages"][1:]}
    assert tokenizer.render_conversation(with_system) == tokenizer.render_conversation(merged)
    assert with_system["messages"][0]["role"] == "system"  # the caller's conversation is left untouched


def test_truncation_keeps_a_prefix_of_max_tokens(tokenizer):
    full_ids, full_mask = tokenizer.render_conversation(TOOL_CHAT)
    for max_tokens in (1, 5, len(full_ids) - 1, len(full_ids), len(full_ids) + 10):
        ids, mask = tokenizer.render_conversation(TOOL_CHAT, max_tokens=max_tokens)
        assert ids == full_ids[:max_tokens] and mask == full_mask[:max_tokens]


def test_render_for_completion_drops_the_answer_and_opens_an_assistant_turn(tokenizer):
    prompt = tokenizer.render_for_completion(CHAT)
    without_last, _ = tokenizer.render_conversation({"messages": CHAT["messages"][:-1]})
    assert prompt == without_last + [special(tokenizer, "<|assistant_start|>")]
    assert len(CHAT["messages"]) == 4  # not mutated
    with pytest.raises(ValueError, match="last message"):
        tokenizer.render_for_completion({"messages": CHAT["messages"][:-1]})


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}
MALFORMED = [
    ({"messages": []}, "non-empty 'messages'"),
    ({}, "non-empty 'messages'"),
    ({"messages": [ASSISTANT]}, "message 0: expected role 'user', got 'assistant'"),
    ({"messages": [USER, USER]}, "message 1: expected role 'assistant', got 'user'"),
    ({"messages": [USER, ASSISTANT, {"role": "system", "content": "x"}]},
     "message 2: expected role 'user', got 'system' \\(only allowed as the first message\\)"),
    ({"messages": [USER, {"role": "tool", "content": "x"}]}, "message 1: expected role 'assistant', got 'tool'"),
    ({"messages": [{"role": "system", "content": "x"}, ASSISTANT]},
     "message 0: a system message must be followed by a user message, got 'assistant'"),
    ({"messages": [{"role": "system", "content": "x"}]}, "message 0: .* followed by a user message, got nothing"),
    ({"messages": [{"role": "system", "content": ["x"]}, USER]}, "message 0: system content must be a string"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": 3}]},
     "message 1: user content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, "message 0: user content must be a string"),
    ({"messages": [USER, {"role": "assistant", "content": 5}]}, "message 1: assistant content must be a string or a list"),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},
     "message 1, part 0: unknown part type 'image'"),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": "a"}, "b"]}]},
     "message 1, part 1: a part must be a dict"),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "python", "text": None}]}]},
     "message 1, part 0: part 'text' must be a string"),
    ({"messages": [USER, {"role": "assistant"}]}, "message 1: must be a dict with 'role' and 'content'"),
    ({"messages": [USER, ASSISTANT, "hello"]}, "message 2: must be a dict"),
]


@pytest.mark.parametrize("conversation, message", MALFORMED)
def test_malformed_conversation_raises_value_error_naming_the_problem(tokenizer, conversation, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.render_conversation(conversation)


def test_visualize_tokenization_colors_by_mask(tokenizer):
    ids, mask = tokenizer.render_conversation(CHAT)
    shown = tokenizer.visualize_tokenization(ids, mask, with_token_id=True)
    assert shown.count("|") - sum(tokenizer.decode([i]).count("|") for i in ids) == len(ids) - 1
    assert shown.count("\033[92m") == sum(mask) and shown.count("\033[91m") == len(mask) - sum(mask)
    assert f"({ids[0]})" in shown


# -----------------------------------------------------------------------------
# token_bytes, saving and loading


def test_token_bytes_count_raw_bytes_and_zero_for_specials(tokenizer):
    token_bytes = compute_token_bytes(tokenizer)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB_SIZE,)
    for token_id in range(VOCAB_SIZE - len(SPECIAL_TOKENS)):
        assert token_bytes[token_id] == len(tokenizer.decode_single_token_bytes(token_id))
    assert token_bytes[-len(SPECIAL_TOKENS):].tolist() == [0] * len(SPECIAL_TOKENS)
    # A lone continuation byte is not valid UTF-8: decoding gives U+FFFD (3 bytes), but it stands for 1 byte.
    assert len(tokenizer.decode([0x80]).encode("utf-8")) == 3 and token_bytes[0x80] == 1
    # Merged tokens that are incomplete UTF-8 sequences (the corpus has CJK and emoji) count their true length too.
    partial = [i for i in range(256, VOCAB_SIZE - len(SPECIAL_TOKENS)) if not _is_utf8(tokenizer.decode_single_token_bytes(i))]
    assert partial, "expected some merged tokens that split a multi-byte character"
    assert all(token_bytes[i] == len(tokenizer.decode_single_token_bytes(i)) for i in partial)


def _is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_save_and_load_round_trip(tokenizer, tmp_path, corpus):
    tokenizer.save(str(tmp_path))
    loaded = RustBPETokenizer.from_directory(str(tmp_path))
    assert loaded.get_vocab_size() == VOCAB_SIZE
    assert loaded.get_bos_token_id() == tokenizer.get_bos_token_id()
    assert [loaded.encode_special(s) for s in SPECIAL_TOKENS] == [tokenizer.encode_special(s) for s in SPECIAL_TOKENS]
    texts = SAMPLE_TEXTS + corpus[:20]
    assert loaded.encode(texts) == tokenizer.encode(texts)
    assert loaded.render_conversation(TOOL_CHAT) == tokenizer.render_conversation(TOOL_CHAT)


def test_get_tokenizer_and_get_token_bytes_read_the_base_dir(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="tok_train"):
        get_token_bytes()
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save(str(tokenizer_dir))
    torch.save(compute_token_bytes(tokenizer), tokenizer_dir / "token_bytes.pt")
    assert get_tokenizer().encode("hello world") == tokenizer.encode("hello world")
    assert torch.equal(get_token_bytes("cpu"), compute_token_bytes(tokenizer))


# -----------------------------------------------------------------------------
# HuggingFaceTokenizer


def test_hf_tokenizer_trains_to_size_with_unique_specials(hf_tokenizer):
    assert hf_tokenizer.get_vocab_size() == VOCAB_SIZE
    ids = [hf_tokenizer.encode_special(name) for name in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert hf_tokenizer.get_special_tokens() == set(SPECIAL_TOKENS)
    assert hf_tokenizer.get_bos_token_id() == hf_tokenizer.encode_special("<|bos|>")
    with pytest.raises(KeyError):
        hf_tokenizer.encode_special("<|not_a_token|>")


def test_hf_tokenizer_round_trips_and_ignores_special_strings_in_text(hf_tokenizer):
    for text in SAMPLE_TEXTS + random_unicode_strings(200, seed=1):
        assert hf_tokenizer.decode(hf_tokenizer.encode(text)) == text
    special_ids = {hf_tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
    assert not special_ids & set(hf_tokenizer.encode("<|bos|>hi<|user_end|>"))


def test_hf_tokenizer_batch_prepend_append_and_save(hf_tokenizer, tmp_path, corpus):
    bos = hf_tokenizer.get_bos_token_id()
    texts = SAMPLE_TEXTS + corpus[:20]
    assert hf_tokenizer.encode(texts, prepend="<|bos|>") == [[bos] + hf_tokenizer.encode(t) for t in texts]
    hf_tokenizer.save(str(tmp_path))
    loaded = HuggingFaceTokenizer.from_directory(str(tmp_path))
    assert loaded.encode(texts) == hf_tokenizer.encode(texts)
    trained = [i for i, m in zip(*loaded.render_conversation(TOOL_CHAT)) if m == 1]
    assert loaded.decode(trained) == ("Let me check: <|python_start|>1234 + 4321<|python_end|>"
                                      " so the answer is 5555.<|assistant_end|>")


def test_hf_token_bytes_are_the_raw_bytes_of_each_token(hf_tokenizer):
    text = "Caf\u00e9 \u2603 na\u00efve \U0001F600 tabs\tand\nnewlines"
    ids = hf_tokenizer.encode(text)
    assert b"".join(hf_tokenizer.decode_single_token_bytes(i) for i in ids) == text.encode("utf-8")
    token_bytes = compute_token_bytes(hf_tokenizer)
    assert token_bytes.shape == (hf_tokenizer.get_vocab_size(),)
    special_ids = [hf_tokenizer.encode_special(name) for name in SPECIAL_TOKENS]
    assert token_bytes[special_ids].tolist() == [0] * len(SPECIAL_TOKENS)
    assert sum(token_bytes[i].item() for i in ids) == len(text.encode("utf-8"))


def test_hf_bos_falls_back_to_endoftext():
    from tokenizers import Tokenizer, models

    raw = Tokenizer(models.BPE())
    raw.add_special_tokens(["<|endoftext|>"])
    assert HuggingFaceTokenizer(raw).get_bos_token_id() == raw.token_to_id("<|endoftext|>")
