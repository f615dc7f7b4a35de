"""
How much disk a run writes under $NANOCHAT_BASE_DIR, from the model's shapes (no GPU, no data):
checkpoint sizes per phase with --keep-checkpoints, the chosen dataset's pretraining shards still
missing from its directory (NANOCHAT_DATASET, nanochat.dataset), the eval bundle.
`PHASE_DRY_RUN=1 bash speedrun.sh` prints it and scripts.preflight checks it against free space.

    python -m nanochat.disk_plan --depth 20 --nproc 8 --keep-checkpoints 1 --data-shards 170
    python -m nanochat.disk_plan --depth 26 --nproc 8 --keep-checkpoints -1 --base-saves 9
"""

import argparse
import contextlib
import io
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from nanochat.common import get_base_dir, parse_flags
from nanochat.dataset import get_dataset, shard_filename, shard_indices_to_download
from nanochat.gpt import GPT
from nanochat.optim import state_nbytes
from nanochat.training import model_config_for_depth

GB = 1e9
# one shard of either dataset: upstream packs both at ~250M characters per shard, ~100 MB as zstd parquet
SHARD_BYTES = 100e6
EVAL_BUNDLE_BYTES = 0.5e9  # the CORE eval bundle: a ~162 MB zip, extracted beside it
TASK_DATA_BYTES = 2e9  # task_data/: the SmolTalk, MMLU, GSM8K, ARC parquet exports (generous)
DEFAULT_VOCAB_SIZE = 32768  # tok_train's default (2**15)
# torch.save's zip container: a record header per tensor plus the pickled structure
TENSOR_RECORD_BYTES = 256
FILE_OVERHEAD_BYTES = 16 * 1024
# The training phases in pipeline order and their checkpoint directories.
PHASES = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


@dataclass(frozen=True)
class CheckpointSize:
    model: int  # model_<step>.pt
    optimizer: int  # all optim_<step>_rank*.pt together

    @property
    def total(self):
        return self.model + self.optimizer


def checkpoint_size(config, world_size, embedding_dtype=torch.bfloat16):
    """
    Bytes of one checkpoint of a model with this GPTConfig trained on world_size ranks. Embedding
    tables are saved in the compute dtype (bf16 on a GPU run), every other weight in fp32.
    """
    with torch.device("meta"):
        model = GPT(config)
    embeddings = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Embedding)}
    state = model.state_dict()
    model_bytes = sum(t.numel() * (embedding_dtype.itemsize if name in embeddings else t.element_size())
                      for name, t in state.items())
    with contextlib.redirect_stdout(io.StringIO()):  # setup_optimizer announces its LR scaling
        optimizer = model.setup_optimizer()
    holders = sum(1 if g["kind"] == "muon" else len(g["params"]) for g in optimizer.param_groups)
    optimizer_bytes = state_nbytes(optimizer.param_groups, world_size)
    optimizer_bytes += world_size * (FILE_OVERHEAD_BYTES + 2 * holders * TENSOR_RECORD_BYTES)
    return CheckpointSize(model_bytes + FILE_OVERHEAD_BYTES + len(state) * TENSOR_RECORD_BYTES, optimizer_bytes)


def checkpoints_held(keep, saves=None):
    """(at the peak, at the end) of a phase: how many checkpoints are on disk; None = unbounded (saves unknown)."""
    if keep > 0:
        return (keep + 1 if saves is None else min(saves, keep + 1)), (keep if saves is None else min(saves, keep))
    return (saves, saves) if saves is not None else (None, None)


def base_train_saves(num_iterations, save_every):
    """How many checkpoints base_train writes: every save_every steps and the last step."""
    if save_every <= 0:
        return 1
    return num_iterations // save_every + (1 if num_iterations % save_every else 0)


@dataclass
class PhasePlan:
    name: str
    size: CheckpointSize
    peak_count: int | None
    end_count: int | None

    @property
    def peak(self):
        return None if self.peak_count is None else self.peak_count * self.size.total

    @property
    def end(self):
        return None if self.end_count is None else self.end_count * self.size.total


def plan_checkpoints(config, world_size, keep, phases, saves=None, embedding_dtype=torch.bfloat16):
    """A PhasePlan per phase (saves: {phase: number of saves}, where known) and the checkpoint peak over the run."""
    size = checkpoint_size(config, world_size, embedding_dtype)
    plans = []
    for name in phases:
        peak_count, end_count = checkpoints_held(keep, (saves or {}).get(name))
        plans.append(PhasePlan(name, size, peak_count, end_count))
    # Phases run one after another: each one's peak sits on top of what the earlier ones left.
    peak, left = 0, 0
    for plan in plans:
        if plan.peak is None:
            return plans, None
        peak = max(peak, left + plan.peak)
        left += plan.end
    return plans, peak


def missing_shards(num_shards, data_dir, dataset=None):
    """How many of what `python -m nanochat.dataset -n num_shards` fetches (train shards and the val shard) are not in data_dir yet."""
    wanted = {shard_filename(i) for i in shard_indices_to_download(num_shards, dataset)}
    present = set(os.listdir(data_dir)) if os.path.isdir(data_dir) else set()
    return len(wanted - present)


def shard_bytes_to_download(num_shards, base_dir):
    """Bytes of the chosen dataset's shards a run that downloads num_shards train shards still has to fetch."""
    if num_shards <= 0:
        return 0
    dataset = get_dataset()
    return missing_shards(num_shards, os.path.join(base_dir, dataset.dir_name), dataset) * SHARD_BYTES


