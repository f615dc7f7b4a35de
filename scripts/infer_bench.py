"""
Inference benchmark: the Engine (KV cache, one prefill, batched decode) against the naive
model.generate (the whole sequence re-run for every token), on any device. It measures time to
first token, median time per output token and decode tokens/s at batch 1 and each --batch-sizes
entry, and checks that at temperature 0 the Engine gives exactly the naive tokens; on CUDA it adds
weight and KV-cache bytes, MBU, MFU and peak memory. README.md ("Talk to the model", end) explains
the numbers.

Run it (one process, not under torchrun):
    python -m scripts.infer_bench -i base -g d12                                  # a checkpoint, one GPU
    python -m scripts.infer_bench -i sft --batch-sizes 1,4,16,64 --decode-tokens 512
    python -m scripts.infer_bench --depth 4 --prompt-tokens 64 --decode-tokens 128 --device-type cpu
                                                # a random-init d4 model: no checkpoint, no tokenizer

Reads a checkpoint and the tokenizer unless --depth is given. Writes nothing; the last stdout line
is one JSON document with every number. On a CPU with noisy numbers, compare with OMP_NUM_THREADS=1.
"""

import argparse
import json
import math
import statistics
import time

import torch

from nanochat.common import (
    COMPUTE_DTYPE, ConfigError, autodetect_device_type, compute_init, get_peak_flops, parse_flags,
    run_script,
)
from nanochat.engine import Engine
from nanochat.flash_attention import require_fast_attention
from nanochat.checkpoint_manager import load_model

RANDOM_MODEL_VOCAB_SIZE = 32768  # tok_train's default vocab
WARMUP_TOKENS = 8  # a short untimed run per configuration: allocator, kernel selection, caches
PROMPT_TEXT = ("The history of science is the study of the development of science, including both the natural "
               "and social sciences. Science is a body of empirical, theoretical, and practical knowledge about "
               "the natural world. ")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Inference benchmark: Engine vs naive generate",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-i", "--source", type=str, default="base", help="checkpoint source: base|mid|sft|rl")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint directory (None = the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (None = the last one)")
    parser.add_argument("--depth", type=int, default=0, help="benchmark a random-init model of this depth (base_train's shapes) instead of a checkpoint")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="context length of the --depth model")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length (clamped to sequence_len - decode tokens)")
    parser.add_argument("--decode-tokens", type=int, default=256, help="tokens generated per row")
    parser.add_argument("--batch-sizes", type=str, default="", help="comma-separated numbers of samples (empty = 1,8 on CPU/MPS, 1,8,32 on CUDA); 1 is always run")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (the naive match is checked at 0)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    return parse_flags(parser, argv)


# -----------------------------------------------------------------------------
# The model and the prompt


class TokenIdsOnly:
    """
    Stands in for the tokenizer when benchmarking a random model. The Engine asks a tokenizer only
    for the special-token ids (to end a row, to run the calculator) and, when the calculator runs,
    for encode/decode. Here every special token gets a negative id no model can sample, so no row
    ends early and the calculator never runs.
    """

    SPECIAL = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
               "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")

    def encode_special(self, text):
        return -1 - self.SPECIAL.index(text)

    def get_bos_token_id(self):
        return self.encode_special("<|bos|>")


def build_random_model(depth, max_seq_len, device):
    """A base_train-shaped model of `depth` with random weights in every matrix."""
    from nanochat.training import build_model, model_config_for_depth

    config, _ = model_config_for_depth(depth, RANDOM_MODEL_VOCAB_SIZE, max_seq_len=max_seq_len)
    model = build_model(config, device)
    # Training starts with zero output projections (each block is the identity) and a near-zero
    # lm_head (flat logits): greedy tokens would then ignore the context and near-ties would pick
    # them, which makes the Engine-vs-naive check meaningless. Give those matrices the input
    # projections' scale; the cost of a step is the same.
    bound = math.sqrt(3) / math.sqrt(config.n_embd)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.transformer.h:
            for linear in (block.attn.c_proj, block.mlp.c_proj):
                linear.weight.copy_(torch.empty(linear.weight.shape).uniform_(-bound, bound, generator=generator))
        model.lm_head.weight.copy_(torch.empty(model.lm_head.weight.shape).uniform_(-bound, bound, generator=generator))
    return model.eval()


