"""
Train the BPE tokenizer on the pretraining shards (our Rust `rustbpe`), then save it for every
later phase. Train it on the dataset base_train will read: a tokenizer from the other one still
works, but compresses that data worse.

    python -m scripts.tok_train                                  # 2B chars of ClimbMix, vocab 32768
    python -m scripts.tok_train --dataset fineweb                # of FineWeb-Edu instead
    python -m scripts.tok_train --max-chars=2000000000 --vocab-size=8192   # CPU demo (dev/runcpu.sh)

Single process only (training is multi-threaded inside rustbpe); there is nothing to torchrun.
Reads:  the chosen dataset's train shards ($NANOCHAT_BASE_DIR/base_data_climbmix/ or base_data/;
        --dataset or NANOCHAT_DATASET; see nanochat/dataset.py)
Writes: $NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl, tokenizer/token_bytes.pt (int32 [V], raw
        bytes per token id, 0 for specials) and the "Tokenizer training" report section.
"""

import argparse
import os
import time

import torch

from nanochat.common import atomic_open, get_base_dir, parse_flags, run_script
from nanochat.dataset import add_dataset_flag, parquets_iter_batched, use_dataset
from nanochat.report import get_report
from nanochat.tokenizer import TOKEN_BYTES_FILE, TOKENIZER_DIRNAME, RustBPETokenizer, compute_token_bytes

# English, digits of several lengths, contractions, punctuation runs, whitespace runs, CJK,
# Cyrillic, Arabic and emoji (multi-byte and joined sequences): a tokenizer that breaks any
# of these does not round-trip.
SANITY_TEXT = "\n".join([
    "Hello world! Tokenizers should survive this.",
    "Numbers: 7, 42, 365, 2048, 3.14159, 1,000,000",
    "Contractions: I'm, you're, it's, we'll, they've, she'd, DON'T",
    "Punctuation:  @#$%^&*() -- ... ?!?! [brackets] {braces} <tags/>",
    "Tabs\tand   spaces\n\n  trailing   ",
    "中文测试：你好，世界。 Русский текст. مرحبا بالعالم",
    "Emoji: 🚀 👩\u200d💻 🇫🇷 ✨",
])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a BPE tokenizer on the pretraining shards")
    add_dataset_flag(parser)
    parser.add_argument("--max-chars", type=int, default=2_000_000_000,
                        help="stop reading documents once this many characters were seen (default: 2B)")
    parser.add_argument("--doc-cap", type=int, default=10_000,
                        help="crop each document to this many characters (default: 10,000)")
    parser.add_argument("--vocab-size", type=int, default=32768,
                        help="vocabulary size including the 9 special tokens (default: 32768 = 2^15)")
    return parse_flags(parser, argv)


def capped_documents(max_chars, doc_cap, stats):
    """Train-split documents cropped to doc_cap chars; stops right after the total passes max_chars."""
    for batch in parquets_iter_batched(split="train"):
        for text in batch:
            text = text[:doc_cap]
            stats["chars"] += len(text)
            stats["docs"] += 1
            yield text
            if stats["chars"] > max_chars:
                return


def main(argv=None):
    args = parse_args(argv)
    dataset = use_dataset(args.dataset)
    print(f"dataset: {dataset.title}")
    print(f"max_chars: {args.max_chars:,}")
    print(f"doc_cap: {args.doc_cap:,}")
    print(f"vocab_size: {args.vocab_size:,}")

    stats = {"chars": 0, "docs": 0}
    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(capped_documents(args.max_chars, args.doc_cap, stats), args.vocab_size)
    train_time = time.time() - t0
    if stats["docs"] == 0:
        raise RuntimeError(f"the {dataset.title} train split yielded no documents; download shards with "
                           f"`python -m nanochat.dataset --dataset {dataset.name}`")
    print(f"Trained on {stats['docs']:,} docs ({stats['chars']:,} chars)")
    print(f"Training time: {train_time:.2f}s")

    # Check before saving, so a broken tokenizer never lands where later phases would load it.
    decoded = tokenizer.decode(tokenizer.encode(SANITY_TEXT))
    if decoded != SANITY_TEXT:
        raise RuntimeError(f"tokenizer does not round-trip the sanity text; got {decoded!r}")

    tokenizer_dir = os.path.join(get_base_dir(), TOKENIZER_DIRNAME)
    tokenizer.save(tokenizer_dir)

    # Bytes per token id, for bits-per-byte: raw token bytes, 0 for the special tokens.
    token_bytes = compute_token_bytes(tokenizer)
    token_bytes_path = os.path.join(tokenizer_dir, TOKEN_BYTES_FILE)

    with atomic_open(token_bytes_path, "wb") as f:
        torch.save(token_bytes, f)
    print(f"Saved token_bytes to {token_bytes_path}")

    text_token_bytes = token_bytes[token_bytes > 0].to(torch.float32)
    get_report().log(section="Tokenizer training", data=[
        vars(args),
        {"train_docs": stats["docs"], "train_chars": stats["chars"], "train_time": train_time},
        {"num_special_tokens": len(tokenizer.get_special_tokens())},
        # Only when the text supported fewer merges than asked for (tiny corpora).
        {"trained_vocab_size": tokenizer.get_vocab_size()} if tokenizer.get_vocab_size() != args.vocab_size else None,
        {"token_bytes_min": int(text_token_bytes.min().item()),
         "token_bytes_max": int(text_token_bytes.max().item()),
         "token_bytes_mean": text_token_bytes.mean().item(),
         "token_bytes_std": text_token_bytes.std().item()},
    ])


if __name__ == "__main__":
    run_script(main, "tok_train")
