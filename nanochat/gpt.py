"""
The GPT model: a decoder-only Transformer with the nanochat recipe.

- RoPE (split-halves form), QK-norm after it, parameterless RMSNorm everywhere, no biases
- ReLU^2 MLP with 4x expansion; untied token embedding and lm_head; logits soft-capped at 15 in fp32
- value embeddings (ResFormer-style) mixed into v on alternating layers, with a per-head gate
- per-layer learnable scalars that mix the residual stream with the first-layer input x0
- sliding-window attention by a layer pattern ("SSSL": three short, one long), last layer full; GQA
- recipe 2026-07 adds smear (a gated share of the previous token's embedding) and backout (a learned
  share of the mid-layer residual taken out before the final norm); GPTConfig holds every option.

Precision: no autocast. Activations run in nanochat.common.COMPUTE_DTYPE; Linear weights are fp32
masters cast on the fly; embedding tables are stored in the compute dtype (fp32 under fp16).
No distributed code here: data parallelism lives in the optimizer and the scripts.

    with torch.device("meta"):
        model = GPT(GPTConfig.for_recipe("2026-07", n_layer=..., ...))
    model.to_empty(device=device)
    model.init_weights()
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE, print0
from nanochat.flash_attention import flash_attn

LOGIT_SOFTCAP = 15.0  # logits = 15 * tanh(logits / 15)
SMEAR_GATE_CHANNELS = 24  # the smear gate reads the first 24 channels of the normed embedding (upstream autoresearch round 2)
ROTARY_CACHE_MULTIPLE = 10  # rotary tables cover 10x sequence_len so generation can run past it

# The fields of upstream's GPTConfig (both 348fbb3 and 92d63d4): all that a checkpoint's
# meta["model_config"] holds, because upstream rebuilds the model with GPTConfig(**model_config).
UPSTREAM_CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when smaller than n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over layers: L = full context, S = short (see short_window_*)
    # Options beyond upstream's shape fields. Their defaults are upstream's 2026-01 model, so a
    # config saved without them rebuilds what it was; RECIPES holds upstream's later values.
    smear: bool = False  # mix a gated share of the previous token's embedding into each position
    backout: bool = False  # subtract a learned share of the mid-layer residual before the final norm
    rotary_base: int = 10000
    qk_scale: float = 1.0  # q and k are multiplied by this after QK-norm: sharper attention
    ve_gate_channels: int = 32  # the value-embedding gate reads the first channels of the normed block input
    ve_gate_range: float = 2.0  # gate = range * sigmoid(...), so range / 2 at a zero gate weight
    short_window_divisor: int = 2  # S window: sequence_len // divisor, or with a tile > 1 ...
    short_window_tile: int = 1  # ... ceil(sequence_len / divisor) rounded up to a multiple of the tile
    # Init only: a loaded checkpoint overwrites every weight these set.
    wte_init_std: float = 1.0
    c_fc_init_scale: float = 1.0  # times the uniform bound of the other block matrices
    resid_lambda_init: float = 1.0  # layer i starts at init - decay * i / (n_layer - 1)
    resid_lambda_decay: float = 0.0
    x0_lambda_init: float = 0.1
    x0_lambda_decay: float = 0.0
    gate_init_max: float = 0.0  # ve_gate and smear_gate weights start ~ U(0, this); 0 = zeros

    @classmethod
    def for_recipe(cls, recipe, **fields):
        """The config of a recipe ("2026-01", "2026-07" or "latest"); fields given here win over it."""
        return cls(**{**RECIPES[resolve_recipe(recipe)], **fields})

    def recipe(self):
        """The name of the recipe whose options this config has, or None for another mix."""
        shape = {name: getattr(self, name) for name in UPSTREAM_CONFIG_FIELDS}
        return next((name for name in RECIPES if GPTConfig.for_recipe(name, **shape) == self), None)

    def meta_entries(self):
        """
        {"model_config": upstream's fields, "model_options": ours} for a checkpoint's meta: upstream's
        code rebuilds the model with GPTConfig(**meta["model_config"]) and rejects keys it does not know.
        """
        values = dataclasses.asdict(self)
        return {"model_config": {name: values[name] for name in UPSTREAM_CONFIG_FIELDS},
                "model_options": {name: values[name] for name in OPTION_FIELDS}}

    @classmethod
    def from_meta(cls, model_config, model_options, state_dict_keys):
        """
        The config a checkpoint was trained with. Without model_options (upstream's checkpoints and
        ours from before them) the state dict tells the generation: upstream's latest model is the
        one with a smear gate, the 2026-01 model has none.
        """
        if model_options is None:
            keys = {key.removeprefix("_orig_mod.") for key in state_dict_keys}
            model_options = RECIPES["2026-07"] if "smear_gate.weight" in keys else {}
        return cls(**{**model_options, **model_config})


OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name not in UPSTREAM_CONFIG_FIELDS)

# Model options per recipe; 2026-01 is the field defaults (upstream 348fbb3). 2026-07 is upstream's
# model at 92d63d4, where these values are code constants: autoresearch rounds 1 and 2 (6ed7d1d,
# a825e63) and the smear/backout init fixes (94b73ad, 9822cc7).
RECIPES = {
    "2026-01": {},
    "2026-07": dict(smear=True, backout=True, rotary_base=100000, qk_scale=1.2, ve_gate_channels=12,
                    ve_gate_range=3.0, short_window_divisor=4, short_window_tile=128, wte_init_std=0.8,
                    c_fc_init_scale=0.4, resid_lambda_init=1.15, resid_lambda_decay=0.10, x0_lambda_init=0.20,
                    x0_lambda_decay=0.15, gate_init_max=0.02),
}
LATEST_RECIPE = "2026-07"


def resolve_recipe(recipe):
    """A recipe name, with "latest" meaning the newest; unknown names are an error that lists the known ones."""
    name = LATEST_RECIPE if recipe == "latest" else recipe
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)} or 'latest'")
    return name


def _validate_config(config):
    if config.n_embd % config.n_head != 0:
        raise ValueError(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
    if config.n_head % config.n_kv_head != 0:
        raise ValueError(f"n_head={config.n_head} must be divisible by n_kv_head={config.n_kv_head} (GQA groups)")
    head_dim = config.n_embd // config.n_head
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim = n_embd / n_head = {head_dim} must be even for rotary embeddings")
    if not 0 < config.ve_gate_channels <= config.n_embd:
        raise ValueError(f"ve_gate_channels={config.ve_gate_channels} must be in 1..n_embd={config.n_embd}")
    if config.smear and config.n_embd < SMEAR_GATE_CHANNELS:
        raise ValueError(f"n_embd={config.n_embd} must be at least {SMEAR_GATE_CHANNELS} (the smear gate input)")
    if config.short_window_divisor < 1 or config.short_window_tile < 1:
        raise ValueError(f"short_window_divisor and short_window_tile must be >= 1, got {config}")
    if config.n_layer < 1 or config.sequence_len < 1 or config.vocab_size < 1:
        raise ValueError(f"n_layer, sequence_len and vocab_size must be positive, got {config}")


def has_ve(layer_idx, n_layer):
    """Value embeddings live on every other layer, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def norm(x):
    """Parameterless RMSNorm over the last dim (eps = the dtype's machine epsilon)."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """
    RoPE in split-halves form on x (B, T, heads, D), cos/sin (1, T, 1, D/2). This rotates each
    (x1, x2) pair by -theta, the transpose of the textbook convention; it is equivalent for
    attention and we keep it so upstream checkpoints give the same outputs.
    """
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1)


class Linear(nn.Linear):
    """Bias-free Linear whose (fp32 master) weight is cast to the input's dtype in forward."""

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None):
        # bias is accepted because upstream code builds these as Linear(..., bias=False).
        if bias:
            raise ValueError("nanochat's Linear has no bias (the forward pass would ignore it); pass bias=False")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        C, D = config.n_embd, self.head_dim
        self.c_q = Linear(C, self.n_head * D)
        self.c_k = Linear(C, self.n_kv_head * D)
        self.c_v = Linear(C, self.n_kv_head * D)
        self.c_proj = Linear(C, C)
        self.ve_gate_channels, self.ve_gate_range = config.ve_gate_channels, config.ve_gate_range
        self.qk_scale = config.qk_scale
        self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)

        if ve is not None:
            # Gate in (0, range) per kv head: range / 2 at a zero ve_gate weight.
            gate = self.ve_gate_range * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)

        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        # QK-norm after RoPE, as upstream. RMS over D is unchanged by the rotation, so the order
        # only affects rounding.
        q, k = norm(q), norm(k)
        if self.qk_scale != 1.0:  # 1.2 since upstream autoresearch round 2: sharper attention
            q, k = q * self.qk_scale, k * self.qk_scale

        if kv_cache is None:
            y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                                   cache_seqlens=kv_cache.cache_seqlens,
                                                   causal=True, window_size=window_size,
                                                   cache_pos=kv_cache.get_pos())
            if self.layer_idx == kv_cache.n_layers - 1:
                kv_cache.advance(T)  # every layer has written its k/v for these T positions

        y = y.contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, window_size, kv_cache)
        x = x + self.mlp(norm(x))
        return x


