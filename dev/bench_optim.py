"""
Optimizer step time: our MuonAdamW against other implementations (e.g. upstream nanochat's
optim.py from a scratch checkout) on the same GPT's param groups and the same random grads, in
one process, alternating step by step so that a noisy machine slows all alike. Prints the
median wall and CPU time of a step for each, and the median over steps of its wall time over
ours in the same step (adjacent in time, so robust to a load that comes and goes); the last
line is one JSON document. On a shared machine, --threads 1 steadies the CPU time.

    python dev/bench_optim.py --other upstream=/tmp/upstream/nanochat/optim.py              # d4, runcpu shapes
    python dev/bench_optim.py --other upstream=/tmp/upstream/nanochat/optim.py --vocab-size 32768 --head-dim 128
    python dev/bench_optim.py --recipe 2026-01 --steps 30

Each other optim.py is loaded as a module of its own; it must define MuonAdamW(param_groups)
(upstream's compiles its kernels itself; ours follows NANOCHAT_COMPILE). Numbers go to
dev/LOG.md with the date, machine and command.
"""

import argparse
import copy
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nanochat.gpt import GPT, GPTConfig  # noqa: E402


def load_other_optimizer_class(name, path):
    spec = importlib.util.spec_from_file_location(f"other_optim_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MuonAdamW


def build_groups(args):
    """Our optimizer over a fresh model, and a function giving the same groups over fresh param copies."""
    head_dim = args.head_dim
    width = -(-args.depth * 64 // head_dim) * head_dim  # base_train's depth -> width mapping
    config = GPTConfig.for_recipe(args.recipe, sequence_len=256, vocab_size=args.vocab_size, n_layer=args.depth,
                                  n_head=width // head_dim, n_kv_head=width // head_dim, n_embd=width)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    ours = model.setup_optimizer(weight_decay=0.2, recipe=args.recipe)

    def copied_groups():
        groups = []
        for group in ours.param_groups:
            clone = {k: copy.deepcopy(v) for k, v in group.items() if k not in ("params", "initial_lr")}
            clone["params"] = [torch.nn.Parameter(p.detach().clone()) for p in group["params"]]
            groups.append(clone)
        return groups
    return ours, copied_groups


def set_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", action="append", default=[], help="NAME=PATH of another optim.py to time beside ours (repeatable)")
    parser.add_argument("--recipe", type=str, default="2026-07", help="model and optimizer recipe (2026-01 or 2026-07)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ours, copied_groups = build_groups(args)
    optimizers = {"ours": ours}
    for other in args.other:
        name, path = other.split("=", 1)
        optimizers[name] = load_other_optimizer_class(name, path)(copied_groups())
    params = {name: [p for g in opt.param_groups for p in g["params"]] for name, opt in optimizers.items()}
    wall, cpu = {name: [] for name in optimizers}, {name: [] for name in optimizers}
    for step in range(args.warmup + args.steps):
        for name, optimizer in optimizers.items():
            set_grads(params[name], seed=step)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            optimizer.step()
            if step >= args.warmup:
                wall[name].append(time.perf_counter() - wall0)
                cpu[name].append(time.process_time() - cpu0)
    result = {"recipe": args.recipe, "depth": args.depth, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
              "threads": torch.get_num_threads(), "compile": os.environ.get("NANOCHAT_COMPILE", "1"),
              "steps": args.steps, "wall_ms": {}, "cpu_ms": {}, "step_ratio_to_ours": {}}
    median = lambda samples: sorted(samples)[len(samples) // 2]  # noqa: E731
    for name in optimizers:
        result["wall_ms"][name] = round(1000 * median(wall[name]), 2)
        result["cpu_ms"][name] = round(1000 * median(cpu[name]), 2)
        result["step_ratio_to_ours"][name] = round(median([t / o for t, o in zip(wall[name], wall["ours"])]), 3)
        print(f"{name}: median wall {result['wall_ms'][name]:.1f} ms, CPU {result['cpu_ms'][name]:.1f} ms, "
              f"median step ratio to ours {result['step_ratio_to_ours'][name]:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
