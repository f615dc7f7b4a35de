"""
Bits per byte (bpb): the model's loss measured per byte of text instead of per token.

Mean token loss depends on the tokenizer (a bigger vocab packs more text into a token, so each
token is harder to predict); dividing the summed loss by the number of UTF-8 bytes the target
tokens stand for gives a number comparable across vocab sizes and tokenizers. Special tokens
(<|bos|> ...) stand for no bytes and are left out of both sums, as are ignored targets (-1).
"""

import math

import torch
import torch.distributed as dist

# What base_train and base_loss complete, greedily, to show what a base model knows.
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    Bits per byte over the next `steps` batches of `batches` (an iterator of (inputs, targets),
    as the data loaders yield), summed over all ranks when torch.distributed is initialized.

    model(inputs, targets, loss_reduction="none") must return one loss in nats per target.
    token_bytes: int tensor [V] on the targets' device, the byte length of each token id (0 for
    special tokens). Returns inf when the targets cover no bytes at all.
    """
    if steps <= 0:  # every rank gets the same steps, so none of them reaches the all-reduce
        return float("inf")
    total_nats = None
    total_bytes = None
    batch_iter = iter(batches)
    for _ in range(steps):
        batch = next(batch_iter)
        inputs, targets = batch[0], batch[1]
        losses = model(inputs, targets, loss_reduction="none").reshape(-1).float()
        targets = targets.reshape(-1)
        # ignored targets (-1) must not index token_bytes (it would wrap to the last id): clamp
        # them to a valid id, then zero their byte count
        valid = targets >= 0
        num_bytes = torch.where(valid, token_bytes[targets.clamp(min=0)], 0).to(torch.int64)
        # the where (not a multiply) keeps a non-finite loss on an excluded target out of the sum
        nats = torch.where(num_bytes > 0, losses, 0.0).sum()
        if total_nats is None:
            total_nats = torch.zeros((), dtype=torch.float32, device=losses.device)
            total_bytes = torch.zeros((), dtype=torch.int64, device=losses.device)
        total_nats += nats
        total_bytes += num_bytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_nats, total_bytes = total_nats.item(), total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats / (math.log(2) * total_bytes)
