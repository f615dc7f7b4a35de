"""
The 2-rank half of tests/test_optim.py: a small problem with every kind of param group, and a
worker that optimizes it on W ranks (gloo, CPU), each rank seeing its own slice of the batch.
The test builds the 1-rank reference in its own process and compares.

Run (the test does this; <dir> must hold the problem.pt the test writes):
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_optim_worker.py <dir>
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat import optim
from nanochat.optim import MuonAdamW

BATCH_SIZE = 8
# Muon as recipe 2026-07 runs it (MuonEq, Muon+, margin 1.01), for scenario D
MUON_2026_07 = dict(muon_eq=True, muon_plus=True, polar_margin=1.01)
# name -> (shape, number of params), in the order of the param groups (so list positions are
# the param indices of the optimizer's state_dict). Chosen to cover every path on 2 ranks.
PARAM_SPECS = {
    "vector": ((48,), 1),  # small AdamW: all_reduce, replicated state
    "embedding": ((64, 32), 1),  # 2048 elements: reduce_scatter along dim 0, sharded state
    "scalars": ((4,), 1),  # small AdamW in a group of its own (other betas)
    "wide": ((16, 32), 3),  # muon, K=3 on 2 ranks: chunk 2, rank 1 holds one padding matrix
    "tall": ((64, 16), 2),  # muon, 4C x C: 2x learning rate
    "square": ((32, 32), 1),  # muon, K=1: rank 1 owns nothing
}


def param_names(*kinds):
    return [f"{name}.{i}" for name in (kinds or PARAM_SPECS) for i in range(PARAM_SPECS[name][1])]


def make_problem(seed=0):
    """Initial params and per-example targets, {name: tensor}; targets have a leading batch dim."""
    generator = torch.Generator().manual_seed(seed)
    init, targets = {}, {}
    for name in param_names():
        shape = PARAM_SPECS[name.split(".")[0]][0]
        init[name] = torch.randn(shape, generator=generator) * 0.5
        targets[name] = torch.randn((BATCH_SIZE, *shape), generator=generator)
    return init, targets


def make_params(values):
    return {name: torch.nn.Parameter(values[name].clone()) for name in param_names()}


def make_param_groups(params):
    """Two AdamW groups and one muon group per shape, as GPT.setup_optimizer does."""
    def select(*kinds):
        return [params[name] for name in param_names(*kinds)]

    muon = dict(kind="muon", lr=0.02, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=0.2)
    return [
        dict(kind="adamw", params=select("vector", "embedding"), lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
        dict(kind="adamw", params=select("scalars"), lr=0.05, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
        *(dict(muon, params=select(kind)) for kind in ("wide", "tall", "square")),
    ]


def compute_grads(params, targets, batch):
    """Mean over the examples in `batch` (a slice) of a per-example, non-quadratic loss; sets .grad."""
    for p in params.values():
        p.grad = None
    loss = sum(torch.log1p((p.unsqueeze(0) - targets[name][batch]).square()).sum(dim=tuple(range(1, p.ndim + 1)))
               for name, p in params.items())
    loss.mean().backward()


def record_muon_kernel_calls():
    """Make every muon kernel call append how many matrices it was given; returns (that list, undo)."""
    matrices_per_call = []
    real_kernel = optim._kernel

    def recording_kernel(fn, device):
        kernel = real_kernel(fn, device)
        if fn is not optim.muon_update_:
            return kernel

        def record(grads, *args):
            matrices_per_call.append(grads.size(0))
            return kernel(grads, *args)
        return record

    optim._kernel = recording_kernel
    return matrices_per_call, lambda: setattr(optim, "_kernel", real_kernel)


def main(out_dir):
    dist.init_process_group(backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    problem = torch.load(out_dir / "problem.pt")
    targets = problem["targets"]
    per_rank = BATCH_SIZE // world_size
    my_batch = slice(rank * per_rank, (rank + 1) * per_rank)

    # A: three steps from the start; keep this rank's optimizer shard after step 2, and how many
    # matrices each of its muon kernel calls computed
    params = make_params(problem["init"])
    optimizer = MuonAdamW(make_param_groups(params))
    matrices_per_call, stop_recording = record_muon_kernel_calls()
    for step in range(1, 4):
        compute_grads(params, targets, my_batch)
        optimizer.step()
        if step == 2:
            torch.save({"optimizer": optimizer.state_dict(), "params": {n: p.detach().clone() for n, p in params.items()}},
                       out_dir / f"after2_rank{rank}.pt")
    stop_recording()
    torch.save(matrices_per_call, out_dir / f"muon_kernel_calls_rank{rank}.pt")
    torch.save({n: p.detach().clone() for n, p in params.items()}, out_dir / f"fresh_after3_rank{rank}.pt")

    # B: resume from the full state a 1-rank run had after step 2, take step 3 on 2 ranks
    params = make_params(problem["one_rank_params_after2"])
    optimizer = MuonAdamW(make_param_groups(params))
    optimizer.load_state_dict(problem["one_rank_optimizer_after2"])
    compute_grads(params, targets, my_batch)
    optimizer.step()
    torch.save({n: p.detach().clone() for n, p in params.items()}, out_dir / f"resumed_after3_rank{rank}.pt")

    # D: three steps from the start with MuonEq and Muon+ on
    params = make_params(problem["init"])
    optimizer = MuonAdamW(make_param_groups(params), **MUON_2026_07)
    for _ in range(3):
        compute_grads(params, targets, my_batch)
        optimizer.step()
    torch.save({n: p.detach().clone() for n, p in params.items()}, out_dir / f"muon_2026_07_after3_rank{rank}.pt")

    # C: a large AdamW param whose rows do not split over the ranks must be refused up front
    try:
        MuonAdamW([dict(kind="adamw", params=[torch.nn.Parameter(torch.zeros(3, 512))], lr=0.1,
                        betas=(0.9, 0.9), eps=1e-8, weight_decay=0.0)])
        uneven_rows_error = None
    except ValueError as error:
        uneven_rows_error = str(error)
    torch.save({"uneven_rows_error": uneven_rows_error}, out_dir / f"errors_rank{rank}.pt")
    # Tear down together: a rank that destroys its gloo group while the other is still finishing
    # its last collective can abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
