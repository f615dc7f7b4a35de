"""
A Hugging Face causal LM behind the calls our base-model evaluations make (forward with targets
and loss_reduction, bits per byte, CORE), for `base_loss --hf-path` and `base_eval --hf-path`:
a hub id (downloaded, or from the local HF cache offline) or a directory scripts.export_hf wrote.
Needs the transformers package (the [hf] extra).
"""

import os

import torch

from nanochat.common import ConfigError


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
