"""
Training-step throughput of the GPT + MuonAdamW alone: no data, no tokenizer (random token ids),
so it runs on a fresh GPU machine with nothing but torch. Prints tokens/s, MFU, peak memory and
which attention kernel ran, per configuration; the last line is one JSON document.

    python dev/bench_model.py                                   # d12 and d20, device batch 32 and 16, both recipes
    python dev/bench_model.py --depths 20 --batch-sizes 16 --recipes latest --fp8   # bf16 and fp8 rows
    python dev/bench_model.py --depths 2 --batch-sizes 2 --seq-len 128 --steps 3 --no-compile   # CPU smoke run

Numbers go to dev/LOG.md with the date, machine and command.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nanochat import flash_attention  # noqa: E402
from nanochat.common import COMPUTE_DTYPE, ConfigError, get_peak_flops  # noqa: E402
from nanochat.fp8 import check_fp8_support, convert_to_fp8  # noqa: E402
from nanochat.gpt import resolve_recipe  # noqa: E402
from nanochat.training import build_model, model_config_for_depth  # noqa: E402


def bench(depth, batch_size, seq_len, vocab_size, steps, warmup, compile_model, window_pattern, device,
          recipe="latest", fp8_recipe=None):
    # the same shape derivation, construction and fp8 swap as base_train (depth -> width nudged to head_dim)
    config, _ = model_config_for_depth(depth, vocab_size, max_seq_len=seq_len, window_pattern=window_pattern,
                                       recipe=recipe)
    model = build_model(config, device)
    optimizer = model.setup_optimizer(weight_decay=0.2 * (12 / depth) ** 2)
    if fp8_recipe:
        convert_to_fp8(model, fp8_recipe)
    train_model = torch.compile(model, dynamic=False) if compile_model else model

    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, vocab_size, (batch_size, seq_len), device=device, generator=generator)
    y = torch.randint(0, vocab_size, (batch_size, seq_len), device=device, generator=generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for step in range(warmup + steps):
        sync()
        t0 = time.time()
        loss = train_model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        sync()
        if step >= warmup:
            times.append(time.time() - t0)

    dt = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    tokens = batch_size * seq_len
    peak = get_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else float("inf")
    flops_per_token = model.estimate_flops()
    return {
        "depth": depth, "recipe": resolve_recipe(recipe), "fp8": fp8_recipe or "off", "model_dim": config.n_embd,
        "device_batch_size": batch_size, "seq_len": seq_len, "compile": compile_model, "window_pattern": window_pattern,
        "attention": "fa3" if flash_attention.USE_FA3 else "sdpa",
        "dtype": str(COMPUTE_DTYPE).removeprefix("torch."), "step_ms": round(dt * 1000, 2),
        "tok_per_sec": round(tokens / dt), "mfu_percent": round(100 * flops_per_token * tokens / dt / peak, 2),
        "peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
        "final_loss": round(loss.item(), 4),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=str, default="12,20", help="comma-separated depths")
    parser.add_argument("--batch-sizes", type=str, default="32,16", help="comma-separated device batch sizes (rows)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--window-pattern", type=str, default="SSSL")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the model and optimizer kernels")
    parser.add_argument("--recipes", type=str, default="2026-01,latest", help="comma-separated model/optimizer recipes")
    parser.add_argument("--fp8", action="store_true", help="also time each configuration with fp8 matmuls (torchao)")
    parser.add_argument("--fp8-recipe", type=str, default="tensorwise", help="fp8 scaling: tensorwise or rowwise")
    args = parser.parse_args(argv)
    if args.no_compile:
        os.environ["NANOCHAT_COMPILE"] = "0"  # the optimizer reads it at each step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} | "
          f"dtype: {COMPUTE_DTYPE} | FA3 available: {flash_attention.HAS_FA3} | torch {torch.__version__}")
    fp8_recipes = [None]
    if args.fp8:
        try:
            check_fp8_support(device)
            fp8_recipes.append(args.fp8_recipe)
        except ConfigError as error:  # still time the bf16 rows, and say why fp8 has none
            print(f"fp8: not timed: {error}", flush=True)
    results = []
    for depth in map(int, args.depths.split(",")):
        for batch_size in map(int, args.batch_sizes.split(",")):
            for recipe in args.recipes.split(","):
                for fp8_recipe in fp8_recipes:
                    try:
                        result = bench(depth, batch_size, args.seq_len, args.vocab_size, args.steps, args.warmup,
                                       not args.no_compile, args.window_pattern, device, recipe, fp8_recipe)
                    except torch.OutOfMemoryError:
                        result = {"depth": depth, "device_batch_size": batch_size, "recipe": recipe,
                                  "fp8": fp8_recipe or "off", "error": "out of memory"}
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    print(" | ".join(f"{k}: {v}" for k, v in result.items()), flush=True)
                    results.append(result)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
