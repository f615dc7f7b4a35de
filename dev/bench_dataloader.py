"""
Benchmark of the BOS best-fit pretraining loader on synthetic shards: time per batch, the cost of
building the exact-resume state, its JSON size, and how long a resume takes. CPU only; the shards
and a tiny byte-level BPE are made in a temp directory.

    python -m dev.bench_dataloader                  # B=32, T=2048, buffer 1000 (base_train's defaults)
    python -m dev.bench_dataloader --batches 50 --device-batch-size 8
"""

import argparse
import json
import os
import random
import tempfile
import time

import tiktoken

from nanochat.dataloader import (
    _decode_positions,
    _encode_positions,
    tokenizing_distributed_data_loader_with_state_bos_bestfit,
)
from nanochat.dataset import write_shard
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device-batch-size", type=int, default=32, help="B, rows per batch")
parser.add_argument("--max-seq-len", type=int, default=2048, help="T")
parser.add_argument("--batches", type=int, default=100, help="batches to time per loader")
parser.add_argument("--shards", type=int, default=3, help="synthetic train shards of 8 row groups x 1024 docs")
args = parser.parse_args()

# docs with a long-tailed length like web text: lognormal, median ~450 tokens, mean ~800
rng = random.Random(0)
words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
data_dir = tempfile.mkdtemp(prefix="bench_dataloader_")
for shard in list(range(args.shards)) + [1822]:
    texts = []
    for i in range(8 * 1024):
        num_words = max(5, int(rng.lognormvariate(6.1, 1.0)))
        texts.append(f"doc {shard}.{i} " + " ".join(rng.choices(words, k=num_words)))
    write_shard(os.path.join(data_dir, f"shard_{shard:05d}.parquet"), texts, row_group_size=1024)

ranks = {bytes([i]): i for i in range(256)}
for word in words:  # whole-word merges keep token counts web-like (about one token per word)
    piece = (" " + word).encode()
    for end in range(2, len(piece) + 1):
        ranks.setdefault(piece[:end], len(ranks))
enc = tiktoken.Encoding("bench", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                        special_tokens={name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)})
tokenizer = RustBPETokenizer(enc, "<|bos|>")
B, T = args.device_batch_size, args.max_seq_len
common = dict(device="cpu", data_dir=data_dir)


def time_batches(loader, n):
    next(loader)  # the first batch fills the buffer
    t0 = time.perf_counter()
    for _ in range(n):
        batch = next(loader)
    return (time.perf_counter() - t0) / n, batch


# the plain loader is the state loader with the state dropped: one timing covers both
loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(tokenizer, B, T, "train", **common)
dt_state, (_, _, state) = time_batches(loader, args.batches)
print(f"B={B} T={T}: {dt_state * 1e3:.2f} ms/batch (building the state included)")

positions = _decode_positions(state["doc_buffer"])
t0 = time.perf_counter()
for _ in range(100):
    _encode_positions(positions)
print(f"state: {len(positions)} buffered docs, built in {(time.perf_counter() - t0) * 10:.3f} ms, "
      f"{len(json.dumps(state))} bytes of JSON ({len(json.dumps(state, indent=2))} with indent=2), "
      f"{len({p[:2] for p in positions})} distinct row groups")
t0 = time.perf_counter()
resumed = tokenizing_distributed_data_loader_with_state_bos_bestfit(tokenizer, B, T, "train",
                                                                    resume_state_dict=state, **common)
next(resumed)
print(f"resume (re-read + re-tokenize the buffer, first batch): {time.perf_counter() - t0:.2f} s")
