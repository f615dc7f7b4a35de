"""
scripts/infer_bench.py on a tiny random model (no checkpoint, no tokenizer), in process: the
last stdout line is one JSON document with every number, and at temperature 0 the Engine's
tokens equal naive generate's. Plus the architecture accounting on a hand-countable model and
the MBU/MFU arithmetic of the CUDA card.
"""

import json
import math

import pytest

from conftest import build_gpt
from nanochat.gpt import GPTConfig
from scripts import infer_bench
from scripts.infer_bench import get_peak_bandwidth

RESULT_FIELDS = {"batch", "ttft_s", "tpot_s", "tok_per_s", "total_s", "decode_steps", "time_vs_batch1"}


def test_random_model_bench_reports_every_number_and_engine_matches_naive(capsys):
    infer_bench.main(["--depth=2", "--max-seq-len=64", "--prompt-tokens=16", "--decode-tokens=10",
                      "--batch-sizes=3", "--device-type=cpu"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["engine_matches_naive"] is True
    assert report["tokens_compared"] == 10
    assert report["prompt_tokens"] == 16 and report["decode_tokens"] == 10
    assert report["model"]["source"] == "random" and report["model"]["depth"] == 2
    assert set(report["naive"]) >= RESULT_FIELDS - {"time_vs_batch1"}
    assert [result["batch"] for result in report["engine"]] == [1, 3]  # batch 1 always runs
    for result in report["engine"]:
        assert set(result) >= RESULT_FIELDS
        assert result["decode_steps"] == 10  # no special token can end a random model's row
        assert all(result[key] > 0 for key in ("ttft_s", "tpot_s", "tok_per_s", "total_s"))
    assert report["engine"][0]["time_vs_batch1"] == 1.0
    assert report["engine_speedup_vs_naive"] > 0


def test_prompt_is_clamped_to_fit_the_context(capsys):
    infer_bench.main(["--depth=1", "--max-seq-len=32", "--prompt-tokens=100", "--decode-tokens=4",
                      "--batch-sizes=1", "--device-type=cpu"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["prompt_tokens"] == 28
    assert report["engine_matches_naive"] is True


def test_accounting_counts_weights_kv_and_flops():
    # 2 layers, C = 64, 2 heads of 32, 1 kv head, windows: layer 0 short (16), layer 1 full (32)
    model = build_gpt(GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=1, n_embd=64,
                                window_pattern="SL"))
    assert model.window_sizes == [(16, 0), (32, 0)]
    kv_per_key = 2 * 1 * 32 * 4  # k and v, one kv head of 32 fp32 values each
    assert infer_bench.kv_bytes_per_token(model) == 2 * kv_per_key
    assert infer_bench.kv_read_bytes(model, 10) == kv_per_key * (10 + 10)
    assert infer_bench.kv_read_bytes(model, 30) == kv_per_key * (17 + 30)  # the short window sees 17 keys
    assert infer_bench.weight_bytes(model) == 4 * sum(p.numel() for p in model.parameters())
    matmuls = sum(p.numel() for p in model.transformer.h.parameters()) + model.lm_head.weight.numel()
    assert infer_bench.decode_flops(model, 30) == 2 * matmuls + 4 * 64 * (17 + 30)
    # prefill of 3 tokens: token p sees p + 1 keys in both layers
    assert infer_bench.prefill_flops(model, 3) == 2 * matmuls * 3 + 4 * 64 * 2 * (1 + 2 + 3)


def test_utilization_counts_the_weights_once_and_the_kv_cache_per_row():
    model = build_gpt(GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, window_pattern="L"))
    card = {"weight_bytes": 1000.0, "kv_read_bytes": 50.0, "peak_bandwidth": 1e6, "peak_flops": 1e9, "context": 20}
    result = {"batch": 8, "tpot_s": 0.01}
    infer_bench.add_utilization(result, card, model)
    assert result["mbu_pct"] == pytest.approx(100 * (1000 + 8 * 50) / 0.01 / 1e6)  # one weight read serves all 8 rows
    assert result["mfu_pct"] == pytest.approx(100 * 8 * infer_bench.decode_flops(model, 20) / 0.01 / 1e9)


def test_peak_bandwidth_table():
    assert get_peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert get_peak_bandwidth("NVIDIA H200") == 4.8e12
    assert get_peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.0e12
    assert math.isinf(get_peak_bandwidth("Some Future GPU"))
