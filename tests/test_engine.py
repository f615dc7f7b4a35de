"""
The inference Engine (nanochat/engine.py): with the KV cache it generates exactly what the naive
full-recompute `model.generate` does (sliding windows, GQA), samples reproducibly, runs the
calculator tool and forces its output with mask 0, and works with upstream-style stand-ins (a
mock model that only advances the cache, a byte-level tokenizer). The calculator refuses unsafe
input and its time limit holds from a worker thread.
"""

import os
import threading
import time

import pytest
import torch

from conftest import build_gpt
from nanochat.engine import Engine, KVCache, eval_with_timeout, sample_next_token, use_calculator
from nanochat.gpt import GPTConfig

# -----------------------------------------------------------------------------
# Upstream-style stand-ins: a byte-level tokenizer and a model that only advances the cache

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class ByteTokenizer:
    """Ids 0..255 are bytes, then the special tokens."""

    def __init__(self):
        self.special = {name: 256 + i for i, name in enumerate(SPECIALS)}

    def encode_special(self, text):
        return self.special[text]

    def get_bos_token_id(self):
        return self.special["<|bos|>"]

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class MockConfig:
    n_kv_head, n_head, n_embd, n_layer, sequence_len = 2, 2, 16, 2, 128


class MockModel:
    """Uniform logits over the vocab, or a scripted sequence of forced next tokens."""

    def __init__(self, vocab_size=256 + len(SPECIALS), script=None):
        self.vocab_size = vocab_size
        self.config = MockConfig()
        self.script = list(script or [])
        self.calls = 0

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = torch.zeros(B, T, self.vocab_size)
        if self.calls < len(self.script):
            logits[:, -1, self.script[self.calls]] = 100.0
        self.calls += 1
        return logits


# -----------------------------------------------------------------------------
# A real tiny GPT and a tokenizer view that hides the stop tokens


