"""
The BOS-aligned best-fit pretraining loader (nanochat/dataloader.py), on tiny parquet shards made
here: rows are whole BOS-prefixed documents (the last one possibly cropped) with no padding,
packing equals a plain reference implementation, ranks read disjoint row groups, and a loader
restored from any yielded state continues exactly like the uninterrupted one.
"""

import json
import logging
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import (
    _decode_positions,
    _document_batches,
    _encode_positions,
    tokenizing_distributed_data_loader_bos_bestfit,
    tokenizing_distributed_data_loader_with_state_bos_bestfit,
)
from nanochat.dataset import get_dataset, get_split_paths

# Small on purpose: T=48 makes many docs longer than a row (they linger in the buffer and get
# cropped), 16-doc row groups in chunks of 5 exercise partial chunks and short last row groups.
B, T = 4, 48
LOADER_ARGS = dict(tokenizer_batch_size=5, buffer_size=24, device="cpu", tokenizer_threads=1)
# docs per train shard, row group size 16: 5, 3 and 4 row groups, each file's last one short
TRAIN_SHARD_DOCS = {0: 70, 1: 40, 2: 50}
VAL_SHARD_DOCS = 30
ROW_GROUP_SIZE = 16
WORDS = ("the cat sat on a mat while the other dog ran in the park and then there was rain "
         "over hills where birds sing their song to everyone listening near the river bank").split()


def make_doc(rng, label):
    kind = rng.random()
    num_chars = rng.randint(10, 60) if kind < 0.6 else rng.randint(60, 150) if kind < 0.9 else rng.randint(150, 400)
    words = [label]
    while sum(len(w) + 1 for w in words) < num_chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base_data")
    rng = random.Random(1234)
    shards = dict(TRAIN_SHARD_DOCS)
    shards[get_dataset().val_shard] = VAL_SHARD_DOCS  # the pinned val shard of the default dataset
    for shard, num_docs in shards.items():
        # the label makes every document's text (and tokens) unique
        texts = [make_doc(rng, f"<{shard}.{i}>") for i in range(num_docs)]
        table = pa.table({"text": pa.array(texts, type=pa.string())})
        pq.write_table(table, os.path.join(directory, f"shard_{shard:05d}.parquet"), row_group_size=ROW_GROUP_SIZE)
    return str(directory)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def set_rank(monkeypatch, rank, world_size):
    """What torchrun sets; the loader reads it (via get_dist_info) when it is created."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


def make_loader(tokenizer, data_dir, resume_state_dict=None, split="train", **overrides):
    args = dict(LOADER_ARGS, **overrides)
    return tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, split, resume_state_dict=resume_state_dict, data_dir=data_dir, **args)


def take(loader, num_batches):
    """[(rows as lists of T+1 ids, state)]; checks targets are inputs shifted by one on the way."""
    out = []
    for _ in range(num_batches):
        inputs, targets, state = next(loader)
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.long
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        out.append((torch.cat([inputs, targets[:, -1:]], dim=1).tolist(), state))
    return out


def tokenized_docs(tokenizer, paths, rank=0, world_size=1):
    """{token tuple: (pq_idx, rg_idx)} of every doc in this rank's row groups."""
    bos = tokenizer.get_bos_token_id()
    docs = {}
    for pq_idx, path in enumerate(paths):
        parquet_file = pq.ParquetFile(path)
        for rg_idx in range(rank, parquet_file.num_row_groups, world_size):
            texts = parquet_file.read_row_group(rg_idx).column("text").to_pylist()
            for tokens in tokenizer.encode(texts, prepend=bos):
                docs[tuple(tokens)] = (pq_idx, rg_idx)
    return docs


def split_at_bos(row, bos):
    starts = [i for i, token in enumerate(row) if token == bos] + [len(row)]
    return [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]


def reference_bestfit_rows(tokenizer, paths, rank, world_size, num_batches, tokenizer_batch_size, buffer_size):
    """Upstream's best-fit packing spelled out plainly: a list buffer, linear scans, the stream read with its own loops."""
    bos = tokenizer.get_bos_token_id()

    def doc_chunks():
        while True:  # epochs
            for path in paths:
                parquet_file = pq.ParquetFile(path)
                for rg_idx in range(rank, parquet_file.num_row_groups, world_size):
                    texts = parquet_file.read_row_group(rg_idx).column("text").to_pylist()
                    for i in range(0, len(texts), tokenizer_batch_size):
                        yield texts[i : i + tokenizer_batch_size]

    chunks = doc_chunks()
    buffer, batches = [], []
    for _ in range(num_batches):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    buffer.extend(tokenizer.encode(next(chunks), prepend=bos))
                space = T + 1 - len(row)
                best = None
                for i, doc in enumerate(buffer):
                    if len(doc) <= space and (best is None or len(doc) > len(buffer[best])):
                        best = i
                if best is not None:
                    row.extend(buffer.pop(best))
                else:
                    shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                    row.extend(buffer.pop(shortest)[:space])
            rows.append(row)
        batches.append(rows)
    return batches


