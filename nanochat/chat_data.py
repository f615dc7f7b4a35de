"""
Data loaders of the chat phases: conversations (any dataset with len() and [i] -> a conversation
dict, e.g. a tasks TaskMixture) -> token rows -> (inputs, targets) batches on the device.

    packed_conversation_batches   midtraining: rows of T+1 tokens packed best-fit with whole
                                  conversations, padded (never cropped); every token is trained on
    padded_conversation_batches   SFT: one conversation per row, padded to the longest row of the
                                  batch; only the assistant's tokens are trained on

Rank r of W reads conversations r, r+W, r+2W, ... and wraps around at the end (`epoch` counts
passes from 1). Each batch comes with a small JSON state from which the loader resumes exactly.
loader_state_for_rank turns the states a run saved (one per rank) into the start of one rank of a
run with another number of ranks: every conversation not yet trained on is still read, by exactly
one rank (packing: a few may be read twice, none is lost).
"""

import numpy as np
import torch

from nanochat.common import get_dist_info

# -----------------------------------------------------------------------------
# Reading conversations rank-strided


class _StridedReader:
    """Indices rank, rank+W, ... into a dataset of `size`, wrapping around (epoch += 1 at each wrap)."""

    def __init__(self, size, rank, world_size, cursor=None, epoch=1):
        if size < 1:
            raise ValueError("the dataset has no conversations")
        self.size, self.world_size = size, world_size
        self.cursor = rank % size if cursor is None else cursor
        self.epoch = epoch

    def next_index(self):
        index = self.cursor
        self.cursor += self.world_size
        if self.cursor >= self.size:
            self.cursor %= self.size
            self.epoch += 1
        return index


def _to_device(rows_np, device):
    """One int64 numpy array -> a tensor on device (through pinned memory on CUDA, without blocking)."""
    tensor = torch.from_numpy(rows_np)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _rank_and_world(rank, world_size):
    if rank is None or world_size is None:
        _, env_rank, _, env_world_size = get_dist_info()
        rank = env_rank if rank is None else rank
        world_size = env_world_size if world_size is None else world_size
    return rank, world_size


# -----------------------------------------------------------------------------
# Midtraining: best-fit packing with padding


def packed_conversation_batches(dataset, tokenizer, B, T, device="cpu", rank=None, world_size=None,
                                resume_state=None, buffer_size=100):
    """
    Infinite iterator of (inputs[B, T], targets[B, T], state), int64 on `device`.

    Each row holds T+1 tokens: whole conversations (rendered with render_conversation, each
    starting with BOS), chosen best-fit from a buffer of `buffer_size` conversations: the longest
    that fits in what is left of the row (the earliest of equals). When none fits, the rest of the
    row is BOS padding and its targets are -1 (from the target that would predict the first pad
    on), and the row ends. No conversation is ever split across rows; one longer than T+1 tokens
    is rendered only up to T+1 (it would fit in no row). All tokens of a conversation are
    trained on, user turns included, as upstream's midtraining does.

    state: {"cursor", "epoch", "consumed", "buffer", "rank", "world_size", "dataset_size"};
    consumed counts the conversations placed in rows by all ranks together (it starts at rank and
    grows by world_size per conversation this rank places, as upstream counts it), so
    consumed / dataset_size is the progress through one pass of the data.
    """
    rank, world_size = _rank_and_world(rank, world_size)
    device = torch.device(device)
    size = len(dataset)
    row_capacity = T + 1
    bos = tokenizer.get_bos_token_id()

    def render(index):
        ids, _ = tokenizer.render_conversation(dataset[index], max_tokens=row_capacity)
        return ids

    if resume_state is None:
        reader, consumed, buffer = _StridedReader(size, rank, world_size), rank, []
    else:
        _check_state(resume_state, rank, world_size, size)
        reader = _StridedReader(size, rank, world_size, resume_state["cursor"], resume_state["epoch"])
        consumed = resume_state["consumed"]
        buffer = [(index, render(index)) for index in resume_state["buffer"]]

    while True:
        rows = np.full((B, row_capacity), bos, dtype=np.int64)
        content_lengths = []
        for row in rows:
            filled = 0
            while True:
                while len(buffer) < buffer_size:
                    index = reader.next_index()
                    buffer.append((index, render(index)))
                space = row_capacity - filled
                best = -1
                for i, (_, ids) in enumerate(buffer):
                    if len(ids) <= space and (best < 0 or len(ids) > len(buffer[best][1])):
                        best = i
                if best < 0:
                    break  # nothing fits: the rest stays BOS padding
                _, ids = buffer.pop(best)
                row[filled : filled + len(ids)] = ids
                filled += len(ids)
                consumed += world_size
                if filled == row_capacity:
                    break
            content_lengths.append(filled)
        inputs, targets = rows[:, :-1].copy(), rows[:, 1:].copy()
        for i, filled in enumerate(content_lengths):
            if filled < row_capacity:
                targets[i, max(filled - 1, 0):] = -1
        state = {"cursor": reader.cursor, "epoch": reader.epoch, "consumed": consumed,
                 "buffer": [index for index, _ in buffer], "rank": rank, "world_size": world_size,
                 "dataset_size": size}
        yield _to_device(inputs, device), _to_device(targets, device), state


