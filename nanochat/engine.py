"""
Inference on token ids: a KV cache, the sampler, and the Engine that generates with the
calculator tool. The Engine works purely on token ids; the tokenizer is only needed for the tool.

    engine = Engine(model, tokenizer)
    for token_column, token_masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64):
        ...  # one token per sample per step; mask 1 = sampled, 0 = forced (tool output)
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

The prompt is run once, at batch 1, and its cache is copied into every sample's row; then each
step runs the model on one new token per row. Per generated token the host waits on the device
once (to read the sampled ids, which the tool and the caller need).

Self-test: python -m nanochat.engine   (the last base model: naive generate vs the Engine)
"""

import ast
import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE

# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """
    Keys/values for all layers: k_cache and v_cache of shape (num_layers, B, T_max, Hkv, D), the
    layout Flash Attention 3 wants, plus cache_seqlens (B,) int32, the number of filled positions
    per row. All rows move together. The model writes into the cache inside attention; its last
    layer calls advance(). The position is mirrored on the host, so reading it costs no sync.
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype=None):
        self.batch_size = batch_size
        self.max_seq_len = seq_len
        self.n_heads = num_heads
        self.head_dim = head_dim
        self.n_layers = num_layers
        dtype = COMPUTE_DTYPE if dtype is None else dtype
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._pos = 0
        # (B, 1, C): the last position's normalized token embedding, which a model with smear mixes
        # into the next one; the model sets it (upstream keeps it here under the same name)
        self.prev_embedding = None

    def reset(self):
        """Forget the contents (positions back to 0; stale entries are overwritten before use)."""
        self.cache_seqlens.zero_()
        self._pos = 0
        self.prev_embedding = None

    def get_pos(self):
        """Current fill position (every row's)."""
        return self._pos

    def get_layer_cache(self, layer_idx):
        """Views (k, v) of one layer, each (B, T_max, Hkv, D); writes go into the cache."""
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens
        self._pos += num_tokens

    def prefill(self, other):
        """
        Copy another cache's filled prefix into this empty one, broadcasting a batch-1 cache over
        all rows (prefill a prompt once, then sample several continuations in parallel).
        """
        if self.get_pos() != 0:
            raise ValueError(f"prefill needs an empty cache, this one holds {self.get_pos()} positions; call reset()")
        mine = (self.n_layers, self.n_heads, self.head_dim)
        theirs = (other.n_layers, other.n_heads, other.head_dim)
        if mine != theirs:
            raise ValueError(f"cannot prefill a cache of (layers, kv heads, head_dim) = {mine} from one of {theirs}")
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"the source cache must have batch size 1 or {self.batch_size}, got {other.batch_size}")
        if self.max_seq_len < other.max_seq_len:
            raise ValueError(f"this cache holds {self.max_seq_len} positions, fewer than the source's "
                             f"{other.max_seq_len}; make it at least as long")
        pos = other.get_pos()
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
        self._pos = pos
        previous = other.prev_embedding  # smear's state: a batch-1 one is copied into every row
        self.prev_embedding = None if previous is None else previous.expand(self.batch_size, -1, -1).clone()


# -----------------------------------------------------------------------------
# Sampling


@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """
    logits (B, V) -> next ids (B, 1). temperature 0 is greedy (argmax); otherwise sample from
    softmax(logits / temperature), restricted to the top_k most likely ids when top_k > 0 and to
    the smallest set whose probability reaches top_p when 0 < top_p < 1 (nucleus sampling).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    probs, ids = sampling_distribution(logits, temperature, top_k, top_p)
    return draw(probs, ids, rng)


def sampling_distribution(logits, temperature, top_k=None, top_p=None):
    """
    The distribution sample_next_token draws from, per row: (probs (B, K), ids (B, K) or None when
    K is the whole vocab). Every step works row by row, so rows of a bigger batch get exactly
    what they would get alone (the batch engine computes it once for many requests).
    """
    ids = None
    if top_k is not None and top_k > 0:
        logits, ids = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep a token while the mass before it is < top_p (so the most likely one always stays)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs, ids


def draw(probs, ids, rng):
    """One id per row from sampling_distribution's output, with the generator rng -> (B, 1)."""
    choice = torch.multinomial(probs, num_samples=1, generator=rng)
    return choice if ids is None else ids.gather(-1, choice)


# -----------------------------------------------------------------------------
# The calculator tool

