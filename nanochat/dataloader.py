"""
Pretraining data loader: parquet shards -> tokenized documents -> BOS-aligned, best-fit packed
rows of T+1 tokens -> (inputs, targets) batches on the device, for one rank of W.

Every row starts with BOS and holds whole documents (the longest that fits, and when none fits
the head of the shortest; its tail is dropped), so no position is padding. Rank r reads row
groups r, r+W, r+2W, ... of every file of the split, as upstream. Each batch comes with a small
JSON state from which the loader resumes exactly (upstream resumes approximately; its states
still load). README.md ("The pretraining loader") describes the packing, the state and its cost.

    loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(tokenizer, B, T, "train")
    inputs, targets, state = next(loader)

Reads the chosen dataset's shards (nanochat.dataset: $NANOCHAT_BASE_DIR/base_data_climbmix/ or,
with NANOCHAT_DATASET=fineweb, base_data/); writes nothing.
"""

import bisect
import concurrent.futures
import functools
import itertools
import logging
import operator

import torch

from nanochat.common import get_dist_info
from nanochat.dataset import get_split_paths, iter_row_groups, open_shard, read_row_group_texts

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# The document stream


def _document_batches(paths, rank, world_size, tokenizer_batch_size, start):
    """
    Infinite stream of (texts, (epoch, pq_idx, rg_idx, row_start)): chunks of at most
    `tokenizer_batch_size` docs from row groups rank, rank+world_size, ... of each file in
    `paths`, starting at `start` = (epoch, pq_idx, rg_idx, row). A start past the end of a row
    group, file or epoch simply moves on to the next one.
    """
    epoch, first_file, first_row_group, first_row = start
    yielded_since_epoch_start = True  # the first, partial pass is never "empty"
    while True:
        for pq_idx, rg_idx, texts in iter_row_groups(paths, rank, world_size, first_file, first_row_group):
            # only the start's own row group begins mid-way
            begin = first_row if (pq_idx, rg_idx) == (first_file, first_row_group) else 0
            for row in range(begin, len(texts), tokenizer_batch_size):
                yield texts[row : row + tokenizer_batch_size], (epoch, pq_idx, rg_idx, row)
                yielded_since_epoch_start = True
        if not yielded_since_epoch_start:
            raise RuntimeError(
                f"rank {rank} of {world_size} gets no documents: the split's files have too few row groups "
                f"({paths[:3]}...); download more shards or run with fewer ranks"
            )
        yielded_since_epoch_start = False
        epoch += 1
        first_file, first_row_group, first_row = 0, rank, 0


# -----------------------------------------------------------------------------
# The document buffer


class _DocBuffer:
    """
    Tokenized docs awaiting packing, with their stream positions. Besides arrival order (dict
    order) it keeps the docs sorted by (length, arrival number), so "longest doc that fits" and
    "shortest doc" are binary searches instead of scans; ties go to the earliest arrival, the
    doc a left-to-right scan of the buffer would pick.
    """

    def __init__(self):
        self.tokens = {}  # arrival number -> token list
        self.positions = {}  # arrival number -> (pq_idx, rg_idx, row)
        self.by_length = []  # sorted (len(tokens), arrival number)
        self.arrivals = 0

    def __len__(self):
        return len(self.tokens)

    def add(self, tokens, position):
        key = self.arrivals
        self.arrivals += 1
        self.tokens[key] = tokens
        self.positions[key] = position
        # new arrivals have the largest arrival number, so they go after every doc of equal length
        bisect.insort(self.by_length, (len(tokens), key))

    def _pop(self, index):
        _, key = self.by_length.pop(index)
        del self.positions[key]
        return self.tokens.pop(key)

    def pop_longest_fitting(self, space):
        """The longest doc of at most `space` tokens (earliest arrival among equals), or None."""
        index = bisect.bisect_right(self.by_length, (space, self.arrivals))
        if index == 0:
            return None
        longest = self.by_length[index - 1][0]
        return self._pop(bisect.bisect_left(self.by_length, (longest, -1)))

    def pop_shortest(self):
        return self._pop(0)


def _encode_positions(positions):
    """[(pq, rg, row), ...] -> "pq:rg:row,row,...;pq:rg:row,..." (runs of equal (pq, rg) share a prefix)."""
    return ";".join(
        f"{pq_idx}:{rg_idx}:" + ",".join([str(position[2]) for position in group])
        for (pq_idx, rg_idx), group in itertools.groupby(positions, key=operator.itemgetter(0, 1))
    )


def _decode_positions(encoded):
    """Inverse of _encode_positions."""
    positions = []
    for group in filter(None, encoded.split(";")):
        pq_idx, rg_idx, rows = group.split(":")
        pq_idx, rg_idx = int(pq_idx), int(rg_idx)
        positions.extend((pq_idx, rg_idx, int(row)) for row in rows.split(","))
    return positions