def load_benchmark_model(args, device):
    """(model, tokenizer or None, description) from --depth or a checkpoint."""
    if args.depth > 0:
        if args.model_tag is not None or args.step is not None:
            raise ConfigError("--depth benchmarks a random model: drop -g/--model-tag and -s/--step (or --depth)")
        model = build_random_model(args.depth, args.max_seq_len, device)
        return model, None, dict(source="random", model_tag=f"d{args.depth}", step=None)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    return model, tokenizer, dict(source=args.source, model_tag=args.model_tag, step=meta.get("step"))


def build_prompt(tokenizer, vocab_size, num_tokens):
    """Natural text of exactly num_tokens tokens (a real prompt keeps greedy decoding from degenerating), or random ids."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (num_tokens,), generator=generator).tolist()
    text = PROMPT_TEXT * (num_tokens // 10 + 1)  # > 10 characters per repetition, so always enough tokens
    return tokenizer.encode(text, prepend="<|bos|>")[:num_tokens]


# -----------------------------------------------------------------------------
# Architecture accounting: what a step has to compute and to read


def _attended_keys(context, window_left):
    return context if window_left < 0 else min(context, window_left + 1)


def weight_bytes(model):
    """Bytes of parameters as stored (each decode step reads all of them)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _kv_bytes_per_key(model):
    config = model.config
    head_dim = config.n_embd // config.n_head
    element_size = torch.empty((), dtype=COMPUTE_DTYPE).element_size()  # the KV cache is in the compute dtype
    return 2 * config.n_kv_head * head_dim * element_size  # k and v


def kv_bytes_per_token(model):
    return model.config.n_layer * _kv_bytes_per_key(model)


def kv_read_bytes(model, context):
    """Bytes of KV cache one decode step reads at `context` (sliding-window layers read only their window)."""
    return sum(_kv_bytes_per_key(model) * _attended_keys(context, left) for left, _ in model.window_sizes)


def _matmul_params(model):
    lookups = (model.transformer.wte.weight.numel() + sum(p.numel() for p in model.value_embeds.parameters())
               + model.resid_lambdas.numel() + model.x0_lambdas.numel())
    return sum(p.numel() for p in model.parameters()) - lookups


def decode_flops(model, context):
    """Forward FLOPs for one new token at `context`: 2 per matmul weight, 4*H*D per attended key per layer."""
    config = model.config
    attention = 4 * config.n_embd * sum(_attended_keys(context, left) for left, _ in model.window_sizes)
    return 2 * _matmul_params(model) + attention


def prefill_flops(model, num_tokens):
    """Forward FLOPs of a causal pass over num_tokens (token p attends to p + 1 keys, or its window)."""
    config = model.config
    attended = sum(_attended_keys(p + 1, left) for left, _ in model.window_sizes for p in range(num_tokens))
    return 2 * _matmul_params(model) * num_tokens + 4 * config.n_embd * attended


# -----------------------------------------------------------------------------
# Timing


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_steps(steps, device):
    """
    Drive a generator of per-step outputs: returns (outputs, TTFT, the times of the later steps).
    The first step holds the prefill and the first sample; each later one is one decode step.
    """
    outputs, step_times = [], []
    synchronize(device)
    start = time.perf_counter()
    for output in steps:
        synchronize(device)
        now = time.perf_counter()
        step_times.append(now - start)
        outputs.append(output)
        start = now
    return outputs, step_times[0], step_times[1:]


def summarize(batch_size, ttft, step_times):
    tpot = statistics.median(step_times) if step_times else float("nan")
    decode_time = sum(step_times)
    return dict(batch=batch_size, ttft_s=ttft, tpot_s=tpot,
                tok_per_s=batch_size * len(step_times) / decode_time if decode_time > 0 else float("nan"),
                total_s=ttft + decode_time, decode_steps=len(step_times) + 1)


def bench_naive(model, prompt, decode_tokens, temperature, device):
    list(model.generate(prompt, WARMUP_TOKENS, temperature=temperature))
    tokens, ttft, step_times = timed_steps(model.generate(prompt, decode_tokens, temperature=temperature), device)
    return tokens, summarize(1, ttft, step_times)


def bench_engine(engine, prompt, batch_size, decode_tokens, temperature, device):
    """Returns (row 0's tokens, measurements)."""
    kwargs = dict(num_samples=batch_size, temperature=temperature)
    list(engine.generate(prompt, max_tokens=WARMUP_TOKENS, **kwargs))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    columns, ttft, step_times = timed_steps(engine.generate(prompt, max_tokens=decode_tokens, **kwargs), device)
    result = summarize(batch_size, ttft, step_times)
    if device.type == "cuda":
        result["peak_vram_bytes"] = torch.cuda.max_memory_allocated(device)
    return [column[0] for column, _ in columns], result


