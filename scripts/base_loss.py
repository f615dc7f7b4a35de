"""
Bits per byte of a base model on the train and val splits, plus a few greedy and sampled
completions so you can see what it learned.

Run it:
    python -m scripts.base_loss                                            # largest base model, last step
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss
    python -m scripts.base_loss --device-batch-size=1 --split-tokens=16384  # CPU
    python -m scripts.base_loss --hf-path=openai-community/gpt2             # an HF model (needs transformers)
    python -m scripts.base_loss --hf-path=/path/to/exported_model           # the same from a local directory (offline)

Reads  $NANOCHAT_BASE_DIR/base_checkpoints/<tag>/, the shards of the data the checkpoint was trained on
       (--dataset to choose another) and the tokenizer.
Writes the "Base model loss" section of the report.
"""

import argparse


from nanochat.checkpoint_manager import load_model
from nanochat.common import (
    ConfigError, autodetect_device_type, compute_cleanup, compute_init, parse_flags, print0, run_script,
)
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from nanochat.dataset import DATASETS, use_dataset
from nanochat.hf_model import load_hf
from nanochat.loss_eval import SAMPLE_PROMPTS, evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Bits per byte of a base model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per rank")
    parser.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens evaluated per split (a multiple of device_batch_size * sequence_len * world_size)")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint directory (default: the largest model)")
    parser.add_argument("--model-step", type=int, default=None, help="checkpoint step (default: the last one)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--hf-path", type=str, default=None, help="evaluate a Hugging Face causal LM instead (hub id or local directory)")
    parser.add_argument("--dataset", type=str, default=None, choices=list(DATASETS),
                        help="shards to measure on (default: those the checkpoint was trained on; $NANOCHAT_DATASET, "
                             "else climbmix, for an HF model or a checkpoint that does not say)")
    return parse_flags(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    ddp, rank, local_rank, world_size, device = compute_init(device_type)

    if args.hf_path:
        model, tokenizer, token_bytes, sequence_len = load_hf(args.hf_path, device)
        model_name = args.hf_path
    else:
        model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.model_step)
        token_bytes = get_token_bytes(device=device)
        sequence_len = meta["model_config"]["sequence_len"]
        model_name = f"base_model (step {meta['step']})"
    # bpb compares only within one dataset: by default the one base_train recorded
    trained_on = None if args.hf_path else meta.get("user_config", {}).get("dataset")
    print0(f"Data: {use_dataset(args.dataset or trained_on).title}")

    tokens_per_step = args.device_batch_size * sequence_len * world_size
    if args.device_batch_size < 1 or args.split_tokens < tokens_per_step or args.split_tokens % tokens_per_step:
        # every split must see exactly the tokens asked for, so bpb numbers stay comparable across runs
        suggestion = max(args.split_tokens // max(tokens_per_step, 1), 1) * tokens_per_step
        raise ConfigError(f"--split-tokens={args.split_tokens} must be a positive multiple of device_batch_size * sequence_len * "
                          f"world_size = {args.device_batch_size} * {sequence_len} * {world_size} = {tokens_per_step}; "
                          f"e.g. --split-tokens={suggestion}, or change --device-batch-size")
    steps = args.split_tokens // tokens_per_step
    bpb_results = {}
    for split in ("train", "val"):
        loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, args.device_batch_size, sequence_len, split, device=device)
        bpb_results[split] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {bpb_results[split]:.4f}")

    samples, unconditioned_samples = [], []
    if rank == 0 and not args.hf_path:
        print0("Greedy completions:")
        for prompt in SAMPLE_PROMPTS:
            tokens = tokenizer(prompt, prepend="<|bos|>")
            text = tokenizer.decode(tokens + list(model.generate(tokens, max_tokens=16, temperature=0)))
            print0(text)
            samples.append(text)
        print0("Unconditioned samples:")
        bos = tokenizer.get_bos_token_id()
        for seed in range(8):
            text = tokenizer.decode([bos] + list(model.generate([bos], max_tokens=128, temperature=1.0, seed=seed)))
            print0(text)
            unconditioned_samples.append(text)

    get_report().log(section="Base model loss", data=[
        {"model": model_name, "train bpb": bpb_results["train"], "val bpb": bpb_results["val"]},
        {f"sample {i}": sample for i, sample in enumerate(samples)},
        {f"unconditioned {i}": sample for i, sample in enumerate(unconditioned_samples)},
    ])
    compute_cleanup()


if __name__ == "__main__":
    run_script(main, "base_loss")