# -----------------------------------------------------------------------------
# Resume


# The exact-resume state: pq_idx, rg_idx, epoch (file, row group and epoch of the last chunk read:
# upstream's keys), next_row (the first unread row there), rank and world_size (who wrote it), and
# doc_buffer (the buffered docs' positions in arrival order, "pq:rg:row,row,...;pq:rg:row,...",
# about 5 bytes per doc).
_EXACT_KEYS = ("pq_idx", "rg_idx", "epoch", "next_row", "rank", "world_size", "doc_buffer")


def _approximate_start(state, rank, world_size):
    """
    Upstream's resume: file pq_idx, row group (rg_idx // W + 1) * W + rank (one round of row groups
    past the saved one, so nothing repeats), same epoch; a state without "epoch" is epoch 1.
    """
    rg_idx = (state["rg_idx"] // world_size + 1) * world_size + rank
    return (state.get("epoch", 1), state["pq_idx"], rg_idx, 0)


def _read_docs_at(paths, positions, num_threads):
    """
    Texts of the docs at positions [(pq, rg, row), ...]. Long docs can sit in the buffer for most
    of a run, so the positions may span hundreds of row groups: each is read once, only the
    wanted texts are kept, and files are read in parallel (pyarrow decodes without the GIL).
    """
    wanted = {}  # pq_idx -> {rg_idx -> set of rows}
    for pq_idx, rg_idx, row in positions:
        wanted.setdefault(pq_idx, {}).setdefault(rg_idx, set()).add(row)
    if wanted and max(wanted) >= len(paths):
        raise IndexError(f"file index {max(wanted)} but the split has only {len(paths)} files")

    def read_file(pq_idx):
        parquet_file = open_shard(paths[pq_idx])
        found = {}
        for rg_idx, rows in wanted[pq_idx].items():
            if rg_idx >= parquet_file.num_row_groups:
                raise IndexError(f"row group {rg_idx} but {paths[pq_idx]} has {parquet_file.num_row_groups}")
            texts = read_row_group_texts(parquet_file, rg_idx, paths[pq_idx])
            if max(rows) >= len(texts):
                raise IndexError(f"row {max(rows)} but row group {rg_idx} of {paths[pq_idx]} has {len(texts)}")
            found.update(((pq_idx, rg_idx, row), texts[row]) for row in rows)
        return found

    texts_at = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        for found in pool.map(read_file, sorted(wanted)):
            texts_at.update(found)
    return [texts_at[position] for position in positions]


def _restore(state, paths, rank, world_size, tokenizer, bos, tokenizer_threads):
    """(stream start, restored _DocBuffer) for a resume state; falls back to upstream's approximate resume."""
    buffer = _DocBuffer()
    if not all(key in state for key in _EXACT_KEYS):
        logger.info("Loader state has no exact-resume fields (an upstream checkpoint?): resuming approximately")
        return _approximate_start(state, rank, world_size), buffer
    if (state["rank"], state["world_size"]) != (rank, world_size):
        logger.warning(
            f"Loader state was written by rank {state['rank']} of {state['world_size']}, this is rank {rank} "
            f"of {world_size}: resuming approximately (a few documents may be skipped)"
        )
        return _approximate_start(state, rank, world_size), buffer
    positions = _decode_positions(state["doc_buffer"])
    try:
        texts = _read_docs_at(paths, positions, tokenizer_threads)
    except IndexError as error:  # the split's files changed since the state was written
        logger.warning(f"Loader state does not match the data on disk ({error}): resuming approximately")
        return _approximate_start(state, rank, world_size), buffer
    for tokens, position in zip(tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads), positions):
        buffer.add(tokens, position)
    return (state["epoch"], state["pq_idx"], state["rg_idx"], state["next_row"]), buffer


# -----------------------------------------------------------------------------
# The loaders