class NoStopTokenizer:
    """The tiny tokenizer, with <|assistant_end|> and <|bos|> moved to ids the model never emits,
    so greedy comparisons run to max_tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_special(self, text):
        return 10_000 if text == "<|assistant_end|>" else self.tokenizer.encode_special(text)

    def get_bos_token_id(self):
        return 10_001

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        return self.tokenizer.decode(ids)


PROMPTS = ["the cat sees", "A small bird crosses the quiet sea.", "x", "our city builds a long road " * 3]


def test_greedy_engine_equals_naive_generate_token_for_token(gpt, tiny_tokenizer):
    engine = Engine(gpt, NoStopTokenizer(tiny_tokenizer))
    for text in PROMPTS:
        prompt = tiny_tokenizer.encode(text, prepend="<|bos|>")
        max_tokens = 64 - len(prompt)  # up to the full context: the windows of layers 0-1 are exceeded
        reference = list(gpt.generate(prompt, max_tokens, temperature=0))
        columns = list(engine.generate(prompt, num_samples=3, max_tokens=max_tokens, temperature=0))
        assert len(columns) == max_tokens
        for row in range(3):  # every sample of a greedy batch is the naive sequence
            assert [column[row] for column, _ in columns] == reference, text
        assert all(masks == [1, 1, 1] for _, masks in columns)


def test_greedy_engine_with_smear_equals_naive_generate_for_every_sample(tiny_tokenizer):
    # The 2026-07 model mixes the previous token's embedding into each position: the KV cache carries it
    # from the batch-1 prefill into every sample's row, then from step to step.
    config = GPTConfig.for_recipe("2026-07", sequence_len=64, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2,
                                  n_embd=64, window_pattern="SSL")
    model = build_gpt(config, seed=3, perturb=0.1)
    with torch.no_grad():
        model.smear_lambda.fill_(1.0)  # 0 at init: strong enough here that a missing smear changes the tokens
    engine = Engine(model, NoStopTokenizer(tiny_tokenizer))
    for text in PROMPTS[:2]:
        prompt = tiny_tokenizer.encode(text, prepend="<|bos|>")
        reference = list(model.generate(prompt, 24, temperature=0))
        columns = list(engine.generate(prompt, num_samples=3, max_tokens=24, temperature=0))
        for row in range(3):
            assert [column[row] for column, _ in columns] == reference, text


def test_engine_stops_on_assistant_end_and_bos(tiny_tokenizer):
    tokenizer = ByteTokenizer()
    end = tokenizer.encode_special("<|assistant_end|>")
    model = MockModel(script=[ord("h"), ord("i"), end, ord("x")])
    columns = list(Engine(model, tokenizer).generate([tokenizer.get_bos_token_id()], max_tokens=10, temperature=0))
    assert [column[0] for column, _ in columns] == [ord("h"), ord("i"), end]
    results, masks = Engine(MockModel(script=[ord("h"), ord("i"), end]), tokenizer).generate_batch(
        [tokenizer.get_bos_token_id()], max_tokens=10, temperature=0)
    assert results == [[tokenizer.get_bos_token_id(), ord("h"), ord("i")]]  # prompt + reply, no end token
    assert masks == [[0, 1, 1]]
    bos = tokenizer.get_bos_token_id()
    columns = list(Engine(MockModel(script=[ord("a"), bos]), tokenizer).generate([bos], max_tokens=10, temperature=0))
    assert [column[0] for column, _ in columns] == [ord("a"), bos]


def test_max_tokens_is_respected(gpt, tiny_tokenizer):
    engine = Engine(gpt, NoStopTokenizer(tiny_tokenizer))
    prompt = tiny_tokenizer.encode("the cat", prepend="<|bos|>")
    for max_tokens in (1, 5, 17):
        assert len(list(engine.generate(prompt, num_samples=2, max_tokens=max_tokens, temperature=1.0))) == max_tokens
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=5)
    assert [len(r) for r in results] == [len(prompt) + 5] * 2 and [len(m) for m in masks] == [len(prompt) + 5] * 2


def test_same_seed_same_samples_and_greedy_ignores_the_seed(gpt, tiny_tokenizer):
    engine = Engine(gpt, NoStopTokenizer(tiny_tokenizer))
    prompt = tiny_tokenizer.encode("a dog loves", prepend="<|bos|>")

    def run(**kwargs):
        return [column for column, _ in engine.generate(prompt, num_samples=4, max_tokens=12, **kwargs)]

    assert run(temperature=1.0, seed=7) == run(temperature=1.0, seed=7)
    assert run(temperature=1.0, seed=7) != run(temperature=1.0, seed=8)
    assert run(temperature=0.0, seed=1) == run(temperature=0.0, seed=2)
    assert run(temperature=0.9, top_k=5, seed=3) == run(temperature=0.9, top_k=5, seed=3)


def test_sixteen_samples_draw_their_first_tokens_independently():
    tokenizer = ByteTokenizer()
    engine = Engine(MockModel(), tokenizer)  # uniform logits: any shared first token would be a bug
    first_column, _ = next(engine.generate([tokenizer.get_bos_token_id()], num_samples=16, max_tokens=4, temperature=1.0))
    assert len(set(first_column)) > 1


def test_calculator_output_is_forced_with_mask_zero():
    tokenizer = ByteTokenizer()
    special = tokenizer.special
    script = [special["<|python_start|>"], *b"1+2", special["<|python_end|>"]]
    engine = Engine(MockModel(script=script), tokenizer)
    columns = list(engine.generate([tokenizer.get_bos_token_id()], max_tokens=len(script) + 3, temperature=0))
    tokens = [column[0] for column, _ in columns]
    masks = [mask[0] for _, mask in columns]
    forced = [special["<|output_start|>"], ord("3"), special["<|output_end|>"]]
    assert tokens == script + forced
    assert masks == [1] * len(script) + [0, 0, 0]


def test_kv_cache_advance_reset_and_prefill_broadcast():
    cache = KVCache(batch_size=1, num_heads=2, seq_len=8, head_dim=4, num_layers=3, device="cpu", dtype=torch.float32)
    assert cache.k_cache.shape == (3, 1, 8, 2, 4) and cache.get_pos() == 0
    cache.k_cache[:, :, :5] = torch.randn(3, 1, 5, 2, 4)
    cache.v_cache[:, :, :5] = torch.randn(3, 1, 5, 2, 4)
    cache.advance(5)
    assert cache.get_pos() == 5 and cache.cache_seqlens.tolist() == [5]
    wide = KVCache(batch_size=4, num_heads=2, seq_len=12, head_dim=4, num_layers=3, device="cpu", dtype=torch.float32)
    wide.prefill(cache)
    assert wide.get_pos() == 5 and wide.cache_seqlens.tolist() == [5] * 4
    for row in range(4):
        assert torch.equal(wide.k_cache[:, row, :5], cache.k_cache[:, 0, :5])
        assert torch.equal(wide.v_cache[:, row, :5], cache.v_cache[:, 0, :5])
    with pytest.raises(ValueError, match="empty cache"):
        wide.prefill(cache)
    short = KVCache(batch_size=4, num_heads=2, seq_len=4, head_dim=4, num_layers=3, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="at least as long"):
        short.prefill(cache)
    cache.reset()
    assert cache.get_pos() == 0 and cache.cache_seqlens.tolist() == [0]


def test_kv_cache_is_in_the_compute_dtype_by_default():
    from nanochat.common import COMPUTE_DTYPE

    cache = KVCache(batch_size=1, num_heads=1, seq_len=2, head_dim=2, num_layers=1, device="cpu")
    assert cache.k_cache.dtype == cache.v_cache.dtype == COMPUTE_DTYPE


def test_sampling_top_k_and_top_p_keep_only_the_allowed_ids():
    rng = torch.Generator().manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(200, -1)
    assert set(sample_next_token(logits, rng, temperature=0).flatten().tolist()) == {0}
    assert set(sample_next_token(logits, rng, temperature=1.0, top_k=2).flatten().tolist()) <= {0, 1}
    # softmax masses 0.64, 0.24, 0.09, ...: top_p=0.7 keeps the first two ids
    assert set(sample_next_token(logits, rng, temperature=1.0, top_p=0.7).flatten().tolist()) == {0, 1}
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, rng, temperature=-1)


# -----------------------------------------------------------------------------
# The calculator


def test_calculator_does_arithmetic_and_string_counting():
    assert use_calculator("1+2") == 3
    assert use_calculator("1,000 * 3") == 3000
    assert use_calculator("(7 - 2) / 4") == 1.25
    assert use_calculator("'strawberry'.count('r')") == 3
    assert use_calculator("1/0") is None


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo hi')", "2**10", "9**9**9", "().__class__.__bases__[0].__subclasses__()",
    "'a'.__class__", "lambda: 1", "open('x').read()", "eval('1+1')", "'abc'.upper()", "x.count(1) or dir()",
    "1+" * 600 + "1",
])
def test_calculator_refuses_unsafe_or_oversized_input(expression):
    assert use_calculator(expression) is None


def test_time_limit_holds_in_a_worker_thread():
    # What the allow-list can never let through, run straight at the evaluator: it burns CPU for minutes.
    result, elapsed = {}, {}

    def worker():
        start = time.time()
        result["value"] = eval_with_timeout("9**9**9", max_time=1.0)
        elapsed["seconds"] = time.time() - start

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert result["value"] is None and elapsed["seconds"] < 5
    assert eval_with_timeout("6*7") == 42  # and the evaluator still works afterwards


def test_the_evaluator_child_is_reused_and_replaced_after_a_timeout():
    from nanochat.engine import _evaluator

    assert eval_with_timeout("2*21") == 42
    first = _evaluator.process.pid
    assert eval_with_timeout("'hello'.count('l')") == 2 and _evaluator.process.pid == first  # no interpreter per call
    assert eval_with_timeout("9**9**9", max_time=0.5) is None and _evaluator.process is None  # killed, not left burning
    assert eval_with_timeout("6*7") == 42 and _evaluator.process.pid != first


def test_calls_from_many_threads_each_get_their_own_answer():
    answers = {}

    def worker(k):
        answers[k] = [eval_with_timeout(f"{k} * 1000 + {i}") for i in range(20)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == {k: [k * 1000 + i for i in range(20)] for k in range(8)}


def test_a_forked_child_starts_its_own_evaluator():
    from nanochat.engine import _evaluator

    assert eval_with_timeout("1+1") == 2
    parents = _evaluator.process.pid
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through its own evaluator, then leave without running pytest's exit handlers
        os.close(read_end)
        answer = eval_with_timeout("3*3")
        os.write(write_end, f"{answer} {_evaluator.process.pid}".encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child_answer, childs = pipe.read().split()
    os.waitpid(pid, 0)
    assert child_answer == "9" and int(childs) != parents  # not the parent's child, nor its pipes
    assert eval_with_timeout("2+2") == 4 and _evaluator.process.pid == parents
