"""
nanochat's GPT as a Hugging Face transformers causal LM (loaded with trust_remote_code).

This file is copied verbatim into every exported model directory and imports only torch and
transformers, so the export loads where nanochat is not installed. The parameter names are
nanochat's own (transformer.wte, transformer.h.<i>.attn.c_q, value_embeds.<i>, ...), so a
nanochat state dict loads as it is. The forward pass is nanochat's, step for step:

- token embedding, then a parameterless RMSNorm; that normed embedding x0 is mixed back into
  the residual stream before every layer: x = resid_lambdas[i] * x + x0_lambdas[i] * x0
- pre-norm blocks: x + attn(norm(x)), then x + mlp(norm(x)); ReLU^2 MLP; no biases
- attention: rotary embeddings in split-halves form (the rotation by -theta that nanochat uses),
  then QK-norm; grouped-query attention; per-layer windows (a query at position p sees keys
  p - window .. p, window = sequence_len on long layers, sequence_len // 2 on short ones)
- value embeddings on every other layer (always the last): v += 2 * sigmoid(ve_gate(x[:32])) * ve
- final norm, lm_head over the padded vocab, logits cut to vocab_size, in fp32, soft-capped
  at 15 * tanh(logits / 15)

The KV cache is transformers' DynamicCache: generate() builds it from the config, whose
layer_types give the short-window layers a sliding-window cache layer. Attention masks are
built here from cache slots, so any cache layer that returns the most recent keys works.
Static (compiled) caches are not supported. A 2D padding mask (1 = token, 0 = padding) and
position_ids (what generate() derives from it for left padding) are honoured.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanochat_gpt import NanochatGPTConfig

# transformers 5 renamed the cache argument and output field from past_key_values to cache.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def norm(x):
    """Parameterless RMSNorm over the last dim (eps = the dtype's machine epsilon)."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """x (B, T, heads, D); cos/sin (B, T, 1, D/2). Split halves, rotating each pair by -theta."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)


def rotary_tables(config, position_ids, dtype):
    """cos/sin (B, T, 1, D/2) for integer positions (B, T), computed as nanochat does (fp32 angles)."""
    head_dim = config.head_dim
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
    inv_freq = 1.0 / (config.rotary_base ** (channels / head_dim))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq
    return angles.cos().to(dtype)[:, :, None, :], angles.sin().to(dtype)[:, :, None, :]


class Linear(nn.Linear):
    """Bias-free Linear that casts its weight to the input's dtype (nanochat keeps fp32 master weights)."""

    def __init__(self, in_features, out_features, init_rule):
        super().__init__(in_features, out_features, bias=False)
        self.init_rule = init_rule  # how _init_weights fills it for a model built from a config alone

    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype))


class Embedding(nn.Embedding):
    def __init__(self, num_embeddings, dim, init_rule):
        super().__init__(num_embeddings, dim)
        self.init_rule = init_rule


