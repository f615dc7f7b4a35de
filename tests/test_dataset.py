"""
Pretraining shards: the two datasets (their directories, selection, val shards and URLs), the
split rule, striding, the shard format, the shard writer, the repackager, and the downloader
against a local HTTP server that misbehaves on purpose (no network needed).
"""

import argparse
import glob
import importlib.util
import json
import math
import os
import random
import socket
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import LocalHTTPServer, QuietHandler
from nanochat import dataset
from nanochat.common import ConfigError
from nanochat.dataset import (
    ShardWriter, download_shard, get_split_paths, list_parquet_files, parquets_iter_batched, shard_filename,
    shard_problem, write_shard, write_train_val_shards,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = dataset.get_dataset()  # the mechanics are tested on the default dataset (conftest clears NANOCHAT_DATASET)
VAL_SHARD_INDEX, MAX_SHARD = DEFAULT.val_shard, DEFAULT.max_shard
# upstream's facts: the hub repository, the last shard index and the local directory of each dataset
UPSTREAM = {
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6542, "base_data_climbmix"),
    "fineweb": ("karpathy/fineweb-edu-100b-shuffle", 1822, "base_data"),
}


def make_docs(tag, n):
    return [f"{tag} doc {i} " + "lorem ipsum " * (i % 7) for i in range(n)]


def shard_bytes(tmp_path, tag, n=10, row_group_size=4):
    path = os.path.join(tmp_path, f"source_{tag}.parquet")
    write_shard(path, make_docs(tag, n), row_group_size)
    with open(path, "rb") as f:
        return f.read()


def leftovers(directory):
    """Temp files a download or write may have left behind."""
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


# -----------------------------------------------------------------------------
# The two datasets: selection, directories, val shards


def test_climbmix_is_the_default_and_the_env_or_the_flag_chooses(monkeypatch):
    assert dataset.get_dataset().name == "climbmix"
    monkeypatch.setenv("NANOCHAT_DATASET", "fineweb")
    assert dataset.get_dataset().name == "fineweb" and dataset.get_dataset("climbmix").name == "climbmix"
    parser = argparse.ArgumentParser()
    dataset.add_dataset_flag(parser)
    assert parser.parse_args([]).dataset == "fineweb"  # the flag's default follows the env
    assert parser.parse_args(["--dataset", "climbmix"]).dataset == "climbmix"
    assert dataset.use_dataset("climbmix").name == "climbmix" and os.environ["NANOCHAT_DATASET"] == "climbmix"
    monkeypatch.setenv("NANOCHAT_DATASET", "fineweb-edu")
    with pytest.raises(ConfigError, match="unknown pretraining dataset 'fineweb-edu'.*climbmix, fineweb"):
        dataset.get_dataset()


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_each_dataset_has_upstreams_url_directory_and_last_shard_as_val(name, tmp_path, monkeypatch):
    repo, last_shard, dir_name = UPSTREAM[name]
    chosen = dataset.get_dataset(name)
    assert chosen.base_url == f"https://huggingface.co/datasets/{repo}/resolve/main"
    assert (chosen.max_shard, chosen.val_shard, chosen.dir_name) == (last_shard, last_shard, dir_name)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATASET", name)
    assert dataset.shard_dir() == str(tmp_path / dir_name)
    for index in (0, 1, 7, 1822, 6542):  # 1822 is a train shard of ClimbMix, 6542 a stray file next to FineWeb-Edu
        write_shard(os.path.join(dataset.shard_dir(), shard_filename(index)), make_docs(index, 3))
    (tmp_path / dir_name / "shard_00002.parquet.abc.tmp").write_bytes(b"partial download")
    names = [os.path.basename(p) for p in list_parquet_files()]
    assert names == ["shard_00000.parquet", "shard_00001.parquet", "shard_00007.parquet", "shard_01822.parquet", "shard_06542.parquet"]
    assert [os.path.basename(p) for p in get_split_paths("val")] == [shard_filename(last_shard)]
    assert [os.path.basename(p) for p in get_split_paths("train")] == [n for n in names if n != shard_filename(last_shard)]


