"""
GPT.forward against a from-scratch reference written straight from upstream's published formulas, in
the llm.c spirit: plain tensor math on a bare state dict, explicit-mask attention, no code shared
with nanochat/gpt.py. Every weight is random (no zero-initialized projection or gate hides a
path), the config has GQA, an odd depth, a padded vocab and sliding windows, so the test pins
down the whole forward pass: an upstream checkpoint must give the same logits here. Two
references: upstream's 2026-01 model (348fbb3) and its 2026-07 model (92d63d4: smear, backout,
RoPE base 100,000, q/k x 1.2, a 12-channel value gate in (0, 3), quarter windows rounded up to 128),
the latter also loaded from a checkpoint laid out as upstream's code writes it.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat import checkpoint_manager
from nanochat.gpt import GPT, GPTConfig

SOFTCAP = 15.0
ROPE_BASE = 10000.0


def rmsnorm(x):
    # parameterless, eps = machine epsilon of the dtype (F.rms_norm's default)
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + torch.finfo(x.dtype).eps)


def rotate(x, positions, base=ROPE_BASE):
    """Split-halves RoPE: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos, on (B, T, heads, D)."""
    D = x.size(-1)
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = positions.double()[:, None] * inv_freq[None, :]  # (T, D/2)
    cos, sin = angles.cos().float()[None, :, None, :], angles.sin().float()[None, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def window_lefts(config):
    """Per layer, how many previous tokens a query may see: T//2 for 'S', T for 'L', last layer 'L'."""
    pattern = config.window_pattern.upper()
    lefts = [config.sequence_len // 2 if pattern[i % len(pattern)] == "S" else config.sequence_len
             for i in range(config.n_layer)]
    lefts[-1] = config.sequence_len
    return lefts