# -----------------------------------------------------------------------------


def batch_sizes_for(flag, device_type):
    text = flag or ("1,8,32" if device_type == "cuda" else "1,8")
    try:
        sizes = {int(size) for size in text.split(",") if size.strip()}
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if any(size < 1 for size in sizes):
        raise ConfigError(f"--batch-sizes must be positive, got {text!r}")
    return sorted(sizes | {1})  # batch 1 is the reference for the naive comparison and the ratios


def clamp_prompt_tokens(args, sequence_len):
    prompt_len = min(args.prompt_tokens, sequence_len - args.decode_tokens)
    if args.decode_tokens < 2 or prompt_len < 1:
        raise ConfigError(f"need --decode-tokens >= 2 and a prompt of at least 1 token within sequence_len="
                          f"{sequence_len}; got --prompt-tokens {args.prompt_tokens}, --decode-tokens {args.decode_tokens}")
    if prompt_len < args.prompt_tokens:
        print(f"note: clamping the prompt to {prompt_len} tokens so prompt + decode fits sequence_len={sequence_len}")
    return prompt_len


# Peak memory bandwidth in bytes/s (HBM, as the vendors state it). Order matters: more specific names first.
_PEAK_BANDWIDTH = [
    (("h200",), 4.8e12),
    (("h100 nvl",), 3.9e12),
    (("h100 pcie",), 2.0e12),
    (("h100",), 3.35e12),  # SXM
    (("a100",), 2.0e12),  # 80 GB SXM (2.04e12); the 40 GB part has 1.56e12
]


def get_peak_bandwidth(device_name):
    """Peak memory bandwidth (bytes/s) of a GPU by its name, for MBU. Unknown devices give inf (MBU reads 0)."""
    name = device_name.lower()
    for patterns, bandwidth in _PEAK_BANDWIDTH:
        if any(pattern in name for pattern in patterns):
            return bandwidth
    print(f"note: peak memory bandwidth unknown for {device_name!r}: MBU will read 0")
    return float("inf")


def gpu_card(model, device, prompt_len, decode_tokens):
    """The architecture's costs next to the GPU's peaks (CUDA only)."""
    name = torch.cuda.get_device_name(device)
    context = prompt_len + decode_tokens // 2  # a representative decode context
    card = dict(gpu=name, peak_bandwidth=get_peak_bandwidth(name), peak_flops=get_peak_flops(name),
                total_vram_bytes=torch.cuda.get_device_properties(device).total_memory,
                weight_bytes=weight_bytes(model), kv_bytes_per_token=kv_bytes_per_token(model),
                kv_read_bytes=kv_read_bytes(model, context), context=context)
    # tokens/s at batch 1 if a step only had to re-read the weights and the KV cache at peak bandwidth
    card["ceiling_bs1_tok_per_s"] = card["peak_bandwidth"] / (card["weight_bytes"] + card["kv_read_bytes"])
    card["max_full_context_rows"] = int((card["total_vram_bytes"] - card["weight_bytes"])
                                        / (card["kv_bytes_per_token"] * model.config.sequence_len))
    return card


def add_utilization(result, card, model):
    """MBU and MFU of one decode run, from its median step time."""
    batch, tpot = result["batch"], result["tpot_s"]
    bytes_per_step = card["weight_bytes"] + batch * card["kv_read_bytes"]
    result["mbu_pct"] = 100 * bytes_per_step / tpot / card["peak_bandwidth"]
    result["mfu_pct"] = 100 * batch * decode_flops(model, card["context"]) / tpot / card["peak_flops"]


def print_table(naive, engine_results):
    header = f"{'':>8} {'batch':>6} {'TTFT ms':>9} {'TPOT ms':>9} {'tok/s':>10} {'total s':>8} {'x batch 1':>9} {'MBU %':>7} {'MFU %':>7}"
    print(header)
    print("-" * len(header))
    for label, result in [("naive", naive)] + [("engine", r) for r in engine_results]:
        ratio = result.get("time_vs_batch1")
        mbu, mfu = result.get("mbu_pct"), result.get("mfu_pct")
        print(f"{label:>8} {result['batch']:>6} {result['ttft_s'] * 1e3:>9.1f} {result['tpot_s'] * 1e3:>9.2f} "
              f"{result['tok_per_s']:>10,.0f} {result['total_s']:>8.2f} {'' if ratio is None else f'{ratio:.2f}':>9} "
              f"{'' if mbu is None else f'{mbu:.1f}':>7} {'' if mfu is None else f'{mfu:.2f}':>7}")
    print("-" * len(header))


