"""
The multi-node recipe of the README, run on one machine: two torchrun launchers, one per "node"
(--nnodes=2 --node-rank=0/1, one CPU rank each, gloo), meet at a master address and train
exactly like one launcher with 2 ranks. Nothing in base_train may assume one node (global vs
local rank, who writes which checkpoint file, which rank reads which data).
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY_FLAGS, child_env, free_port, gloo_aborted, parse_losses, parse_val_bpb, run_base_train

FLAGS = ["--total-batch-size=512", "--num-iterations=6", "--eval-every=3", "--save-every=3"]


def run_two_nodes(base, *flags):
    port = free_port()
    launchers = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
               "-m", "scripts.base_train", "--", *TINY_FLAGS, *flags]
        launchers.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(base), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = [launcher.communicate(timeout=300) for launcher in launchers]
    return [(launcher.returncode, out, err) for launcher, (out, err) in zip(launchers, outputs)]


@pytest.mark.slow
def test_two_nodes_train_exactly_like_one_node_with_two_ranks(tiny_base_dir):
    base_dir = tiny_base_dir
    single = run_base_train(base_dir, *FLAGS, "--model-tag=one_node", nproc=2)
    assert single.returncode == 0, single.stdout + single.stderr

    results = run_two_nodes(base_dir, *FLAGS, "--model-tag=two_nodes")
    if gloo_aborted(results):
        results = run_two_nodes(base_dir, *FLAGS, "--model-tag=two_nodes")  # gloo's rare abort at exit
    for code, out, err in results:
        assert code == 0, out + err
    (_, node0_out, _), (_, node1_out, _) = results

    # Only global rank 0 (on node 0) prints; its losses and val bpb equal the one-node run's exactly.
    assert parse_losses(node1_out) == {} and "Validation bpb" not in node1_out
    assert parse_losses(node0_out) == parse_losses(single.stdout)
    assert sorted(parse_losses(node0_out)) == list(range(6))
    assert parse_val_bpb(node0_out) == parse_val_bpb(single.stdout)

    # One model file and meta from global rank 0, one optimizer shard per global rank.
    checkpoint_dir = base_dir / "base_checkpoints" / "two_nodes"
    assert sorted(p.name for p in checkpoint_dir.glob("*_000006*")) == [
        "meta_000006.json", "model_000006.pt", "optim_000006_rank0.pt", "optim_000006_rank1.pt"]
    assert json.loads((checkpoint_dir / "meta_000006.json").read_text())["world_size"] == 2
