"""
nanochat's tokenizer as a Hugging Face `tokenizers` BPE, with a chat template (runs in the export
process; the files it writes load with AutoTokenizer.from_pretrained alone).

The tiktoken encoding becomes a byte-level BPE: every token's raw bytes spelled in the printable
byte alphabet of GPT-2, the split regex as a pre-tokenizer, and merges recovered from the ranks.
tiktoken merges, in every regex chunk, the adjacent pair whose concatenation has the lowest rank,
and takes a chunk that is itself a token whole; a merge list ordered by the rank of the merged
token, holding every way to split each token into two tokens, plus ignore_merges, does the same.

One difference stays, as in every Hugging Face tokenizer: HF turns special-token strings inside
text into the special tokens (the chat template relies on it), where nanochat's encode treats them
as plain text.

The chat template renders a conversation exactly as render_conversation does (a leading system
message joined to the first user message with a blank line, strictly alternating roles, the
assistant's python / python_output parts), and add_generation_prompt appends
<|assistant_start|> as render_for_completion does. Each piece is tokenized on its own because
the special tokens around it split the text; two text parts in a row are the exception (nanochat
encodes them one by one, the template joins them).
"""

from nanochat.tokenizer import _BYTE_LEVEL_BYTES, SPECIAL_TOKENS, SPLIT_PATTERN

_BYTE_TO_CHAR = {byte: char for char, byte in _BYTE_LEVEL_BYTES.items()}

CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages | length < 2 or messages[1]['role'] != 'user' -%}"
    "{{ raise_exception('a system message must be followed by a user message') }}"
    "{%- endif -%}"
    "{%- set turns = [{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[1]['content']}]"
    " + messages[2:] -%}"
    "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
    "<|bos|>"
    "{%- for message in turns -%}"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{ raise_exception('roles must alternate user, assistant, ... (a system message only first)') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user_start|>{{ message['content'] }}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'python' -%}<|python_start|>{{ part['text'] }}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{ part['text'] }}<|output_end|>"
    "{%- else -%}{{ raise_exception('unknown part type ' + part['type']) }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def _spell(token_bytes):
    return "".join(_BYTE_TO_CHAR[b] for b in token_bytes)


def vocab_and_merges(tokenizer):
    """({byte-level string: id}, [(left, right), ...]) for the ordinary (non-special) tokens of a RustBPETokenizer."""
    special_ids = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    token_bytes = {i: tokenizer.decode_single_token_bytes(i) for i in range(tokenizer.get_vocab_size()) if i not in special_ids}
    rank_of = {b: i for i, b in token_bytes.items()}
    merges = []  # (merged rank, left rank, left, right)
    for rank, merged in token_bytes.items():
        for cut in range(1, len(merged)):
            left, right = rank_of.get(merged[:cut]), rank_of.get(merged[cut:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, _spell(merged[:cut]), _spell(merged[cut:])))
    merges.sort()
    vocab = {_spell(b): i for i, b in token_bytes.items()}
    return vocab, [(left, right) for _, _, left, right in merges]


def build_hf_tokenizer(tokenizer):
    """A transformers PreTrainedTokenizerFast equal to `tokenizer` (a RustBPETokenizer), chat template included."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = vocab_and_merges(tokenizer)
    pattern = getattr(tokenizer.enc, "_pat_str", SPLIT_PATTERN)  # the encoding's own regex
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, byte_fallback=False, fuse_unk=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    special = sorted(tokenizer.get_special_tokens(), key=tokenizer.encode_special)
    for name in special:
        token_id = tokenizer.encode_special(name)
        added = hf.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        if added != 1 or hf.token_to_id(name) != token_id:
            raise ValueError(f"special token {name} landed on id {hf.token_to_id(name)}, expected {token_id}")
    bos = "<|bos|>" if "<|bos|>" in special else None
    chat = all(name in special for name in SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=hf,
        bos_token=bos,
        eos_token="<|assistant_end|>" if chat else bos,
        pad_token=bos,  # padding is masked out; any id works, and the document delimiter is always there
        chat_template=CHAT_TEMPLATE if chat else None,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=None,
    )
