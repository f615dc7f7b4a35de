"""
The SDPA fallback of nanochat.flash_attention must give FA3's answers: each case is checked
against a naive softmax(QK^T / sqrt(D) + mask) V with the mask written out position by position.
"""

import math

import pytest
import torch

import nanochat.flash_attention as fa
from nanochat.flash_attention import flash_attn


@pytest.fixture(autouse=True)
def force_sdpa(monkeypatch):
    monkeypatch.setattr(fa, "_override_impl", "sdpa")


def reference_attention(q, k, v, causal=True, window_size=(-1, -1)):
    """q (B,Tq,H,D), k/v (B,Tk,Hkv,D); query r sits at absolute position (Tk - Tq) + r."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.size(1), k.size(2)
    left, right = window_size
    if causal:
        right = 0
    mask = torch.full((Tq, Tk), float("-inf"))
    for r in range(Tq):
        pos = Tk - Tq + r
        for c in range(Tk):
            if (right < 0 or c - pos <= right) and (left < 0 or pos - c <= left):
                mask[r, c] = 0.0
    group = H // Hkv  # query head h reads kv head h // group
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D) + mask
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def random_qkv(B, Tq, Tk, H, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=g)
    k = torch.randn(B, Tk, Hkv, D, generator=g)
    v = torch.randn(B, Tk, Hkv, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [-1, 0, 3, 8, 15, 40])
def test_full_sequence_matches_reference(H, Hkv, window):
    q, k, v = random_qkv(2, 16, 16, H, Hkv, 8)
    out = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    torch.testing.assert_close(out, reference_attention(q, k, v, window_size=(window, 0)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2)])
@pytest.mark.parametrize("window", [-1, 2, 6, 100])
def test_chunk_with_offset_matches_reference(H, Hkv, window):
    # 5 new queries after 7 earlier positions: queries sit at positions 7..11
    q, k, v = random_qkv(2, 5, 12, H, Hkv, 8, seed=1)
    out = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    torch.testing.assert_close(out, reference_attention(q, k, v, window_size=(window, 0)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("window", [-1, 0, 4, 11, 12, 50])
def test_single_token_decode_matches_reference(H, Hkv, window):
    q, k, v = random_qkv(3, 1, 12, H, Hkv, 8, seed=2)
    out = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    torch.testing.assert_close(out, reference_attention(q, k, v, window_size=(window, 0)), rtol=1e-5, atol=1e-5)


def test_non_causal_two_sided_window_matches_reference():
    q, k, v = random_qkv(1, 10, 10, 2, 2, 8, seed=3)
    for window in [(-1, -1), (2, 3), (0, 0)]:
        out = flash_attn.flash_attn_func(q, k, v, causal=False, window_size=window)
        torch.testing.assert_close(out, reference_attention(q, k, v, causal=False, window_size=window),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [-1, 3])
@pytest.mark.parametrize("T_new", [1, 4])
def test_kvcache_writes_in_place_and_matches_reference(window, T_new):
    B, T_max, H, Hkv, D, pos = 2, 16, 4, 2, 8, 6
    g = torch.Generator().manual_seed(4)
    k_cache = torch.zeros(B, T_max, Hkv, D)
    v_cache = torch.zeros(B, T_max, Hkv, D)
    k_cache[:, :pos] = torch.randn(B, pos, Hkv, D, generator=g)
    v_cache[:, :pos] = torch.randn(B, pos, Hkv, D, generator=g)
    q, k_new, v_new = random_qkv(B, T_new, T_new, H, Hkv, D, seed=5)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    cache_seqlens = torch.full((B,), pos, dtype=torch.int32)

    out = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=cache_seqlens,
                                             causal=True, window_size=(window, 0))

    end = pos + T_new
    torch.testing.assert_close(k_cache[:, pos:end], k_new, rtol=0, atol=0)
    torch.testing.assert_close(v_cache[:, pos:end], v_new, rtol=0, atol=0)
    torch.testing.assert_close(k_cache[:, :pos], before_k[:, :pos], rtol=0, atol=0)
    torch.testing.assert_close(v_cache[:, :pos], before_v[:, :pos], rtol=0, atol=0)
    assert k_cache[:, end:].eq(0).all() and v_cache[:, end:].eq(0).all()
    assert cache_seqlens.tolist() == [pos] * B  # the caller advances, not the kernel
    expected = reference_attention(q, k_cache[:, :end], v_cache[:, :end], window_size=(window, 0))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_kvcache_rejects_overflow():
    k_cache = torch.zeros(2, 8, 2, 4)
    v_cache = torch.zeros(2, 8, 2, 4)
    q, k, v = random_qkv(2, 3, 3, 2, 2, 4)
    for positions in ([6, 6], [1, 6]):
        with pytest.raises(ValueError, match="overflow"):
            flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                               cache_seqlens=torch.tensor(positions, dtype=torch.int32), causal=True)


@pytest.mark.parametrize("window", [-1, 3])
@pytest.mark.parametrize("T_new", [1, 4])
@pytest.mark.parametrize("host_positions", [False, True])
def test_kvcache_rows_at_different_positions_each_match_their_own_reference(window, T_new, host_positions):
    # continuous batching: every row is its own sequence; what lies past a row's end (another
    # conversation's stale keys, here huge values) must not reach it
    positions, T_max, H, Hkv, D = [0, 5, 2, 9], 16, 4, 2, 8
    g = torch.Generator().manual_seed(6)
    k_cache = torch.full((4, T_max, Hkv, D), 1e4)
    v_cache = torch.full((4, T_max, Hkv, D), 1e4)
    for b, pos in enumerate(positions):
        k_cache[b, :pos] = torch.randn(pos, Hkv, D, generator=g)
        v_cache[b, :pos] = torch.randn(pos, Hkv, D, generator=g)
    q, k_new, v_new = random_qkv(4, T_new, T_new, H, Hkv, D, seed=7)
    cache_seqlens = torch.tensor(positions, dtype=torch.int32)

    out = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=cache_seqlens, causal=True,
                                             window_size=(window, 0), cache_pos=positions if host_positions else None)

    assert cache_seqlens.tolist() == positions  # the caller advances, not the kernel
    for b, pos in enumerate(positions):
        end = pos + T_new
        torch.testing.assert_close(k_cache[b, pos:end], k_new[b], rtol=0, atol=0)
        torch.testing.assert_close(v_cache[b, pos:end], v_new[b], rtol=0, atol=0)
        assert k_cache[b, end:].eq(1e4).all()  # nothing written past the row's new end
        expected = reference_attention(q[b:b + 1], k_cache[b:b + 1, :end], v_cache[b:b + 1, :end], window_size=(window, 0))
        torch.testing.assert_close(out[b:b + 1], expected, rtol=1e-5, atol=1e-5)


def test_override_impl_is_validated(monkeypatch):
    q, k, v = random_qkv(1, 4, 4, 2, 2, 4)
    monkeypatch.setattr(fa, "_override_impl", "flash")
    with pytest.raises(ValueError, match="_override_impl"):
        flash_attn.flash_attn_func(q, k, v, causal=True)
    if not fa.HAS_FA3:
        monkeypatch.setattr(fa, "_override_impl", "fa3")
        with pytest.raises(RuntimeError, match="could not be loaded"):
            flash_attn.flash_attn_func(q, k, v, causal=True)


def test_use_fa3_can_be_re_resolved_after_an_override(monkeypatch):
    # Later upstream tests set _override_impl and then re-resolve USE_FA3 = _resolve_use_fa3().
    monkeypatch.setattr(fa, "USE_FA3", fa.USE_FA3)
    fa.USE_FA3 = fa._resolve_use_fa3()
    assert fa.USE_FA3 is False  # the autouse fixture forced "sdpa"
    q, k, v = random_qkv(1, 6, 6, 4, 2, 8)
    out = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(2, 0))
    torch.testing.assert_close(out, reference_attention(q, k, v, window_size=(2, 0)), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(fa, "_override_impl", None)
    # automatic: FA3 only when it loaded, and FA3 is only loaded for bf16 compute
    assert fa._resolve_use_fa3() == (fa.HAS_FA3 and fa.COMPUTE_DTYPE == torch.bfloat16)
    assert not fa._use_fa3(q)  # CPU fp32 tensors never reach the CUDA kernel
    if not fa.HAS_FA3:
        monkeypatch.setattr(fa, "_override_impl", "fa3")
        with pytest.raises(RuntimeError, match="could not be loaded"):
            fa._resolve_use_fa3()


def test_fa3_kernel_is_chosen_per_gpu_architecture():
    # as later upstream: Hopper loads the Hopper build; Ampere/Ada the community build when has_kernel
    # finds one for this torch/CUDA; Blackwell has none and stays on SDPA.
    assert fa._fa3_kernel_for_arch(9) == ("varunneal/flash-attention-3", False)
    assert fa._fa3_kernel_for_arch(8) == ("kernels-community/flash-attn3", True)
    for blackwell_major in (10, 12):
        assert fa._fa3_kernel_for_arch(blackwell_major) is None


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fa.HAS_FA3), reason="needs CUDA with Flash Attention 3")
@pytest.mark.parametrize("window", [-1, 64])
def test_fa3_matches_sdpa(monkeypatch, window):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, Hkv, D = 2, 256, 8, 4, 128

    def rand(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)

    q, k, v = rand(B, T, H, D), rand(B, T, Hkv, D), rand(B, T, Hkv, D)
    results = {}
    for impl in ("fa3", "sdpa"):
        monkeypatch.setattr(fa, "_override_impl", impl)
        full = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        k_cache = torch.zeros(B, T, Hkv, D, dtype=torch.bfloat16, device="cuda")
        v_cache = torch.zeros_like(k_cache)
        prefix = T - 8
        seqlens = torch.zeros(B, dtype=torch.int32, device="cuda")
        first = flash_attn.flash_attn_with_kvcache(q[:, :prefix], k_cache, v_cache, k=k[:, :prefix], v=v[:, :prefix],
                                                   cache_seqlens=seqlens, causal=True, window_size=(window, 0))
        seqlens += prefix
        step = flash_attn.flash_attn_with_kvcache(q[:, prefix:prefix + 1], k_cache, v_cache,
                                                  k=k[:, prefix:prefix + 1], v=v[:, prefix:prefix + 1],
                                                  cache_seqlens=seqlens, causal=True, window_size=(window, 0))
        results[impl] = (full.float(), first.float(), step.float())
    for fa3_out, sdpa_out in zip(results["fa3"], results["sdpa"]):
        torch.testing.assert_close(fa3_out, sdpa_out, rtol=2e-2, atol=2e-2)
