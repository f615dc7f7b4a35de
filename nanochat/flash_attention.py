"""
Attention kernels behind one FA3-shaped interface.

The model calls `flash_attn.flash_attn_func` and `flash_attn.flash_attn_with_kvcache` with the
argument names and the (B, T, heads, D) layout of Flash Attention 3. With bf16 compute on CUDA we
load FA3 through the `kernels` package (an optional dependency): Hopper (SM 9.x) gets the
Hopper build, Ampere/Ada get the community build if one exists for this torch/CUDA, and
Blackwell (SM 10+) has no FA3 build. Everywhere else (CPU, MPS, Blackwell, fp32/fp16 compute, or
when loading fails) the same calls run on PyTorch's scaled_dot_product_attention (SDPA) with
masks that reproduce FA3's semantics:

* `causal=True` aligns the queries to the END of the keys (query row r of Tq sits at absolute
  position (Tk - Tq) + r), so a chunk of new queries attends to the whole cached prefix.
* `window_size=(left, right)`: a query at position p may see keys in [p - left, p + right];
  -1 means unlimited on that side. With causal=True the right side is 0.

Tests force one implementation with `_override_impl = "fa3" | "sdpa"` (None = automatic). Later
upstream tests also re-resolve `USE_FA3 = _resolve_use_fa3()` after setting it; both ways work.
"""

import logging
import os
import threading
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE

logger = logging.getLogger(__name__)

HOPPER_FA3_REPO = "varunneal/flash-attention-3"  # FA3 built for Hopper (SM 9.x)
COMMUNITY_FA3_REPO = "kernels-community/flash-attn3"  # builds for other archs (Ampere, Ada), where they exist


def _fa3_kernel_for_arch(major):
    """
    (kernel repo, ask has_kernel first) for a CUDA compute-capability major, or None for SDPA.
    The community repo only carries builds for some torch/CUDA/arch combinations, so we ask
    before fetching; Blackwell (10.x, 12.x) has no FA3 build at all.
    """
    if major == 9:
        return HOPPER_FA3_REPO, False
    if major >= 10:
        return None
    return COMMUNITY_FA3_REPO, True


def _load_flash_attention_3():
    """FA3's interface module, or None. Only tried where it can be used: CUDA with bf16 compute."""
    if not torch.cuda.is_available() or COMPUTE_DTYPE != torch.bfloat16:
        return None
    try:
        major, _minor = torch.cuda.get_device_capability()
        choice = _fa3_kernel_for_arch(major)
        if choice is None:
            return None
        repo, ask_first = choice
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # keep the hub download quiet in training logs
        from kernels import get_kernel, has_kernel
        if ask_first and not has_kernel(repo):
            return None
        return get_kernel(repo).flash_attn_interface
    except Exception as e:  # missing package, no network, ABI mismatch: all mean "use SDPA"
        first_line = (str(e).strip().splitlines() or [""])[0]
        logger.warning(f"Flash Attention 3 not available ({type(e).__name__}: {first_line}); using PyTorch SDPA")
        return None


_fa3 = _load_flash_attention_3()
HAS_FA3 = _fa3 is not None  # loaded, which also means compute is bf16 on CUDA

# None = automatic, "fa3" = force FA3 (error if missing), "sdpa" = force the SDPA fallback.
_override_impl = None


def _resolve_use_fa3():
    """Whether calls go to FA3, from _override_impl and availability (FA3 here is bf16-only)."""
    if _override_impl == "sdpa":
        return False
    if _override_impl == "fa3":
        if not HAS_FA3:
            raise RuntimeError("_override_impl='fa3' but Flash Attention 3 could not be loaded on this machine")
        return True
    if _override_impl is not None:
        raise ValueError(f"_override_impl must be None, 'fa3' or 'sdpa', got {_override_impl!r}")
    return HAS_FA3 and COMPUTE_DTYPE == torch.bfloat16


USE_FA3 = _resolve_use_fa3()  # resolved once; code that changes _override_impl may re-resolve it


def _use_fa3(q):
    if _override_impl is not None:
        return _resolve_use_fa3()  # an override set without re-resolving USE_FA3 still applies
    # A CPU model on a GPU machine, or an fp32 call, must not reach the bf16 CUDA kernel.
    return USE_FA3 and q.is_cuda and q.dtype == torch.bfloat16


# -----------------------------------------------------------------------------
# SDPA fallback


def _attention_mask(Tq, Tk, causal, window_size, device):
    """Boolean (Tq, Tk) mask, True = may attend, with FA3's bottom-right alignment."""
    left, right = window_size
    query_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    key_pos = torch.arange(Tk, device=device)[None, :]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        right = 0
    if right >= 0:
        allowed &= key_pos <= query_pos + right
    if left >= 0:
        allowed &= key_pos >= query_pos - left
    return allowed