# -----------------------------------------------------------------------------


def test_rows_are_bos_aligned_whole_documents_with_only_the_last_cropped(tokenizer, data_dir):
    bos = tokenizer.get_bos_token_id()
    docs = tokenized_docs(tokenizer, get_split_paths("train", data_dir=data_dir))
    num_cropped = 0
    for rows, _ in take(make_loader(tokenizer, data_dir), 40):
        for row in rows:
            assert len(row) == T + 1 and row[0] == bos  # full row (no padding), BOS first
            segments = split_at_bos(row, bos)
            assert all(segment in docs for segment in segments[:-1])  # whole docs ...
            if segments[-1] not in docs:  # ... and the last may be the start of one
                num_cropped += 1
                assert any(doc[: len(segments[-1])] == segments[-1] for doc in docs)
    assert num_cropped > 0  # the fixture has docs longer than a row, so crops must happen


def test_packing_equals_plain_reference_implementation(tokenizer, data_dir, monkeypatch):
    paths = get_split_paths("train", data_dir=data_dir)
    for rank, world_size in ((0, 1), (1, 2)):
        set_rank(monkeypatch, rank, world_size)
        rows = [rows for rows, _ in take(make_loader(tokenizer, data_dir), 50)]
        expected = reference_bestfit_rows(tokenizer, paths, rank, world_size, 50,
                                          LOADER_ARGS["tokenizer_batch_size"], LOADER_ARGS["buffer_size"])
        assert rows == expected, f"rank {rank} of {world_size}"


def test_stateless_loader_yields_the_same_batches(tokenizer, data_dir):
    with_state = make_loader(tokenizer, data_dir)
    stateless = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, B, T, "train", data_dir=data_dir,
                                                               **LOADER_ARGS)
    for _ in range(10):
        inputs, targets, _ = next(with_state)
        batch = next(stateless)
        assert len(batch) == 2 and torch.equal(batch[0], inputs) and torch.equal(batch[1], targets)


def test_ranks_read_disjoint_row_groups_that_cover_the_split(tokenizer, data_dir, monkeypatch):
    paths = get_split_paths("train", data_dir=data_dir)
    all_row_groups = {(p, rg) for p, path in enumerate(paths) for rg in range(pq.ParquetFile(path).num_row_groups)}
    read = {}
    for rank in range(2):
        first_epoch = []
        for texts, (epoch, pq_idx, rg_idx, row) in _document_batches(paths, rank, 2, 5, (1, 0, rank, 0)):
            if epoch > 1:
                break
            first_epoch.append((pq_idx, rg_idx))
        read[rank] = set(first_epoch)
        assert all(rg_idx % 2 == rank for _, rg_idx in read[rank])
    assert not read[0] & read[1] and read[0] | read[1] == all_row_groups

    # and each rank's loader only ever packs documents from its own row groups
    bos = tokenizer.get_bos_token_id()
    for rank in range(2):
        set_rank(monkeypatch, rank, 2)
        own_docs = tokenized_docs(tokenizer, paths, rank, 2)
        for rows, _ in take(make_loader(tokenizer, data_dir), 20):
            for row in rows:
                for segment in split_at_bos(row, bos):
                    assert any(doc[: len(segment)] == segment for doc in own_docs)


def test_epochs_count_from_one_and_advance_after_a_full_pass(tokenizer, data_dir):
    states = [state for _, state in take(make_loader(tokenizer, data_dir), 60)]
    epochs = [state["epoch"] for state in states]
    assert epochs[0] == 1 and epochs == sorted(epochs) and epochs[-1] >= 3


def test_resume_from_any_state_continues_exactly(tokenizer, data_dir, monkeypatch):
    horizon, lookahead = 60, 20
    for rank, world_size in ((0, 1), (1, 2)):
        set_rank(monkeypatch, rank, world_size)
        uninterrupted = take(make_loader(tokenizer, data_dir), horizon + lookahead)
        states = [state for _, state in uninterrupted]
        # the resume points below include each kind of cursor position
        assert any(a["epoch"] < b["epoch"] for a, b in zip(states, states[1:]))  # right after an epoch boundary
        assert any(0 < s["next_row"] < ROW_GROUP_SIZE for s in states)  # mid row group
        assert any(s["rg_idx"] >= 2 and s["pq_idx"] == 0 for s in states)  # mid file
        assert any(s["next_row"] == ROW_GROUP_SIZE for s in states)  # at a row group's end
        for k in range(horizon):
            state = json.loads(json.dumps(states[k]))  # it travels through the checkpoint's meta JSON
            assert state == states[k]
            resumed = take(make_loader(tokenizer, data_dir, resume_state_dict=state), lookahead)
            expected = uninterrupted[k + 1 : k + 1 + lookahead]
            assert resumed == expected, f"rank {rank} of {world_size}, resumed after batch {k}"