def test_one_base_dir_holds_both_datasets_and_each_reads_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for name in UPSTREAM:
        for index in (0, dataset.get_dataset(name).val_shard):
            write_shard(os.path.join(dataset.shard_dir(name), shard_filename(index)), make_docs(f"{name}{index}", 3))
    assert sorted(os.listdir(tmp_path)) == ["base_data", "base_data_climbmix"]
    for name in UPSTREAM:
        monkeypatch.setenv("NANOCHAT_DATASET", name)
        val_shard = dataset.get_dataset(name).val_shard
        assert sum(parquets_iter_batched("train"), []) == make_docs(f"{name}0", 3)
        assert sum(parquets_iter_batched("val"), []) == make_docs(f"{name}{val_shard}", 3)


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_missing_shards_are_one_line_naming_the_download_of_that_dataset(name, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATASET", name)
    title = dataset.get_dataset(name).title
    for split in ("train", "val"):
        with pytest.raises(FileNotFoundError) as missing:
            get_split_paths(split)
        message = str(missing.value)
        assert f"no {title} {split}" in message and "\n" not in message
        assert f"`python -m nanochat.dataset --dataset {name} -n 8`" in message
        assert f"`python -m dev.offline_data corpus --dataset {name}`" in message
        assert "NANOCHAT_DATASET=" not in message  # no other dataset on disk to point at


def test_missing_climbmix_shards_point_at_the_fineweb_shards_already_on_disk(tmp_path, monkeypatch):
    """Upstream falls back to base_data/ with a warning; we say where those shards are and how to keep using them."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    write_shard(os.path.join(dataset.shard_dir("fineweb"), shard_filename(0)), make_docs(0, 3))
    with pytest.raises(FileNotFoundError) as missing:
        get_split_paths("train")
    message = str(missing.value)
    assert message.startswith(f"no ClimbMix-400B train shards in {tmp_path / 'base_data_climbmix'}: ")
    assert f"FineWeb-Edu-100B shards are in {tmp_path / 'base_data'}: set NANOCHAT_DATASET=fineweb" in message
    assert "retraining the tokenizer" in message


# -----------------------------------------------------------------------------
# Split rule and striding


def test_missing_splits_raise_errors_that_say_what_to_run(tmp_path):
    write_shard(os.path.join(tmp_path, shard_filename(3)), make_docs(3, 3))
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset"):
        get_split_paths("val", str(tmp_path))
    os.remove(os.path.join(tmp_path, shard_filename(3)))
    write_shard(os.path.join(tmp_path, shard_filename(VAL_SHARD_INDEX)), make_docs(9, 3))
    with pytest.raises(FileNotFoundError, match="python -m dev.offline_data corpus"):
        get_split_paths("train", str(tmp_path))
    with pytest.raises(ValueError, match="'train' or 'val'"):
        get_split_paths("test", str(tmp_path))


@pytest.mark.parametrize("start,step", [(0, 1), (1, 2), (0, 3), (2, 2), (5, 1)])
def test_parquets_iter_batched_yields_exactly_the_strided_row_groups(tmp_path, monkeypatch, start, step):
    row_group_size = 4
    sizes = {0: 10, 1: 13, 2: 4, VAL_SHARD_INDEX: 9}
    for index, n in sizes.items():
        write_shard(os.path.join(tmp_path, DEFAULT.dir_name, shard_filename(index)), make_docs(f"s{index}", n), row_group_size)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))  # the default data dir is looked up per call
    for split, indices in (("train", [0, 1, 2]), ("val", [VAL_SHARD_INDEX])):
        expected = []
        for index in indices:  # reference: all docs of the file, cut into row groups by hand
            docs = make_docs(f"s{index}", sizes[index])
            groups = [docs[i:i + row_group_size] for i in range(0, len(docs), row_group_size)]
            expected.extend(groups[start::step])
        assert list(parquets_iter_batched(split, start=start, step=step)) == expected


def test_iter_row_groups_can_begin_mid_way_and_later_files_begin_at_start(tmp_path):
    sizes = [10, 13, 4]  # row groups of 4: 3, 4 and 1 of them
    paths = []
    for index, n in enumerate(sizes):
        paths.append(os.path.join(tmp_path, shard_filename(index)))
        write_shard(paths[-1], make_docs(f"s{index}", n), row_group_size=4)

    def positions(**kwargs):
        return [(pq_idx, rg_idx) for pq_idx, rg_idx, _ in dataset.iter_row_groups(paths, **kwargs)]

    assert positions(start=1, step=2) == [(0, 1), (1, 1), (1, 3)]
    assert positions(start=1, step=2, first_file=1, first_row_group=2) == [(1, 2)]  # file 2 has no row group 1
    assert positions(start=0, step=2, first_file=0, first_row_group=7) == [(1, 0), (1, 2), (2, 0)]  # past the end: next file
    texts = [texts for _, _, texts in dataset.iter_row_groups(paths, first_file=2)]
    assert texts == [make_docs("s2", 4)]


# -----------------------------------------------------------------------------
# Shard format and writer


def test_write_shard_has_the_exact_upstream_format(tmp_path):
    texts = [f"document {i}: " + "word " * i for i in range(2500)]
    path = os.path.join(tmp_path, "shard_00000.parquet")
    write_shard(path, texts, row_group_size=1024)
    assert leftovers(tmp_path) == []
    parquet_file = pq.ParquetFile(path)
    assert parquet_file.schema_arrow == pa.schema([pa.field("text", pa.string())])
    meta = parquet_file.metadata
    assert meta.num_rows == 2500 and meta.num_row_groups == 3
    assert [meta.row_group(i).num_rows for i in range(3)] == [1024, 1024, 452]
    for i in range(3):
        column = meta.row_group(i).column(0)
        assert column.compression == "ZSTD"
        assert not column.is_stats_set
        assert not column.has_dictionary_page
        assert not any("DICTIONARY" in encoding for encoding in column.encodings)
    assert pq.read_table(path).column("text").to_pylist() == texts
    # byte-identical to the pyarrow call of upstream's repackaging script, with the zstd level pinned too
    reference = os.path.join(tmp_path, "reference.parquet")
    pq.write_table(pa.table({"text": texts}), reference, row_group_size=1024, use_dictionary=False,
                   compression="zstd", compression_level=3, write_statistics=False)
    assert open(path, "rb").read() == open(reference, "rb").read()


def reference_shard_sizes(lengths, chars_per_shard, row_group_size):
    """The closing rule written out plainly: >= chars_per_shard chars AND a multiple of row_group_size docs."""
    sizes, count, chars = [], 0, 0
    for length in lengths:
        count, chars = count + 1, chars + length
        if chars >= chars_per_shard and count % row_group_size == 0:
            sizes.append(count)
            count, chars = 0, 0
    if count:
        sizes.append(count)
    return sizes


def test_shard_writer_closes_shards_by_the_chars_and_row_group_rule(tmp_path):
    rng = random.Random(0)
    docs = ["x" * rng.randint(1, 60) for _ in range(500)]
    writer = ShardWriter(str(tmp_path), chars_per_shard=700, row_group_size=8, first_index=VAL_SHARD_INDEX - 3)
    for doc in docs:
        writer.add(doc)
    paths = writer.close()
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    assert sizes == reference_shard_sizes(map(len, docs), 700, 8)
    indices = [int(os.path.basename(p)[6:11]) for p in paths]
    assert VAL_SHARD_INDEX not in indices  # reserved for val
    assert indices[:4] == [VAL_SHARD_INDEX - 3, VAL_SHARD_INDEX - 2, VAL_SHARD_INDEX - 1, VAL_SHARD_INDEX + 1]
    assert sum((pq.read_table(p).column("text").to_pylist() for p in paths), []) == docs


def test_train_val_split_with_held_out_docs_and_with_last_shard(tmp_path):
    docs = make_docs("d", 100)
    held_out = tmp_path / "held_out"
    train, val = write_train_val_shards(docs, str(held_out), chars_per_shard=300, row_group_size=4, val_docs=12)
    assert os.path.basename(val) == shard_filename(VAL_SHARD_INDEX)
    assert pq.read_table(val).column("text").to_pylist() == docs[:12]
    assert sum((pq.read_table(p).column("text").to_pylist() for p in train), []) == docs[12:]

    last = tmp_path / "last"
    train, val = write_train_val_shards(docs, str(last), chars_per_shard=300, row_group_size=4, val_docs=0)
    train_docs = sum((pq.read_table(p).column("text").to_pylist() for p in train), [])
    assert train_docs + pq.read_table(val).column("text").to_pylist() == docs
    assert sorted(os.listdir(last)) == sorted([os.path.basename(p) for p in train] + [shard_filename(VAL_SHARD_INDEX)])

    capped = tmp_path / "capped"
    train, val = write_train_val_shards(docs, str(capped), chars_per_shard=300, row_group_size=4, val_docs=8, max_train_shards=2)
    assert len(train) == 2 and len(os.listdir(capped)) == 3

    _, val = write_train_val_shards(docs, str(tmp_path / "fineweb"), chars_per_shard=300, row_group_size=4, val_docs=8,
                                    val_index=dataset.get_dataset("fineweb").val_shard)
    assert os.path.basename(val) == "shard_01822.parquet"


def test_repackage_script_builds_shards_from_local_files(tmp_path):
    spec = importlib.util.spec_from_file_location("repackage", os.path.join(REPO_ROOT, "dev", "repackage_data_reference.py"))
    repackage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repackage)
    inputs = tmp_path / "inputs"
    (inputs / "nested").mkdir(parents=True)
    txt_docs = [f"text file {i} " + "abc " * i for i in range(20)]
    for i, doc in enumerate(txt_docs):
        (inputs / "nested" / f"{i:02d}.txt").write_text(doc)
    jsonl_docs = [f"json line {i}" for i in range(15)]
    (inputs / "lines.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in jsonl_docs) + "\n")
    parquet_docs = [f"parquet row {i}" for i in range(9)]
    pq.write_table(pa.table({"body": parquet_docs}), inputs / "rows.parquet")
    out = tmp_path / "out"
    repackage.main(["--input-dir", str(inputs), "--output-dir", str(out), "--text-field", "body",
                    "--chars-per-shard", "100", "--row-group-size", "4", "--val-docs", "8"])
    val = get_split_paths("val", str(out))
    train = get_split_paths("train", str(out))
    written = sum((pq.read_table(p).column("text").to_pylist() for p in train + val), [])
    assert sorted(written) == sorted(txt_docs + jsonl_docs + parquet_docs)
    assert pq.ParquetFile(val[0]).metadata.num_rows == 8
    with pytest.raises(SystemExit, match="--overwrite"):
        repackage.main(["--input-dir", str(inputs), "--output-dir", str(out), "--text-field", "body"])


# -----------------------------------------------------------------------------
# Downloads from a local server that fails on purpose


class ShardServer(LocalHTTPServer):
    """
    Serves shard bytes over HTTP on 127.0.0.1. plan[name] is a list of behaviours, one per GET
    (the last repeats): "ok", "drop" (Content-Length, half the body, then a TCP reset), "short"
    (Content-Length of the whole body, half sent, clean close), "unsized_short" (no Content-Length,
    half sent, close), "500", "404". gets[name] counts GET requests, paths lists the paths asked for.
    """

    def __init__(self, files):
        self.files, self.plan, self.gets, self.paths = files, {}, {}, []
        server = self

        class Handler(QuietHandler):
            def do_HEAD(self):
                self.send_response(200)
                self.end_headers()

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.paths.append(self.path)
                server.gets[name] = server.gets.get(name, 0) + 1
                steps = server.plan.get(name, ["ok"])
                behaviour = steps[min(server.gets[name], len(steps)) - 1]
                body = server.files.get(name)
                if body is None or behaviour == "404":
                    self.send_error(404)
                    return
                if behaviour == "500":
                    self.send_error(500)
                    return
                self.send_response(200)
                if behaviour != "unsized_short":
                    self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if behaviour == "ok":
                    self.wfile.write(body)
                    return
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                if behaviour == "drop":  # abortive close: the client sees a reset mid-body
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()

        super().__init__(Handler)
        self.url = f"{self.address}/data"


@pytest.fixture
def shard_files(tmp_path_factory):
    sources = tmp_path_factory.mktemp("sources")
    return {shard_filename(i): shard_bytes(str(sources), i) for i in (0, 1, 2, VAL_SHARD_INDEX)}


def test_download_writes_a_complete_shard(tmp_path, shard_files):
    with ShardServer(shard_files) as server:
        result = download_shard(0, str(tmp_path), server.url, backoff_base=0)
    assert result.status == "downloaded" and result.num_bytes == len(shard_files["shard_00000.parquet"])
    assert (tmp_path / "shard_00000.parquet").read_bytes() == shard_files["shard_00000.parquet"]
    assert server.gets == {"shard_00000.parquet": 1} and leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", ["drop", "short", "unsized_short", "500"])
def test_a_failed_first_attempt_is_retried_into_a_correct_shard(tmp_path, shard_files, failure):
    with ShardServer(shard_files) as server:
        server.plan["shard_00001.parquet"] = [failure, "ok"]
        result = download_shard(1, str(tmp_path), server.url, backoff_base=0)
    assert result.status == "downloaded"
    assert (tmp_path / "shard_00001.parquet").read_bytes() == shard_files["shard_00001.parquet"]
    assert server.gets["shard_00001.parquet"] == 2 and leftovers(tmp_path) == []


@pytest.mark.parametrize("failure,expected_gets,reason", [
    ("500", 5, "HTTP 500"), ("short", 5, ""), ("drop", 5, ""), ("unsized_short", 5, "not a valid shard"), ("404", 1, "HTTP 404")])
def test_a_persistent_failure_leaves_no_file_and_says_why(tmp_path, shard_files, failure, expected_gets, reason):
    with ShardServer(shard_files) as server:
        server.plan["shard_00002.parquet"] = [failure]
        result = download_shard(2, str(tmp_path), server.url, attempts=5, backoff_base=0)
    assert result.status == "failed" and reason in result.reason and result.reason
    assert server.gets["shard_00002.parquet"] == expected_gets  # 4xx is not retried
    assert os.listdir(tmp_path) == []


def test_a_truncated_or_foreign_file_on_disk_is_replaced(tmp_path, shard_files):
    body = shard_files["shard_00000.parquet"]
    (tmp_path / "shard_00000.parquet").write_bytes(body[: len(body) - 100])
    pq.write_table(pa.table({"content": ["no text column"]}), tmp_path / "shard_00001.parquet")
    assert "not a readable parquet" in shard_problem(str(tmp_path / "shard_00000.parquet"))
    assert "no 'text' column" in shard_problem(str(tmp_path / "shard_00001.parquet"))
    with ShardServer(shard_files) as server:
        results = [download_shard(i, str(tmp_path), server.url, backoff_base=0) for i in (0, 1)]
    assert [r.status for r in results] == ["downloaded", "downloaded"]
    for name in ("shard_00000.parquet", "shard_00001.parquet"):
        assert (tmp_path / name).read_bytes() == shard_files[name]


def test_complete_shards_are_skipped_without_a_request(tmp_path, shard_files):
    (tmp_path / "shard_00000.parquet").write_bytes(shard_files["shard_00000.parquet"])
    with ShardServer(shard_files) as server:
        result = download_shard(0, str(tmp_path), server.url, backoff_base=0)
    assert result.status == "skipped" and server.gets == {}


def test_shard_indices_always_include_the_val_shard():
    assert dataset.shard_indices_to_download(3) == [0, 1, 2, VAL_SHARD_INDEX]
    assert dataset.shard_indices_to_download(0) == [VAL_SHARD_INDEX]
    assert dataset.shard_indices_to_download(-1) == list(range(MAX_SHARD + 1))
    assert dataset.shard_indices_to_download(50000) == list(range(MAX_SHARD + 1))
    fineweb = dataset.get_dataset("fineweb")
    assert dataset.shard_indices_to_download(3, fineweb) == [0, 1, 2, 1822]
    assert dataset.shard_indices_to_download(-1, fineweb) == list(range(1823))


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_cli_fetches_each_dataset_from_its_repository_into_its_directory(name, tmp_path, monkeypatch, capsys):
    """A fake hub stands in for the real one: only the host changes, the dataset's path stays."""
    repo, last_shard, dir_name = UPSTREAM[name]
    sources = tmp_path / "sources"
    files = {shard_filename(i): shard_bytes(str(sources), i) for i in (0, 1, last_shard)}
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_DATA_URL", raising=False)
    with ShardServer(files) as server:
        monkeypatch.setattr(dataset, "HUB_DATASETS_URL", f"{server.address}/datasets")
        assert dataset.main(["--dataset", name, "-n", "2", "-w", "1", "--retry-backoff", "0"]) == 0
    assert sorted(server.paths) == [f"/datasets/{repo}/resolve/main/{shard_filename(i)}" for i in (0, 1, last_shard)]
    assert sorted(os.listdir(tmp_path / "base")) == [dir_name]
    assert sorted(os.listdir(tmp_path / "base" / dir_name)) == sorted(files)
    assert f"Shards of {dataset.get_dataset(name).title}: 3 wanted" in capsys.readouterr().out


def test_cli_downloads_in_parallel_and_reports_failures(tmp_path, shard_files, capsys):
    with ShardServer(shard_files) as server:
        server.plan["shard_00001.parquet"] = ["500"]
        args = ["-n", "3", "-w", "3", "--base-url", server.url, "--data-dir", str(tmp_path), "--retry-backoff", "0"]
        assert dataset.main(args) == 1
        out = capsys.readouterr().out
        assert "Done! Downloaded: 3/4 shards" in out
        assert "failed shard_00001.parquet: HTTP 500" in out
        assert sum(line.startswith("[") for line in out.splitlines()) == 4  # one progress line per shard
        server.plan["shard_00001.parquet"] = ["ok"]
        assert dataset.main(args) == 0
        assert "Done! Downloaded: 4/4 shards (1 new, 3 already present)" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", shard_filename(VAL_SHARD_INDEX)]


def test_cli_says_in_one_line_when_the_host_is_unreachable(tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["-n", "2", "--base-url", f"http://127.0.0.1:{port}/data", "--data-dir", str(tmp_path), "--retry-backoff", "5"]
    assert dataset.main(args) == 1  # with a 5 s back-off this would take minutes if it retried
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Shards of ClimbMix-400B: 3 wanted")
    assert "Cannot reach 127.0.0.1" in lines[1] and "connection refused" in lines[1]
    assert "python -m dev.offline_data corpus --dataset climbmix" in lines[1]
    assert os.listdir(tmp_path) == []


def test_cli_refuses_to_mix_downloads_into_the_offline_corpus(tmp_path, capsys):
    (tmp_path / dataset.OFFLINE_MANIFEST_NAME).write_text("{}")
    assert dataset.main(["-n", "1", "--data-dir", str(tmp_path), "--base-url", "http://127.0.0.1:9/x"]) == 1
    assert "offline corpus" in capsys.readouterr().out


def test_cli_only_downloads_and_names_the_offline_builder(capsys):
    with pytest.raises(SystemExit):
        dataset.parse_args(["--offline"])  # the offline builder is `python -m dev.offline_data corpus` now
    with pytest.raises(SystemExit):
        dataset.parse_args(["--help"])
    assert "python -m dev.offline_data corpus" in " ".join(capsys.readouterr().out.split())


def test_val_shard_download_and_split_end_to_end(tmp_path, shard_files):
    with ShardServer(shard_files) as server:
        results = dataset.download_shards([0, VAL_SHARD_INDEX], str(tmp_path), server.url, num_workers=2, backoff_base=0)
    assert [r.status for r in results] == ["downloaded", "downloaded"]
    val_batches = list(parquets_iter_batched("val", data_dir=str(tmp_path)))
    assert sum(val_batches, []) == make_docs(VAL_SHARD_INDEX, 10)
    assert math.ceil(10 / 4) == len(val_batches)
    assert not glob.glob(os.path.join(tmp_path, "*.tmp"))
