"""
Attention kernels behind one FA3-shaped interface.

The model calls `flash_attn.flash_attn_func` and `flash_attn.flash_attn_with_kvcache` with the
argument names and the (B, T, heads, D) layout of Flash Attention 3. With bf16 compute on CUDA we
load FA3 through the `kernels` package from a pinned hub revision: Hopper (SM 9.x) gets the
Hopper build, Ampere/Ada the community build where one exists, Blackwell (SM 10+) has none.
Everywhere else the same calls run on PyTorch's scaled_dot_product_attention (SDPA) with masks
that reproduce FA3's semantics (causal aligned to the END of the keys; window_size=(left, right),
-1 = unlimited). `ATTENTION` says which backend runs and why; on SM 9.0+ the training and serving
scripts refuse to run on SDPA (require_fast_attention) unless NANOCHAT_ALLOW_SDPA=1.

Tests force one implementation with `_override_impl = "fa3" | "sdpa"` (None = automatic), with or
without re-resolving `USE_FA3 = _resolve_use_fa3()`, and may call `_use_fa3()` with no arguments.
"""

import logging
import os
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE, ConfigError

logger = logging.getLogger(__name__)

HOPPER_FA3_REPO = "varunneal/flash-attention-3"  # FA3 built for Hopper (SM 9.x)
COMMUNITY_FA3_REPO = "kernels-community/flash-attn3"  # builds for other archs (Ampere, Ada), where they exist
# kernels >= 0.15 refuses a repository without a revision or version, and a moving branch can drop
# the build for our torch, so the revision is explicit. "main" is what upstream's proven pair
# (torch 2.9.1 + CUDA 12.8, kernels 0.11.7) loads; pin a commit with NANOCHAT_FA3_REVISION.
FA3_REVISION = os.environ.get("NANOCHAT_FA3_REVISION", "main")


@dataclass(frozen=True)
class AttentionChoice:
    backend: str  # "fa3" or "sdpa"
    reason: str  # one line: where FA3 came from, or why SDPA runs
    capability: tuple | None  # (major, minor) of the CUDA device, None without CUDA


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


def _hub_loader(repo, revision, ask_first):
    """FA3's interface module from the hub through `kernels` (None when the repo has no build for us)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # keep the hub download quiet in training logs
    from kernels import get_kernel, has_kernel
    if ask_first and not has_kernel(repo, revision=revision):
        return None
    return get_kernel(repo, revision=revision).flash_attn_interface


def _load_flash_attention_3(capability=None, compute_dtype=None, loader=_hub_loader):
    """
    (FA3 interface module or None, AttentionChoice). Only tried where FA3 can run: CUDA with bf16
    compute. capability and compute_dtype default to this machine's; tests inject them and a loader.
    """
    if capability is None and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
    compute_dtype = COMPUTE_DTYPE if compute_dtype is None else compute_dtype

    def sdpa(reason):
        return None, AttentionChoice("sdpa", reason, capability)

    if capability is None:
        return sdpa("no CUDA device")
    sm = f"SM {capability[0]}.{capability[1]}"
    if compute_dtype != torch.bfloat16:
        return sdpa(f"compute dtype {str(compute_dtype).removeprefix('torch.')} (FA3 runs in bf16 only; see NANOCHAT_DTYPE)")
    choice = _fa3_kernel_for_arch(capability[0])
    if choice is None:
        return sdpa(f"no FA3 build exists for {sm}")
    repo, ask_first = choice
    try:
        module = loader(repo, FA3_REVISION, ask_first)
    except Exception as e:  # missing package, no network, no build for this torch/CUDA, ABI mismatch
        first_line = (str(e).strip().splitlines() or [""])[0]
        return sdpa(f"FA3 from {repo}@{FA3_REVISION} failed to load ({type(e).__name__}: {first_line})")
    if module is None:
        return sdpa(f"{repo}@{FA3_REVISION} has no build for this torch/CUDA on {sm}")
    return module, AttentionChoice("fa3", f"Flash Attention 3 from {repo}@{FA3_REVISION} ({sm})", capability)


_fa3, _LOADED = _load_flash_attention_3()
if _LOADED.backend == "sdpa" and _LOADED.capability is not None:
    logger.warning(f"Flash Attention 3 not used: {_LOADED.reason}; attention runs on PyTorch SDPA")
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


def _use_fa3(q=None):
    """Whether attention runs on FA3 (for q, when given: a CPU or fp32 tensor never reaches the bf16 CUDA kernel)."""
    if _override_impl is not None:
        return _resolve_use_fa3()  # an override set without re-resolving USE_FA3 still applies
    if q is None:
        return USE_FA3
    return USE_FA3 and q.is_cuda and q.dtype == torch.bfloat16


def attention_backend():
    """The AttentionChoice in effect now (an override wins over what was loaded)."""
    if _use_fa3():
        return _LOADED if _LOADED.backend == "fa3" else AttentionChoice("fa3", "forced by _override_impl", _LOADED.capability)
    if _LOADED.backend == "fa3":
        return AttentionChoice("sdpa", "forced by _override_impl", _LOADED.capability)
    return _LOADED


def require_fast_attention(device_type, choice=None, environ=os.environ):
    """
    On SM 9.0+ GPUs, stop unless attention runs on FA3: SDPA runs the short sliding windows through
    explicit masks there and a run takes several times as long while looking healthy.
    NANOCHAT_ALLOW_SDPA=1 accepts SDPA. Returns the AttentionChoice that will run.
    """
    choice = choice or attention_backend()
    if device_type != "cuda" or choice.backend == "fa3" or choice.capability is None or choice.capability[0] < 9:
        return choice
    if environ.get("NANOCHAT_ALLOW_SDPA", "0") == "1":
        logger.warning(f"attention runs on PyTorch SDPA ({choice.reason}); accepted by NANOCHAT_ALLOW_SDPA=1")
        return choice
    raise ConfigError(f"attention would run on PyTorch SDPA, not Flash Attention 3, on this SM "
                      f"{choice.capability[0]}.{choice.capability[1]} GPU: {choice.reason}. SDPA is several times "
                      "slower here; run `python -m scripts.preflight` to see why, or set NANOCHAT_ALLOW_SDPA=1 "
                      "to train on SDPA anyway")


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
