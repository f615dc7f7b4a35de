"""
MuonAdamW: one optimizer for the whole model, on one process or on N ranks.

Each param group is a dict with every hyperparameter explicit (there are no defaults):
    {"kind": "adamw", "params": [...], "lr", "betas": (b1, b2), "eps", "weight_decay"}
    {"kind": "muon",  "params": [...], "lr", "momentum", "ns_steps", "beta2", "weight_decay"}
AdamW is for embeddings, lm_head and scalars. Muon is for the 2-D hidden matrices; a muon
group holds matrices of ONE shape, because they are stacked (K, rows, cols) and
orthogonalized in one batched call (the model makes one group per shape).

Distribution: when torch.distributed is initialized with world size W > 1 at construction
time, step() also averages the gradients across ranks (do NOT wrap the model in DDP) and
shards the work ZeRO-2 style, in three phases so communication overlaps compute:
  1. launch every reduction: AdamW params with < 1024 elements all_reduce their grad
     (state replicated); larger AdamW params reduce_scatter along dim 0 (rank r owns rows
     [r*n/W, (r+1)*n/W); state for that slice only); each muon group stacks its K grads into a
     zero-padded (chunk*W, rows, cols) buffer, chunk = ceil(K/W), and reduce_scatters it, so
     rank r gets matrices [r*chunk, r*chunk + chunk) of the padded stack, of which it owns the
     n_owned = clamp(K - r*chunk, 0, chunk) real ones;
  2. per group: wait, update what this rank owns (its AdamW slice; its n_owned muon matrices,
     never the padding, as upstream nanochat does), launch the all_gather of the result (muon:
     the zero-padded chunk);
  3. wait for the gathers; muon copies the first K gathered matrices back into the params.
With W == 1 the same code runs with every collective skipped and the rank owning everything.

The math is one function per kind (adamw_update_, muon_update_), run through torch.compile
(dynamic=False, fullgraph=True) unless NANOCHAT_COMPILE=0 (common.compile_enabled).
Hyperparameters reach it as 0-D CPU tensors refilled before each call, so an LR/momentum/wd
schedule never recompiles.

Checkpoints: state_dict() is THIS rank's shard, in torch's layout ({"state": {param index:
{...}}, "param_groups": [...]}) plus a "sharding" entry {"world_size", "rank", "param_shapes"}
that makes it self-describing. Per-param state:
    adamw: "step" (int), "exp_avg", "exp_avg_sq" (fp32; the rank's row slice when sharded)
    muon:  on the group's FIRST param only: "momentum_buffer" (chunk, rows, cols) in the param
           dtype and "second_momentum_buffer" (chunk, rows, 1) if rows >= cols else
           (chunk, 1, cols) in fp32; chunk = ceil(K/W) (= K on one rank; padding rows stay 0).
    One function, _state_shapes, decides these shapes for creation, loading and re-sharding.
The FULL state is what one rank would hold (world_size 1): consolidate_state_dicts(shards)
builds it from the W shards of a run, shard_state_dict(full, rank, world_size) slices it, and
load_state_dict() accepts either this rank's own shard or a full state (it takes its slice).
So a run saved on N ranks resumes on M ranks by loading all N shards, consolidating, and
calling load_state_dict(full) on every rank.
"""

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from nanochat.common import COMPUTE_DTYPE, compile_enabled

# AdamW params smaller than this are all-reduced and updated on every rank: sharding a handful
# of scalars would cost more in collectives than it saves.
SMALL_PARAM_NUMEL = 1024

# Polar Express quintic coefficients (num_iters=5, safety 2e-2, cushion 2; arXiv 2505.16932).
# Each triple (a, b, c) maps singular values s -> a*s + b*s^3 + c*s^5, pushing them towards 1.
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

_REQUIRED_KEYS = {
    "adamw": ("params", "lr", "betas", "eps", "weight_decay"),
    "muon": ("params", "lr", "momentum", "ns_steps", "beta2", "weight_decay"),
}

# -----------------------------------------------------------------------------
# The math, written once. Hyperparameters arrive as 0-D CPU tensors so that a schedule
# changing lr/momentum/wd never triggers a torch.compile recompilation.