def _uninitialized_embedding(num_embeddings, dim, dtype):
    """
    nn.Embedding without its own random init: init_weights sets every weight anyway, and
    normal_ on the meta device (where models are built) imports torch._dynamo, ~4 s per process.
    """
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim, dtype=dtype))


class GPT(nn.Module):
    def __init__(self, config, pad_vocab_size_to=64):
        super().__init__()
        _validate_config(config)
        self.config = config
        self.compute_dtype = COMPUTE_DTYPE
        # fp16 training unscales gradients with GradScaler, which needs fp32 params, so the
        # embedding tables only drop to the compute dtype when that is bf16 (or fp32).
        self.embedding_dtype = torch.float32 if COMPUTE_DTYPE == torch.float16 else COMPUTE_DTYPE
        self.window_sizes = self._compute_window_sizes(config)

        # A vocab that is a multiple of 64 keeps the lm_head matmul on fast kernel paths.
        padded_vocab_size = math.ceil(config.vocab_size / pad_vocab_size_to) * pad_vocab_size_to
        if padded_vocab_size != config.vocab_size:
            print0(f"Padding vocab_size from {config.vocab_size} to {padded_vocab_size} for efficiency")
        self.padded_vocab_size = padded_vocab_size

        C, L = config.n_embd, config.n_layer
        head_dim = C // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.transformer = nn.ModuleDict({
            "wte": _uninitialized_embedding(padded_vocab_size, C, self.embedding_dtype),
            "h": nn.ModuleList([Block(config, i) for i in range(L)]),
        })
        self.lm_head = Linear(C, padded_vocab_size)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        # Upstream's names and shapes, in its registration order (its 2026-07 model has all three).
        if config.smear:
            self.smear_gate = Linear(SMEAR_GATE_CHANNELS, 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({
            str(i): _uninitialized_embedding(padded_vocab_size, kv_dim, self.embedding_dtype)
            for i in range(L) if has_ve(i, L)
        })
        self.rotary_seq_len = config.sequence_len * ROTARY_CACHE_MULTIPLE
        if self.transformer.wte.weight.is_meta:
            # Only shapes on the meta device (arange there imports torch._dynamo, ~4 s); init_weights fills them.
            shape = (1, self.rotary_seq_len, 1, head_dim // 2)
            cos, sin = torch.empty(shape, dtype=self.compute_dtype), torch.empty(shape, dtype=self.compute_dtype)
        else:
            cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        # Not persistent: derived data, recomputed on the real device in init_weights.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # -------------------------------------------------------------------------
    # Construction helpers

    @staticmethod
    def _compute_window_sizes(config):
        """Per-layer FA3-style (left, right) windows from config.window_pattern."""
        pattern = config.window_pattern.upper()
        if not pattern or any(ch not in "SL" for ch in pattern):
            raise ValueError(f"window_pattern must be a non-empty string of 'S' (short) and 'L' (long), "
                             f"got {config.window_pattern!r}")
        T, divisor, tile = config.sequence_len, config.short_window_divisor, config.short_window_tile
        long_window = (T, 0)
        # 2026-01: half the context. 2026-07 (upstream autoresearch round 2): a quarter, rounded up to
        # FA3's tile of 128 (2048 -> 512; at most 128 keys, i.e. full attention, up to T = 128).
        short_window = (T // divisor if tile == 1 else -(-T // divisor // tile) * tile, 0)
        window_sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window
                        for i in range(config.n_layer)]
        window_sizes[-1] = long_window  # the last layer always sees the full context
        return window_sizes

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=None, device=None):
        """cos/sin tables of shape (1, seq_len, 1, head_dim/2) in the compute dtype; base defaults to the config's."""
        if base is None:
            base = self.config.rotary_base
        if device is None:
            device = self.transformer.wte.weight.device
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channels / head_dim))
        positions = torch.arange(seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(positions, inv_freq)
        cos = angles.cos().to(self.compute_dtype)[None, :, None, :]
        sin = angles.sin().to(self.compute_dtype)[None, :, None, :]
        return cos, sin

    @torch.no_grad()
    def init_weights(self):
        """
        Set every parameter (upstream nanochat's init, with the config's init options) and rebuild the
        rotary tables on the current device. Draws follow upstream's order, so a seed gives its values.
        """
        config = self.config
        C, L = config.n_embd, config.n_layer
        bound = math.sqrt(3) / math.sqrt(C)  # uniform with std 1/sqrt(C)

        def fill(param, init_fn):
            # Draw in fp32 so a bf16 model gets the same values (rounded) as an fp32 one.
            if param.dtype == torch.float32:
                init_fn(param)
            else:
                tmp = torch.empty(param.shape, dtype=torch.float32, device=param.device)
                init_fn(tmp)
                param.copy_(tmp)

        def small_positive_or_zero(param):
            # gates: zero weights (the neutral gate) in 2026-01, U(0, 0.02) since autoresearch round 1
            if config.gate_init_max > 0:
                fill(param, lambda t: nn.init.uniform_(t, 0.0, config.gate_init_max))
            else:
                nn.init.zeros_(param)

        fill(self.transformer.wte.weight, lambda t: nn.init.normal_(t, mean=0.0, std=config.wte_init_std))
        fill(self.lm_head.weight, lambda t: nn.init.normal_(t, mean=0.0, std=0.001))
        c_fc_bound = bound * config.c_fc_init_scale
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                fill(linear.weight, lambda t: nn.init.uniform_(t, -bound, bound))
            fill(block.mlp.c_fc.weight, lambda t: nn.init.uniform_(t, -c_fc_bound, c_fc_bound))
            # Zero output projections: every block starts as the identity on the residual stream.
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        # Per-layer scalars, linear in depth from init (layer 0) to init - decay (the last layer)
        # (upstream's float64 expression, element by element, rounded once to fp32)
        last = max(L - 1, 1)
        self.resid_lambdas.copy_(torch.tensor([config.resid_lambda_init - config.resid_lambda_decay * i / last
                                               for i in range(L)]))
        self.x0_lambdas.copy_(torch.tensor([config.x0_lambda_init - config.x0_lambda_decay * i / last
                                            for i in range(L)]))
        if config.smear:
            nn.init.zeros_(self.smear_lambda)  # smear starts off
            small_positive_or_zero(self.smear_gate.weight)
        if config.backout:
            nn.init.constant_(self.backout_lambda, 0.2)  # upstream autoresearch round 2
        for embedding in self.value_embeds.values():
            fill(embedding.weight, lambda t: nn.init.uniform_(t, -bound, bound))
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                small_positive_or_zero(block.attn.ve_gate.weight)

        head_dim = C // config.n_head
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.cos, self.sin = cos, sin

    def get_device(self):
        return self.transformer.wte.weight.device

    def to_empty(self, *, device, recurse=True):
        """nn.Module.to_empty, allocating by shape: empty_like of a meta tensor goes through a Python
        reference op that imports sympy (~2 s per process); every tensor here is contiguous."""
        return self._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device), recurse=recurse)

    # -------------------------------------------------------------------------
    # Accounting

    def estimate_flops(self):
        """
        Training FLOPs per token: 6 per matmul weight (forward + backward) plus the attention
        score/value matmuls, 12*H*D per attended key, with each layer's window capped at T.
        Embedding lookups, per-layer scalars and softmax are not counted.
        """
        H, D, T = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = 0
        for left, _right in self.window_sizes:
            attended = T if left < 0 else min(left, T)
            attn_flops += 12 * H * D * attended
        return 6 * self.num_matmul_params() + attn_flops

    def num_matmul_params(self):
        """
        Weights that multiply the token stream (2 FLOPs each per token forward), counted by structure
        as upstream does since 92d63d4: every matmul is an nn.Linear; embeddings are lookups and the
        per-layer scalars are bare Parameters. (nn.Linear, not our subclass: fp8 swaps in its own.)
        """
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def _smear_backout_params(self):
        """The smear gate and lambda and the backout lambda this config has, in upstream's order."""
        names = (["smear_gate.weight", "smear_lambda"] if self.config.smear else []) + \
            (["backout_lambda"] if self.config.backout else [])
        return [self.get_parameter(name) for name in names]

    def num_scaling_params(self):
        """Parameter counts by part. base_train's scaling params = transformer_matrices + lm_head."""
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": sum(p.numel() for p in [self.resid_lambdas, self.x0_lambdas, *self._smear_backout_params()]),
        }
        counts["total"] = sum(p.numel() for p in self.parameters())
        parts = sum(v for k, v in counts.items() if k != "total")
        if parts != counts["total"]:
            raise RuntimeError(f"parameter parts sum to {parts} but the model has {counts['total']}")
        return counts

    # -------------------------------------------------------------------------
    # Optimizer

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        adam_betas=None, scalar_lr=0.5, recipe=None, muon_eq=None, muon_plus=None):
        """
        One MuonAdamW over all parameters: AdamW for embeddings, lm_head and the scalars,
        Muon for every matrix inside the blocks (grouped by shape so Muon can stack them).
        Each group also gets initial_lr = lr for the LR schedulers.
        recipe ("2026-01", "2026-07", "latest"; default: the one this model's config follows, else
        2026-01) sets what the LRs do not: per-group AdamW betas and weight decay, Muon's beta2 and
        norm margin, and MuonEq / Muon+ (muon_eq / muon_plus override those two).
        adam_betas: the AdamW betas that recipe 2026-01 shares over its groups (default (0.8, 0.95));
        recipe 2026-07 sets betas per group.
        """
        if recipe is None:
            recipe = self.config.recipe() or "2026-01"
        recipe = resolve_recipe(recipe)
        model_dim = self.config.n_embd
        # AdamW LRs were tuned at width 768; scale them as 1/sqrt(width) elsewhere.
        dmodel_lr_scale = (model_dim / 768) ** -0.5
        print0(f"Optimizer recipe: {recipe}")
        print0(f"Scaling the LR for the AdamW parameters ∝1/√({model_dim}/768) = {dmodel_lr_scale:.6f}")

        def adamw(params, lr, betas, weight_decay=0.0):
            return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=weight_decay)

        lm_head, wte = list(self.lm_head.parameters()), list(self.transformer.wte.parameters())
        value_embeds = list(self.value_embeds.parameters())
        if recipe == "2026-01":
            betas = (0.8, 0.95) if adam_betas is None else tuple(adam_betas)
            param_groups = [
                adamw(lm_head, unembedding_lr * dmodel_lr_scale, betas),
                adamw(wte, embedding_lr * dmodel_lr_scale, betas),
                adamw(value_embeds, embedding_lr * dmodel_lr_scale, betas),
                adamw([self.resid_lambdas], scalar_lr * 0.01, betas),  # the residual gain wants tiny steps
                adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95)),
            ]
            muon_beta2, optimizer_options = 0.95, dict(muon_eq=False, muon_plus=False, polar_margin=1.02)
        else:
            if adam_betas is not None:
                raise ValueError(f"recipe {recipe} sets the AdamW betas per group; adam_betas is for recipe 2026-01")
            # upstream autoresearch round 1 (6ed7d1d): per-group betas and weight decay, value
            # embeddings at half the embedding LR, Muon beta2 0.9 and norm margin 1.01; MuonEq and
            # Muon+ since 4e014d3
            param_groups = [
                adamw(lm_head, unembedding_lr * dmodel_lr_scale, (0.8, 0.96), weight_decay=0.01),
                adamw(wte, embedding_lr * dmodel_lr_scale, (0.8, 0.995), weight_decay=0.001),
                adamw(value_embeds, embedding_lr * dmodel_lr_scale * 0.5, (0.8, 0.995), weight_decay=0.01),
                adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), weight_decay=0.05),
                adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95)),
            ]
            muon_beta2, optimizer_options = 0.9, dict(muon_eq=True, muon_plus=True, polar_margin=1.01)
        if self._smear_backout_params():  # upstream autoresearch round 2: a fixed LR of 0.2
            param_groups.append(adamw(self._smear_backout_params(), 0.2, (0.8, 0.95)))
        matrix_params = list(self.transformer.h.parameters())
        for shape in sorted({tuple(p.shape) for p in matrix_params}):
            same_shape = [p for p in matrix_params if tuple(p.shape) == shape]
            param_groups.append(dict(kind="muon", params=same_shape, lr=matrix_lr, momentum=0.95, ns_steps=5,
                                     beta2=muon_beta2, weight_decay=weight_decay))

        grouped = [id(p) for group in param_groups for p in group["params"]]
        all_params = {id(p) for p in self.parameters()}
        if len(grouped) != len(set(grouped)) or set(grouped) != all_params:
            raise RuntimeError("optimizer groups must cover every model parameter exactly once")

        # Imported here: the optimizer carries the distributed code, which inference never needs.
        from nanochat.optim import MuonAdamW  # noqa: PLC0415

        if muon_eq is not None:
            optimizer_options["muon_eq"] = muon_eq
        if muon_plus is not None:
            optimizer_options["muon_plus"] = muon_plus
        optimizer = MuonAdamW(param_groups, **optimizer_options)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    # -------------------------------------------------------------------------
    # Forward and sampling

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """
        idx (B, T) token ids. Returns fp32 logits (B, T, vocab_size), or with targets the
        cross-entropy (ignore_index=-1; loss_reduction="none" gives per-token losses, flat).
        With a kv_cache, positions continue from kv_cache.get_pos() (per row when it is a list) and
        the cache advances by T.
        """
        B, T = idx.size()
        assert self.cos.device == idx.device, f"rotary tables on {self.cos.device} but input on {idx.device}"
        cos_sin = self._rotary_for(T, kv_cache)

        x = norm(self.transformer.wte(idx).to(self.compute_dtype))
        if self.config.smear:
            x = self._smear(x, kv_cache)
        x0 = x  # the normalized embedding, re-injected into every layer
        backout_layer = self.config.n_layer // 2 if self.config.backout else None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            key = str(i)
            ve = self.value_embeds[key](idx).to(self.compute_dtype) if key in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
            if i == backout_layer:
                x_mid = x
        if backout_layer is not None:  # take out low-level features before the logits (upstream round 2)
            x = x - self.backout_lambda.to(x.dtype) * x_mid
        x = norm(x)

        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        if torch.is_grad_enabled():
            logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        else:  # same values in place: at decode time fresh buffers for each op cost more than the math
            logits = logits.div_(LOGIT_SOFTCAP).tanh_().mul_(LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def _smear(self, x, kv_cache):
        """
        Each position gets smear_lambda * sigmoid(smear_gate(its first 24 channels)) times the previous
        position's embedding: cheap bigram information. A sequence's first token has no previous one;
        under a KV cache the previous token of the new positions is the cache's prev_embedding.
        """
        previous = None if kv_cache is None else kv_cache.prev_embedding
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:]  # un-smeared, as the next position needs it
        if previous is None:
            head, current, previous = x[:, :1], x[:, 1:], x[:, :-1]
        else:
            head, current, previous = x[:, :0], x, torch.cat([previous, x[:, :-1]], dim=1)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(current[..., :SMEAR_GATE_CHANNELS]))
        return torch.cat([head, current + gate * previous], dim=1)

    def _rotary_for(self, T, kv_cache):
        """
        cos/sin for T new positions per row. A cache's get_pos() is one int when all its rows are
        at that position (a slice of the tables), or a list of per-row positions when its rows
        hold different conversations (a gather: shape (B, T, 1, D/2)).
        """
        start = 0 if kv_cache is None else kv_cache.get_pos()
        highest = start if isinstance(start, int) else max(start)
        if highest + T > self.cos.size(1):
            raise ValueError(f"positions up to {highest + T} exceed the rotary cache ({self.cos.size(1)} = "
                             f"{ROTARY_CACHE_MULTIPLE} x sequence_len)")
        if isinstance(start, int):
            return self.cos[:, start:start + T], self.sin[:, start:start + T]
        positions = kv_cache.cache_seqlens.long()[:, None] + torch.arange(T, device=self.cos.device)
        return self.cos[0, positions], self.sin[0, positions]

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """
        Naive sampler (batch 1, no KV cache: the whole sequence is re-run every step). Yields
        one token id per step. It is the reference the Engine is checked against.
        """
        if not isinstance(tokens, list) or not tokens:
            raise ValueError("tokens must be a non-empty list of token ids")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth_largest, -float("inf"))
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