def existing_checkpoint_bytes(base_dir, phases, model_tag):
    """Checkpoint files already on disk for this run's tag: a resumed run's peak includes them."""
    total = 0
    for name in phases:
        directory = os.path.join(base_dir, PHASES[name], model_tag)
        if os.path.isdir(directory):
            total += sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file())
    return total


@dataclass
class RunPlan:
    phases: list
    checkpoint_peak: int | None
    data: int  # shards still to download
    other: int  # eval bundle and task data, when not there yet
    already: int  # checkpoint bytes of this run already on disk

    @property
    def still_to_write(self):
        """Bytes the run may still add to the disk; None when a phase keeps every checkpoint of unknown count."""
        if self.checkpoint_peak is None:
            return None
        return self.data + self.other + max(self.checkpoint_peak - self.already, 0)


def plan_run(depth, world_size, keep, phases, data_shards, base_dir=None, saves=None,
             vocab_size=DEFAULT_VOCAB_SIZE, model_tag=None, on_gpu=True):
    """The disk plan of a pipeline run over `phases` (base, mid, sft, rl) of a d<depth> model."""
    base_dir = base_dir or get_base_dir()
    config, _ = model_config_for_depth(depth, vocab_size)
    embedding_dtype = torch.bfloat16 if on_gpu else torch.float32  # the compute dtype of a GPU / CPU run
    plans, peak = plan_checkpoints(config, world_size, keep, phases, saves, embedding_dtype)
    data = shard_bytes_to_download(data_shards, base_dir)
    other = 0 if os.path.isdir(os.path.join(base_dir, "eval_bundle")) else EVAL_BUNDLE_BYTES
    other += 0 if os.path.isdir(os.path.join(base_dir, "task_data")) else TASK_DATA_BYTES
    already = existing_checkpoint_bytes(base_dir, phases, model_tag or f"d{depth}")
    return RunPlan(plans, peak, int(data), int(other), already)


def plan_series(depths, world_size, data_shards, base_dir=None, vocab_size=DEFAULT_VOCAB_SIZE, on_gpu=True):
    """The disk plan of a series of base runs (miniseries.sh, scaling_laws.sh): each depth leaves one checkpoint."""
    base_dir = base_dir or get_base_dir()
    embedding_dtype = torch.bfloat16 if on_gpu else torch.float32
    plans = []
    for depth in depths:
        config, _ = model_config_for_depth(depth, vocab_size)
        plans.append(PhasePlan(f"d{depth}", checkpoint_size(config, world_size, embedding_dtype), 1, 1))
    peak = sum(plan.end for plan in plans)
    data = shard_bytes_to_download(data_shards, base_dir)
    other = 0 if os.path.isdir(os.path.join(base_dir, "eval_bundle")) else EVAL_BUNDLE_BYTES
    return RunPlan(plans, peak, int(data), int(other), 0)


def gb(num_bytes):
    return "unbounded" if num_bytes is None else f"{num_bytes / GB:.1f} GB"


def describe(plan, keep):
    """The plan as lines, one per phase, then the data and the total."""
    lines = []
    for phase in plan.phases:
        held = "every checkpoint" if keep < 0 else f"the newest {keep}"
        if phase.name.startswith("d"):  # one run of a series: its final checkpoint stays
            lines.append(f"{phase.name}: one checkpoint of {gb(phase.size.total)}")
            continue
        lines.append(f"{phase.name}: checkpoint {gb(phase.size.total)} (weights {gb(phase.size.model)}, optimizer "
                     f"{gb(phase.size.optimizer)}); keeps {held}: up to {gb(phase.peak)} while saving, "
                     f"{gb(phase.end)} left after it")
    lines.append(f"checkpoints of the whole run at their peak: {gb(plan.checkpoint_peak)}"
                 + (f" ({gb(plan.already)} of them already on disk)" if plan.already else ""))
    lines.append(f"data still to download: {gb(plan.data)} of {get_dataset().title} shards, {gb(plan.other)} of eval "
                 "bundle and task data")
    lines.append(f"the run may still write: {gb(plan.still_to_write)}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description="Disk a training run writes under $NANOCHAT_BASE_DIR",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--depth", type=int, default=20, help="model depth")
    parser.add_argument("--nproc", type=int, default=8, help="ranks (one optimizer shard each)")
    parser.add_argument("--keep-checkpoints", type=int, default=-1, help="as the training scripts' flag (-1 = keep all)")
    parser.add_argument("--phases", type=str, default="base,mid,sft", help="training phases of the run, in order")
    parser.add_argument("--data-shards", type=int, default=0, help="train shards the run downloads (0 = none)")
    parser.add_argument("--base-saves", type=int, default=None, help="checkpoints base_train writes (for --keep-checkpoints=-1)")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
    parser.add_argument("--series-depths", type=str, default="", help="a series of base runs instead, one checkpoint each: 12,14,16")
    args = parse_flags(parser, argv)
    if args.series_depths:
        plan = plan_series([int(d) for d in args.series_depths.split(",")], args.nproc, args.data_shards)
        for line in describe(plan, -1):
            print(f"[disk] {line}")
        return
    phases = [p for p in args.phases.split(",") if p]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {unknown}: choose from {', '.join(PHASES)}")
    saves = {"base": args.base_saves} if args.base_saves else None
    plan = plan_run(args.depth, args.nproc, args.keep_checkpoints, phases, args.data_shards, saves=saves,
                    model_tag=args.model_tag)
    for line in describe(plan, args.keep_checkpoints):
        print(f"[disk] {line}")


if __name__ == "__main__":
    main()
