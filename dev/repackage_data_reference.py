"""
Repackage a text corpus into nanochat pretraining shards: parquet files with one string column
`text`, row groups of 1024 documents, zstd level 3, no dictionary, no statistics. A shard is
closed once it holds >= --chars-per-shard characters AND a whole number of row groups. This is how
upstream made the FineWeb-Edu shards (sample-100BT, shuffled with seed 42, 250M chars per shard ->
1823 shards); it is a reference, the shards are downloaded with `python -m nanochat.dataset`.
(Upstream's ClimbMix shards were made the same way from NVIDIA's ClimbMix, whose documents are
GPT-2 token ids decoded back to text; this script reads text only.)

Train shards are shard_00000, shard_00001, ...; the val split is the chosen dataset's pinned shard
(NANOCHAT_DATASET: shard_06542 for climbmix, the default; shard_01822 for fineweb). Which documents are val:
    --val-docs 0 (default)  the last shard written becomes the val shard (FineWeb-Edu's 1823rd shard
                            is shard_01822, so with NANOCHAT_DATASET=fineweb this is the upstream split)
    --val-docs K            the first K documents of the shuffled stream form the val shard

Run it:
    NANOCHAT_DATASET=fineweb python dev/repackage_data_reference.py --output-dir /data/base_data   # FineWeb-Edu (needs the hub, ~1 TB of disk)
    python dev/repackage_data_reference.py --input-dir my_texts/ --output-dir out/ \
        --chars-per-shard 5000000 --val-docs 2048                                # local .txt/.jsonl/.parquet
Local inputs: a .txt file is one document; a .jsonl line or a .parquet row gives one document
from the --text-field field. Every shard is written atomically (temp file + rename).
"""

import argparse
import glob
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

import pyarrow.parquet as pq

from nanochat.common import parse_flags
from nanochat.dataset import ROW_GROUP_SIZE, write_train_val_shards

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Repackage a corpus into nanochat pretraining shards",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", type=str, default="HuggingFaceFW/fineweb-edu", help="Hugging Face dataset (when no local input is given)")
    parser.add_argument("--dataset-config", type=str, default="sample-100BT", help="its configuration (subset)")
    parser.add_argument("--dataset-split", type=str, default="train", help="its split")
    parser.add_argument("--input-files", type=str, nargs="*", default=[], help="local .txt/.jsonl/.parquet files")
    parser.add_argument("--input-dir", type=str, default=None, help="a directory searched recursively for .txt/.jsonl/.parquet files")
    parser.add_argument("--text-field", type=str, default="text", help="field/column holding the text in .jsonl/.parquet inputs")
    parser.add_argument("--output-dir", type=str, required=True, help="where shard_XXXXX.parquet files go")
    parser.add_argument("--chars-per-shard", type=int, default=250_000_000, help="close a shard at this many characters (and a whole row group)")
    parser.add_argument("--row-group-size", type=int, default=ROW_GROUP_SIZE, help="documents per row group")
    parser.add_argument("--val-docs", type=int, default=0, help="0: the last shard is val; K>0: the first K shuffled docs are val")
    parser.add_argument("--max-train-shards", type=int, default=None, help="stop after this many train shards (for trials)")
    parser.add_argument("--shuffle-seed", type=int, default=42, help="document shuffle seed (-1: keep input order)")
    parser.add_argument("--overwrite", action="store_true", help="allow an output dir that already has shards; stale ones are removed")
    return parse_flags(parser, argv)


def local_input_paths(files, directory):
    paths = list(files)
    if directory:
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"--input-dir {directory} is not a directory")
        paths += sorted(p for p in glob.glob(os.path.join(directory, "**", "*"), recursive=True) if p.endswith(LOCAL_SUFFIXES))
    for path in paths:
        if not path.endswith(LOCAL_SUFFIXES):
            raise ValueError(f"{path}: unsupported input type; use .txt, .jsonl or .parquet")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path} does not exist")
    return paths


def read_local_documents(paths, text_field="text"):
    """Every document of the local inputs, in path order (non-empty texts only)."""
    docs = []
    for path in paths:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                docs.append(f.read())
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for line_number, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if text_field not in record:
                            raise KeyError(f"{path}:{line_number} has no {text_field!r} field (set --text-field)")
                        docs.append(record[text_field])
        else:
            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise KeyError(f"{path} has no {text_field!r} column (columns: {table.column_names}; set --text-field)")
            docs.extend(table.column(text_field).to_pylist())
    return [doc for doc in docs if doc and doc.strip()]


def hub_documents(args):
    """Stream the texts of a Hugging Face dataset, shuffled like upstream (needs the hub)."""
    from datasets import load_dataset  # only this path needs it

    dataset = load_dataset(args.dataset, name=args.dataset_config, split=args.dataset_split)
    if args.shuffle_seed >= 0:
        dataset = dataset.shuffle(seed=args.shuffle_seed)
    for row in dataset:
        yield row[args.text_field]


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(args.output_dir, "shard_*.parquet")))
    if existing and not args.overwrite:
        raise SystemExit(f"{args.output_dir} already holds {len(existing)} shards; pass --overwrite or choose another --output-dir")

    paths = local_input_paths(args.input_files, args.input_dir)
    if paths:
        docs = read_local_documents(paths, args.text_field)
        print(f"Read {len(docs):,} documents from {len(paths)} local file(s)")
        if args.shuffle_seed >= 0:
            random.Random(args.shuffle_seed).shuffle(docs)
    else:
        print(f"Reading {args.dataset} ({args.dataset_config}, {args.dataset_split}) from the Hugging Face hub")
        docs = hub_documents(args)

    train_paths, val_path = write_train_val_shards(docs, args.output_dir, args.chars_per_shard, args.row_group_size,
                                                   args.val_docs, args.max_train_shards)
    written = set(train_paths) | {val_path}
    for stale in existing:
        if stale not in written:
            os.remove(stale)
    print(f"Done: {len(train_paths)} train shards + {os.path.basename(val_path)} (val) in {args.output_dir}")


if __name__ == "__main__":
    main()