def adamw_update_(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    """
    One AdamW step on p in place. Math in fp32: a bf16 p is upcast and written back once.
    Compiled, it is one fused loop; without torch.compile the one temporary (g^2, then the
    denominator) is reused in place, which halves the step time (dev/LOG.md).
    """
    p32 = p.float()  # p itself when p is fp32
    g = grad.float()
    p32.mul_(1 - lr_t * wd_t)  # decoupled weight decay
    exp_avg.lerp_(g, 1 - beta1_t)
    scratch = g.square()
    exp_avg_sq.lerp_(scratch, 1 - beta2_t)
    bias_correction1 = 1 - beta1_t**step_t
    bias_correction2 = 1 - beta2_t**step_t
    # p -= lr / bc1 * m / (sqrt(v / bc2) + eps), with the step size folded into the denominator
    denom = scratch.copy_(exp_avg_sq).div_(bias_correction2).sqrt_().add_(eps_t).div_(lr_t / bias_correction1)
    p32.addcdiv_(exp_avg, denom, value=-1)
    if p.dtype != torch.float32:
        p.copy_(p32)


def polar_express(G, ns_steps, compute_dtype=torch.float32, margin=1.02):
    """
    Approximate the orthogonal polar factor U V^T of each matrix in G (..., rows, cols) with
    ns_steps quintic iterations; returns it in compute_dtype. The margin (1.02; 1.01 since
    upstream autoresearch round 1) keeps the normalized singular values below 1, where the
    iteration is designed to work. Each scale-and-add runs in place on a fresh matmul result:
    compiled that is the same fused code, and without torch.compile it spares a pass and an
    allocation per term (measured in dev/LOG.md).
    """
    X = G.to(compute_dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin + 1e-6)
    if X.size(-2) > X.size(-1):  # tall: iterate on the small (cols x cols) Gram matrix
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X.mT @ X
            B = (A @ A).mul_(c).add_(A, alpha=b)  # b*A + c*A^2
            X = (X @ B).add_(X, alpha=a)  # a*X + X@B
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X @ X.mT
            B = (A @ A).mul_(c).add_(A, alpha=b)
            X = (B @ X).add_(X, alpha=a)  # a*X + B@X
    return X


def muon_update_(grads, params, momentum_buffer, second_momentum_buffer,
                 momentum_t, lr_t, wd_t, beta2_t, ns_steps, compute_dtype, options):
    """
    One Muon step on a stack of same-shaped matrices, all (K, rows, cols), params in place.
    grads is overwritten (it is a scratch buffer). lr_t already includes the shape factor.
    options: a MuonOptions (MuonEq, Muon+, the polar margin). The update g is a fresh tensor
    after the polar iteration, so it is rescaled in place.
    """
    # Nesterov momentum, via two lerps
    momentum = momentum_t.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)
    rows, cols = g.shape[-2:]
    X = g.to(compute_dtype)  # bf16 when the model computes in bf16 (else grads itself, a scratch buffer)
    if options.muon_eq:
        # MuonEq (arXiv 2603.28254): every row rescaled to the RMS row norm, so the spectrum that
        # enters the polar iteration is better conditioned
        X32 = X.float()
        target = X32.norm(dim=(-2, -1), keepdim=True) / math.sqrt(rows)
        X = X.mul_((target / X32.norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(X.dtype))
    g = polar_express(X, ns_steps, compute_dtype, options.polar_margin).to(params.dtype)
    if options.muon_plus:
        # Muon+ (arXiv 2602.21545): the Frobenius norm snapped to sqrt(min(rows, cols)), an exactly
        # semi-orthogonal matrix's, making up for the iteration's under-convergence
        frobenius = g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
        g.mul_((math.sqrt(min(rows, cols)) / frobenius).to(g.dtype))
    # NorMuon variance reduction: a factored second moment (one value per row if rows >= cols,
    # else per column) evens out the update's rows/cols, then the Frobenius norm is restored.
    reduce_dim = -1 if rows >= cols else -2
    reduce_size = g.size(reduce_dim)
    v_mean = g.float().norm(dim=reduce_dim, keepdim=True).square_() / reduce_size  # mean of squares
    norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * reduce_size).sqrt()
    second_momentum_buffer.lerp_(v_mean, 1 - beta2_t)
    scale = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    # ||g * scale||_F from the factored pieces, without materializing g * scale
    scaled_norm = (v_mean * reduce_size * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g.mul_((scale * (norm / scaled_norm.clamp_min(1e-10))).to(g.dtype))
    # Cautious weight decay: decay only where the update and the weight agree in sign,
    # p -= lr * (g + wd * p * mask)
    mask = (g * params) >= 0
    step = (params * mask).mul_(wd_t.to(params.dtype)).add_(g)
    params.sub_(step.mul_(lr_t.to(params.dtype)))


class MuonOptions(NamedTuple):
    """Muon variants, fixed for a run (constants to torch.compile). Defaults: upstream's 2026-01 Muon."""
    muon_eq: bool = False
    muon_plus: bool = False
    polar_margin: float = 1.02


_compiled_kernels = {}


def _kernel(fn, device):
    if compile_enabled(device.type):
        if fn not in _compiled_kernels:
            _compiled_kernels[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
        return _compiled_kernels[fn]
    if device.type == "cpu":
        return fn
    # Eager on an accelerator: not every torch version lets ops such as lerp_ mix a CPU scalar
    # tensor with device tensors, so move the 0-D hyperparameters over (a few tiny copies).
    return lambda *args: fn(*(arg.to(device) if torch.is_tensor(arg) and arg.ndim == 0 and arg.device != device
                              else arg for arg in args))


def _polar_express_dtype():
    # bf16 only when the model computes in bf16: the iteration is unstable in fp16
    return torch.bfloat16 if COMPUTE_DTYPE == torch.bfloat16 else torch.float32


# -----------------------------------------------------------------------------
# How state is laid out over W ranks (shared by the optimizer and the re-sharding helpers)


def _adamw_is_sharded(shape, world_size):
    return world_size > 1 and math.prod(shape) >= SMALL_PARAM_NUMEL


def _muon_chunk(num_matrices, world_size):
    return -(-num_matrices // world_size)  # ceil


def _state_shapes(kind, param_shape, num_params, world_size):
    """
    {state name: shape} of the state tensors one rank of world_size keeps (world_size 1: the full
    state). AdamW, per param: the param's shape, or its 1/W row slice when sharded. Muon, per group
    of K = num_params matrices: a chunk of ceil(K/W) of them (padding included), with a factored
    second moment of one value per row if rows >= cols, else one per column.
    """
    if kind == "adamw":
        shape = tuple(param_shape)
        if _adamw_is_sharded(shape, world_size):
            shape = (shape[0] // world_size, *shape[1:])
        return {"exp_avg": shape, "exp_avg_sq": shape}
    rows, cols = param_shape
    chunk = _muon_chunk(num_params, world_size)
    return {"momentum_buffer": (chunk, rows, cols),
            "second_momentum_buffer": (chunk, rows, 1) if rows >= cols else (chunk, 1, cols)}


def _state_specs(group, p, world_size):
    """{state name: (shape on one rank of world_size, dtype)} of p, a state holder of group."""
    shapes = _state_shapes(group["kind"], p.shape, len(group["params"]), world_size)
    # Muon's momentum is kept in the param dtype, every other moment in fp32
    return {name: (shape, p.dtype if name == "momentum_buffer" else torch.float32) for name, shape in shapes.items()}


def state_nbytes(param_groups, world_size):
    """Bytes of optimizer state that world_size ranks hold together: what their checkpoint shards store (padding included)."""
    per_rank = sum(math.prod(shape) * dtype.itemsize
                   for group in param_groups for p in _state_holders(group)
                   for shape, dtype in _state_specs(group, p, world_size).values())
    return per_rank * world_size


def _state_holders(group):
    """The params (or param indices) of a group that keep state: each AdamW param, a muon group's first."""
    return group["params"] if group["kind"] == "adamw" else group["params"][:1]


def _check_shardable(shape, world_size):
    if _adamw_is_sharded(shape, world_size) and shape[0] % world_size != 0:
        raise ValueError(
            f"AdamW param of shape {tuple(shape)} has {math.prod(shape)} >= {SMALL_PARAM_NUMEL} elements, so it is "
            f"sharded along dim 0, but {shape[0]} rows do not divide by world size {world_size}; "
            f"pad that dimension to a multiple of {world_size} or run on a world size that divides it"
        )


def _stack_padded(tensors, size, like):
    """Stack same-shaped tensors (shaped like `like`) into (size, ...), zero past len(tensors)."""
    if len(tensors) == size:
        return torch.stack(tensors)
    stacked = like.new_zeros((size, *like.shape))
    if tensors:
        torch._foreach_copy_(list(stacked.unbind(0)[:len(tensors)]), tensors)
    return stacked


class _Pending:
    """An async collective (none on 1 rank) plus what to do once it has finished (e.g. divide a SUM by W)."""

    def __init__(self, work=None, then=None):
        self.work, self.then = work, then

    def wait(self):
        if self.work is not None:
            self.work.wait()
        if self.then is not None:
            self.then()


class _LaunchedAdamW(NamedTuple):
    """One AdamW param between phase 1 (reduction launched) and phase 2 (update)."""
    param: torch.Tensor
    owned: torch.Tensor  # what this rank updates: the param itself, or its row slice when sharded
    grad: torch.Tensor  # the averaged grad of `owned`, once `reduction` has finished
    reduction: _Pending


class _LaunchedMuon(NamedTuple):
    """One muon group between phase 1 and phase 2."""
    grad_chunk: torch.Tensor  # (chunk, rows, cols): the averaged grads of this rank's chunk
    stacked: torch.Tensor | None  # padded (chunk*W, rows, cols) reduce buffer, reused by the gather; None on 1 rank
    reduction: _Pending


# torch 2.13 renamed the single-tensor collectives; keep working on older versions too
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class MuonAdamW(torch.optim.Optimizer):
    """
    Muon for 2-D hidden matrices + AdamW for the rest; see the module docstring. muon_eq,
    muon_plus and polar_margin default to upstream's 2026-01 Muon; recipe 2026-07
    (GPT.setup_optimizer) turns on MuonEq and Muon+ with margin 1.01, as upstream's 92d63d4.
    """

    def __init__(self, param_groups, muon_eq=False, muon_plus=False, polar_margin=1.02):
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if distributed else 1
        self.rank = dist.get_rank() if distributed else 0
        # NCCL averages natively; on other backends (gloo) AVG support depends on the torch
        # version, so there we SUM and divide by W ourselves.
        self._native_avg = distributed and dist.get_backend() == "nccl"
        super().__init__(list(param_groups), defaults={})
        self.muon_options = MuonOptions(muon_eq, muon_plus, polar_margin)
        # One set of 0-D CPU tensors, refilled before each kernel call (see the math above); CPU
        # explicitly, whatever the default device (e.g. a `with torch.device("meta")` block)
        self._hparams = {name: torch.tensor(0.0, dtype=torch.float32, device="cpu") for name in
                         ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    def add_param_group(self, param_group):
        kind = param_group.get("kind")
        if kind not in _REQUIRED_KEYS:
            raise ValueError(f"param group 'kind' must be 'adamw' or 'muon', got {kind!r}")
        missing = [key for key in _REQUIRED_KEYS[kind] if key not in param_group]
        if missing:
            raise ValueError(f"{kind} param group is missing {missing}; every hyperparameter must be given explicitly")
        super().add_param_group(dict(param_group))  # torch makes params a list and checks each is a leaf tensor
        shapes = sorted({tuple(p.shape) for p in self.param_groups[-1]["params"]})
        try:
            if kind == "muon" and (len(shapes) != 1 or len(shapes[0]) != 2):
                raise ValueError(f"a muon param group stacks its matrices into one tensor, so it needs one 2-D shape; "
                                 f"got {shapes}: make one group per shape, and use adamw for the rest")
            for shape in shapes if kind == "adamw" else []:
                _check_shardable(shape, self.world_size)
        except ValueError:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ state layout

    def _state_specs(self, group, p):
        """{state name: (shape on this rank, dtype)} of p, a state holder of group: what is created and loaded."""
        return _state_specs(group, p, self.world_size)

    def _zero_state(self, group, p):
        return {name: torch.zeros(shape, dtype=dtype, device=p.device)
                for name, (shape, dtype) in self._state_specs(group, p).items()}

    # ------------------------------------------------------------------ collectives

    def _average_all_reduce(self, tensor):
        if self._native_avg:
            return _Pending(dist.all_reduce(tensor, op=dist.ReduceOp.AVG, async_op=True))
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
        return _Pending(work, lambda: tensor.div_(self.world_size))

    def _average_reduce_scatter(self, output, input):
        if self._native_avg:
            return _Pending(_reduce_scatter(output, input, op=dist.ReduceOp.AVG, async_op=True))
        work = _reduce_scatter(output, input, op=dist.ReduceOp.SUM, async_op=True)
        return _Pending(work, lambda: output.div_(self.world_size))

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Phase 1: launch every gradient reduction before any compute
        launched = []
        for group in self.param_groups:
            launch = self._launch_adamw if group["kind"] == "adamw" else self._launch_muon
            launched.append(launch(group))
        # Phase 2: update what this rank owns, group by group, launching the gathers
        finishers = []
        for group, reductions in zip(self.param_groups, launched):
            update = self._update_adamw if group["kind"] == "adamw" else self._update_muon
            finishers.extend(update(group, reductions))
        # Phase 3: wait for the gathers and write results back
        for finish in finishers:
            finish.wait()
        return loss

    def _launch_adamw(self, group):
        launched = []
        for p in group["params"]:
            if p.grad is None:  # like torch optimizers; all ranks must agree on which params have grads
                continue
            if self.world_size == 1:
                launched.append(_LaunchedAdamW(p, p, p.grad, _Pending()))
            elif not _adamw_is_sharded(p.shape, self.world_size):
                launched.append(_LaunchedAdamW(p, p, p.grad, self._average_all_reduce(p.grad)))
            else:
                rows = p.shape[0] // self.world_size
                owned = p[self.rank * rows:(self.rank + 1) * rows]
                grad_slice = torch.empty_like(p.grad[:rows])
                launched.append(_LaunchedAdamW(p, owned, grad_slice, self._average_reduce_scatter(grad_slice, p.grad)))
        return launched

    def _update_adamw(self, group, launched):
        h = self._hparams
        beta1, beta2 = group["betas"]
        h["lr"].fill_(group["lr"])
        h["beta1"].fill_(beta1)
        h["beta2"].fill_(beta2)
        h["eps"].fill_(group["eps"])
        h["wd"].fill_(group["weight_decay"])
        finishers = []
        for p, owned, grad, reduction in launched:
            reduction.wait()
            state = self.state[p]
            if not state:
                state["step"] = 0
                state.update(self._zero_state(group, p))
            state["step"] += 1
            h["step"].fill_(state["step"])
            _kernel(adamw_update_, p.device)(owned, grad, state["exp_avg"], state["exp_avg_sq"],
                                             h["step"], h["lr"], h["beta1"], h["beta2"], h["eps"], h["wd"])
            if owned is not p:  # sharded: every rank needs the whole updated param back
                finishers.append(_Pending(_all_gather(p, owned, async_op=True)))
        return finishers

    def _launch_muon(self, group):
        params = group["params"]
        if all(p.grad is None for p in params):
            return None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.world_size == 1:
            return _LaunchedMuon(torch.stack(grads), None, _Pending())
        chunk = _muon_chunk(len(params), self.world_size)
        # Zero padding up to chunk*W matrices keeps reduce_scatter's equal-split contract
        stacked = _stack_padded(grads, chunk * self.world_size, grads[0])
        grad_chunk = torch.empty_like(stacked[:chunk])
        return _LaunchedMuon(grad_chunk, stacked, self._average_reduce_scatter(grad_chunk, stacked))

    def _update_muon(self, group, launched):
        if launched is None:
            return []
        grad_chunk, stacked, reduction = launched
        reduction.wait()
        params = group["params"]
        rows, cols = params[0].shape
        chunk = grad_chunk.size(0)
        # This rank's real matrices: n_owned = clamp(K - rank*chunk, 0, chunk); the rest of the chunk
        # is padding, which (as upstream nanochat does) is never computed: its state stays zero.
        owned = params[self.rank * chunk:(self.rank + 1) * chunk]
        n_owned = len(owned)
        state = self.state[params[0]]
        if not state:
            state.update(self._zero_state(group, params[0]))
        param_chunk = _stack_padded(owned, chunk, params[0])
        if n_owned:
            h = self._hparams
            h["momentum"].fill_(group["momentum"])
            # Shape-based LR: a tall (out > in) matrix such as mlp.c_fc (4C x C) takes a sqrt(rows/cols)x step
            h["lr"].fill_(group["lr"] * math.sqrt(max(1.0, rows / cols)))
            h["wd"].fill_(group["weight_decay"])
            h["beta2"].fill_(group["beta2"])
            _kernel(muon_update_, param_chunk.device)(
                grad_chunk[:n_owned], param_chunk[:n_owned],
                state["momentum_buffer"][:n_owned], state["second_momentum_buffer"][:n_owned],
                h["momentum"], h["lr"], h["wd"], h["beta2"], group["ns_steps"], _polar_express_dtype(),
                self.muon_options)
        if stacked is None:  # one rank: it owns the whole group
            torch._foreach_copy_(params, list(param_chunk.unbind(0)))
            return []
        # The reduce buffer is free again: gather every rank's updated (zero-padded) chunk into it
        work = _all_gather(stacked, param_chunk, async_op=True)
        return [_Pending(work, lambda: torch._foreach_copy_(params, list(stacked.unbind(0)[:len(params)])))]

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self):
        """This rank's shard, self-describing (see the module docstring)."""
        state_dict = super().state_dict()
        state_dict["sharding"] = {
            "world_size": self.world_size,
            "rank": self.rank,
            "param_shapes": [list(p.shape) for group in self.param_groups for p in group["params"]],
        }
        return state_dict

    def load_state_dict(self, state_dict):
        """Load this rank's own shard, or a full (world_size 1) state from which it takes its slice."""
        sharding = state_dict.get("sharding")
        if sharding is not None:
            if sharding["world_size"] == 1 and self.world_size > 1:
                state_dict = shard_state_dict(state_dict, self.rank, self.world_size)
            elif sharding["world_size"] != self.world_size or sharding["rank"] != self.rank:
                raise ValueError(
                    f"optimizer shard of rank {sharding['rank']} of {sharding['world_size']} cannot load on rank "
                    f"{self.rank} of {self.world_size}; load every shard, merge them with "
                    f"consolidate_state_dicts(shards) and pass the result to load_state_dict"
                )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}")
        params_by_index = [p for group in self.param_groups for p in group["params"]]
        expected = self._state_layout()
        for saved, group in zip(saved_groups, self.param_groups):
            if saved["kind"] != group["kind"] or len(saved["params"]) != len(group["params"]):
                raise ValueError(f"saved param group ({saved['kind']}, {len(saved['params'])} params) does not match "
                                 f"this optimizer's ({group['kind']}, {len(group['params'])} params)")
        new_state = {}
        for index, saved_state in state_dict["state"].items():
            index = int(index)
            p = params_by_index[index]
            layout = expected.get(index)
            if layout is None:
                raise ValueError(f"optimizer state has an entry for param {index}, which keeps no state here")
            loaded = {}
            for name, value in saved_state.items():
                if name == "step":
                    loaded[name] = int(value)
                    continue
                if name not in layout:
                    raise ValueError(f"unexpected optimizer state {name!r} for param {index}")
                shape, dtype = layout[name]
                if tuple(value.shape) != shape:
                    raise ValueError(f"optimizer state {name!r} of param {index} has shape {tuple(value.shape)}, "
                                     f"expected {shape}: it was saved for another model or world size")
                # a copy, so the optimizer never shares storage with the caller's dict
                loaded[name] = value.to(device=p.device, dtype=dtype, copy=True)
            new_state[p] = loaded
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({key: value for key, value in saved.items() if key != "params"})
        self.state.clear()
        self.state.update(new_state)

    def _state_layout(self):
        """{param index: {state name: (shape on this rank, dtype)}} for every param that keeps state."""
        layout, first_index = {}, 0
        for group in self.param_groups:
            for offset, p in enumerate(_state_holders(group)):
                layout[first_index + offset] = self._state_specs(group, p)
            first_index += len(group["params"])
        return layout


# -----------------------------------------------------------------------------
# Re-sharding: checkpoints that load on a different number of ranks


def consolidate_state_dicts(shards):
    """
    Merge the state_dict() of every rank of one run (any order) into the full state: exactly
    what a single-rank optimizer would hold after the same steps ("sharding" world_size 1).
    """
    shards = sorted(shards, key=lambda sd: _sharding_of(sd)["rank"])
    world_size = _sharding_of(shards[0])["world_size"]
    ranks = [_sharding_of(sd)["rank"] for sd in shards]
    if ranks != list(range(world_size)) or any(_sharding_of(sd)["world_size"] != world_size for sd in shards):
        raise ValueError(f"need one shard per rank 0..{world_size - 1} of the same run, got ranks {ranks}")
    param_shapes = _sharding_of(shards[0])["param_shapes"]
    full_state = {}
    for group in shards[0]["param_groups"]:
        for index in _state_holders(group):
            per_rank = _state_of_every_rank(shards, index)
            if per_rank is None:
                continue
            if group["kind"] == "adamw" and not _adamw_is_sharded(param_shapes[index], world_size):
                full_state[index] = dict(per_rank[0])  # replicated: every rank holds the same values
                continue
            full_shapes = _state_shapes(group["kind"], param_shapes[index], len(group["params"]), world_size=1)
            merged = {"step": per_rank[0]["step"]} if "step" in per_rank[0] else {}
            for name, full_shape in full_shapes.items():
                # the ranks' row slices (or chunks) in rank order, less the zero padding of muon's last chunks
                merged[name] = torch.cat([state[name] for state in per_rank])[:full_shape[0]]
            full_state[index] = merged
    return {
        "state": full_state,
        "param_groups": [dict(group) for group in shards[0]["param_groups"]],
        "sharding": {"world_size": 1, "rank": 0, "param_shapes": param_shapes},
    }


def shard_state_dict(full_state_dict, rank, world_size, device=None):
    """
    The state_dict() that rank `rank` of `world_size` would hold, sliced from a full state. Its
    tensors are new copies, on `device` when given (else where the full state's are).
    """
    sharding = _sharding_of(full_state_dict)
    if sharding["world_size"] != 1:
        raise ValueError("shard_state_dict needs a full state; merge the shards with consolidate_state_dicts first")
    param_shapes = sharding["param_shapes"]
    shard_state = {}
    for group in full_state_dict["param_groups"]:
        for index in _state_holders(group):
            if index not in full_state_dict["state"]:
                continue
            state, shape = full_state_dict["state"][index], param_shapes[index]
            if group["kind"] == "adamw":
                _check_shardable(shape, world_size)
            # a replicated (small AdamW) state is the whole tensor on every rank
            replicated = group["kind"] == "adamw" and not _adamw_is_sharded(shape, world_size)
            shard = {"step": state["step"]} if "step" in state else {}
            for name, shard_shape in _state_shapes(group["kind"], shape, len(group["params"]), world_size).items():
                first_row = 0 if replicated else rank * shard_shape[0]
                shard[name] = _rows_of(state[name], first_row, shard_shape, device)
            shard_state[index] = shard
    return {
        "state": shard_state,
        "param_groups": [dict(group) for group in full_state_dict["param_groups"]],
        "sharding": {"world_size": world_size, "rank": rank, "param_shapes": param_shapes},
    }


def _rows_of(full, first_row, shape, device):
    """Rows [first_row, first_row + shape[0]) of full as a new tensor of `shape` on device, zero past full's end."""
    part = full.new_zeros(shape, device=device)
    rows = full[first_row:first_row + shape[0]]
    part[:rows.size(0)] = rows
    return part


def _sharding_of(state_dict):
    if "sharding" not in state_dict:
        raise ValueError("this optimizer state has no 'sharding' entry (it predates re-sharding support), "
                         "so it can only be loaded on the same world size and rank that saved it")
    return state_dict["sharding"]


def _state_of_every_rank(shards, index):
    states = [sd["state"].get(index) for sd in shards]
    if all(state is None for state in states):
        return None
    if any(state is None for state in states):
        raise ValueError(f"param {index} has optimizer state on some ranks but not on others")
    return states
