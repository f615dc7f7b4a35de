"""
A KV cache whose rows are independent sequences, each at its own position: the cache behind
continuous batching (nanochat.batch_engine), where conversations join and leave a running batch.

    cache = RowKVCache(max_rows=32, max_len=2048, num_heads=..., head_dim=..., num_layers=..., device=device)
    logits = model.forward(prompt_ids, kv_cache=cache.rows(5, 6))   # prefill one conversation into row 5
    logits = model.forward(last_ids, kv_cache=cache.rows(0, 12))    # one decode step for rows 0..11
    cache.move_row(11, 3)                                           # row 3 left: keep the batch contiguous
    cache.resize(16, 512, keep_rows=11)                             # more rows, shorter ones: same token count

The model sees a view of some rows, with the Engine's KVCache interface; get_pos() is one int when
those rows share a position and a list of per-row positions otherwise. Per-row state the model
keeps on its cache (an attribute it sets on the view, e.g. the previous token's embedding of shape
(B, 1, C)) is stored per row here, so it moves and clears with its row. Nothing is written to disk.
"""

import torch

from nanochat.common import COMPUTE_DTYPE


class RowKVCache:
    """
    k_cache / v_cache (num_layers, max_rows, max_len, Hkv, D) in the layout Flash Attention 3 wants,
    cache_seqlens (max_rows,) int32 on the device with a host mirror `positions` (reading it costs
    no sync), and `row_state`: per-row tensors (rows on dim 0) that the model stored on a view.
    """

    def __init__(self, max_rows, max_len, num_heads, head_dim, num_layers, device, dtype=None):
        self.max_rows, self.max_seq_len = max_rows, max_len
        self.n_heads, self.head_dim, self.n_layers = num_heads, head_dim, num_layers
        dtype = COMPUTE_DTYPE if dtype is None else dtype
        shape = (num_layers, max_rows, max_len, num_heads, head_dim)
        # zeros, not empty: a masked key still meets a zero weight in SDPA, and 0 * NaN garbage is NaN
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_seqlens = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.positions = [0] * max_rows
        self.row_state = {}  # name -> tensor (max_rows, ...)
        self.row_state_set = {}  # name -> [bool] * max_rows: which rows hold a value

    def bytes_per_position(self):
        """Memory one cached token takes: its keys and values in every layer."""
        return 2 * self.n_layers * self.n_heads * self.head_dim * self.k_cache.element_size()

    def resize(self, max_rows, max_len, keep_rows):
        """
        Reallocate as max_rows x max_len, keeping rows [0, keep_rows) (each row's filled prefix
        must fit max_len). Views made before are stale afterwards; while it copies, old and new
        tensors are both allocated.
        """
        if keep_rows > max_rows or any(pos > max_len for pos in self.positions[:keep_rows]):
            raise ValueError(f"cannot shrink to {max_rows} rows x {max_len}: rows [0, {keep_rows}) hold "
                             f"positions up to {max(self.positions[:keep_rows], default=0)}")
        keep_len = min(max_len, self.max_seq_len)
        old_k, old_v, old_seqlens = self.k_cache, self.v_cache, self.cache_seqlens
        shape = (self.n_layers, max_rows, max_len, self.n_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=old_k.dtype, device=old_k.device)
        self.v_cache = torch.zeros(shape, dtype=old_v.dtype, device=old_v.device)
        self.k_cache[:, :keep_rows, :keep_len] = old_k[:, :keep_rows, :keep_len]
        self.v_cache[:, :keep_rows, :keep_len] = old_v[:, :keep_rows, :keep_len]
        self.cache_seqlens = torch.zeros(max_rows, dtype=torch.int32, device=old_seqlens.device)
        self.cache_seqlens[:keep_rows] = old_seqlens[:keep_rows]
        self.positions = self.positions[:keep_rows] + [0] * (max_rows - keep_rows)
        for name, state in self.row_state.items():
            grown = torch.zeros((max_rows, *state.shape[1:]), dtype=state.dtype, device=state.device)
            grown[:keep_rows] = state[:keep_rows]
            self.row_state[name] = grown
            self.row_state_set[name] = self.row_state_set[name][:keep_rows] + [False] * (max_rows - keep_rows)
        self.max_rows, self.max_seq_len = max_rows, max_len

    def rows(self, start, stop):
        """The model's view of rows [start, stop)."""
        return CacheRows(self, start, stop)

    def clear_row(self, row):
        """Make a row an empty sequence (old keys stay until overwritten; they are masked)."""
        self.positions[row] = 0
        self.cache_seqlens[row] = 0
        for flags in self.row_state_set.values():
            flags[row] = False

    def move_row(self, src, dst):
        """Copy row src (its filled prefix and its state) into row dst; src is left as it was."""
        if src == dst:
            return
        end = self.positions[src]
        self.k_cache[:, dst, :end] = self.k_cache[:, src, :end]
        self.v_cache[:, dst, :end] = self.v_cache[:, src, :end]
        self.cache_seqlens[dst] = self.cache_seqlens[src]
        self.positions[dst] = end
        for name, state in self.row_state.items():
            state[dst] = state[src]
            self.row_state_set[name][dst] = self.row_state_set[name][src]

    def _read_state(self, name, start, stop):
        flags = self.row_state_set.get(name)
        if flags is None or not any(flags[start:stop]):
            return None  # as on a fresh cache
        if not all(flags[start:stop]):
            raise RuntimeError(f"rows {start}..{stop - 1} mix rows with and without {name!r}: "
                               "a batch must only hold rows that have been prefilled")
        return self.row_state[name][start:stop].clone()  # a copy: the model may overwrite the state next

    def _write_state(self, name, start, stop, value):
        if value.size(0) != stop - start:
            raise ValueError(f"{name} must have one entry per row ({stop - start}), got shape {tuple(value.shape)}")
        state = self.row_state.get(name)
        if state is None or state.shape[1:] != value.shape[1:] or state.dtype != value.dtype:
            state = torch.zeros((self.max_rows, *value.shape[1:]), dtype=value.dtype, device=value.device)
            self.row_state[name], self.row_state_set[name] = state, [False] * self.max_rows
        state[start:stop] = value
        self.row_state_set[name][start:stop] = [True] * (stop - start)


