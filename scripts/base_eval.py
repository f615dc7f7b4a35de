"""
The CORE metric of a base model: the 22 in-context-learning tasks of the DCLM eval bundle, each
accuracy centered by its random baseline, averaged (nanochat/core_eval.py scores them).

Run it:
    python -m scripts.base_eval                                     # largest base model, last step
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval   # examples strided over the ranks
    python -m scripts.base_eval --max-per-task=100 --device-type=cpu
    python -m scripts.base_eval --hf-path=openai-community/gpt2     # an HF model (needs transformers)
    python -m scripts.base_eval --hf-path=/path/to/exported_model   # the same from a local directory (offline)

Reads  $NANOCHAT_BASE_DIR/base_checkpoints/<tag>/, the tokenizer and the eval bundle (downloaded on
       first use, else the offline reconstruction, whose score is labelled "CORE (partial: N of 22
       tasks, offline reconstruction)"; README.md, "CORE").
Writes $NANOCHAT_BASE_DIR/base_eval/<model_slug>.csv (Task, Accuracy, Centered; last row the
       CORE metric) and the "Base model evaluation" section of the report.
"""

import argparse
import os

from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type, compute_cleanup, compute_init, get_base_dir, parse_flags, print0, run_script
from nanochat.core_eval import DEFAULT_PACK_TOKENS, evaluate_core
from nanochat.report import get_report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="CORE metric of a base model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hf-path", type=str, default=None, help="evaluate a Hugging Face causal LM instead (hub id or local directory)")
    parser.add_argument("--max-per-task", type=int, default=-1, help="examples per task after a fixed shuffle (-1 = all)")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint directory (default: the largest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--pack-tokens", type=int, default=None,
                        help=f"rows x length of a forward that packs several examples (0 = one example per forward; "
                             f"unset: {DEFAULT_PACK_TOKENS} on CUDA, 0 on CPU/MPS where packing only adds padding)")
    parser.add_argument("--bundle-dir", type=str, default=None, help="evaluate on this eval bundle directory instead of looking for one")
    return parse_flags(parser, argv)


def load_evaluated_model(args, device):
    """(model, tokenizer, model_name, model_slug)."""
    if args.hf_path:
        from nanochat.hf_model import load_hf

        model, tokenizer, _, _ = load_hf(args.hf_path, device)
        # a hub id names its table (openai-community-gpt2.csv); a local directory by its own name
        local = os.path.isdir(args.hf_path)
        slug = os.path.basename(os.path.normpath(args.hf_path)) if local else args.hf_path.replace("/", "-")
        return model, tokenizer, args.hf_path, slug
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
    return model, tokenizer, f"base_model (step {meta['step']})", f"base_model_{meta['step']:06d}"


def write_csv(path, out):
    """The padded table: a row per task, then the CORE metric (its label quoted when it has a comma)."""
    label = f'"{out["label"]}"' if "," in out["label"] else out["label"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n")
        for task, accuracy in out["results"].items():
            f.write(f"{task:<35}, {accuracy:<10.6f}, {out['centered_results'][task]:<10.6f}\n")
        f.write(f"{label:<35}, {'':<10}, {out['core_metric']:<10.6f}\n")


def print_table(model_name, out):
    print0("=" * 80)
    print0(f"Model: {model_name}")
    print0("=" * 80)
    print0(f"{'Task':<35} | {'Type':<17} | {'Accuracy':>8} | {'Centered':>8} | {'Time (s)':>8} | {'Examples/s':>10}")
    for task, d in out["details"].items():
        print0(f"{task:<35} | {d['task_type']:<17} | {d['accuracy']:>8.4f} | {d['centered']:>8.4f} | "
               f"{d['seconds']:>8.2f} | {d['examples_per_second']:>10.1f}")
    print0(f"{out['label']}: {out['core_metric']:.4f}")


def main(argv=None):
    args = parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    model, tokenizer, model_name, model_slug = load_evaluated_model(args, device)
    out = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task, bundle_dir=args.bundle_dir,
                        pack_tokens=args.pack_tokens)
    if rank == 0:
        csv_path = os.path.join(get_base_dir(), "base_eval", f"{model_slug}.csv")
        write_csv(csv_path, out)
        print_table(model_name, out)
        print0(f"Wrote {csv_path}")
    # the report's summary table reads the line that starts with "- CORE"; a partial score carries its label there
    core_key = "CORE metric" if out["label"] == "CORE" else out["label"]
    get_report().log(section="Base model evaluation", data=[
        {"Model": model_name, core_key: out["core_metric"]},
        out["centered_results"],
    ])
    compute_cleanup()


if __name__ == "__main__":
    run_script(main, "base_eval")
