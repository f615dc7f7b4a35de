"""
Tokenizer training benchmark: our rustbpe vs PyPI rustbpe 0.1.0 vs Hugging Face `tokenizers`,
all on the same text with nanochat's split pattern. Also checks that our merges are exactly
PyPI rustbpe's, and measures encoding throughput (tiktoken built from our merges, and
rustbpe.batch_encode).

Run (CPU only; each trainer runs in its own subprocess, one after the other):
    python dev/bench_tokenizer.py                         # ~100 MB of text, vocab 32768
    python dev/bench_tokenizer.py --mb 10 --vocab-size 4096
    python dev/bench_tokenizer.py --source files --text-dir /usr/share/doc

Text (--source): "parquet" = the chosen dataset's shards (NANOCHAT_DATASET; or --parquet-dir);
"files" = local text files (--text-dir, default: /usr/share/doc, the Python standard library,
site-packages; .gz files are decompressed); "auto" (default) = parquet first, topped up with
local files if the shards hold less than --mb. PyPI rustbpe comes from .oracle/rustbpe-0.1.0
(dev/build_rustbpe.sh puts it there); without it that row is skipped.
Writes only temporary files (the corpus and each trainer's merges).
"""

import argparse
import gzip
import logging
import os
import pickle
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
ORACLE_DIR = os.path.join(REPO_ROOT, ".oracle", "rustbpe-0.1.0")
BINARY_SUFFIXES = (".pyc", ".so", ".a", ".o", ".png", ".jpg", ".gif", ".zip", ".whl", ".pdf", ".bz2", ".xz")
MAX_FILE_BYTES = 4 << 20  # one huge generated file should not be most of the corpus


# -----------------------------------------------------------------------------
# Gathering the corpus


def parquet_texts(parquet_dir):
    import pyarrow.parquet as pq

    from nanochat.dataset import list_parquet_files

    for path in list_parquet_files(parquet_dir):
        parquet_file = pq.ParquetFile(path)
        for row_group in range(parquet_file.num_row_groups):
            yield from parquet_file.read_row_group(row_group, columns=["text"]).column("text").to_pylist()


def read_text_file(path):
    """The file's text (gzip-decompressed if .gz), or None if it looks binary (a NUL byte early on)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(8192)
            if b"\x00" in head:
                return None
            data = head + f.read(MAX_FILE_BYTES - len(head))
    except (OSError, EOFError):
        return None
    return data.decode("utf-8", errors="replace")


def file_texts(text_dirs):
    """Every text file under the given directories, in a fixed order."""
    for top in text_dirs:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and not os.path.islink(path) and not name.endswith(BINARY_SUFFIXES):
                    text = read_text_file(path)
                    if text:
                        yield text


def gather_corpus(args):
    """Documents (str) totalling at least --mb megabytes of UTF-8, and where they came from."""
    target_bytes = int(args.mb * 1e6)
    docs, total, sources = [], 0, []
    streams = []
    if args.source in ("auto", "parquet"):
        streams.append(("parquet", parquet_texts(args.parquet_dir)))
    if args.source in ("auto", "files"):
        streams.append(("files", file_texts(args.text_dir)))
    for name, stream in streams:
        before = total
        for text in stream:
            if total >= target_bytes:
                break
            docs.append(text)
            total += len(text.encode("utf-8"))
        if total > before:
            sources.append(f"{name} {(total - before) / 1e6:.1f} MB")
    if total < target_bytes:
        print(f"note: found only {total / 1e6:.1f} MB of text (asked for {args.mb} MB)")
    if not docs:
        sys.exit("no text found: pass --parquet-dir or --text-dir (see --help)")
    return docs, total, ", ".join(sources)


# -----------------------------------------------------------------------------
# Trainers (each runs in a subprocess: `--worker NAME`)


def cpu_seconds():
    """CPU time of this process, all threads: steadier than wall time on a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_rustbpe(docs, vocab_size, pattern, want_oracle):
    import rustbpe

    origin = getattr(rustbpe, "__file__", None) or "an empty namespace package (not built?)"
    if origin.startswith(ORACLE_DIR) != want_oracle or not hasattr(rustbpe, "Tokenizer"):
        sys.exit(f"wrong rustbpe imported: {origin}")
    tokenizer = rustbpe.Tokenizer()
    start, start_cpu = time.perf_counter(), cpu_seconds()
    tokenizer.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
    seconds, train_cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    tokens = [bytes(token) for token, _ in sorted(tokenizer.get_mergeable_ranks(), key=lambda kv: kv[1])]
    start = time.perf_counter()
    tokenizer.batch_encode(docs)
    encode_seconds = time.perf_counter() - start
    return seconds, train_cpu, tokens, encode_seconds


def train_hf(docs, vocab_size, pattern):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    start, start_cpu = time.perf_counter(), cpu_seconds()
    tokenizer.train_from_iterator(iter(docs), trainer)
    seconds, train_cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    # HF stores tokens as printable stand-ins for bytes (GPT-2's byte-to-unicode table).
    printable_to_byte = {}
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = 0
    for b in range(256):
        if b in printable:
            printable_to_byte[chr(b)] = b
        else:
            printable_to_byte[chr(256 + extra)] = b
            extra += 1
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [bytes(printable_to_byte[c] for c in token) for token, _ in vocab]
    start = time.perf_counter()
    tokenizer.encode_batch(docs)
    encode_seconds = time.perf_counter() - start
    return seconds, train_cpu, tokens, encode_seconds