def reference_logits(sd, config, idx):
    B, T = idx.shape
    C, H, Hkv, L = config.n_embd, config.n_head, config.n_kv_head, config.n_layer
    D = C // H
    positions = torch.arange(T)
    x = rmsnorm(sd["transformer.wte.weight"][idx])
    x0 = x
    for i in range(L):
        p = f"transformer.h.{i}."
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        # attention branch
        h = rmsnorm(x)
        q = (h @ sd[p + "attn.c_q.weight"].T).view(B, T, H, D)
        k = (h @ sd[p + "attn.c_k.weight"].T).view(B, T, Hkv, D)
        v = (h @ sd[p + "attn.c_v.weight"].T).view(B, T, Hkv, D)
        if i % 2 == (L - 1) % 2:  # value-embedding layers: every other one, always the last
            ve = sd[f"value_embeds.{i}.weight"][idx].view(B, T, Hkv, D)
            gate = 2 * torch.sigmoid(h[..., :32] @ sd[p + "attn.ve_gate.weight"].T)  # (B, T, Hkv)
            v = v + gate[..., None] * ve
        else:
            assert p + "attn.ve_gate.weight" not in sd
        q, k = rmsnorm(rotate(q, positions)), rmsnorm(rotate(k, positions))
        group = H // Hkv  # query head j reads kv head j // group
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5
        distance = positions[:, None] - positions[None, :]  # query row minus key column
        allowed = (distance >= 0) & (distance <= window_lefts(config)[i])
        scores = scores.masked_fill(~allowed, float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        # MLP branch: ReLU squared, 4x
        h = rmsnorm(x)
        x = x + (F.relu(h @ sd[p + "mlp.c_fc.weight"].T) ** 2) @ sd[p + "mlp.c_proj.weight"].T
    logits = rmsnorm(x) @ sd["lm_head.weight"].T
    logits = logits[..., : config.vocab_size].float()
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


def random_model(config, seed):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 1.0 if "wte" in name or "value_embeds" in name else 0.3 / param.shape[-1] ** 0.5
            if param.ndim == 1:  # the per-layer lambdas
                param.uniform_(0.2, 1.2)
            else:
                param.normal_(0.0, scale)
    return model.eval()


@pytest.mark.parametrize("config_kwargs, T", [
    (dict(sequence_len=32, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=128, window_pattern="SSL"), 32),
    (dict(sequence_len=32, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=128, window_pattern="SSL"), 19),
    (dict(sequence_len=16, vocab_size=64, n_layer=4, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SSSL"), 16),
    (dict(sequence_len=16, vocab_size=70, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, window_pattern="L"), 16),
])
def test_forward_matches_the_spec_reference(config_kwargs, T):
    config = GPTConfig(**config_kwargs)
    model = random_model(config, seed=T)
    state_dict = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    idx = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
        expected = reference_logits(state_dict, config, idx)
    assert ours.dtype == torch.float32 and ours.shape == (2, T, config.vocab_size)
    # the comparison is meaningful: the logits vary, and are not pinned to the softcap
    assert expected.std() > 0.1 and expected.abs().max() < 0.9 * SOFTCAP
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)

    targets = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
    targets[0, :3] = -1  # ignored positions
    with torch.no_grad():
        loss = model(idx, targets)
    keep = targets >= 0
    expected_loss = F.cross_entropy(expected[keep], targets[keep])
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# Upstream's 2026-07 model (92d63d4)


def window_lefts_2026_07(config):
    """'S' sees ceil(ceil(T/4) / 128) * 128 previous tokens (a quarter, up to FA3's tile), 'L' and the last layer T."""
    T = config.sequence_len
    short = math.ceil(math.ceil(T / 4) / 128) * 128
    pattern = config.window_pattern.upper()
    lefts = [short if pattern[i % len(pattern)] == "S" else T for i in range(config.n_layer)]
    lefts[-1] = T
    return lefts


def reference_logits_2026_07(sd, config, idx):
    B, T = idx.shape
    C, H, Hkv, L = config.n_embd, config.n_head, config.n_kv_head, config.n_layer
    D = C // H
    positions = torch.arange(T)
    e = rmsnorm(sd["transformer.wte.weight"][idx])
    # smear: position t > 0 adds lambda * sigmoid(gate . e_t[:24]) * e_{t-1}; position 0 stays e_0
    gate = sd["smear_lambda"] * torch.sigmoid(e[:, 1:, :24] @ sd["smear_gate.weight"].T)  # (B, T-1, 1)
    x = torch.cat([e[:, :1], e[:, 1:] + gate * e[:, :-1]], dim=1)
    x0 = x
    for i in range(L):
        p = f"transformer.h.{i}."
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = rmsnorm(x)
        q = (h @ sd[p + "attn.c_q.weight"].T).view(B, T, H, D)
        k = (h @ sd[p + "attn.c_k.weight"].T).view(B, T, Hkv, D)
        v = (h @ sd[p + "attn.c_v.weight"].T).view(B, T, Hkv, D)
        if i % 2 == (L - 1) % 2:
            ve = sd[f"value_embeds.{i}.weight"][idx].view(B, T, Hkv, D)
            gate = 3 * torch.sigmoid(h[..., :12] @ sd[p + "attn.ve_gate.weight"].T)  # (B, T, Hkv) in (0, 3)
            v = v + gate[..., None] * ve
        q = 1.2 * rmsnorm(rotate(q, positions, base=100000.0))
        k = 1.2 * rmsnorm(rotate(k, positions, base=100000.0))
        group = H // Hkv
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5
        distance = positions[:, None] - positions[None, :]
        allowed = (distance >= 0) & (distance <= window_lefts_2026_07(config)[i])
        scores = scores.masked_fill(~allowed, float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        h = rmsnorm(x)
        x = x + (F.relu(h @ sd[p + "mlp.c_fc.weight"].T) ** 2) @ sd[p + "mlp.c_proj.weight"].T
        if i == L // 2:
            x_mid = x  # backout: the residual after the middle layer
    x = x - sd["backout_lambda"] * x_mid
    logits = rmsnorm(x) @ sd["lm_head.weight"].T
    logits = logits[..., : config.vocab_size].float()
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


CONFIGS_2026_07 = [
    # T = 200 > the 128-token short windows of layers 0-1: the windows cut; GQA, odd depth (backout after layer 1)
    (dict(sequence_len=512, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSL"), 200),
    # 520 / 4 = 130 rounds up to a 256-token window; even depth (backout after layer 2 of 4)
    (dict(sequence_len=520, vocab_size=70, n_layer=4, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL"), 270),
]


@pytest.mark.parametrize("config_kwargs, T", CONFIGS_2026_07)
def test_2026_07_forward_with_smear_and_backout_matches_the_reference(config_kwargs, T):
    config = GPTConfig.for_recipe("2026-07", **config_kwargs)
    model = random_model(config, seed=T)
    state_dict = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    idx = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
        expected = reference_logits_2026_07(state_dict, config, idx)
    assert expected.std() > 0.1 and expected.abs().max() < 0.9 * SOFTCAP
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_upstream_2026_07_checkpoint_loads_through_load_model_with_the_reference_logits(tmp_path, monkeypatch,
                                                                                       tiny_tokenizer):
    """
    Laid out as upstream's 92d63d4 code writes it: meta["model_config"] with its 7 fields only, the
    state dict in bf16 with smear_gate.weight (1, 24), smear_lambda (1,), backout_lambda (1,) and
    12-channel value gates. load_model must tell the generation from the state dict.
    """
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tiny_tokenizer.save(str(tmp_path / "tokenizer"))
    V = tiny_tokenizer.get_vocab_size()
    V_pad, C, Hkv, L = -(-V // 64) * 64, 64, 2, 3
    shapes = {"transformer.wte.weight": (V_pad, C), "lm_head.weight": (V_pad, C), "resid_lambdas": (L,),
              "x0_lambdas": (L,), "smear_gate.weight": (1, 24), "smear_lambda": (1,), "backout_lambda": (1,)}
    for i in range(L):
        for name, shape in [("attn.c_q", (C, C)), ("attn.c_k", (Hkv * 16, C)), ("attn.c_v", (Hkv * 16, C)),
                            ("attn.c_proj", (C, C)), ("mlp.c_fc", (4 * C, C)), ("mlp.c_proj", (C, 4 * C))]:
            shapes[f"transformer.h.{i}.{name}.weight"] = shape
    for i in (0, 2):  # value embeddings on every other layer, the last included
        shapes[f"value_embeds.{i}.weight"] = (V_pad, Hkv * 16)
        shapes[f"transformer.h.{i}.attn.ve_gate.weight"] = (Hkv, 12)
    generator = torch.Generator().manual_seed(0)
    upstream = {}
    for name, shape in shapes.items():
        scale = 1.0 if "wte" in name or "value_embeds" in name else 0.3 / shape[-1] ** 0.5
        tensor = torch.rand(shape, generator=generator) + 0.2 if len(shape) == 1 else torch.randn(shape, generator=generator) * scale
        upstream[name] = tensor.bfloat16()
    model_config = dict(sequence_len=256, vocab_size=V, n_layer=L, n_head=4, n_kv_head=Hkv, n_embd=C,
                        window_pattern="SSSL")
    checkpoint_dir = tmp_path / "base_checkpoints" / "d3"
    checkpoint_dir.mkdir(parents=True)
    torch.save(upstream, checkpoint_dir / "model_000005.pt")
    (checkpoint_dir / "meta_000005.json").write_text(json.dumps({"step": 5, "model_config": model_config}))

    model, _, _ = checkpoint_manager.load_model("base", "cpu", phase="eval")
    assert model.config == GPTConfig.for_recipe("2026-07", **model_config)
    idx = torch.randint(0, V, (2, 200), generator=torch.Generator().manual_seed(1))  # past the 128-token windows
    with torch.no_grad():
        ours = model(idx)
    expected = reference_logits_2026_07({k: v.float() for k, v in upstream.items()}, model.config, idx)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