def finite(value):
    """The report with inf/nan (an unknown peak, no decode steps) as null, so the line stays valid JSON."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv=None):
    args = parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    attention = require_fast_attention(device_type)
    ddp, _, _, _, device = compute_init(device_type)
    if ddp:
        raise ConfigError("infer_bench measures one device: run it with python -m, not torchrun")
    batch_sizes = batch_sizes_for(args.batch_sizes, device_type)
    model, tokenizer, described = load_benchmark_model(args, device)
    config = model.config
    prompt_len = clamp_prompt_tokens(args, config.sequence_len)
    prompt = build_prompt(tokenizer, config.vocab_size, prompt_len)
    engine = Engine(model, TokenIdsOnly() if tokenizer is None else tokenizer)
    card = gpu_card(model, device, prompt_len, args.decode_tokens) if device.type == "cuda" else None

    print(f"Model: {described['source']} {described['model_tag'] or ''} | depth {config.n_layer}, dim {config.n_embd}, "
          f"heads {config.n_head}, kv heads {config.n_kv_head}, vocab {config.vocab_size} | "
          f"{sum(p.numel() for p in model.parameters()):,} params | {device} {str(COMPUTE_DTYPE).removeprefix('torch.')} | "
          f"attention {attention.backend} ({attention.reason})")
    print(f"Prompt {prompt_len} tokens, {args.decode_tokens} decode tokens, temperature {args.temperature}, "
          f"batch sizes {','.join(map(str, batch_sizes))}")
    if card is not None:
        print(f"GPU {card['gpu']}: weights {card['weight_bytes'] / 2**20:,.0f} MiB | KV {card['kv_bytes_per_token']:,} B/token, "
              f"{card['kv_read_bytes']:,} B read/step at context {card['context']} | batch-1 ceiling "
              f"{card['ceiling_bs1_tok_per_s']:,.0f} tok/s | ~{card['max_full_context_rows']:,} full-context rows fit")

    naive_tokens, naive = bench_naive(model, prompt, args.decode_tokens, args.temperature, device)
    engine_results, engine_tokens = [], None
    for batch_size in batch_sizes:
        tokens, result = bench_engine(engine, prompt, batch_size, args.decode_tokens, args.temperature, device)
        if batch_size == 1:
            engine_tokens = tokens
        if card is not None:
            add_utilization(result, card, model)
        engine_results.append(result)
    for result in engine_results:
        result["time_vs_batch1"] = result["total_s"] / engine_results[0]["total_s"]
    print_table(naive, engine_results)

    # The Engine stops a row at <|assistant_end|>/<|bos|>, naive generate never: compare the common part.
    compared = min(len(engine_tokens), len(naive_tokens))
    report = dict(
        model=dict(**described, depth=config.n_layer, n_embd=config.n_embd, n_head=config.n_head,
                   n_kv_head=config.n_kv_head, vocab_size=config.vocab_size, sequence_len=config.sequence_len,
                   params=sum(p.numel() for p in model.parameters())),
        device=str(device), compute_dtype=str(COMPUTE_DTYPE).removeprefix("torch."),
        prompt_tokens=prompt_len, decode_tokens=args.decode_tokens, temperature=args.temperature,
        naive=naive, engine=engine_results,
        engine_speedup_vs_naive=naive["total_s"] / engine_results[0]["total_s"],
        tokens_compared=compared, engine_matches_naive=engine_tokens[:compared] == naive_tokens[:compared],
    )
    if card is not None:
        report["card"] = card
        report["prefill"] = dict(tok_per_s=prompt_len / engine_results[0]["ttft_s"],
                                 mfu_pct=100 * prefill_flops(model, prompt_len) / engine_results[0]["ttft_s"] / card["peak_flops"])
    print(f"Engine vs naive (batch 1, total time): {report['engine_speedup_vs_naive']:.2f}x faster | "
          f"greedy tokens match: {report['engine_matches_naive']} ({compared} compared)")
    print(json.dumps(finite(report)))


if __name__ == "__main__":
    run_script(main, "infer_bench")
