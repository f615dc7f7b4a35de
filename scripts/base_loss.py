"""
Bits per byte of a base model on the train and val splits, plus a few greedy and sampled
completions so you can see what it learned.

Run it:
    python -m scripts.base_loss                                            # largest base model, last step
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss
    python -m scripts.base_loss --device-batch-size=1 --split-tokens=16384  # CPU
    python -m scripts.base_loss --hf-path=openai-community/gpt2             # an HF model (needs transformers)
    python -m scripts.base_loss --hf-path=/path/to/exported_model           # the same from a local directory (offline)

Reads  $NANOCHAT_BASE_DIR/base_checkpoints/<tag>/, the data shards and the tokenizer.
Writes the "Base model loss" section of the report.
"""

import argparse
import os

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.common import (
    ConfigError, autodetect_device_type, compute_cleanup, compute_init, parse_flags, print0, run_script,
)
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from scripts.base_train import SAMPLE_PROMPTS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Bits per byte of a base model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per rank")
    parser.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens evaluated per split (a multiple of device_batch_size * sequence_len * world_size)")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint directory (default: the largest model)")
    parser.add_argument("--model-step", type=int, default=None, help="checkpoint step (default: the last one)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--hf-path", type=str, default=None, help="evaluate a Hugging Face causal LM instead (hub id or local directory)")
    return parse_flags(parser, argv)


class HuggingFaceModel:
    """Adapts an HF causal LM to the forward(idx, targets, loss_reduction) call evaluate_bpb makes."""

    def __init__(self, model):
        self.model = model
        config = model.config
        self.max_seq_len = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

    def __call__(self, idx, targets=None, loss_reduction="mean"):
        logits = self.model(idx).logits.float()
        if targets is None:
            return logits
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=loss_reduction)

    def eval(self):
        return self


def load_hf(hf_path, device):
    """
    (model, tokenizer, token_bytes, sequence_len) for a hub id (downloaded, or from the local HF
    cache when offline) or a local directory with config.json, the weights and tokenizer.json.
    """
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as error:
        raise ConfigError(f"--hf-path={hf_path} needs the transformers package, which nanochat does not install: "
                          f"pip install transformers ({error})") from error
    from nanochat.tokenizer import HuggingFaceTokenizer
    local = os.path.isdir(hf_path)
    try:
        tokenizer = HuggingFaceTokenizer.from_directory(hf_path) if local else HuggingFaceTokenizer.from_pretrained(hf_path)
        # A local directory may be one scripts.export_hf wrote, whose model code ships beside the
        # weights; code from the hub is not run unasked.
        hf_model = AutoModelForCausalLM.from_pretrained(hf_path, trust_remote_code=local)
    except OSError as error:  # also the hub's "not in the local cache" error when offline
        if local:
            raise ConfigError(f"--hf-path={hf_path}: {error}; a model directory needs config.json, the weights "
                              "and tokenizer.json") from error
        raise ConfigError(f"--hf-path={hf_path}: could not load it from the hub or the local cache ({error}); "
                          "without network access pass a local directory with config.json, the weights and "
                          "tokenizer.json, or fill the cache on a machine that can reach the hub") from error
    model = HuggingFaceModel(hf_model.to(device).eval())
    # token_bytes from this tokenizer's own vocab: UTF-8 length of each decoded token, 0 for specials
    vocab_size = tokenizer.get_vocab_size()
    special_ids = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
    token_bytes = torch.tensor([0 if i in special_ids else len(tokenizer.decode([i]).encode("utf-8")) for i in range(vocab_size)],
                               dtype=torch.int32, device=device)
    return model, tokenizer, token_bytes, model.max_seq_len or 1024


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
