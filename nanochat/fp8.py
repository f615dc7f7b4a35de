"""
fp8 training through torchao's Float8Linear, for base_train --fp8 (tensorwise or rowwise dynamic scaling).

convert_to_fp8 swaps the model's large Linear layers for Float8Linear, which keeps the very same weight
Parameters: the fp32 master weights, the optimizer groups and the state dict keys stay as they were,
only the matmuls run on the GPU's fp8 tensor cores. disable_fp8 puts our plain Linear back for the
length of a with block (evaluation, sampling) and restores the Float8Linear layers after.
check_fp8_support refuses hardware without fp8 tensor cores, or a missing torchao, with one ConfigError.

    check_fp8_support(device)              # at start: fail before anything costly
    convert_to_fp8(model, "tensorwise")    # after loading weights, before torch.compile
    with disable_fp8(model):
        val_bpb = evaluate_bpb(model, ...)

torchao (0.15.0, pinned in the gpu extra) is imported only by runs that ask for fp8. Nothing in this
module has run on a GPU yet: the CPU tests cover the swap, the layers left out, the refusal and the
checkpoint keys; the speed and the losses on an H100 are still to be measured.
"""

import contextlib
import importlib
import sys

import torch
import torch.nn as nn

from nanochat.common import ConfigError
from nanochat.gpt import Linear

FP8_RECIPES = ("tensorwise", "rowwise")  # torchao's recipe names, as upstream's --fp8-recipe offers them
# fp8 tensor cores arrived with Ada (sm_89: L4, L40S, RTX 4090) and Hopper (sm_90: H100, H200).
MIN_FP8_CAPABILITY = (8, 9)
# torch._scaled_mm, the fp8 matmul, needs both dims of each operand divisible by 16.
FP8_DIM_MULTIPLE = 16
# Upstream bac5a35: below this the casts to fp8 cost more than the fp8 matmul saves.
FP8_MIN_DIM = 128


def check_fp8_support(device):
    """A ConfigError unless `device` is a CUDA GPU with fp8 tensor cores and torchao imports."""
    device = torch.device(device)
    needed = f"compute capability {_dotted(MIN_FP8_CAPABILITY)}+, e.g. H100, L4"
    if device.type != "cuda":
        raise ConfigError(f"--fp8 needs an NVIDIA GPU with fp8 tensor cores ({needed}), but this run is on "
                          f"{device.type}: drop --fp8")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_FP8_CAPABILITY:
        raise ConfigError(f"--fp8 needs fp8 tensor cores ({needed}), but {torch.cuda.get_device_name(device)} has "
                          f"compute capability {_dotted(capability)}: drop --fp8")
    try:
        importlib.import_module("torchao.float8")
    except ImportError as error:
        raise ConfigError(f"--fp8 needs torchao ({error}): install the GPU extras with `bash dev/install.sh` "
                          "(or `pip install torchao==0.15.0`), or drop --fp8") from None


def _dotted(capability):
    return ".".join(map(str, capability))


def fp8_eligible(module, fqn=""):
    """
    Whether convert_to_fp8 converts this module (torchao's module_filter_fn): a Linear whose dims are
    multiples of 16 and at least 128, upstream's rule. In our model that is every block matmul
    (c_q, c_k, c_v, both c_proj, c_fc) and lm_head; the value-embedding gate (12 or 32 inputs to one
    output per kv head) and the smear gate (24 to 1) stay in the compute dtype: too small to gain from
    fp8, and not multiples of 16. The embeddings are lookups, not matmuls: torchao leaves them alone.
    """
    if not isinstance(module, nn.Linear):
        return False
    dims = (module.in_features, module.out_features)
    return all(d % FP8_DIM_MULTIPLE == 0 for d in dims) and min(dims) >= FP8_MIN_DIM


def convert_to_fp8(model, recipe="tensorwise"):
    """
    Swap every fp8_eligible Linear of `model` for torchao's Float8Linear, in place; returns
    (converted, linear layers in all). Call it before torch.compile, and check_fp8_support first:
    this only swaps modules. torchao swaps any subclass of nn.Linear, ours too; the Float8Linear
    that replaces it takes the same weight Parameter, casts the fp32 master weight to fp8 itself
    and returns the input's dtype, so no autocast is needed.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: PLC0415 (only fp8 runs pay its import)

    num_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=fp8_eligible)
    float8_linear = _float8_linear_class()
    return sum(isinstance(m, float8_linear) for m in model.modules()), num_linear


def _float8_linear_class():
    # A process that never converted has not imported torchao and so has no Float8Linear to swap:
    # runs without fp8 skip the import (seconds).
    module = sys.modules.get("torchao.float8.float8_linear")
    return None if module is None else module.Float8Linear


@contextlib.contextmanager
def disable_fp8(model):
    """
    Within the block every Float8Linear of `model` (compiled or not) is our plain Linear over the same
    weight Parameter, so evaluation and sampling compute as a model trained without fp8 would; the
    Float8Linear layers are back afterwards, also after an error. The stand-ins are built on the meta
    device and then given the weight: nothing is allocated (upstream 47e983e: stand-ins built on the GPU
    allocated a second copy of those weights for a moment). A model without Float8Linear layers is left as it is.
    """
    float8_linear = _float8_linear_class()
    swapped = []  # (parent, attribute, Float8Linear)
    if float8_linear is not None:
        for name, module in list(model.named_modules()):
            if isinstance(module, float8_linear):
                parent_name, _, attribute = name.rpartition(".")
                plain = Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
                plain.weight = module.weight
                plain.train(module.training)
                parent = model.get_submodule(parent_name)
                setattr(parent, attribute, plain)
                swapped.append((parent, attribute, module))
    try:
        yield model
    finally:
        for parent, attribute, module in swapped:
            setattr(parent, attribute, module)