def run_worker(args):
    logging.getLogger("rustbpe").setLevel(logging.WARNING)  # both rustbpes log progress there
    with open(args.corpus, "rb") as f:
        docs = pickle.load(f)
    if args.worker == "hf":
        seconds, train_cpu, tokens, encode_seconds = train_hf(docs, args.vocab_size, args.pattern)
    else:
        want_oracle = args.worker == "pypi"
        seconds, train_cpu, tokens, encode_seconds = train_rustbpe(docs, args.vocab_size, args.pattern, want_oracle)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(args.result, "wb") as f:
        pickle.dump({"seconds": seconds, "cpu_seconds": train_cpu, "tokens": tokens, "encode_seconds": encode_seconds,
                     "peak_rss_mb": peak_rss_mb}, f)


def run_trainer(name, corpus_path, args, workdir):
    result_path = os.path.join(workdir, f"{name}.pkl")
    env = dict(os.environ)
    if name == "pypi":  # same module name as ours: put the oracle first on the path
        env["PYTHONPATH"] = ORACLE_DIR + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--corpus", corpus_path,
           "--result", result_path, "--vocab-size", str(args.vocab_size), "--pattern", args.pattern]
    print(f"training {name} ...", flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=workdir)
    with open(result_path, "rb") as f:
        return pickle.load(f)


# -----------------------------------------------------------------------------
# Encoding throughput


def tiktoken_throughput(docs, total_bytes, tokens, pattern):
    """MB/s of tiktoken's encode_ordinary_batch with our merges (how nanochat encodes), and bytes/token."""
    import tiktoken

    encoding = tiktoken.Encoding(name="bench", pat_str=pattern,
                                 mergeable_ranks={token: rank for rank, token in enumerate(tokens)}, special_tokens={})
    threads = os.cpu_count() or 1
    start = time.perf_counter()
    encoded = encoding.encode_ordinary_batch(docs, num_threads=threads)
    mb_per_s = total_bytes / 1e6 / (time.perf_counter() - start)
    return mb_per_s, total_bytes / sum(map(len, encoded)), threads


# -----------------------------------------------------------------------------


def main():
    from nanochat.dataset import shard_dir
    from nanochat.tokenizer import SPLIT_PATTERN

    class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--mb", type=float, default=100, help="megabytes (UTF-8) of text to train on")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size incl. the 256 bytes")
    parser.add_argument("--source", choices=["auto", "parquet", "files"], default="auto", help="where the text comes from")
    parser.add_argument("--parquet-dir", default=shard_dir(), help="directory of parquet shards")
    parser.add_argument("--text-dir", action="append", default=None,
                        help="directory of text files (repeatable); default: /usr/share/doc, stdlib, site-packages")
    parser.add_argument("--pattern", default=SPLIT_PATTERN, help="split regex (default: nanochat's)")
    parser.add_argument("--skip", action="append", default=[], choices=["ours", "pypi", "hf"], help="trainer to leave out")
    parser.add_argument("--worker", choices=["ours", "pypi", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)
    if args.text_dir is None:
        args.text_dir = ["/usr/share/doc", sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]

    docs, total_bytes, sources = gather_corpus(args)
    print(f"corpus: {len(docs):,} documents, {total_bytes / 1e6:.1f} MB ({sources}); vocab {args.vocab_size}; "
          f"{os.cpu_count()} CPUs")
    trainers = [name for name in ("ours", "pypi", "hf") if name not in args.skip]
    if "pypi" in trainers and not os.path.isdir(os.path.join(ORACLE_DIR, "rustbpe")):
        print(f"skipping PyPI rustbpe: {ORACLE_DIR} is missing (run dev/build_rustbpe.sh with a package registry)")
        trainers.remove("pypi")

    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        corpus_path = os.path.join(workdir, "corpus.pkl")
        with open(corpus_path, "wb") as f:
            pickle.dump(docs, f, protocol=pickle.HIGHEST_PROTOCOL)
        for name in trainers:
            results[name] = run_trainer(name, corpus_path, args, workdir)

    labels = {"ours": "rustbpe (ours)", "pypi": "rustbpe 0.1.0 (PyPI)", "hf": "HF tokenizers"}
    ours = results.get("ours", {}).get("tokens")
    print()
    print("| trainer | train wall s | train CPU s | train MB/s (wall) | peak RSS MB | merges vs ours "
          "| own batch encode MB/s |")
    print("|---|---|---|---|---|---|---|")
    for name, result in results.items():
        if name == "ours" or ours is None:
            compare = "-"
        elif name == "pypi":
            compare = "identical" if result["tokens"] == ours else "DIFFERENT"
        else:
            shared = len(set(result["tokens"]) & set(ours))
            compare = f"{shared / len(ours):.2%} of tokens shared"
        mb = total_bytes / 1e6
        print(f"| {labels[name]} | {result['seconds']:.1f} | {result['cpu_seconds']:.1f} | {mb / result['seconds']:.2f} | "
              f"{result['peak_rss_mb']:.0f} | {compare} | {mb / result['encode_seconds']:.1f} |")

    if ours is not None:
        mb_per_s, bytes_per_token, threads = tiktoken_throughput(docs, total_bytes, ours, args.pattern)
        print(f"\ntiktoken encode_ordinary_batch with our merges ({threads} threads): {mb_per_s:.1f} MB/s, "
              f"{bytes_per_token:.2f} bytes/token")
    if "pypi" in results and ours is not None and results["pypi"]["tokens"] != ours:
        sys.exit("our merges differ from PyPI rustbpe 0.1.0")


if __name__ == "__main__":
    main()
