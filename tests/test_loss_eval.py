"""
Bits per byte (nanochat/loss_eval.py) against a hand computation: summed nats over targets that
stand for bytes, divided by ln 2 and the byte count; ignored (-1) and special (0-byte) targets
left out; sums taken over all ranks.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port
from nanochat.loss_eval import evaluate_bpb

VOCAB = 12
# bytes per token id: ids 0 and 1 are specials (0 bytes); the LAST id has bytes, so an ignored
# target (-1) that wrongly indexed token_bytes would count them
TOKEN_BYTES = torch.tensor([0, 0, 1, 2, 3, 1, 4, 2, 1, 3, 2, 5], dtype=torch.int32)


class BigramModel:
    """A model-like callable with GPT.forward's signature: logits are a fixed row per input id."""

    def __init__(self, seed=0):
        self.logits = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed))
        self.calls = 0

    def __call__(self, idx, targets=None, loss_reduction="mean"):
        self.calls += 1
        logits = self.logits[idx]
        return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1, reduction=loss_reduction)


def make_batches(seed, num_batches=3, B=2, T=7):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        inputs = torch.randint(0, VOCAB, (B, T), generator=generator)
        targets = torch.randint(0, VOCAB, (B, T), generator=generator)
        targets[torch.rand(B, T, generator=generator) < 0.25] = -1
        batches.append((inputs, targets))
    return batches


def hand_computed_bpb(model, batches):
    nats, num_bytes = 0.0, 0
    for inputs, targets in batches:
        for x, y in zip(inputs.flatten().tolist(), targets.flatten().tolist()):
            if y < 0 or TOKEN_BYTES[y] == 0:
                continue
            row = model.logits[x].tolist()
            nats += math.log(sum(math.exp(v) for v in row)) - row[y]  # -log softmax(row)[y]
            num_bytes += int(TOKEN_BYTES[y])
    return nats / (math.log(2) * num_bytes)


def test_bpb_equals_hand_computation_without_ignored_and_special_targets():
    model, batches = BigramModel(), make_batches(seed=1)
    # the fixture must actually contain ignored targets and special targets
    all_targets = torch.cat([t.flatten() for _, t in batches])
    assert (all_targets == -1).any() and ((all_targets == 0) | (all_targets == 1)).any()
    bpb = evaluate_bpb(model, iter(batches), len(batches), TOKEN_BYTES)
    assert bpb == pytest.approx(hand_computed_bpb(model, batches), rel=1e-5)


def test_only_the_requested_steps_are_evaluated():
    model, batches = BigramModel(), make_batches(seed=2, num_batches=5)
    bpb = evaluate_bpb(model, iter(batches), 2, TOKEN_BYTES)
    assert model.calls == 2
    assert bpb == pytest.approx(hand_computed_bpb(model, batches[:2]), rel=1e-5)


def test_loader_style_triples_are_accepted():
    model, batches = BigramModel(), make_batches(seed=3)
    triples = [(x, y, {"epoch": 1}) for x, y in batches]
    assert evaluate_bpb(model, iter(triples), 3, TOKEN_BYTES) == evaluate_bpb(model, iter(batches), 3, TOKEN_BYTES)


def test_no_bytes_gives_infinity():
    model = BigramModel()
    inputs = torch.randint(0, VOCAB, (2, 5))
    targets = torch.tensor([[0, 1, -1, 0, 1], [-1, -1, 1, 0, 0]])  # only specials and ignored
    assert evaluate_bpb(model, iter([(inputs, targets)]), 1, TOKEN_BYTES) == float("inf")
    assert evaluate_bpb(model, iter([]), 0, TOKEN_BYTES) == float("inf")


def test_nonfinite_losses_on_excluded_targets_do_not_reach_the_sum():
    """A loss of inf/nan on a special or ignored target (0 bytes) is left out, not multiplied by 0 (inf * 0 = nan)."""
    class NonFiniteOnExcludedModel(BigramModel):
        def __call__(self, idx, targets=None, loss_reduction="mean"):
            losses = super().__call__(idx, targets, loss_reduction)
            excluded = (targets < 0) | (TOKEN_BYTES[targets.clamp(min=0)] == 0)
            return torch.where(excluded.view(-1), torch.tensor(float("inf")), losses)

    batches = make_batches(seed=5)
    bpb = evaluate_bpb(NonFiniteOnExcludedModel(), iter(batches), 3, TOKEN_BYTES)
    assert bpb == pytest.approx(hand_computed_bpb(BigramModel(), batches), rel=1e-5)


def test_runs_without_building_autograd_graphs():
    class GradCheckingModel(BigramModel):
        def __call__(self, idx, targets=None, loss_reduction="mean"):
            assert not torch.is_grad_enabled()
            return super().__call__(idx, targets, loss_reduction)

    evaluate_bpb(GradCheckingModel(), iter(make_batches(seed=4)), 3, TOKEN_BYTES)


def _rank_worker(rank, world_size, port, result_queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        bpb = evaluate_bpb(BigramModel(), iter(make_batches(seed=10 + rank)), 3, TOKEN_BYTES)
        result_queue.put((rank, bpb))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch
def test_two_ranks_sum_nats_and_bytes_before_dividing():
    # spawn, not fork: a forked child of a process that already ran torch's OpenMP pool can hang
    port, context = free_port(), mp.get_context("spawn")
    result_queue = context.Queue()
    workers = [context.Process(target=_rank_worker, args=(rank, 2, port, result_queue)) for rank in range(2)]
    for worker in workers:
        worker.start()
    results = dict(result_queue.get(timeout=60) for _ in range(2))
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    expected = hand_computed_bpb(BigramModel(), make_batches(seed=10) + make_batches(seed=11))
    assert results[0] == pytest.approx(expected, rel=1e-5) and results[1] == pytest.approx(expected, rel=1e-5)
    # and this is not simply the mean of the two ranks' own bpb
    separate = [hand_computed_bpb(BigramModel(), make_batches(seed=10 + r)) for r in range(2)]
    assert abs(expected - sum(separate) / 2) > 1e-6
