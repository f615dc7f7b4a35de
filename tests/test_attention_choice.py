"""
Which attention backend runs, and the refusal to train on SDPA where FA3 should run: decided with
an injected GPU capability and kernel loader, since this machine has neither CUDA nor FA3.
"""

import sys
import types

import pytest
import torch

import nanochat.flash_attention as fa
from nanochat.common import ConfigError

HOPPER = (9, 0)
BF16 = torch.bfloat16


def failing_loader(repo, revision, ask_first):
    raise ImportError("No module named 'kernels'")


def test_fa3_loads_on_hopper_from_the_pinned_revision():
    calls = []

    def loader(repo, revision, ask_first):
        calls.append((repo, revision, ask_first))
        return "fa3 module"

    module, choice = fa._load_flash_attention_3(capability=HOPPER, compute_dtype=BF16, loader=loader)
    assert module == "fa3 module" and choice.backend == "fa3"
    assert calls == [("varunneal/flash-attention-3", fa.FA3_REVISION, False)]
    assert fa.FA3_REVISION  # kernels >= 0.15 refuses a repository without a revision or version
    assert f"@{fa.FA3_REVISION}" in choice.reason and "SM 9.0" in choice.reason


@pytest.mark.parametrize("capability, dtype, loader, reason", [
    (None, BF16, failing_loader, "no CUDA device"),
    (HOPPER, torch.float32, failing_loader, "compute dtype float32"),
    ((10, 0), BF16, failing_loader, "no FA3 build exists for SM 10.0"),
    (HOPPER, BF16, failing_loader, "failed to load (ImportError: No module named 'kernels')"),
    ((8, 0), BF16, lambda repo, revision, ask_first: None, "kernels-community/flash-attn3@"),
])
def test_every_sdpa_decision_says_why(capability, dtype, loader, reason):
    module, choice = fa._load_flash_attention_3(capability=capability, compute_dtype=dtype, loader=loader)
    assert module is None and choice.backend == "sdpa"
    assert reason in choice.reason
    assert choice.capability == capability


def test_hub_loader_passes_the_revision_to_kernels(monkeypatch):
    calls = []
    fake_kernels = types.ModuleType("kernels")
    fake_kernels.has_kernel = lambda repo, revision=None, version=None: calls.append(("has", repo, revision)) or True
    fake_kernels.get_kernel = lambda repo, revision=None, version=None: (
        calls.append(("get", repo, revision)) or types.SimpleNamespace(flash_attn_interface="iface"))
    monkeypatch.setitem(sys.modules, "kernels", fake_kernels)
    assert fa._hub_loader("kernels-community/flash-attn3", "abc123", ask_first=True) == "iface"
    assert calls == [("has", "kernels-community/flash-attn3", "abc123"), ("get", "kernels-community/flash-attn3", "abc123")]


def sdpa_choice(capability, reason="FA3 from varunneal/flash-attention-3@main failed to load (ImportError: x)"):
    return fa.AttentionChoice("sdpa", reason, capability)


def test_sdpa_on_hopper_stops_the_run_unless_allowed():
    with pytest.raises(ConfigError) as stop:
        fa.require_fast_attention("cuda", sdpa_choice(HOPPER), environ={})
    message = str(stop.value)
    assert "SM 9.0" in message and "ImportError" in message and "NANOCHAT_ALLOW_SDPA=1" in message
    with pytest.raises(ConfigError):
        fa.require_fast_attention("cuda", sdpa_choice((10, 0), "no FA3 build exists for SM 10.0"), environ={})
    allowed = fa.require_fast_attention("cuda", sdpa_choice(HOPPER), environ={"NANOCHAT_ALLOW_SDPA": "1"})
    assert allowed.backend == "sdpa"


def test_sdpa_is_fine_below_hopper_and_off_cuda():
    assert fa.require_fast_attention("cuda", sdpa_choice((8, 0)), environ={}).backend == "sdpa"
    assert fa.require_fast_attention("cpu", sdpa_choice(None, "no CUDA device"), environ={}).backend == "sdpa"
    fa3 = fa.AttentionChoice("fa3", "Flash Attention 3", HOPPER)
    assert fa.require_fast_attention("cuda", fa3, environ={}) is fa3


def test_use_fa3_takes_no_arguments_as_upstream_calls_it(monkeypatch):
    assert fa._use_fa3() is fa.USE_FA3
    monkeypatch.setattr(fa, "_override_impl", "sdpa")
    assert fa._use_fa3() is False
    assert fa.attention_backend().backend == "sdpa"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_this_machine_reports_sdpa_with_its_reason():
    choice = fa.attention_backend()
    assert (choice.backend, choice.reason) == ("sdpa", "no CUDA device")
