"""
Tokenizers for nanochat: a byte-level BPE in the GPT-4 style.

RustBPETokenizer is the one every phase uses: our Rust crate `rustbpe` learns the merges
(training), and a tiktoken Encoding built from them does the inference-time encoding
(fast, multi-threaded). HuggingFaceTokenizer wraps HF `tokenizers` with the same surface; it is
kept for evaluating Hugging Face models and is not used by the default pipeline.

Both also render chat conversations into token ids plus a training mask (render_conversation),
the format midtraining, SFT, RL and the evaluations rely on.

On disk ($NANOCHAT_BASE_DIR/tokenizer/): tokenizer.pkl (the pickled tiktoken Encoding) and
token_bytes.pt (int32 [V], bytes per token id, 0 for special tokens; used for bits-per-byte).
"""

import copy
import os
import pickle
from functools import lru_cache

from nanochat.common import MissingInputError, UserError, atomic_open, get_base_dir

# The 9 special tokens, in this exact order: their ids follow the mergeable ranks consecutively
# (32759..32767 for a 32768 vocab), so the order is part of the checkpoint format.
SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with this (the document delimiter)
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python (calculator) tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's answer, inserted at inference time
    "<|output_end|>",
]

# GPT-4's split regex, except that numbers split into runs of 1-2 digits instead of 1-3:
# at d12 {1,2} gave val bpb 0.965 vs 0.969 for {1,1} and 0.972 for {1,3} (upstream LOG 2026-01-13).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

TOKENIZER_DIRNAME = "tokenizer"
TOKENIZER_PICKLE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"


# -----------------------------------------------------------------------------
# Conversation rendering, shared by both tokenizer classes


def _checked_content(index, role, content):
    if role == "assistant" and isinstance(content, list):  # parts: text, a python call, its output
        for j, part in enumerate(content):
            where = f"message {index}, part {j}"
            if not isinstance(part, dict):
                raise ValueError(f"{where}: a part must be a dict with 'type' and 'text', got {type(part).__name__}")
            if part.get("type") not in ("text", "python", "python_output"):
                raise ValueError(f"{where}: unknown part type {part.get('type')!r} "
                                 "(expected 'text', 'python' or 'python_output')")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: part 'text' must be a string")
    elif not isinstance(content, str):
        allowed = "a string or a list of parts" if role == "assistant" else "a string"
        raise ValueError(f"message {index}: {role} content must be {allowed}, got {type(content).__name__}")


def _checked_messages(conversation):
    """
    Validate a conversation: returns [(message index, role, content)] alternating user, assistant, ...
    with a leading system message folded into the first user turn. ValueError names the bad message.
    """
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("conversation must be a dict with a non-empty 'messages' list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i}: must be a dict with 'role' and 'content'")
    turns = [(i, m["role"], m["content"]) for i, m in enumerate(messages)]
    system = turns[0][1] == "system"
    if system and (len(turns) < 2 or turns[1][1] != "user"):
        got = repr(turns[1][1]) if len(turns) > 1 else "nothing"
        raise ValueError(f"message 0: a system message must be followed by a user message, got {got}")
    expected_roles = (["system"] if system else []) + ["user", "assistant"] * len(turns)
    for (index, role, content), expected in zip(turns, expected_roles):
        if role != expected:
            why = "only allowed as the first message" if role == "system" else "roles must alternate user, assistant, ..."
            raise ValueError(f"message {index}: expected role {expected!r}, got {role!r} ({why})")
        _checked_content(index, role, content)
    if system:  # the model has no system role: the system prompt becomes the head of the first user turn
        turns = [(1, "user", turns[0][2] + "\n\n" + turns[1][2])] + turns[2:]
    return turns