def _bestfit_batches(tokenizer, B, T, paths, rank, world_size, tokenizer_threads, tokenizer_batch_size, device,
                     resume_state_dict, buffer_size):
    bos = tokenizer.get_bos_token_id()

    if resume_state_dict is None:
        start, buffer = (1, 0, rank, 0), _DocBuffer()
    else:
        start, buffer = _restore(resume_state_dict, paths, rank, world_size, tokenizer, bos, tokenizer_threads)
    doc_batches = _document_batches(paths, rank, world_size, tokenizer_batch_size, start)
    # where the stream stands, as the state reports it (updated with each chunk read)
    epoch, pq_idx, rg_idx, next_row = start

    # Rows are built in a preallocated CPU tensor, copied into a host staging buffer laid out
    # [inputs | targets] (pinned on CUDA) and sent to the device in one non-blocking copy per
    # batch. The yielded tensors are views of a persistent buffer that the next batch overwrites.
    # CPU-side writes go through numpy views of the same memory: a token list lands in a numpy
    # slice ~3x faster than via torch.tensor, and numpy copies never wake torch's thread pool.
    device = torch.device(device)
    use_cuda = device.type == "cuda"
    row_capacity = T + 1
    rows = torch.empty((B, row_capacity), dtype=torch.long)
    staging = torch.empty(2 * B * T, dtype=torch.long, pin_memory=use_cuda)
    rows_np, staging_np = rows.numpy(), staging.numpy()
    staging_inputs, staging_targets = staging_np[: B * T].reshape(B, T), staging_np[B * T :].reshape(B, T)
    # on CPU the staging buffer is already where the batch must be
    output = staging if device.type == "cpu" else torch.empty(2 * B * T, dtype=torch.long, device=device)
    inputs, targets = output[: B * T].view(B, T), output[B * T :].view(B, T)
    # The staging buffer is rewritten each batch while the previous asynchronous copy may still be
    # queued behind the GPU's work: wait for that copy first (it was queued before the last step's
    # work, so this does not wait for the step the trainer launched since).
    copy_done = torch.cuda.Event() if use_cuda else None

    while True:
        for row_idx in range(B):
            row = rows_np[row_idx]
            filled = 0
            while filled < row_capacity:
                while len(buffer) < buffer_size:
                    texts, (epoch, pq_idx, rg_idx, row_start) = next(doc_batches)
                    next_row = row_start + len(texts)
                    token_lists = tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads)
                    for offset, tokens in enumerate(token_lists):
                        buffer.add(tokens, (pq_idx, rg_idx, row_start + offset))
                space = row_capacity - filled
                doc = buffer.pop_longest_fitting(space)
                if doc is None:  # nothing fits whole: crop the shortest doc to the space left
                    doc = buffer.pop_shortest()[:space]
                row[filled : filled + len(doc)] = doc
                filled += len(doc)

        if copy_done is not None:
            copy_done.synchronize()
        staging_inputs[:] = rows_np[:, :-1]
        staging_targets[:] = rows_np[:, 1:]
        if output is not staging:
            output.copy_(staging, non_blocking=use_cuda)
            if copy_done is not None:
                copy_done.record(torch.cuda.current_stream(device))

        state_dict = {
            "pq_idx": pq_idx, "rg_idx": rg_idx, "epoch": epoch, "next_row": next_row,
            "rank": rank, "world_size": world_size,
            "doc_buffer": _encode_positions(buffer.positions.values()),
        }
        yield inputs, targets, state_dict


def tokenizing_distributed_data_loader_with_state_bos_bestfit(
    tokenizer, B, T, split, tokenizer_threads=4, tokenizer_batch_size=128, device="cuda",
    resume_state_dict=None, buffer_size=1000, data_dir=None,
):
    """
    Infinite iterator of (inputs[B, T], targets[B, T], state_dict), int64 on `device`, for this
    rank (torchrun environment). inputs and targets are views of one buffer that is overwritten
    by the next batch: use (or clone) them before asking for the next one.

    state_dict is JSON-serializable. Passing the state yielded with batch k as
    `resume_state_dict` (same rank and world size, same files) gives a loader whose first batch
    is batch k+1 of this one. With a training loop that prefetches, save the state of the last
    batch actually trained on, not the prefetched one's.

    data_dir overrides the shard directory (default: the chosen dataset's, nanochat.dataset.shard_dir()).
    The arguments are checked now, not at the first batch.
    """
    if min(B, T, buffer_size, tokenizer_batch_size) < 1:
        raise ValueError(f"B, T, buffer_size and tokenizer_batch_size must be >= 1, got {B}, {T}, {buffer_size}, "
                         f"{tokenizer_batch_size}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"the loader's device is {device!r} but CUDA is not available; pass device='cpu'")
    _, rank, _, world_size = get_dist_info()
    paths = get_split_paths(split, data_dir=data_dir)  # raises ValueError for a split other than train/val
    return _bestfit_batches(tokenizer, B, T, paths, rank, world_size, tokenizer_threads, tokenizer_batch_size,
                            device, resume_state_dict, buffer_size)


@functools.wraps(tokenizing_distributed_data_loader_with_state_bos_bestfit, assigned=())  # help() shows its arguments
def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """Like tokenizing_distributed_data_loader_with_state_bos_bestfit, yielding only (inputs, targets)."""
    batches = tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs)
    return ((inputs, targets) for inputs, targets, _ in batches)