def test_state_is_small_json_even_with_a_large_buffer(tokenizer, data_dir):
    loader = make_loader(tokenizer, data_dir, buffer_size=1000, tokenizer_batch_size=16)
    (_, state), = take(loader, 1)
    assert len(_decode_positions(state["doc_buffer"])) >= 990  # the buffer spans several epochs here
    assert set(state) >= {"pq_idx", "rg_idx", "epoch"}  # upstream's keys stay
    assert len(json.dumps(state)) < 20_000
    resumed = take(make_loader(tokenizer, data_dir, resume_state_dict=json.loads(json.dumps(state)),
                               buffer_size=1000, tokenizer_batch_size=16), 3)
    assert resumed == take(loader, 3)


def test_position_encoding_round_trips():
    rng = random.Random(0)
    positions = [(rng.randint(0, 3), rng.randint(0, 5), rng.randint(0, 20)) for _ in range(300)]
    positions += [(7, 1, row) for row in range(40)] + [(7, 1, 3)]  # a long run, then a repeat
    encoded = _encode_positions(positions)
    assert _decode_positions(encoded) == positions
    assert encoded.endswith("7:1:" + ",".join(str(row) for row in range(40)) + ",3")
    assert _decode_positions(_encode_positions([])) == []


def rank_stream_docs(tokenizer, paths, rank, world_size):
    """[((pq_idx, rg_idx), tokens)] of one rank's docs in stream order, for one epoch."""
    bos = tokenizer.get_bos_token_id()
    docs = []
    for pq_idx, path in enumerate(paths):
        parquet_file = pq.ParquetFile(path)
        for rg_idx in range(rank, parquet_file.num_row_groups, world_size):
            texts = parquet_file.read_row_group(rg_idx).column("text").to_pylist()
            docs.extend(((pq_idx, rg_idx), tuple(tokens)) for tokens in tokenizer.encode(texts, prepend=bos))
    return docs


