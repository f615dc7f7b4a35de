"""
Continuous batching (nanochat/batch_engine.py on nanochat/row_cache.py): requests that join and
leave a running batch get the tokens Engine.generate gives each of them alone (greedy, seeded
sampling, several samples, prompts prefilled in chunks, sliding windows, GQA); cancelled and
finished requests free their rows at once and queued ones take them in order; the calculator
runs per request; per-row model state moves and clears with its row; a failing step fails its
requests and the loop goes on.
"""

import threading

import pytest
import torch

from conftest import build_gpt
from nanochat.batch_engine import BatchEngine, GenerationRequest
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig
from nanochat.row_cache import RowKVCache


class Recorder:
    """Collects one job's events: its token columns, masks and the order of everything."""

    def __init__(self, log):
        self.columns, self.masks, self.kinds, self.log = [], [], [], log

    def __call__(self, kind, value):
        self.kinds.append(kind)
        self.log.append((self, kind))
        if kind == "tokens":
            self.columns.append(value[0])
            self.masks.append(value[1])


def solo(engine, request):
    """Engine.generate's columns and masks for one request on its own."""
    steps = list(engine.generate(request.tokens, num_samples=request.num_samples, max_tokens=request.max_tokens,
                                 temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, seed=request.seed))
    return [column for column, _ in steps], [masks for _, masks in steps]


def run_until_idle(batcher, max_steps=10_000):
    for _ in range(max_steps):
        if not (batcher.waiting or batcher.prefilling or batcher.decoding or batcher._inbox):
            return
        batcher.step()
    raise AssertionError("the batch engine did not finish")


def prompt_of(tokenizer, text):
    return tokenizer.encode(text, prepend="<|bos|>")


# -----------------------------------------------------------------------------