def has_ve(layer_idx, n_layer):
    """Value embeddings live on every other layer, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


class NanochatGPTAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.window_sizes()[layer_idx]
        self.ve_gate_channels = config.ve_gate_channels
        C, D = config.n_embd, self.head_dim
        bound = 3 ** 0.5 / C ** 0.5  # uniform with std 1/sqrt(C)
        self.c_q = Linear(C, self.n_head * D, ("uniform", bound))
        self.c_k = Linear(C, self.n_kv_head * D, ("uniform", bound))
        self.c_v = Linear(C, self.n_kv_head * D, ("uniform", bound))
        self.c_proj = Linear(C, C, ("zeros",))
        self.ve_gate = Linear(config.ve_gate_channels, self.n_kv_head, ("zeros",)) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, cache, past_length, padding_mask):
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (0, 2), 1 when ve_gate is zero
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # the most recent keys, this step's included
        y = self._attend(q, k, v, past_length, padding_mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))

    def _attend(self, q, k, v, past_length, padding_mask):
        Tq, Tk = q.size(2), k.size(2)
        end = past_length + Tq  # cache slots 0 .. end-1 hold this row's tokens; k covers the last Tk of them
        enable_gqa = self.n_head != self.n_kv_head
        window_covers_all = self.window >= end - 1
        if padding_mask is None and Tq == Tk and window_covers_all:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        if padding_mask is None and Tq == 1:
            # Decode: the query is the newest token, so only the window limits which keys it sees.
            keep = min(Tk, self.window + 1)
            return F.scaled_dot_product_attention(q, k[:, :, -keep:], v[:, :, -keep:], enable_gqa=enable_gqa)
        query_slot = torch.arange(past_length, end, device=q.device)[:, None]
        key_slot = torch.arange(end - Tk, end, device=q.device)[None, :]
        allowed = (key_slot <= query_slot) & (query_slot - key_slot <= self.window)
        allowed = allowed[None, None]  # (1, 1, Tq, Tk)
        if padding_mask is not None:
            allowed = allowed & padding_mask[:, None, None, -Tk:]
            # A padding query may have no visible key at all; let it see itself so softmax stays finite.
            allowed = allowed | (key_slot == query_slot)[None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=enable_gqa)


class NanochatGPTMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bound = 3 ** 0.5 / config.n_embd ** 0.5
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, ("uniform", bound))
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, ("zeros",))

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class NanochatGPTBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = NanochatGPTAttention(config, layer_idx)
        self.mlp = NanochatGPTMLP(config)

    def forward(self, x, ve, cos_sin, cache, past_length, padding_mask):
        x = x + self.attn(norm(x), ve, cos_sin, cache, past_length, padding_mask)
        return x + self.mlp(norm(x))


class NanochatGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatGPTConfig
    base_model_prefix = "model"  # no such attribute: this class is its own base model
    _no_split_modules = ["NanochatGPTBlock"]
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        C, L, V = config.n_embd, config.n_layer, config.padded_vocab_size
        kv_dim = config.n_kv_head * config.head_dim
        bound = 3 ** 0.5 / C ** 0.5
        self.transformer = nn.ModuleDict({
            "wte": Embedding(V, C, ("normal", 1.0)),
            "h": nn.ModuleList([NanochatGPTBlock(config, i) for i in range(L)]),
        })
        self.lm_head = Linear(C, V, ("normal", 0.001))
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.full((L,), 0.1))
        self.value_embeds = nn.ModuleDict({str(i): Embedding(V, kv_dim, ("uniform", bound))
                                           for i in range(L) if has_ve(i, L)})
        self.post_init()

    def _init_weights(self, module):
        """nanochat's initialization, for a model built from a config alone (loaded weights are left alone)."""
        rule = getattr(module, "init_rule", None)
        if rule is not None:
            if rule[0] == "uniform":
                nn.init.uniform_(module.weight, -rule[1], rule[1])
            elif rule[0] == "normal":
                nn.init.normal_(module.weight, mean=0.0, std=rule[1])
            else:
                nn.init.zeros_(module.weight)
        elif module is self:
            nn.init.ones_(self.resid_lambdas)
            nn.init.constant_(self.x0_lambdas, 0.1)

    def get_input_embeddings(self):
        return self.transformer["wte"]

    def set_input_embeddings(self, value):
        self.transformer["wte"] = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if input_ids is None:
            raise ValueError("nanochat GPT needs input_ids: value embeddings are looked up by token id")
        if inputs_embeds is not None:
            raise ValueError("nanochat GPT does not take inputs_embeds: value embeddings are looked up by token id")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError(f"cache must be a transformers Cache, got {type(cache).__name__}")
        B, T = input_ids.shape
        past_length = cache.get_seq_length() if cache is not None else 0

        padding_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("nanochat GPT takes a 2D padding mask (batch, keys): 1 for tokens, 0 for padding")
            if not bool(attention_mask.all()):
                padding_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + T, device=input_ids.device).expand(B, T)

        dtype = self.lm_head.weight.dtype
        cos_sin = rotary_tables(self.config, position_ids, dtype)
        x = norm(self.transformer["wte"](input_ids).to(dtype))
        x0 = x
        for i, block in enumerate(self.transformer["h"]):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            key = str(i)
            ve = self.value_embeds[key](input_ids).to(dtype) if key in self.value_embeds else None
            x = block(x, ve, cos_sin, cache, past_length, padding_mask)
        x = norm(x)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            x = x[:, logits_to_keep]

        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        softcap = self.config.logit_softcap
        logits = softcap * torch.tanh(logits / softcap)

        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1).to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
