"""
Configuration of a nanochat GPT for Hugging Face transformers (loaded with trust_remote_code).

This file is copied verbatim into every exported model directory and imports only transformers:
the export must load on a machine without nanochat. The fields are nanochat's GPTConfig (the
names stay nanochat's; attribute_map gives transformers' standard names) plus the vocab padding
and the constants of the architecture, written out so the directory describes the model fully.

model_type is "nanochat_gpt", not "nanochat": transformers ships its own "nanochat" model, an
older architecture without value embeddings, residual/x0 scalars or sliding windows.
"""

from transformers import PretrainedConfig


def window_layer_types(window_pattern, n_layer):
    """'full_attention' / 'sliding_attention' per layer: the pattern tiled over layers, the last layer always full."""
    pattern = window_pattern.upper()
    if not pattern or any(ch not in "SL" for ch in pattern):
        raise ValueError(f"window_pattern must be a non-empty string of 'S' and 'L', got {window_pattern!r}")
    kinds = ["full_attention" if pattern[i % len(pattern)] == "L" else "sliding_attention" for i in range(n_layer)]
    kinds[-1] = "full_attention"
    return kinds


class NanochatGPTConfig(PretrainedConfig):
    model_type = "nanochat_gpt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "max_position_embeddings": "sequence_len",
    }

    def __init__(
        self,
        sequence_len=2048,
        vocab_size=32768,
        n_layer=12,
        n_head=6,
        n_kv_head=6,
        n_embd=768,
        window_pattern="SSSL",
        padded_vocab_size=None,
        rotary_base=10000.0,
        logit_softcap=15.0,
        ve_gate_channels=32,
        use_cache=True,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.sequence_len = sequence_len
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.window_pattern = window_pattern
        # nanochat pads the embedding and lm_head rows to a multiple of 64; logits are cut back to vocab_size
        self.padded_vocab_size = padded_vocab_size if padded_vocab_size is not None else -(-vocab_size // 64) * 64
        self.rotary_base = rotary_base
        self.logit_softcap = logit_softcap
        self.ve_gate_channels = ve_gate_channels
        self.use_cache = use_cache
        # Standard fields that transformers' DynamicCache reads: short-window layers get a sliding cache
        # layer. transformers counts the query itself in sliding_window; nanochat's window counts the
        # earlier tokens a query may see (sequence_len // 2), hence the + 1.
        self.layer_types = window_layer_types(window_pattern, n_layer)
        self.sliding_window = sequence_len // 2 + 1
        kwargs.pop("layer_types", None)
        kwargs.pop("sliding_window", None)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def window_sizes(self):
        """How many earlier tokens each layer's queries may attend to (nanochat's left windows)."""
        return [self.sequence_len if kind == "full_attention" else self.sequence_len // 2 for kind in self.layer_types]
