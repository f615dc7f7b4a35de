"""
The two model recipes of nanochat/gpt.py: 2026-01 (upstream 348fbb3, the GPTConfig defaults) and
2026-07 (upstream 92d63d4). The 2026-07 model's state-dict layout, sizes, FLOPs, init and windows
against upstream's numbers; smear under the KV cache equal to the full forward; the optimizer
groups each recipe sets; recipe names. The forward math itself: tests/test_gpt_reference.py.
"""

import math

import pytest
import torch

from conftest import build_gpt, decode_in_chunks, kv_cache_for
from nanochat.gpt import GPT, RECIPES, GPTConfig


def config_2026_07(**overrides):
    kwargs = dict(sequence_len=512, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSL")
    return GPTConfig.for_recipe("2026-07", **{**kwargs, **overrides})


def d12_2026_07():
    with torch.device("meta"):
        return GPT(GPTConfig.for_recipe("2026-07", sequence_len=2048, vocab_size=32768, n_layer=12, n_head=6,
                                        n_kv_head=6, n_embd=768))


def with_strong_smear(model):
    """smear starts off (lambda 0) and backout at 0.2: turn both up so that a missing path shows."""
    with torch.no_grad():
        model.smear_lambda.fill_(0.8)
        model.backout_lambda.fill_(0.5)
    return model


# -----------------------------------------------------------------------------
# Layout, sizes, init


def test_2026_07_state_dict_matches_upstream_92d63d4_layout():
    C, V_pad, D, Hkv = 64, 128, 16, 2
    expected = {"transformer.wte.weight": (V_pad, C), "lm_head.weight": (V_pad, C), "resid_lambdas": (4,),
                "x0_lambdas": (4,), "smear_gate.weight": (1, 24), "smear_lambda": (1,), "backout_lambda": (1,)}
    for i in range(4):
        prefix = f"transformer.h.{i}."
        expected.update({prefix + "attn.c_q.weight": (4 * D, C), prefix + "attn.c_k.weight": (Hkv * D, C),
                         prefix + "attn.c_v.weight": (Hkv * D, C), prefix + "attn.c_proj.weight": (C, C),
                         prefix + "mlp.c_fc.weight": (4 * C, C), prefix + "mlp.c_proj.weight": (C, 4 * C)})
    for i in (1, 3):
        expected[f"transformer.h.{i}.attn.ve_gate.weight"] = (Hkv, 12)
        expected[f"value_embeds.{i}.weight"] = (V_pad, Hkv * D)
    with torch.device("meta"):
        state = GPT(config_2026_07(n_layer=4)).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_d12_2026_07_flops_and_param_counts_equal_upstream_92d63d4():
    model = d12_2026_07()
    # upstream's estimate_flops and num_scaling_params on this config (92d63d4, run on the meta device)
    assert model.estimate_flops() == 759_696_048
    assert model.num_scaling_params() == {"wte": 25_165_824, "value_embeds": 150_994_944, "lm_head": 25_165_824,
                                          "transformer_matrices": 84_935_088, "scalars": 50, "total": 286_261_730}
    # the same from the formula: every Linear weight (the 24-weight smear gate too) and the quarter windows
    C, L, V = 768, 12, 32768
    matmul = L * 12 * C * C + 6 * 6 * 12 + V * C + 24
    attended = 3 * 2048 + 9 * 512  # SSSL: layers 3, 7, 11 full
    assert model.estimate_flops() == 6 * matmul + 12 * C * attended


@pytest.mark.parametrize("T, short", [(2048, 512), (256, 128), (64, 128), (520, 256), (1025, 384), (4096, 1024)])
def test_2026_07_short_window_is_a_quarter_rounded_up_to_128(T, short):
    with torch.device("meta"):
        model = GPT(config_2026_07(sequence_len=T, n_layer=4, window_pattern="SSSL"))
    assert model.window_sizes == [(short, 0)] * 3 + [(T, 0)]


def test_2026_07_init_values():
    config = config_2026_07(n_layer=5, n_embd=128, n_head=4, n_kv_head=4, vocab_size=2048)
    model = build_gpt(config)
    bound = math.sqrt(3) / math.sqrt(128)
    assert abs(model.transformer.wte.weight.std().item() - 0.8) < 0.02
    for block in model.transformer.h:
        c_fc = block.mlp.c_fc.weight
        assert c_fc.abs().max().item() <= 0.4 * bound and c_fc.abs().max().item() > 0.39 * bound
        assert block.attn.c_q.weight.abs().max().item() > 0.99 * bound
        assert block.attn.c_proj.weight.eq(0).all() and block.mlp.c_proj.weight.eq(0).all()
    # linear in depth: resid 1.15 -> 1.05, x0 0.20 -> 0.05 over layers 0..4
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.125, 1.10, 1.075, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.1625, 0.125, 0.0875, 0.05]))
    gates = [model.smear_gate.weight] + [b.attn.ve_gate.weight for b in model.transformer.h if b.attn.ve_gate is not None]
    for gate in gates:  # small positive: slightly above the neutral gate
        assert gate.min().item() >= 0 and 0.01 < gate.max().item() <= 0.02
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)