def test_rows_at_different_positions_each_get_their_own_logits(gpt):
    """One forward over rows at positions 3, 11 and 27 equals three separate forwards (rotary and masks per row)."""
    config = gpt.config
    cache = RowKVCache(3, 64, config.n_kv_head, config.n_embd // config.n_head, config.n_layer, "cpu")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (1, n), generator=g) for n in (3, 11, 27)]
    next_ids = torch.randint(0, 300, (3, 2), generator=g)
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            gpt.forward(prompt, kv_cache=cache.rows(row, row + 1))
        batched = gpt.forward(next_ids, kv_cache=cache.rows(0, 3))
        assert cache.positions == [5, 13, 29]
        for row, prompt in enumerate(prompts):
            alone = gpt.forward(torch.cat([prompt, next_ids[row:row + 1]], dim=1))[:, -2:]
            torch.testing.assert_close(batched[row:row + 1], alone, rtol=1e-4, atol=1e-4)


def test_requests_joining_a_running_batch_get_the_engines_tokens(gpt, tiny_tokenizer):
    engine = Engine(gpt, tiny_tokenizer)
    batcher = BatchEngine(gpt, tiny_tokenizer, max_batch=8, max_context=64, prefill_chunk=5)  # most prompts take 2+ chunks
    requests = [
        GenerationRequest(prompt_of(tiny_tokenizer, "the cat sees"), max_tokens=30, temperature=0.0),
        GenerationRequest(prompt_of(tiny_tokenizer, "A small bird crosses the quiet sea."), max_tokens=25, temperature=1.0,
                          top_k=50, seed=5),
        GenerationRequest(prompt_of(tiny_tokenizer, "x"), num_samples=3, max_tokens=20, temperature=0.9, seed=7),
        GenerationRequest(prompt_of(tiny_tokenizer, "our city builds a long road " * 2), max_tokens=12, temperature=1.2,
                          top_p=0.9, seed=9),
        GenerationRequest(prompt_of(tiny_tokenizer, "my teacher loves"), num_samples=2, max_tokens=40, temperature=0.0),
    ]
    log, recorders = [], []
    for request in requests:  # each joins a few steps after the last, while the others decode
        recorders.append(Recorder(log))
        batcher.submit(request, recorders[-1])
        for _ in range(3):
            batcher.step()
    run_until_idle(batcher)
    assert batcher.rows_used == 0
    for request, recorder in zip(requests, recorders):
        columns, masks = solo(engine, request)
        assert recorder.columns == columns and recorder.masks == masks
        assert recorder.kinds == ["admitted"] + ["tokens"] * len(columns) + ["done"]


def test_the_2026_07_model_smears_each_row_with_its_own_previous_token(tiny_tokenizer):
    """Smear keeps the previous token's embedding on the cache: per row, across prefill chunks and joins."""
    config = GPTConfig.for_recipe("2026-07", sequence_len=64, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2,
                                  n_embd=64, window_pattern="SSL")
    assert config.smear and config.backout
    model = build_gpt(config, seed=4, perturb=0.1)
    engine = Engine(model, tiny_tokenizer)
    batcher = BatchEngine(model, tiny_tokenizer, max_batch=6, max_context=64, prefill_chunk=4)
    requests = [GenerationRequest(prompt_of(tiny_tokenizer, "the cat sees the moon"), max_tokens=20, temperature=0.0),
                GenerationRequest(prompt_of(tiny_tokenizer, "a bird"), num_samples=2, max_tokens=16, temperature=1.0,
                                  seed=11),
                GenerationRequest(prompt_of(tiny_tokenizer, "my teacher loves the quiet sea"), max_tokens=12,
                                  temperature=0.8, top_k=40, seed=3)]
    log, recorders = [], []
    for request in requests:
        recorders.append(Recorder(log))
        batcher.submit(request, recorders[-1])
        for _ in range(2):
            batcher.step()
    run_until_idle(batcher)
    for request, recorder in zip(requests, recorders):
        assert (recorder.columns, recorder.masks) == solo(engine, request)


def test_a_cancelled_request_frees_its_rows_before_the_next_step(gpt, tiny_tokenizer):
    engine = Engine(gpt, tiny_tokenizer)
    batcher = BatchEngine(gpt, tiny_tokenizer, max_batch=8, max_context=64)
    requests = [GenerationRequest(prompt_of(tiny_tokenizer, text), num_samples=n, max_tokens=40, temperature=1.0, seed=i)
                for i, (text, n) in enumerate([("a dog", 1), ("the river", 3), ("our city", 2)])]
    log = []
    recorders = [Recorder(log) for _ in requests]
    jobs = [batcher.submit(request, recorder) for request, recorder in zip(requests, recorders)]
    for _ in range(4):
        batcher.step()
    assert batcher.rows_used == 6
    batcher.cancel(jobs[1])  # the middle one: the rows above it move down
    tokens_before = len(recorders[1].columns)
    batcher.step()
    assert batcher.rows_used == 3 and len(recorders[1].columns) == tokens_before
    run_until_idle(batcher)
    assert "done" not in recorders[1].kinds
    for i in (0, 2):  # the others never noticed
        assert recorders[i].columns == solo(engine, requests[i])[0]


def test_queued_requests_take_freed_rows_first_come_first_served(gpt, tiny_tokenizer):
    engine = Engine(gpt, tiny_tokenizer)
    batcher = BatchEngine(gpt, tiny_tokenizer, max_batch=3, max_context=64)
    requests = [GenerationRequest(prompt_of(tiny_tokenizer, f"the cat sees {i}"), num_samples=n, max_tokens=m, temperature=0.8,
                                  seed=i) for i, (n, m) in enumerate([(1, 6), (2, 20), (2, 4), (1, 3)])]
    log = []
    recorders = [Recorder(log) for _ in requests]
    for request, recorder in zip(requests, recorders):
        batcher.submit(request, recorder)
    most_rows = 0
    while batcher.waiting or batcher.prefilling or batcher.decoding or batcher._inbox:
        batcher.step()
        most_rows = max(most_rows, batcher.rows_used + sum(len(job.rows) for job in batcher.prefilling))
        if batcher.decoding:  # request 3 fits in the free row, but waits behind request 2 (2 rows)
            assert batcher.queued() == len(batcher.waiting)
    assert most_rows == 3
    admitted = [recorders.index(recorder) for recorder, kind in log if kind == "admitted"]
    assert admitted == [0, 1, 2, 3]
    for request, recorder in zip(requests, recorders):
        assert recorder.columns == solo(engine, request)[0]


class ScriptedModel:
    """The real GPT, except that after a token in `script` the next token is forced: a model that calls the tool."""

    def __init__(self, gpt, script):
        self.gpt, self.script = gpt, script
        self.config, self.rotary_seq_len = gpt.config, gpt.rotary_seq_len

    def get_device(self):
        return self.gpt.get_device()

    def forward(self, ids, kv_cache=None):
        logits = self.gpt.forward(ids, kv_cache=kv_cache)
        for row, token in enumerate(ids[:, -1].tolist()):
            if token in self.script:
                logits[row, -1] = -float("inf")
                logits[row, -1, self.script[token]] = 0.0
        return logits


def test_calculator_runs_inside_a_batch_for_its_request_only(gpt, tiny_tokenizer):
    special = {name: tiny_tokenizer.encode_special(f"<|{name}|>") for name in
               ("user_end", "python_start", "python_end", "output_start", "output_end")}
    expression = tiny_tokenizer.encode("12+30")
    chain = [special["python_start"], *expression, special["python_end"]]
    # a prompt that ends in <|user_end|> makes the model write <|python_start|>12+30<|python_end|>
    model = ScriptedModel(gpt, dict(zip([special["user_end"], *chain[:-1]], chain)))
    engine, batcher = Engine(model, tiny_tokenizer), BatchEngine(model, tiny_tokenizer, max_batch=4, max_context=64)
    tool_request = GenerationRequest(prompt_of(tiny_tokenizer, "what is 12 plus 30") + [special["user_end"]],
                                     max_tokens=len(chain) + 6, temperature=0.0)
    others = [GenerationRequest(prompt_of(tiny_tokenizer, text), max_tokens=15, temperature=0.0) for text in ("a dog", "the sea")]
    log = []
    recorders = [Recorder(log) for _ in range(3)]
    batcher.submit(others[0], recorders[0])
    batcher.step()
    batcher.submit(tool_request, recorders[1])
    batcher.submit(others[1], recorders[2])
    run_until_idle(batcher)

    tokens = [column[0] for column in recorders[1].columns]
    masks = [mask[0] for mask in recorders[1].masks]
    forced = [special["output_start"], *tiny_tokenizer.encode("42"), special["output_end"]]
    assert tokens[:len(chain) + len(forced)] == chain + forced
    assert masks[:len(chain) + len(forced)] == [1] * len(chain) + [0] * len(forced)
    for request, recorder in zip([others[0], tool_request, others[1]], recorders):
        columns, masks = solo(engine, request)
        assert recorder.columns == columns and recorder.masks == masks


def test_row_state_the_model_keeps_moves_and_clears_with_its_row():
    cache = RowKVCache(max_rows=4, max_len=8, num_heads=2, head_dim=4, num_layers=1, device="cpu", dtype=torch.float32)
    view = cache.rows(1, 3)
    assert view.get_pos() == 0 and view.prev_embedding is None  # as a fresh cache
    view.prev_embedding = torch.tensor([[[1.0, 1.0]], [[2.0, 2.0]]])  # (B, 1, C), as a model writing per-row state
    seen = view.prev_embedding
    view.prev_embedding = torch.zeros(2, 1, 2)
    assert seen[:, 0, 0].tolist() == [1.0, 2.0]  # what was read is a copy, not a view the next write changes
    cache.rows(2, 3).prev_embedding = torch.full((1, 1, 2), 5.0)
    cache.rows(2, 3).advance(3)
    assert cache.rows(1, 3).get_pos() == [0, 3] and cache.cache_seqlens.tolist() == [0, 0, 3, 0]
    cache.move_row(2, 0)
    assert cache.positions[0] == 3 and cache.rows(0, 1).prev_embedding[0, 0].tolist() == [5.0, 5.0]
    cache.resize(6, 5, keep_rows=3)  # more, shorter rows: what the kept rows hold stays
    assert cache.positions == [3, 0, 3, 0, 0, 0] and cache.rows(2, 3).prev_embedding[0, 0].tolist() == [5.0, 5.0]
    assert cache.k_cache.shape == (1, 6, 5, 2, 4) and cache.rows(3, 6).prev_embedding is None
    cache.clear_row(0)
    assert cache.positions[0] == 0 and cache.rows(0, 1).prev_embedding is None
    with pytest.raises(RuntimeError, match="mix rows"):
        cache.rows(0, 2).prev_embedding  # a batch of a prefilled and an empty row is a bug
    with pytest.raises(ValueError, match="one entry per row"):
        cache.rows(0, 2).prev_embedding = torch.zeros(3, 1, 2)


def test_the_cache_grows_and_reshapes_within_its_token_budget(gpt, tiny_tokenizer):
    engine = Engine(gpt, tiny_tokenizer)
    batcher = BatchEngine(gpt, tiny_tokenizer, max_batch=4, kv_cache_tokens=128, max_context=100)
    prompt = prompt_of(tiny_tokenizer, "a dog")
    requests = [GenerationRequest(prompt, max_tokens=20 - len(prompt), temperature=1.0, seed=1),  # reserves 20 positions
                GenerationRequest(prompt, max_tokens=30 - len(prompt), temperature=1.0, seed=2),  # 30
                GenerationRequest(prompt, max_tokens=25 - len(prompt), temperature=1.0, seed=3),  # 25
                GenerationRequest(prompt, max_tokens=100 - len(prompt), temperature=1.0, seed=4)]  # 100: waits for a lone row
    log = []
    recorders = [Recorder(log) for _ in requests]
    shapes = set()
    for request, recorder in zip(requests, recorders):
        batcher.submit(request, recorder)
        for _ in range(2):  # each arrives while the others run: the cache reshapes under them
            batcher.step()
            shapes.add((batcher.cache.max_rows, batcher.cache.max_seq_len))
    while batcher.waiting or batcher.prefilling or batcher.decoding:
        batcher.step()
        shapes.add((batcher.cache.max_rows, batcher.cache.max_seq_len))
    assert all(rows * length <= 128 for rows, length in shapes) and len(shapes) >= 3, shapes
    admitted = [kind for _, kind in log].count("admitted")
    assert admitted == 4 and log.index((recorders[3], "admitted")) > log.index((recorders[1], "done"))
    for request, recorder in zip(requests, recorders):
        assert recorder.columns == solo(engine, request)[0]


def test_requests_that_cannot_fit_are_refused(gpt, tiny_tokenizer):
    batcher = BatchEngine(gpt, tiny_tokenizer, max_batch=2, kv_cache_tokens=48, max_context=32)
    prompt = prompt_of(tiny_tokenizer, "the cat")
    assert batcher.room(len(prompt)) == 32 - len(prompt) and batcher.room(len(prompt), 2) == 24 - len(prompt)
    with pytest.raises(ValueError, match="do not fit"):
        batcher.submit(GenerationRequest(prompt, max_tokens=33 - len(prompt)), print)
    with pytest.raises(ValueError, match="do not fit"):  # two samples of 32 positions: more than the 48 of the cache
        batcher.submit(GenerationRequest(prompt, num_samples=2, max_tokens=32 - len(prompt)), print)
    with pytest.raises(ValueError, match="num_samples"):
        batcher.submit(GenerationRequest(prompt, num_samples=3, max_tokens=4), print)
    with pytest.raises(ValueError, match="rotary"):
        BatchEngine(gpt, tiny_tokenizer, max_context=gpt.rotary_seq_len + 1)


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(gpt, tiny_tokenizer, monkeypatch):
    batcher = BatchEngine(gpt, tiny_tokenizer, max_batch=4, max_context=64)
    real_forward, calls = gpt.forward, [0]

    def forward_failing_once(ids, kv_cache=None):
        calls[0] += 1
        if calls[0] == 3:  # the prefill, one decode step, then this one
            raise RuntimeError("injected failure")
        return real_forward(ids, kv_cache=kv_cache)

    monkeypatch.setattr(gpt, "forward", forward_failing_once)
    endings = {}

    def ending(name):
        ended = threading.Event()

        def sink(kind, value):
            if kind in ("done", "error"):
                endings[name] = (kind, value)
                ended.set()
        return sink, ended

    thread = threading.Thread(target=batcher.run, daemon=True)
    thread.start()
    try:
        sink, ended = ending("first")
        batcher.submit(GenerationRequest(prompt_of(tiny_tokenizer, "a dog"), max_tokens=10), sink)
        assert ended.wait(60)
        sink, ended = ending("second")
        batcher.submit(GenerationRequest(prompt_of(tiny_tokenizer, "the sea"), max_tokens=10), sink)
        assert ended.wait(60)
    finally:
        batcher.close()
        thread.join(timeout=10)
    assert endings["first"] == ("error", "RuntimeError: injected failure")
    assert endings["second"] == ("done", None)
    assert batcher.rows_used == 0 and not batcher.decoding and not batcher.prefilling