class ConversationRendering:
    """Chat formatting on top of encode/encode_special/decode/get_bos_token_id (a mixin)."""

    def render_conversation(self, conversation, max_tokens=2048):
        """
        Tokenize a chat conversation ({"messages": [{"role", "content"}, ...]}) for training.
        Returns (ids, mask): mask is 1 on exactly the tokens the assistant produces (its content and
        <|assistant_end|>, python tool calls included) and 0 elsewhere (BOS, user turns, the tool's
        output, which arrives from outside at inference time). Both are truncated to max_tokens.
        """
        turns = _checked_messages(conversation)
        ids, mask = [], []

        def add(token_ids, mask_value):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([mask_value] * len(token_ids))

        special = {name: self.encode_special(name) for name in SPECIAL_TOKENS}
        add(self.get_bos_token_id(), 0)
        for _, role, content in turns:
            if role == "user":
                add(special["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(special["<|user_end|>"], 0)
                continue
            add(special["<|assistant_start|>"], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":
                    add(special["<|python_start|>"], 1)
                    add(self.encode(part["text"]), 1)
                    add(special["<|python_end|>"], 1)
                else:  # python_output: written by the tool, never predicted by the model
                    add(special["<|output_start|>"], 0)
                    add(self.encode(part["text"]), 0)
                    add(special["<|output_end|>"], 0)
            add(special["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt ids for sampling (RL, evaluation): drop the final assistant message, render, append <|assistant_start|>."""
        if _checked_messages(conversation)[-1][1] != "assistant":
            raise ValueError("render_for_completion needs a conversation whose last message is the assistant's")
        conversation = copy.deepcopy(conversation)
        conversation["messages"].pop()
        ids, _ = self.render_conversation(conversation)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask, with_token_id=False):
        """Debug view: tokens joined by '|', green where mask is 1 (trained on), red where 0."""
        green, red, gray, reset = "\033[92m", "\033[91m", "\033[90m", "\033[0m"
        pieces = []
        for token_id, mask_value in zip(ids, mask):
            color = green if mask_value == 1 else red
            piece = f"{color}{self.decode([token_id])}{reset}"
            if with_token_id:
                piece += f"{gray}({token_id}){reset}"
            pieces.append(piece)
        return "|".join(pieces)


def _resolve_special(tokenizer, token):
    """prepend/append accept an id or a special-token string."""
    if token is None or isinstance(token, int):
        return token
    return tokenizer.encode_special(token)


def _add_ends(row, prepend_id, append_id):
    head = [prepend_id] if prepend_id is not None else []
    tail = [append_id] if append_id is not None else []
    return head + row + tail if (head or tail) else row


# -----------------------------------------------------------------------------
# The runtime tokenizer: rustbpe for training, tiktoken for inference


class RustBPETokenizer(ConversationRendering):
    """A tiktoken Encoding plus nanochat's special tokens and chat rendering."""

    def __init__(self, enc, bos_token):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Learn vocab_size - 9 byte-level BPE ranks with rustbpe; the 9 special tokens take the last ids."""
        import rustbpe
        import tiktoken

        num_mergeable = vocab_size - len(SPECIAL_TOKENS)
        if num_mergeable < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(text_iterator), num_mergeable, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(mergeable_ranks) < num_mergeable:
            # rustbpe stops early when no adjacent pair is left to merge; the vocab is then smaller than asked for.
            print(f"Warning: the training text only supported {len(mergeable_ranks)} of the {num_mergeable} "
                  f"mergeable tokens asked for; vocab size will be {len(mergeable_ranks) + len(SPECIAL_TOKENS)}")
        offset = len(mergeable_ranks)
        special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=trainer.get_pattern(),
                                mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        return cls(enc, "<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, TOKENIZER_PICKLE)
        if not os.path.exists(path):
            raise MissingInputError(f"no tokenizer at {path}; train one with `python -m scripts.tok_train`")
        try:
            with open(path, "rb") as f:
                enc = pickle.load(f)
        except Exception as error:  # a cut or foreign file fails in pickle in many ways
            raise DamagedTokenizerError(path, error) from None
        import tiktoken

        if not isinstance(enc, tiktoken.Encoding):
            raise DamagedTokenizerError(path, TypeError(f"it holds a {type(enc).__name__}, not a tiktoken Encoding"))
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """A reference tiktoken encoding ("gpt2", "cl100k_base"), from $NANOCHAT_BASE_DIR/tiktoken_refs/ or tiktoken."""
        from nanochat.reference_encodings import get_reference_encoding

        # tiktoken names its document delimiter <|endoftext|>; it plays the role of our <|bos|>.
        return cls(get_reference_encoding(tiktoken_name), "<|endoftext|>")

    def save(self, tokenizer_dir):
        path = os.path.join(tokenizer_dir, TOKENIZER_PICKLE)

        with atomic_open(path, "wb") as f:
            pickle.dump(self.enc, f)
        print(f"Saved tokenizer encoding to {path}")

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def decode_single_token_bytes(self, token_id):
        """The raw bytes of one token (may be an incomplete UTF-8 sequence)."""
        return self.enc.decode_single_token_bytes(token_id)

    @lru_cache(maxsize=32)  # called per conversation turn; a process holds one or two tokenizers, so no leak to fear
    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """
        Encode a string (-> list of ids) or a list of strings (-> list of lists, in parallel).
        Special-token strings inside the text are NOT recognized: they encode as ordinary text, so
        user data can never inject control tokens. prepend/append (an id or a special-token
        string) are added to every row.
        """
        prepend_id, append_id = _resolve_special(self, prepend), _resolve_special(self, append)
        if isinstance(text, str):
            return _add_ends(self.enc.encode_ordinary(text), prepend_id, append_id)
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [_add_ends(row, prepend_id, append_id) for row in rows]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)


# -----------------------------------------------------------------------------
# Hugging Face tokenizers wrapper (for evaluating HF models; same surface)


def _byte_level_alphabet():
    """
    The printable character that byte-level BPE (GPT-2, HF ByteLevel) writes for each byte:
    printable Latin-1 bytes stand for themselves, the other 68 map to U+0100 onwards, in order.
    Returns {character: byte}.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return alphabet


_BYTE_LEVEL_BYTES = _byte_level_alphabet()


class HuggingFaceTokenizer(ConversationRendering):
    """HF `tokenizers` byte-level BPE behind the RustBPETokenizer interface (evaluating HF models, comparisons)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Like tiktoken's encode_ordinary: special-token strings in text are plain text.
        self.tokenizer.encode_special_tokens = True

    @classmethod
    def from_pretrained(cls, hf_path):
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_pretrained(hf_path))

    @classmethod
    def from_directory(cls, tokenizer_dir):
        from tokenizers import Tokenizer

        path = os.path.join(tokenizer_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise MissingInputError(f"no Hugging Face tokenizer at {path}")
        return cls(Tokenizer.from_file(path))

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Byte-level BPE with our split regex; the 9 special tokens are added first (ids 0..8)."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token=None, fuse_unk=False))  # as upstream
        tokenizer.normalizer = None
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable chars
        ])
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = None
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=SPECIAL_TOKENS)
        tokenizer.train_from_iterator(text_iterator, trainer)
        return cls(tokenizer)

    def save(self, tokenizer_dir):
        path = os.path.join(tokenizer_dir, "tokenizer.json")
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(self.tokenizer.to_str())
        print(f"Saved tokenizer to {path}")

    def get_vocab_size(self):
        return self.tokenizer.get_vocab_size()

    def get_special_tokens(self):
        return {added.content for added in self.tokenizer.get_added_tokens_decoder().values()}

    def id_to_token(self, token_id):
        return self.decode([token_id])

    def decode_single_token_bytes(self, token_id):
        """
        The raw bytes of one token (may be an incomplete UTF-8 sequence), so token_bytes and
        bits-per-byte work on this tokenizer too. Special tokens give their text.
        """
        token = self.tokenizer.id_to_token(token_id)
        if token is None:
            raise KeyError(f"token id {token_id} is outside this tokenizer's vocab of {self.get_vocab_size()}")
        if token_id in self.tokenizer.get_added_tokens_decoder():
            return token.encode("utf-8")
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # a byte_fallback token
            return bytes([int(token[3:5], 16)])
        if not all(ch in _BYTE_LEVEL_BYTES for ch in token):
            raise ValueError(f"token {token!r} is not byte-level BPE: raw token bytes are only defined for byte-level tokenizers")
        return bytes(_BYTE_LEVEL_BYTES[ch] for ch in token)

    def encode_special(self, text):
        token_id = self.tokenizer.token_to_id(text)
        if token_id is None:
            raise KeyError(f"{text!r} is not a token of this tokenizer")
        return token_id

    def get_bos_token_id(self):
        # Our tokenizers call the delimiter <|bos|>; GPT-2-style ones call it <|endoftext|>.
        for name in ("<|bos|>", "<|endoftext|>"):
            token_id = self.tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ValueError("tokenizer has neither <|bos|> nor <|endoftext|>")

    def encode(self, text, prepend=None, append=None, num_threads=None):
        prepend_id, append_id = _resolve_special(self, prepend), _resolve_special(self, append)
        if isinstance(text, str):
            return _add_ends(self.tokenizer.encode(text, add_special_tokens=False).ids, prepend_id, append_id)
        if isinstance(text, list):
            rows = self.tokenizer.encode_batch(text, add_special_tokens=False)
            return [_add_ends(row.ids, prepend_id, append_id) for row in rows]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False)


# -----------------------------------------------------------------------------
# Streaming text out of generated ids


class IncrementalDecoder:
    """
    Text of a growing list of token ids, piece by piece, never splitting a character: byte-level
    BPE tokens can end inside a multi-byte UTF-8 character (emoji, CJK), which decodes to U+FFFD
    until the rest arrives. So decode the whole list each time and emit only once the text does
    not end in U+FFFD, the new suffix since the last emitted text.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def add(self, token_id):
        """Add one token; returns the text that is now complete ('' while a character is unfinished)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self):
        """What is left at the end, even an incomplete character (as U+FFFD)."""
        text = self.tokenizer.decode(self.ids)
        new, self.text = text[len(self.text):], text
        return new


# -----------------------------------------------------------------------------
# Helpers for the rest of the pipeline


class DamagedTokenizerError(UserError):
    """tokenizer.pkl or token_bytes.pt cannot be read."""

    def __init__(self, path, error):
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        super().__init__(f"tokenizer file {path} is damaged ({type(error).__name__}: {first_line}): rebuild it with "
                         "`python -m scripts.tok_train` (models trained with the old tokenizer need that exact file: "
                         "restore it from a copy instead)")


def get_tokenizer():
    """The tokenizer trained by tok_train, from $NANOCHAT_BASE_DIR/tokenizer."""
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), TOKENIZER_DIRNAME))


def compute_token_bytes(tokenizer):
    """
    int32 tensor [V]: the number of raw bytes each token stands for, 0 for special tokens (they
    are not text, so bits-per-byte ignores them). Raw bytes, not len(decode(...).encode()): a token
    that is an incomplete UTF-8 sequence would decode to U+FFFD and count 3 bytes.
    """
    import torch

    special_ids = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    lengths = [0 if token_id in special_ids else len(tokenizer.decode_single_token_bytes(token_id))
               for token_id in range(tokenizer.get_vocab_size())]
    return torch.tensor(lengths, dtype=torch.int32)


def get_token_bytes(device="cpu"):
    """token_bytes.pt written by tok_train (see compute_token_bytes), on `device`."""
    import torch

    path = os.path.join(get_base_dir(), TOKENIZER_DIRNAME, TOKEN_BYTES_FILE)
    if not os.path.exists(path):
        raise MissingInputError(f"no token_bytes at {path}; it is written by tok_train: run `python -m scripts.tok_train`")
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location=device)
    except Exception as error:  # truncated zip, bad pickle, ...
        raise DamagedTokenizerError(path, error) from None