def test_2026_01_init_keeps_the_neutral_gates_and_constant_lambdas():
    model = build_gpt(GPTConfig(sequence_len=32, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64))
    assert not hasattr(model, "smear_gate") and not hasattr(model, "backout_lambda")
    assert model.resid_lambdas.eq(1.0).all() and model.x0_lambdas.eq(torch.tensor(0.1)).all()
    assert all(b.attn.ve_gate.weight.eq(0).all() for b in model.transformer.h if b.attn.ve_gate is not None)


# -----------------------------------------------------------------------------
# Smear under the KV cache


@pytest.mark.parametrize("chunks", [[7] + [1] * 13, [5, 3, 8, 1, 3]])
def test_kv_cache_decoding_with_smear_equals_full_forward(chunks):
    # [5, 3, ...]: a later chunk of several tokens smears its first one with the cache's prev_embedding
    model = with_strong_smear(build_gpt(config_2026_07(), perturb=0.05))
    idx = torch.randint(0, 100, (2, sum(chunks)))
    with torch.no_grad():
        full = model(idx)
        cache = kv_cache_for(model, 2, 32)
        chunked = decode_in_chunks(model, idx, chunks, cache)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)
    cache.reset()
    assert cache.prev_embedding is None and cache.get_pos() == 0


def test_kv_cache_prefill_copies_the_smear_state_into_every_row():
    model = with_strong_smear(build_gpt(config_2026_07(), perturb=0.05))
    prompt = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        single = kv_cache_for(model, 1, 16)
        model(prompt, kv_cache=single)
        batched = kv_cache_for(model, 3, 24)
        batched.prefill(single)
        assert batched.prev_embedding.shape == (3, 1, 64)
        next_tokens = torch.tensor([[1], [2], [3]])
        logits = model(next_tokens, kv_cache=batched)[:, -1]
        expected = model(torch.cat([prompt.expand(3, -1), next_tokens], dim=1))[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_a_model_without_smear_leaves_the_cache_smear_state_alone():
    model = build_gpt(GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    cache = kv_cache_for(model, 1, 8)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
    assert cache.prev_embedding is None


# -----------------------------------------------------------------------------
# Optimizer groups per recipe


def test_setup_optimizer_of_recipe_2026_07_sets_upstream_92d63d4_groups():
    model = build_gpt(config_2026_07(n_embd=128, n_head=2, n_kv_head=2))
    optimizer = model.setup_optimizer(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28,
                                      scalar_lr=0.5)  # the recipe follows from the config
    s_d = (128 / 768) ** -0.5
    expected = [  # params, lr, betas, weight decay
        ([model.lm_head.weight], 0.008 * s_d, (0.8, 0.96), 0.01),
        ([model.transformer.wte.weight], 0.3 * s_d, (0.8, 0.995), 0.001),
        ([e.weight for e in model.value_embeds.values()], 0.3 * s_d * 0.5, (0.8, 0.995), 0.01),
        ([model.resid_lambdas], 0.5 * 0.01, (0.8, 0.95), 0.05),
        ([model.x0_lambdas], 0.5, (0.96, 0.95), 0.0),
        ([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0),
    ]
    adamw = [g for g in optimizer.param_groups if g["kind"] == "adamw"]
    assert len(adamw) == len(expected)
    for group, (params, lr, betas, weight_decay) in zip(adamw, expected):
        assert [id(p) for p in group["params"]] == [id(p) for p in params]
        assert group["lr"] == pytest.approx(lr) and tuple(group["betas"]) == betas
        assert group["weight_decay"] == weight_decay and group["eps"] == 1e-10
    muon = [g for g in optimizer.param_groups if g["kind"] == "muon"]
    assert muon and all((g["beta2"], g["momentum"], g["weight_decay"]) == (0.9, 0.95, 0.28) for g in muon)
    assert tuple(optimizer.muon_options) == (True, True, 1.01)


def test_setup_optimizer_recipe_and_muon_flags_override_the_inferred_ones():
    model = build_gpt(config_2026_07())
    old = model.setup_optimizer(recipe="2026-01", muon_plus=True)
    assert tuple(old.muon_options) == (False, True, 1.02)
    assert {g["beta2"] for g in old.param_groups if g["kind"] == "muon"} == {0.95}
    assert model.setup_optimizer(muon_eq=False).muon_options.muon_eq is False
    with pytest.raises(ValueError, match="betas per group"):
        model.setup_optimizer(adam_betas=(0.9, 0.95))
    plain = build_gpt(GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    assert tuple(plain.setup_optimizer().muon_options) == (False, False, 1.02)


# -----------------------------------------------------------------------------
# Recipe names


def test_recipes_by_name_latest_and_fields_that_override():
    assert set(RECIPES) == {"2026-01", "2026-07"}
    assert GPTConfig.for_recipe("latest") == GPTConfig.for_recipe("2026-07")
    assert GPTConfig.for_recipe("2026-01", n_layer=4) == GPTConfig(n_layer=4)
    assert GPTConfig.for_recipe("2026-07").recipe() == "2026-07" and GPTConfig().recipe() == "2026-01"
    ablation = GPTConfig.for_recipe("2026-07", smear=False)
    assert not ablation.smear and ablation.backout and ablation.recipe() is None
    with pytest.raises(ValueError, match="2026-01, 2026-07"):
        GPTConfig.for_recipe("2025-10")
