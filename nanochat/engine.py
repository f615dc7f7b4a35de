"""
Inference on token ids with a KV cache.

KVCache holds every layer's keys and values in the layout Flash Attention 3 wants, so the
attention kernel can write new entries in place and attend over the cached prefix.
"""

import torch

from nanochat.common import COMPUTE_DTYPE


class KVCache:
    """
    Keys/values for all layers: k_cache and v_cache of shape (num_layers, B, T_max, Hkv, D),
    plus cache_seqlens (B,) int32, the number of filled positions per row. All rows move
    together. The model writes into the cache inside attention; its last layer calls advance().
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype=None):
        self.batch_size = batch_size
        self.max_seq_len = seq_len
        self.n_heads = num_heads
        self.head_dim = head_dim
        self.n_layers = num_layers
        dtype = COMPUTE_DTYPE if dtype is None else dtype
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)

    def reset(self):
        """Forget the contents (positions back to 0; stale entries are overwritten before use)."""
        self.cache_seqlens.zero_()

    def get_pos(self):
        """Current fill position (row 0; all rows share it)."""
        return int(self.cache_seqlens[0].item())

    def get_layer_cache(self, layer_idx):
        """Views (k, v) of one layer, each (B, T_max, Hkv, D); writes go into the cache."""
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens

    def prefill(self, other):
        """
        Copy another cache's filled prefix into this empty one, broadcasting a batch-1 cache over
        all rows (prefill a prompt once, then sample several continuations in parallel).
        """
        if self.get_pos() != 0:
            raise ValueError(f"prefill needs an empty cache, this one holds {self.get_pos()} positions; call reset()")
        mine = (self.n_layers, self.n_heads, self.head_dim)
        theirs = (other.n_layers, other.n_heads, other.head_dim)
        if mine != theirs:
            raise ValueError(f"cannot prefill a cache of (layers, kv heads, head_dim) = {mine} from one of {theirs}")
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"the source cache must have batch size 1 or {self.batch_size}, got {other.batch_size}")
        if self.max_seq_len < other.max_seq_len:
            raise ValueError(f"this cache holds {self.max_seq_len} positions, fewer than the source's "
                             f"{other.max_seq_len}; make it at least as long")
        pos = other.get_pos()
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
