"""
The GPT model against its spec: parameter counts and FLOPs of the reference sizes, the
state-dict layout upstream checkpoints use, initialization, attention windows, softcapped
logits and loss, KV-cache decoding equal to the full forward, the naive sampler and the
optimizer groups.
"""

import math

import pytest
import torch

import nanochat.engine as engine
import nanochat.gpt as gpt
from conftest import build_gpt, decode_in_chunks, kv_cache_for
from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig, apply_rotary_emb, has_ve, norm


def reference_config(depth, aspect_ratio=64, head_dim=128, sequence_len=2048):
    """base_train's depth -> shape mapping (upstream's rule)."""
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=32768, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                     n_embd=model_dim)


def meta_model(config):
    with torch.device("meta"):
        return GPT(config)


def tiny_config(**overrides):
    kwargs = dict(sequence_len=32, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSL")
    kwargs.update(overrides)
    return GPTConfig(**kwargs)


build = build_gpt  # the shared builder (tests/conftest.py)


# -----------------------------------------------------------------------------
# Sizes


def test_d12_param_counts_match_spec():
    counts = meta_model(reference_config(12)).num_scaling_params()
    assert counts == {
        "wte": 25_165_824,
        "value_embeds": 150_994_944,
        "lm_head": 25_165_824,
        "transformer_matrices": 84_935_808,
        "scalars": 24,
        "total": 286_262_424,
    }
    assert counts["transformer_matrices"] + counts["lm_head"] == 110_101_632  # "110.1M" scaling params


def test_d20_param_counts_match_formulas_and_spec_table():
    C, L, V, Hkv = 1280, 20, 32768, 10
    n_ve = L // 2  # layers 1, 3, ..., 19
    expected = {
        "wte": V * C,
        "value_embeds": n_ve * V * C,
        "lm_head": V * C,
        "transformer_matrices": L * (4 * C * C + 8 * C * C) + n_ve * Hkv * 32,
        "scalars": 2 * L,
    }
    expected["total"] = sum(expected.values())
    counts = meta_model(reference_config(20)).num_scaling_params()
    assert counts == expected
    assert counts["total"] == 896_535_720
    # upstream's published d20 parameter counts, rounded: 41.94M / 419.43M / 393.22M / 896.5M / 435.2M
    assert round(counts["wte"] / 1e6, 2) == 41.94
    assert round(counts["value_embeds"] / 1e6, 2) == 419.43
    assert round(counts["transformer_matrices"] / 1e6, 2) == 393.22
    assert round(counts["total"] / 1e6, 1) == 896.5
    assert round((counts["transformer_matrices"] + counts["lm_head"]) / 1e6, 1) == 435.2


@pytest.mark.parametrize("depth,exact,rounded", [(12, 802_167_552, 8.02e8), (20, 3_004_189_440, 3.00e9)])
def test_estimate_flops_matches_formula(depth, exact, rounded):
    config = reference_config(depth)
    model = meta_model(config)
    counts = model.num_scaling_params()
    matmul_params = counts["transformer_matrices"] + counts["lm_head"]
    H, D, T = config.n_head, config.n_embd // config.n_head, config.sequence_len
    attention = sum(12 * H * D * min(left, T) for left, _ in model.window_sizes)
    assert model.estimate_flops() == 6 * matmul_params + attention == exact
    assert f"{exact:.2e}" == f"{rounded:.2e}"


# -----------------------------------------------------------------------------
# Layout


def test_state_dict_keys_and_shapes_match_upstream_layout():
    config = tiny_config(n_layer=4)
    C, V_pad, D, Hkv = 64, 128, 16, 2
    expected = {"transformer.wte.weight": (V_pad, C), "lm_head.weight": (V_pad, C),
                "resid_lambdas": (4,), "x0_lambdas": (4,)}
    for i in range(4):
        prefix = f"transformer.h.{i}."
        expected[prefix + "attn.c_q.weight"] = (4 * D, C)
        expected[prefix + "attn.c_k.weight"] = (Hkv * D, C)
        expected[prefix + "attn.c_v.weight"] = (Hkv * D, C)
        expected[prefix + "attn.c_proj.weight"] = (C, C)
        expected[prefix + "mlp.c_fc.weight"] = (4 * C, C)
        expected[prefix + "mlp.c_proj.weight"] = (C, 4 * C)
    for i in (1, 3):
        expected[f"transformer.h.{i}.attn.ve_gate.weight"] = (Hkv, 32)
        expected[f"value_embeds.{i}.weight"] = (V_pad, Hkv * D)
    state = meta_model(config).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_rotary_tables_are_non_persistent_buffers():
    config = tiny_config()
    model = build(config)
    assert "cos" not in model.state_dict() and "sin" not in model.state_dict()
    assert model.rotary_seq_len == 10 * config.sequence_len
    assert model.cos.shape == model.sin.shape == (1, 320, 1, 8)
    # angle of position t, channel j = t * 10000^(-2j/D)
    t, j = 37, 3
    torch.testing.assert_close(model.cos[0, t, 0, j].item(), math.cos(t * 10000 ** (-2 * j / 16)), rtol=0, atol=1e-5)


def test_state_dict_round_trips_strictly_including_bf16_embeddings():
    # Upstream CUDA checkpoints hold bf16 wte / value_embeds; loading copies into our dtypes.
    source = build(tiny_config(), seed=1, perturb=0.05)
    state = {k: (v.to(torch.bfloat16) if "wte" in k or "value_embeds" in k else v)
             for k, v in source.state_dict().items()}
    target = build(tiny_config(), seed=2)
    target.load_state_dict(state, strict=True)
    idx = torch.randint(0, 100, (2, 12))
    rounded = build(tiny_config(), seed=3)
    rounded.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    torch.testing.assert_close(target(idx), rounded(idx), rtol=0, atol=0)
    assert target.transformer.wte.weight.dtype == torch.float32  # CPU compute dtype in the tests


def test_vocab_is_padded_to_multiple_of_64_and_logits_cropped():
    model = build(tiny_config(vocab_size=100))
    assert model.transformer.wte.weight.shape[0] == model.lm_head.weight.shape[0] == 128
    assert model(torch.randint(0, 100, (1, 5))).shape == (1, 5, 100)


@pytest.mark.parametrize("overrides,message", [
    (dict(n_embd=66, n_head=4), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
    (dict(n_embd=60, n_head=4), "even"),
    (dict(window_pattern="SXL"), "window_pattern"),
    (dict(window_pattern=""), "window_pattern"),
])
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        meta_model(tiny_config(**overrides))


# -----------------------------------------------------------------------------
# Init


def test_init_values():
    config = tiny_config(n_layer=4, n_embd=128, n_head=4, n_kv_head=4, vocab_size=4096)
    model = build(config)
    bound = math.sqrt(3) / math.sqrt(128)
    assert model.resid_lambdas.eq(1.0).all()
    torch.testing.assert_close(model.x0_lambdas, torch.full((4,), 0.1))
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 2e-5
    uniform = [model.value_embeds[k].weight for k in model.value_embeds]
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.eq(0).all() and block.mlp.c_proj.weight.eq(0).all()
        if block.attn.ve_gate is not None:
            assert block.attn.ve_gate.weight.eq(0).all()
        uniform += [block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight, block.mlp.c_fc.weight]
    for w in uniform:
        assert w.abs().max().item() <= bound
        assert abs(w.std().item() - 1 / math.sqrt(128)) < 0.1 / math.sqrt(128)


def test_value_embedding_gate_is_exactly_one_at_init():
    model = build(tiny_config())
    x = torch.randn(2, 5, 64)
    for i, block in enumerate(model.transformer.h):
        if has_ve(i, 3):
            gate = 2 * torch.sigmoid(block.attn.ve_gate(x[..., :32]))
            assert gate.eq(1.0).all()


def test_blocks_are_identity_at_init_so_logits_come_from_the_embedding():
    # Zero output projections: x stays a multiple of x0, which the final norm removes.
    model = build(tiny_config())
    idx = torch.randint(0, 100, (2, 9))
    x0 = norm(model.transformer.wte(idx))
    raw = (norm(x0) @ model.lm_head.weight.T)[..., :100]
    torch.testing.assert_close(model(idx), 15 * torch.tanh(raw / 15), rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# Windows and value-embedding layers


def test_d20_window_sizes():
    model = meta_model(reference_config(20))
    full_layers = [i for i, w in enumerate(model.window_sizes) if w == (2048, 0)]
    assert full_layers == [3, 7, 11, 15, 19]
    assert all(w == (1024, 0) for i, w in enumerate(model.window_sizes) if i not in full_layers)


def test_window_pattern_is_case_insensitive_and_last_layer_is_full():
    model = meta_model(tiny_config(n_layer=3, window_pattern="s"))
    assert model.window_sizes == [(16, 0), (16, 0), (32, 0)]
    model = meta_model(tiny_config(n_layer=3, window_pattern="L"))
    assert model.window_sizes == [(32, 0)] * 3


@pytest.mark.parametrize("n_layer,ve_layers", [(20, list(range(1, 20, 2))), (3, [0, 2]), (1, [0]), (4, [1, 3])])
def test_value_embedding_layers(n_layer, ve_layers):
    assert [i for i in range(n_layer) if has_ve(i, n_layer)] == ve_layers
    model = meta_model(tiny_config(n_layer=n_layer))
    assert sorted(int(k) for k in model.value_embeds) == ve_layers
    assert [i for i, b in enumerate(model.transformer.h) if b.attn.ve_gate is not None] == ve_layers


# -----------------------------------------------------------------------------
# Forward


def test_rotary_is_a_rotation_that_depends_on_relative_position():
    model = build(tiny_config())
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def rotated(x, pos):
        return apply_rotary_emb(x, model.cos[:, pos:pos + 1], model.sin[:, pos:pos + 1])

    torch.testing.assert_close(rotated(q, 9).norm(), q.norm())
    score_a = (rotated(q, 12) * rotated(k, 5)).sum()
    score_b = (rotated(q, 30) * rotated(k, 23)).sum()
    torch.testing.assert_close(score_a, score_b, rtol=1e-5, atol=1e-5)


def test_rotary_uses_split_halves_and_the_upstream_sign():
    # x1 = first half, x2 = second half; y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos. The sign
    # matters: the opposite rotation changes q.k scores, so upstream checkpoints would break.
    theta = torch.tensor([0.3, 1.1])
    cos, sin = theta.cos().view(1, 1, 1, 2), theta.sin().view(1, 1, 1, 2)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)  # pairs (1, 3) and (2, 4)
    x1, x2 = x[..., :2], x[..., 2:]
    expected = torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)
    torch.testing.assert_close(apply_rotary_emb(x, cos, sin), expected)


def test_logits_are_softcapped_and_loss_is_cross_entropy():
    model = build(tiny_config(), perturb=0.05)
    with torch.no_grad():
        model.lm_head.weight.mul_(500)  # push raw logits well past the cap
    captured = {}
    model.lm_head.register_forward_hook(lambda module, inputs, output: captured.update(raw=output))
    idx = torch.randint(0, 100, (2, 10))
    logits = model(idx)
    assert logits.dtype == torch.float32
    assert logits.abs().max().item() <= 15.0 and logits.abs().max().item() > 10.0
    raw = captured["raw"][..., :100].float()
    assert raw.abs().max().item() > 30.0
    torch.testing.assert_close(logits, 15 * torch.tanh(raw / 15))

    targets = torch.randint(0, 100, (2, 10))
    targets[0, :3] = -1  # ignored positions
    keep = targets.view(-1) != -1
    log_probs = torch.log_softmax(logits.view(-1, 100), dim=-1)
    per_token = -log_probs[keep.nonzero().squeeze(1), targets.view(-1)[keep]]
    torch.testing.assert_close(model(idx, targets), per_token.mean())
    losses = model(idx, targets, loss_reduction="none")
    assert losses.shape == (20,)
    torch.testing.assert_close(losses[keep], per_token)
    assert losses[~keep].eq(0).all()


def test_backward_reaches_every_parameter():
    model = build(tiny_config(), perturb=0.05).train()
    idx = torch.randint(0, 100, (2, 16))
    model(idx, torch.randint(0, 100, (2, 16))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_linear_takes_upstream_bias_false_keyword_and_casts_weight_to_input_dtype():
    layer = gpt.Linear(8, 4, bias=False)  # how later upstream code builds it
    assert layer.bias is None and layer.weight.dtype == torch.float32
    y = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no bias"):
        gpt.Linear(8, 4, bias=True)


def test_bf16_compute_keeps_fp32_master_weights(monkeypatch):
    monkeypatch.setattr(gpt, "COMPUTE_DTYPE", torch.bfloat16)
    model = build(tiny_config(), perturb=0.05)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert all(e.weight.dtype == torch.bfloat16 for e in model.value_embeds.values())
    assert model.cos.dtype == model.sin.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == model.transformer.h[0].attn.c_q.weight.dtype == torch.float32
    logits = model(torch.randint(0, 100, (2, 8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # fp16 compute: GradScaler needs fp32 parameters, so the embeddings stay fp32
    monkeypatch.setattr(gpt, "COMPUTE_DTYPE", torch.float16)
    model = meta_model(tiny_config())
    assert model.transformer.wte.weight.dtype == torch.float32 and model.cos.dtype == torch.float16
    monkeypatch.setattr(engine, "COMPUTE_DTYPE", torch.bfloat16)
    assert KVCache(1, 2, 8, 16, 3, "cpu").k_cache.dtype == torch.bfloat16


# -----------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("chunks", [[7] + [1] * 23, [5, 3, 8, 1, 7], [1] * 30])
def test_kv_cache_decoding_equals_full_forward(chunks):
    # T = 30 tokens with short windows of 16 (SSL over 3 layers): the windows really cut.
    model = build(tiny_config(), perturb=0.05)
    idx = torch.randint(0, 100, (2, sum(chunks)))
    with torch.no_grad():
        full = model(idx)
        cache = kv_cache_for(model, 2, 32)
        chunked = decode_in_chunks(model, idx, chunks, cache)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)


def test_sliding_windows_change_the_result():
    # Guards the test above: with all-full attention the same weights give other logits.
    windowed = build(tiny_config(), perturb=0.05)
    full = build(tiny_config(window_pattern="L"))
    full.load_state_dict(windowed.state_dict())
    idx = torch.randint(0, 100, (1, 30))
    with torch.no_grad():
        assert torch.allclose(windowed(idx)[:, :17], full(idx)[:, :17], atol=1e-5)
        assert not torch.allclose(windowed(idx)[:, 17:], full(idx)[:, 17:], atol=1e-3)


def test_kv_cache_prefill_broadcasts_a_batch_one_cache():
    model = build(tiny_config(), perturb=0.05)
    prompt = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        single = kv_cache_for(model, 1, 16)
        model(prompt, kv_cache=single)
        batched = kv_cache_for(model, 3, 24)
        batched.prefill(single)
        assert batched.cache_seqlens.tolist() == [6, 6, 6]
        next_tokens = torch.tensor([[1], [2], [3]])
        logits = model(next_tokens, kv_cache=batched)[:, -1]
        expected = model(torch.cat([prompt.expand(3, -1), next_tokens], dim=1))[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_kv_cache_prefill_checks():
    source = KVCache(1, 2, 16, 8, 3, "cpu", torch.float32)
    source.advance(4)
    with pytest.raises(ValueError, match="layers"):
        KVCache(2, 2, 16, 8, 4, "cpu", torch.float32).prefill(source)
    with pytest.raises(ValueError, match="at least as long"):
        KVCache(2, 2, 8, 8, 3, "cpu", torch.float32).prefill(source)
    with pytest.raises(ValueError, match="batch size"):
        KVCache(2, 2, 16, 8, 3, "cpu", torch.float32).prefill(KVCache(3, 2, 16, 8, 3, "cpu", torch.float32))
    used = KVCache(2, 2, 16, 8, 3, "cpu", torch.float32)
    used.advance(1)
    with pytest.raises(ValueError, match="empty cache"):
        used.prefill(source)
    used.reset()
    used.prefill(source)
    assert used.get_pos() == 4


# -----------------------------------------------------------------------------
# Sampling


def test_greedy_generate_is_argmax_of_the_full_forward():
    model = build(tiny_config(), perturb=0.05)
    prompt = [5, 17, 42, 9]
    generated = list(model.generate(prompt, max_tokens=12, temperature=0.0))
    assert generated == list(model.generate(prompt, max_tokens=12, temperature=0.0))
    tokens = list(prompt)
    with torch.no_grad():
        for token in generated:
            assert token == model(torch.tensor([tokens]))[0, -1].argmax().item()
            tokens.append(token)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = build(tiny_config(), perturb=0.05)
    prompt = [1, 2, 3]
    first = list(model.generate(prompt, max_tokens=10, temperature=1.0, seed=7))
    assert first == list(model.generate(prompt, max_tokens=10, temperature=1.0, seed=7))
    greedy = list(model.generate(prompt, max_tokens=10, temperature=0.0))
    assert list(model.generate(prompt, max_tokens=10, temperature=1.0, top_k=1, seed=3)) == greedy
    with pytest.raises(ValueError, match="temperature"):
        next(model.generate(prompt, max_tokens=1, temperature=-1.0))


# -----------------------------------------------------------------------------
# Optimizer groups


@pytest.mark.parametrize("n_embd,n_head", [(768, 6), (128, 2)])
def test_setup_optimizer_groups(n_embd, n_head):
    config = tiny_config(n_layer=2, n_embd=n_embd, n_head=n_head, n_kv_head=n_head, vocab_size=64)
    model = build(config)
    optimizer = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1,
                                      adam_betas=(0.8, 0.95), scalar_lr=0.5)
    s_d = 1.0 if n_embd == 768 else (n_embd / 768) ** -0.5
    groups = optimizer.param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}

    adamw = [g for g in groups if g["kind"] == "adamw"]
    expected = [
        ([model.lm_head.weight], 0.004 * s_d, (0.8, 0.95)),
        ([model.transformer.wte.weight], 0.2 * s_d, (0.8, 0.95)),
        ([e.weight for e in model.value_embeds.values()], 0.2 * s_d, (0.8, 0.95)),
        ([model.resid_lambdas], 0.5 * 0.01, (0.8, 0.95)),
        ([model.x0_lambdas], 0.5, (0.96, 0.95)),
    ]
    assert len(adamw) == len(expected)
    for group, (params, lr, betas) in zip(adamw, expected):
        assert [id(p) for p in group["params"]] == [id(p) for p in params]
        assert group["lr"] == pytest.approx(lr) and group["initial_lr"] == group["lr"]
        assert tuple(group["betas"]) == betas and group["eps"] == 1e-10 and group["weight_decay"] == 0.0

    muon = [g for g in groups if g["kind"] == "muon"]
    shapes = [tuple(g["params"][0].shape) for g in muon]
    assert shapes == sorted({tuple(p.shape) for p in model.transformer.h.parameters()})
    assert (n_head, 32) in shapes  # the ve_gate matrices are Muon-optimized too
    for group in muon:
        assert len({tuple(p.shape) for p in group["params"]}) == 1
        assert group["lr"] == 0.02 and group["initial_lr"] == 0.02
        assert (group["momentum"], group["ns_steps"], group["beta2"], group["weight_decay"]) == (0.95, 5, 0.95, 0.1)


def test_one_optimizer_step_lowers_the_loss():
    model = build(tiny_config(), perturb=0.02).train()
    optimizer = model.setup_optimizer()
    idx = torch.randint(0, 100, (4, 16))
    targets = torch.roll(idx, -1, dims=1)
    losses = []
    for _ in range(5):
        loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