CALCULATOR_TIME_LIMIT = 3.0  # seconds, as upstream
CALCULATOR_MAX_CHARS = 1000  # an expression the model writes is a few dozen characters
_ARITHMETIC_CHARS = set("0123456789*+-/.() ")
_STRING_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_FORBIDDEN_WORDS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
                    "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")
# The evaluator is one long-lived child interpreter (-I -S: no site, no env) that evaluates one
# JSON-quoted expression per line with no builtins and answers with one JSON line. A child process,
# so that killing it ends whatever an expression does: a time limit that holds from any thread,
# unlike SIGALRM. Long-lived, because a fresh interpreter per call costs ~20 ms, during which
# chat_web's batch of replies waits; the child is killed and replaced after a timeout.
_EVALUATOR = (
    "import json, sys, warnings\n"
    "warnings.simplefilter('ignore')\n"
    "for line in sys.stdin:\n"
    "    try:\n"
    "        answer = repr(eval(json.loads(line), {'__builtins__': {}}, {}))\n"
    "    except BaseException:\n"
    "        answer = None\n"
    "    sys.stdout.write(json.dumps(answer) + '\\n')\n"
    "    sys.stdout.flush()\n"
)


class _Evaluator:
    """The evaluator child of this process, started on first use and after a kill; one call at a time."""

    def __init__(self):
        self.forget()

    def forget(self):
        # a forked child (e.g. a torchrun or dataloader worker) starts its own evaluator and never
        # touches its parent's pipes, nor a lock some other thread of the parent held at the fork
        self.lock, self.process = threading.Lock(), None

    def __call__(self, formula, max_time):
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self.process = subprocess.Popen([sys.executable, "-I", "-S", "-c", _EVALUATOR], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            try:
                self.process.stdin.write(json.dumps(formula).encode() + b"\n")
                self.process.stdin.flush()
                ready, _, _ = select.select([self.process.stdout], [], [], max_time)
                line = self.process.stdout.readline() if ready else b""
            except OSError:  # the child is gone (a broken pipe)
                line = b""
            if not line.endswith(b"\n"):  # too slow, or the child died: a fresh one next time
                self.close()
                return None
            return json.loads(line)

    def close(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


_evaluator = _Evaluator()
os.register_at_fork(after_in_child=_evaluator.forget)
atexit.register(_evaluator.close)


def eval_with_timeout(formula, max_time=CALCULATOR_TIME_LIMIT):
    """eval(formula) with no builtins in the evaluator child, which is killed after max_time seconds; None on any failure."""
    answer = _evaluator(formula, max_time)
    if answer is None:
        return None
    try:
        return ast.literal_eval(answer)
    except (ValueError, SyntaxError, MemoryError, RecursionError):  # e.g. inf, nan, or a huge repr
        return None


def use_calculator(expr):
    """
    The tool the model calls between <|python_start|> and <|python_end|>: plain arithmetic
    (no power operator), or string counting such as 'strawberry'.count('r'). None when the
    expression is not allowed or fails.
    """
    expr = expr.replace(",", "")
    if not expr.strip() or len(expr) > CALCULATOR_MAX_CHARS:
        return None
    if set(expr) <= _ARITHMETIC_CHARS:
        if "**" in expr:
            return None
        return eval_with_timeout(expr)
    if not set(expr) <= _STRING_CHARS:
        return None
    lowered = expr.lower()
    if any(word in lowered for word in _FORBIDDEN_WORDS) or ".count(" not in expr:
        return None
    return eval_with_timeout(expr)


# -----------------------------------------------------------------------------
# The Engine


@dataclass
class RowState:
    """One sample's generation state: its tokens so far and the tool state machine."""
    current_tokens: list
    forced_tokens: deque = field(default_factory=deque)  # tool output still to be emitted, mask 0
    in_python_block: bool = False
    python_expr_tokens: list = field(default_factory=list)
    completed: bool = False  # emitted <|assistant_end|> or <|bos|>


def special_token_ids(tokenizer):
    """The ids generation acts on: the calculator's delimiters and the two tokens that end a reply."""
    encode = tokenizer.encode_special
    return dict(python_start=encode("<|python_start|>"), python_end=encode("<|python_end|>"),
                output_start=encode("<|output_start|>"), output_end=encode("<|output_end|>"),
                assistant_end=encode("<|assistant_end|>"), bos=tokenizer.get_bos_token_id())


def step_row(row, sampled_token, special, tokenizer):
    """
    One generation step of one row: its next token is queued tool output if there is any (mask 0),
    else the sample (mask 1). Returns (token, mask) after updating the row's state with it.
    """
    forced = bool(row.forced_tokens)
    token = row.forced_tokens.popleft() if forced else sampled_token
    row.current_tokens.append(token)
    _advance_tool_state(row, token, special, tokenizer)
    return token, 0 if forced else 1


def _advance_tool_state(row, token, special, tokenizer):
    """After `token`: mark completion; run the calculator on <|python_end|> and queue its output."""
    if token in (special["assistant_end"], special["bos"]):
        row.completed = True
    if token == special["python_start"]:
        row.in_python_block, row.python_expr_tokens = True, []
    elif token == special["python_end"] and row.in_python_block:
        row.in_python_block = False
        if row.python_expr_tokens:
            result = use_calculator(tokenizer.decode(row.python_expr_tokens))
            if result is not None:
                row.forced_tokens.append(special["output_start"])
                row.forced_tokens.extend(tokenizer.encode(str(result)))
                row.forced_tokens.append(special["output_end"])
        row.python_expr_tokens = []
    elif row.in_python_block:
        row.python_expr_tokens.append(token)


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def _new_cache(self, batch_size, seq_len, device):
        config = self.model.config
        return KVCache(batch_size=batch_size, num_heads=config.n_kv_head, seq_len=seq_len,
                       head_dim=config.n_embd // config.n_head, num_layers=config.n_layer, device=device)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, top_p=None):
        """
        Yield (token_column, token_masks) per step: one token per sample, mask 1 if it was sampled
        and 0 if the tool forced it. A sample is complete once it emits <|assistant_end|> or
        <|bos|>; the others go on, and the loop ends when all are complete or after max_tokens
        steps (None: up to the model's sequence_len in total, and at least one step).
        """
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of token ids (ints)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_tokens is None:
            max_tokens = max(1, self.model.config.sequence_len - len(tokens))
        device = self.model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        special = special_token_ids(self.tokenizer)

        # Prefill the prompt once at batch 1, then give every sample its own copy of the cache.
        prefill_cache = self._new_cache(1, len(tokens), device)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.model.forward(ids, kv_cache=prefill_cache)[:, -1, :]
        logits = logits.expand(num_samples, -1)  # each row samples its first token independently
        decode_cache = self._new_cache(num_samples, len(tokens) + max_tokens, device)
        decode_cache.prefill(prefill_cache)
        del prefill_cache

        rows = [RowState(list(tokens)) for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p)[:, 0].tolist()  # the one sync
            token_column, token_masks = [], []
            for row, sampled_token in zip(rows, sampled):
                token, mask = step_row(row, sampled_token, special, self.tokenizer)
                token_column.append(token)
                token_masks.append(mask)
            yield token_column, token_masks
            if all(row.completed for row in rows) or step == max_tokens - 1:
                break
            ids = torch.tensor(token_column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model.forward(ids, kv_cache=decode_cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """
        Run generate to the end. Returns (results, masks): per sample the prompt plus its generated
        tokens without the terminating <|assistant_end|>/<|bos|>, and masks (0 for the prompt,
        then 1 sampled / 0 forced per generated token).
        """
        special = special_token_ids(self.tokenizer)
        stop = (special["assistant_end"], special["bos"])
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for token_column, token_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, token_masks)):
                if completed[i]:
                    continue
                if token in stop:
                    completed[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(completed):
                break
        return results, masks


# -----------------------------------------------------------------------------
# Self-test: naive generate and the Engine give the same greedy tokens


def main():
    from nanochat.checkpoint_manager import load_model
    from nanochat.common import autodetect_device_type, compute_init

    device_type = os.environ.get("NANOCHAT_DEVICE_TYPE") or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, _ = load_model("base", device, phase="eval")
    prompt = tokenizer.encode("The chemical formula of water is", prepend="<|bos|>")
    kwargs = dict(max_tokens=64, temperature=0.0)

    def timed(run):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.time()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.time() - start

    reference, reference_time = timed(lambda: list(model.generate(prompt, **kwargs)))
    print(tokenizer.decode(reference))
    print(f"Reference time: {reference_time:.2f}s")
    engine = Engine(model, tokenizer)
    generated, engine_time = timed(lambda: [column[0] for column, _ in engine.generate(prompt, num_samples=1, **kwargs)])
    print(tokenizer.decode(generated))
    print(f"Engine time: {engine_time:.2f}s")
    same = generated == reference
    print(f"Match: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    from nanochat.common import run_script

    run_script(lambda: sys.exit(main()), "engine")