def _sdpa(q, k, v, causal, window_size):
    """q (B,Tq,H,D), k/v (B,Tk,Hkv,D) -> (B,Tq,H,D), FA3 semantics on top of SDPA."""
    Tq, Tk = q.size(1), k.size(1)
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs at least as many keys as queries, got Tq={Tq} > Tk={Tk}")
    left = window_size[0]
    enable_gqa = q.size(2) != k.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA wants (B, heads, T, D)
    full_left = left < 0 or left >= Tk - 1  # the window reaches back past the first key anyway
    if causal and Tq == Tk and full_left:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    elif causal and Tq == 1:
        # Decode: the single query is the last position, so causality masks nothing;
        # a window just means fewer keys.
        if not full_left:
            k, v = k[:, :, -(left + 1):], v[:, :, -(left + 1):]
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa)
    else:
        mask = _attention_mask(Tq, Tk, causal, window_size, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# Public FA3-shaped API


def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    """Attention over a whole sequence: q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D)."""
    if _use_fa3(q):
        out = _fa3.flash_attn_func(q, k, v, causal=causal, window_size=window_size)
        return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
    return _sdpa(q, k, v, causal, window_size)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False,
                            window_size=(-1, -1), cache_pos=None):
    """
    Attention for incremental decoding. k_cache/v_cache (B,T_max,Hkv,D) are updated IN PLACE:
    each row's new k/v (B,T_new,Hkv,D) are written at that row's position cache_seqlens[b], then
    q (B,T_new,H,D) attends over the row's prefix [0, cache_seqlens[b] + T_new). cache_seqlens is
    not advanced (the caller owns it). cache_pos (ours, not FA3's) is what the caller knows on the
    host, which saves a device sync per layer: an int when every row is at that one position (the
    Engine's case), or a list of per-row positions (continuous batching).
    """
    if _use_fa3(q):
        out = _fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                           causal=causal, window_size=window_size)
        return out[0] if isinstance(out, tuple) else out
    if cache_pos is None:
        cache_pos = cache_seqlens.tolist()  # one device sync
    if not isinstance(cache_pos, int):
        if len(set(cache_pos)) > 1:
            return _kvcache_rows(q, k_cache, v_cache, k, v, cache_seqlens, cache_pos, causal, window_size)
        cache_pos = cache_pos[0]
    pos = cache_pos
    T_new = 0 if k is None else k.size(1)
    if pos + T_new > k_cache.size(1):
        raise ValueError(f"KV cache overflow: {pos} cached + {T_new} new tokens > capacity {k_cache.size(1)}")
    if k is not None:
        k_cache[:, pos:pos + T_new] = k
        v_cache[:, pos:pos + T_new] = v
    end = pos + T_new
    return _sdpa(q, k_cache[:, :end], v_cache[:, :end], causal, window_size)


def _kvcache_rows(q, k_cache, v_cache, k, v, cache_seqlens, positions, causal, window_size):
    """
    The KV-cache path for rows at different positions: scatter each row's new k/v at its own
    position, then attend over the longest row's prefix with a per-row mask, so a row never sees
    keys past its own end (stale entries there belong to nobody).
    """
    T_new = q.size(1)
    end = max(positions) + (0 if k is None else k.size(1))
    if end > k_cache.size(1):
        raise ValueError(f"KV cache overflow: {max(positions)} cached + {end - max(positions)} new tokens > capacity {k_cache.size(1)}")
    rows, query_pos, allowed = _row_layout(cache_seqlens, positions, T_new, end, causal, window_size)
    if k is not None:
        k_cache[rows, query_pos] = k
        v_cache[rows, query_pos] = v
    enable_gqa = q.size(2) != k_cache.size(2)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :end].transpose(1, 2), v_cache[:, :end].transpose(1, 2),
                                       attn_mask=allowed, enable_gqa=enable_gqa)
    return y.transpose(1, 2)


_layouts = threading.local()  # per thread: each serving thread drives its own model


def _row_layout(cache_seqlens, positions, T_new, end, causal, window_size):
    """
    (row index (B, 1), each new query's position (B, T_new), boolean mask (B, 1, T_new, end)).
    Every layer of one forward asks with the same cache_seqlens tensor at the same positions
    (the cache advances after the last layer), so the answer is built once and kept for them.
    """
    state = (positions if isinstance(positions, tuple) else tuple(positions), T_new)
    memo = getattr(_layouts, "memo", None)
    if memo is None or memo["seqlens"] is not cache_seqlens or memo["state"] != state:
        device = cache_seqlens.device
        memo = {"seqlens": cache_seqlens, "state": state, "masks": {},
                "rows": torch.arange(cache_seqlens.size(0), device=device)[:, None],
                "query_pos": cache_seqlens.long()[:, None] + torch.arange(T_new, device=device)}
        _layouts.memo = memo
    key = (end, causal, tuple(window_size))
    if key not in memo["masks"]:
        query_pos = memo["query_pos"]
        key_pos = torch.arange(end, device=cache_seqlens.device)
        left, right = window_size
        if causal:
            right = 0
        allowed = key_pos < (query_pos[:, -1:, None] + 1)  # (B, 1, end): the row's own prefix and new keys
        if right >= 0:
            allowed = allowed & (key_pos <= query_pos[..., None] + right)
        if left >= 0:
            allowed = allowed & (key_pos >= query_pos[..., None] - left)
        memo["masks"][key] = allowed[:, None]
    return memo["rows"], memo["query_pos"], memo["masks"][key]


flash_attn = SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_with_kvcache=flash_attn_with_kvcache)