class CacheRows:
    """Rows [start, stop) of a RowKVCache, with the interface the model uses on the Engine's KVCache."""

    _OWN = ("cache", "start", "stop", "cache_seqlens")

    def __init__(self, cache, start, stop):
        if not 0 <= start < stop <= cache.max_rows:
            raise ValueError(f"rows [{start}, {stop}) are outside the cache's {cache.max_rows} rows")
        object.__setattr__(self, "cache", cache)
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "cache_seqlens", cache.cache_seqlens[start:stop])  # a view: advance writes through

    @property
    def batch_size(self):
        return self.stop - self.start

    @property
    def max_seq_len(self):
        return self.cache.max_seq_len

    @property
    def n_layers(self):
        return self.cache.n_layers

    @property
    def n_heads(self):
        return self.cache.n_heads

    @property
    def head_dim(self):
        return self.cache.head_dim

    def get_pos(self):
        """The rows' common position (int), or their positions (list) when they differ."""
        positions = self.cache.positions[self.start:self.stop]
        first = positions[0]
        return first if all(p == first for p in positions) else positions

    def get_layer_cache(self, layer_idx):
        return self.cache.k_cache[layer_idx, self.start:self.stop], self.cache.v_cache[layer_idx, self.start:self.stop]

    def advance(self, num_tokens):
        self.cache_seqlens.add_(num_tokens)
        positions = self.cache.positions
        for row in range(self.start, self.stop):
            positions[row] += num_tokens

    def __getattr__(self, name):  # only reached for names that are not the view's own
        if name.startswith("_"):
            raise AttributeError(name)
        return self.cache._read_state(name, self.start, self.stop)

    def __setattr__(self, name, value):
        if name in self._OWN:
            raise AttributeError(f"{name} of a cache view cannot be replaced")
        self.cache._write_state(name, self.start, self.stop, value)