# -----------------------------------------------------------------------------
# SFT: one conversation per row


def padded_conversation_batches(dataset, tokenizer, B, max_tokens, device="cpu", rank=None, world_size=None,
                                resume_state=None):
    """
    Infinite iterator of (inputs[B, L], targets[B, L], state), int64 on `device`, L = the longest
    rendered conversation of the batch minus 1 (rendered up to max_tokens). inputs are the tokens,
    padded with <|assistant_end|>; targets[t] is token t+1 where render_conversation's mask is 1
    (what the assistant says), else -1, and -1 on padding.

    state: {"cursor", "epoch", "rank", "world_size", "dataset_size"}.
    """
    rank, world_size = _rank_and_world(rank, world_size)
    device = torch.device(device)
    size = len(dataset)
    pad = tokenizer.encode_special("<|assistant_end|>")
    if resume_state is None:
        reader = _StridedReader(size, rank, world_size)
    else:
        _check_state(resume_state, rank, world_size, size)
        reader = _StridedReader(size, rank, world_size, resume_state["cursor"], resume_state["epoch"])

    while True:
        rendered = [tokenizer.render_conversation(dataset[reader.next_index()], max_tokens=max_tokens) for _ in range(B)]
        length = max(len(ids) for ids, _ in rendered) - 1
        inputs = np.full((B, length), pad, dtype=np.int64)
        targets = np.full((B, length), -1, dtype=np.int64)
        for row, (ids, mask) in enumerate(rendered):
            ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
            n = len(ids) - 1
            inputs[row, :n] = ids[:-1]
            targets[row, :n] = np.where(mask[1:], ids[1:], -1)
        state = {"cursor": reader.cursor, "epoch": reader.epoch, "rank": rank, "world_size": world_size,
                 "dataset_size": size}
        yield _to_device(inputs, device), _to_device(targets, device), state


# -----------------------------------------------------------------------------
# Resume


def _check_state(state, rank, world_size, size):
    if (state["rank"], state["world_size"]) != (rank, world_size):
        raise ValueError(f"loader state of rank {state['rank']} of {state['world_size']} given to rank {rank} of "
                         f"{world_size}: convert it with loader_state_for_rank")
    if state["dataset_size"] != size:
        raise ValueError(f"loader state is for a dataset of {state['dataset_size']} conversations, this one has {size}: "
                         "resume with the data the run started with")


def loader_state_for_rank(saved_states, rank, world_size):
    """
    The resume state of `rank` of a `world_size`-rank run from the states every rank of a saved run
    yielded with its last trained batch (in rank order). Same number of ranks: the rank's own state.
    Otherwise the new ranks start reading where the slowest saved rank stood (its linear position,
    epochs included, is where every conversation before it has been read), and the conversations
    waiting in the saved buffers are dealt out to the new ranks, so none is lost.
    """
    if len(saved_states) == world_size:
        return saved_states[rank]
    size = saved_states[0]["dataset_size"]

    def linear_position(state):  # where the rank's next read stands, counting wraps
        return (state["epoch"] - 1) * size + state["cursor"] - state["rank"]

    start = min(linear_position(state) for state in saved_states) + rank
    state = {"cursor": start % size, "epoch": start // size + 1, "rank": rank, "world_size": world_size,
             "dataset_size": size}
    if "buffer" in saved_states[0]:
        waiting = [index for saved in saved_states for index in saved["buffer"]]
        placed = sum((saved["consumed"] - saved["rank"]) // len(saved_states) for saved in saved_states)
        state.update(buffer=waiting[rank::world_size], consumed=placed + rank)
    return state