def test_other_world_size_or_upstream_state_resumes_approximately(tokenizer, data_dir, monkeypatch, caplog):
    paths = get_split_paths("train", data_dir=data_dir)
    saved = take(make_loader(tokenizer, data_dir), 8)[-1][1]
    # upstream's rule for rank 1 of 2: same file and epoch, row group (rg_idx // 2 + 1) * 2 + 1,
    # or the next file when that is past the end
    first_rg = (saved["rg_idx"] // 2 + 1) * 2 + 1
    num_row_groups = pq.ParquetFile(paths[saved["pq_idx"]]).num_row_groups
    expected_first = (saved["pq_idx"], first_rg) if first_rg < num_row_groups else (saved["pq_idx"] + 1, 1)
    stream = rank_stream_docs(tokenizer, paths, 1, 2)
    start = next(i for i, (position, _) in enumerate(stream) if position >= expected_first)
    # the buffer starts empty, so the first row packs docs of the first refill: the next
    # `buffer_size` (rounded up to whole chunks) docs of the stream from the resume point on
    first_refill = {tokens for _, tokens in (stream + stream)[start : start + LOADER_ARGS["buffer_size"] + 5]}
    bos = tokenizer.get_bos_token_id()

    set_rank(monkeypatch, 1, 2)
    with caplog.at_level(logging.WARNING, logger="nanochat.dataloader"):
        loader = make_loader(tokenizer, data_dir, resume_state_dict=saved)
        (rows, state), = take(loader, 1)
    assert any("resuming approximately" in record.getMessage() for record in caplog.records)
    assert all(any(doc[: len(s)] == s for doc in first_refill) for s in split_at_bos(rows[0], bos))
    assert (state["rank"], state["world_size"]) == (1, 2)
    # the new state is exact again for the new world size
    assert take(make_loader(tokenizer, data_dir, resume_state_dict=state), 5) == take(loader, 5)

    # an upstream checkpoint's state has only upstream's three keys: same rule, same first row
    upstream = {key: saved[key] for key in ("pq_idx", "rg_idx", "epoch")}
    (upstream_rows, _), = take(make_loader(tokenizer, data_dir, resume_state_dict=upstream), 1)
    assert upstream_rows == rows


def test_state_past_the_last_file_resumes_at_the_start_of_the_next_epoch(tokenizer, data_dir, monkeypatch):
    # e.g. a state saved when the split had more files than are on disk now: the next epoch
    # must start at this rank's first row group and row, not at the state's row group
    num_files = len(get_split_paths("train", data_dir=data_dir))
    for rank, world_size in ((0, 1), (1, 2)):
        set_rank(monkeypatch, rank, world_size)
        fresh = [rows for rows, _ in take(make_loader(tokenizer, data_dir), 3)]
        for state in ({"pq_idx": num_files, "rg_idx": 3, "epoch": 1},  # upstream keys: approximate resume
                      {"pq_idx": num_files, "rg_idx": 3, "epoch": 1, "next_row": 7, "rank": rank,
                       "world_size": world_size, "doc_buffer": ""}):  # exact keys, empty buffer
            resumed = take(make_loader(tokenizer, data_dir, resume_state_dict=state), 3)
            assert [rows for rows, _ in resumed] == fresh, (rank, world_size, state)
            assert resumed[0][1]["epoch"] == 2


def test_state_without_epoch_resumes_as_epoch_one(tokenizer, data_dir, monkeypatch):
    # older upstream states are {"pq_idx", "rg_idx"} only; upstream reads a missing epoch as 1,
    # the number the first pass has
    saved = take(make_loader(tokenizer, data_dir), 8)[-1][1]
    assert saved["epoch"] == 1
    for rank, world_size in ((0, 1), (1, 2)):
        set_rank(monkeypatch, rank, world_size)
        old_state = {"pq_idx": saved["pq_idx"], "rg_idx": saved["rg_idx"]}
        without_epoch = take(make_loader(tokenizer, data_dir, resume_state_dict=old_state), 5)
        as_epoch_one = take(make_loader(tokenizer, data_dir, resume_state_dict=dict(old_state, epoch=1)), 5)
        as_epoch_three = take(make_loader(tokenizer, data_dir, resume_state_dict=dict(old_state, epoch=3)), 5)
        assert without_epoch == as_epoch_one, (rank, world_size)  # rows and states, epoch numbers included
        # the epoch is really taken from the state: the same rows, numbered two epochs later
        assert [rows for rows, _ in as_epoch_three] == [rows for rows, _ in without_epoch]
        assert [s["epoch"] for _, s in as_epoch_three] == [s["epoch"] + 2 for _, s in without_epoch]


def test_batches_are_views_of_one_reused_buffer(tokenizer, data_dir):
    loader = make_loader(tokenizer, data_dir)
    inputs, targets, _ = next(loader)
    assert inputs.is_contiguous() and targets.is_contiguous()
    assert targets.data_ptr() == inputs.data_ptr() + B * T * inputs.element_size()  # [inputs | targets]
    first_inputs = inputs.clone()
    next_inputs, _, _ = next(loader)
    assert next_inputs.data_ptr() == inputs.data_ptr()
    assert torch.equal(inputs, next_inputs) and not torch.equal(inputs, first_inputs)  # overwritten in place


def test_val_split_reads_the_pinned_val_shard(tokenizer, data_dir):
    val_docs = tokenized_docs(tokenizer, get_split_paths("val", data_dir=data_dir))
    loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, B, T, "val", data_dir=data_dir, **LOADER_ARGS)
    inputs, targets = next(loader)
    row = inputs[0].tolist() + [targets[0, -1].item()]
    segments = split_at_bos(row, tokenizer.get_bos_token_id())
    assert all(any(doc[: len(s)] == s for doc in val_docs) for s in segments)


def test_a_rank_without_row_groups_fails_clearly(tokenizer, data_dir, monkeypatch):
    set_rank(monkeypatch, 6, 8)  # the fixture's files have at most 5 row groups
    with pytest.raises(RuntimeError, match="rank 6 of 8 gets no documents"):
        next(make_loader(tokenizer, data_dir))


def test_bad_arguments_fail_at_once_with_clear_errors(tokenizer, data_dir):
    with pytest.raises(ValueError, match="split"):
        tokenizing_distributed_data_loader_bos_bestfit(tokenizer, B, T, "test", data_dir=data_dir, device="cpu")
    with pytest.raises(ValueError, match=">= 1"):
        tokenizing_distributed_data_loader_bos_bestfit(tokenizer, 0, T, "train", data_dir=data_dir, device="cpu")
    if not torch.cuda.is_available():  # device defaults to "cuda", as upstream
        with pytest.raises(RuntimeError, match="device='cpu'"):
            tokenizing_distributed_data_loader_bos_bestfit(tokenizer, B, T, "train", data_dir=data_dir)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(tokenizer, data_dir):
    cpu_loader = make_loader(tokenizer, data_dir)
    cuda_loader = make_loader(tokenizer, data_dir, device="cuda")
    for _ in range(30):
        cpu_inputs, cpu_targets, cpu_state = next(cpu_loader)
        cuda_inputs, cuda_targets, cuda_state = next(cuda_loader)
        assert cuda_inputs.is_cuda and cpu_state == cuda_state
        assert torch.equal(cuda_inputs.cpu(), cpu_inputs) and torch.equal(cuda_targets.cpu(), cpu_targets)
