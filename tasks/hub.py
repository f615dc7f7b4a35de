"""
Datasets from the Hugging Face hub without the `datasets` library, through the parquet export the
hub makes of every dataset (https://huggingface.co/api/datasets/<repo_id>/parquet/<subset>/<split>
lists its shards' URLs). load_hub_dataset downloads the shards once into

    $NANOCHAT_BASE_DIR/task_data/<repo_id with / replaced by -->/<subset>/<split>/
        00000.parquet, 00001.parquet, ...   the shards, in the listing's order
        manifest.json                       JSON list of the shard file names, written last

and reads them with pyarrow. Once the manifest is there no network is touched; a file lock makes
one process (one rank) download while the others wait. NANOCHAT_HUB_URL replaces
https://huggingface.co (a mirror, or a local server in tests). Without internet,
`python -m dev.offline_data tasks` writes the same layout; where a split is a stand-in for the real
one, a provenance.json beside the manifest says so, and loading it prints that line.
"""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

# requests is imported inside the functions that download: with chardet installed its import
# costs ~3 s, which every process that loads a task would pay.
from nanochat.common import MissingInputError, atomic_open, get_base_dir, print0

HUB_URL = "https://huggingface.co"
MANIFEST_NAME = "manifest.json"
PROVENANCE_NAME = "provenance.json"  # written by the offline builder only: where a local copy came from
OFFLINE_BUILDER = "python -m dev.offline_data tasks"
TIMEOUT_SECONDS = 60


class HubDataset:
    """
    The rows of one split as a pyarrow table: len(ds), ds[i] -> dict of column values, and
    ds.shuffle(seed), a view in the order `datasets.Dataset.shuffle(seed=seed)` gives (it draws
    np.random.default_rng(seed).permutation(len(ds)) too).
    """

    def __init__(self, table, permutation=None):
        self.table = table
        self.permutation = permutation

    @property
    def column_names(self):
        return self.table.column_names

    def __len__(self):
        return self.table.num_rows

    def shuffle(self, seed):
        return HubDataset(self.table, np.random.default_rng(seed).permutation(len(self)))

    def __getitem__(self, index):
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset indices are ints, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} rows")
        row = index if self.permutation is None else int(self.permutation[index])
        return self.table.slice(row, 1).to_pylist()[0]


def hub_url():
    return (os.environ.get("NANOCHAT_HUB_URL") or HUB_URL).rstrip("/")


def task_data_dir(repo_id, subset, split):
    return os.path.join(get_base_dir(), "task_data", repo_id.replace("/", "--"), subset, split)


def load_hub_dataset(repo_id, subset="default", split="train"):
    """
    One split of a hub dataset, like datasets.load_dataset(repo_id, subset, split=split):
    downloaded on first use, read from $NANOCHAT_BASE_DIR/task_data afterwards.
    """
    directory = task_data_dir(repo_id, subset, split)
    manifest_path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.exists(manifest_path):
        os.makedirs(directory, exist_ok=True)
        with FileLock(manifest_path + ".lock"):
            if not os.path.exists(manifest_path):  # another process may have finished while we waited
                _download_split(repo_id, subset, split, directory)
    with open(manifest_path, encoding="utf-8") as f:
        filenames = json.load(f)
    _announce_provenance(directory, repo_id, subset, split)
    tables = [pq.read_table(os.path.join(directory, name)) for name in filenames]
    if not tables:
        raise MissingInputError(f"{manifest_path} lists no shards; delete {directory} and load again")
    return HubDataset(pa.concat_tables(tables))


def _announce_provenance(directory, repo_id, subset, split):
    path = os.path.join(directory, PROVENANCE_NAME)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        provenance = json.load(f)
    if provenance.get("substitute"):
        print0(f"{repo_id} {subset}/{split}: offline substitute, not the hub's data: {provenance['substitute']}")


def _unavailable(repo_id, subset, split, directory, reason):
    return MissingInputError(
        f"cannot download {repo_id} {subset}/{split} ({reason}) and there is no local copy in {directory}; "
        f"without internet, build the offline copies with `{OFFLINE_BUILDER}`")


def _get(url, repo_id, subset, split, directory, stream=False):
    """requests.get that turns every way of not getting a 200 into one MissingInputError."""
    import requests
    try:
        response = requests.get(url, stream=stream, timeout=TIMEOUT_SECONDS)
    except requests.RequestException as error:
        raise _unavailable(repo_id, subset, split, directory, f"{type(error).__name__} for {url}") from None
    if response.status_code != 200:
        response.close()
        reason = f"HTTP {response.status_code} for {url}"
        if response.status_code == 404:
            reason += ": check the dataset, subset and split names"
        raise _unavailable(repo_id, subset, split, directory, reason)
    return response


def _download_split(repo_id, subset, split, directory):
    import requests
    listing_url = f"{hub_url()}/api/datasets/{repo_id}/parquet/{subset}/{split}"
    with _get(listing_url, repo_id, subset, split, directory) as response:
        try:
            shard_urls = response.json()
        except ValueError:
            shard_urls = None
    if not isinstance(shard_urls, list) or not shard_urls or not all(isinstance(u, str) for u in shard_urls):
        raise _unavailable(repo_id, subset, split, directory, f"{listing_url} did not answer a list of parquet URLs")
    filenames = []
    for index, shard_url in enumerate(shard_urls):
        filename = f"{index:05d}.parquet"
        print0(f"Downloading {shard_url} -> {os.path.join(directory, filename)}")
        with _get(shard_url, repo_id, subset, split, directory, stream=True) as response, \
                atomic_open(os.path.join(directory, filename), "wb") as f:
            # Content-Length counts encoded bytes; only compare when the body is sent as-is
            expected = None if response.headers.get("Content-Encoding") else response.headers.get("Content-Length")
            try:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
            except requests.RequestException as error:
                raise _unavailable(repo_id, subset, split, directory, f"{shard_url} was cut short ({type(error).__name__}); run again") from None
            if expected is not None and f.tell() != int(expected):
                raise _unavailable(repo_id, subset, split, directory,
                                   f"{shard_url} was cut short at {f.tell()} of {expected} bytes; run again")
            f.flush()
            try:
                pq.read_metadata(f.name)
            except (pa.ArrowException, OSError):
                raise _unavailable(repo_id, subset, split, directory, f"{shard_url} is not a parquet file") from None
        filenames.append(filename)
    with atomic_open(os.path.join(directory, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(filenames, f)
