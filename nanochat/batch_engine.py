"""
Continuous batching: one decode loop generates for many requests at once, as the Engine does for
one. Every step runs the model once over the rows of all running requests; a new request joins
after its prompt is prefilled (in chunks, between decode steps, so a long prompt never stalls the
others for long), and a finished or cancelled one leaves at once, handing its rows back.

    batcher = BatchEngine(model, tokenizer, max_batch=32, kv_cache_tokens=32 * 2048)
    threading.Thread(target=batcher.run, daemon=True).start()
    job = batcher.submit(GenerationRequest(prompt_ids, max_tokens=64, temperature=0.8, top_k=50, seed=7),
                         sink=lambda kind, value: ...)   # ("admitted" | "tokens" | "done" | "error", value)
    batcher.cancel(job)

A request's tokens do not depend on the batch: it has its own seeded generator, sampling settings
and calculator state, and samples exactly as Engine.generate would (n samples of one request step
together and draw from one generator, as there). Events reach each request's sink in one call of
`publish` per step (the server hands that one call to its event loop). Nothing is written to disk.
"""

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from nanochat.engine import RowState, draw, sampling_distribution, special_token_ids, step_row
from nanochat.row_cache import RowKVCache

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per step: a 256-token forward costs a few decode steps
RATE_WINDOW_SECONDS = 10.0  # tokens/s in stats() is measured over this much recent time
CACHE_LENGTH_STEP = 256  # the cache's rows grow in steps of this many positions


@dataclass
class GenerationRequest:
    """The arguments of Engine.generate for one request."""
    tokens: list
    num_samples: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 42


@dataclass(eq=False)
class Job:
    """One submitted request and where it stands. Only the loop thread changes it (cancel() only sets a flag)."""
    request: GenerationRequest
    sink: object  # sink(kind, value), called through publish
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    rows: list = field(default_factory=list)  # cache rows, one per sample
    prefilled: int = 0  # prompt tokens in the cache so far
    logits: torch.Tensor = None  # (num_samples, V): where the next tokens come from
    states: list = field(default_factory=list)  # RowState per sample
    rng: torch.Generator = None
    steps: int = 0  # token columns produced

    @property
    def reserved(self):
        """Cache positions each of its rows may need: the prompt and every token it may generate."""
        return len(self.request.tokens) + self.request.max_tokens

    @property
    def finished(self):
        return self.steps >= self.request.max_tokens or all(state.completed for state in self.states)


class BatchEngine:
    """
    max_batch rows at most; their KV cache holds kv_cache_tokens positions in all (rows x the
    longest conversation in flight, grown and reshaped as requests come), default max_batch x the
    model's sequence_len; one conversation holds at most max_context (default: all the rotary
    tables cover, within the budget). A request reserves its prompt plus max_tokens when it starts.
    """

    def __init__(self, model, tokenizer, max_batch=32, kv_cache_tokens=None, max_context=None,
                 prefill_chunk=DEFAULT_PREFILL_CHUNK, publish=None):
        config = model.config
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        self.kv_cache_tokens = kv_cache_tokens or max_batch * config.sequence_len
        max_context = max_context or model.rotary_seq_len
        if max_context > model.rotary_seq_len:
            raise ValueError(f"max_context {max_context} is past the model's rotary tables ({model.rotary_seq_len} positions)")
        self.max_context = min(max_context, self.kv_cache_tokens)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.device = model.get_device()
        self.cache = RowKVCache(0, 0, config.n_kv_head, config.n_embd // config.n_head, config.n_layer, self.device)
        self.special = special_token_ids(tokenizer)
        self.publish = publish or _call_sinks
        self.waiting = deque()  # submitted, not yet given rows (FIFO)
        self.prefilling = []  # given rows above the decoding ones, prompts going in (FIFO)
        self.decoding = []  # rows [0, rows_used): one token per row per step
        self.rows_used = 0
        self.last_tokens = [0] * max_batch  # per row: the token the next decode step feeds
        self.owner = [None] * max_batch  # per row: (job, sample index) or None
        self._inbox, self._wake, self._closed = [], threading.Condition(), False
        self.tokens_generated = 0
        self._rate_samples = deque()  # (time, tokens_generated) over the last RATE_WINDOW_SECONDS
        self.longest_first_token_wait = 0.0

    def room(self, prompt_tokens, num_samples=1):
        """The most tokens a request may generate after prompt_tokens (< 1: it cannot run here)."""
        return min(self.max_context, self.kv_cache_tokens // num_samples) - prompt_tokens

    # -------------------------------------------------------------------------
    # Any thread

    def submit(self, request, sink):
        """Queue a request; returns its Job. ValueError if it can never fit."""
        if not isinstance(request.tokens, list) or not request.tokens or not all(isinstance(t, int) for t in request.tokens):
            raise ValueError("tokens must be a non-empty list of token ids (ints)")
        if not 1 <= request.num_samples <= self.max_batch:
            raise ValueError(f"num_samples must be in [1, {self.max_batch}] (the batch size), got {request.num_samples}")
        if not 1 <= request.max_tokens <= self.room(len(request.tokens), request.num_samples):
            raise ValueError(f"{len(request.tokens)} prompt tokens + max_tokens {request.max_tokens} do not fit: a "
                             f"conversation holds {self.max_context} positions, and the KV cache "
                             f"{self.kv_cache_tokens} for all {request.num_samples} samples")
        if request.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {request.temperature}")
        job = Job(request, sink)
        with self._wake:
            self._inbox.append(job)
            self._wake.notify()
        return job

    def cancel(self, job):
        """Stop a job; its rows are free before the next decode step."""
        job.cancelled = True
        with self._wake:
            self._wake.notify()

    def close(self):
        with self._wake:
            self._closed = True
            self._wake.notify()

    def stats(self):
        """Counts and rates for a status page (read without locks: a snapshot, possibly a step old)."""
        now = time.monotonic()
        samples = self._rate_samples
        rate = 0.0
        if samples and now - samples[0][0] > 0:
            rate = (self.tokens_generated - samples[0][1]) / max(now - samples[0][0], 1e-9)
        waiting = self._not_started()
        return {"active_requests": len(self.decoding) + len(self.prefilling), "batch_rows": self.rows_used,
                "max_batch": self.max_batch, "waiting_requests": self.queued(),
                "kv_cache_rows": self.cache.max_rows, "kv_cache_length": self.cache.max_seq_len,
                "oldest_wait_s": round(max((now - job.submitted for job in waiting), default=0.0), 3),
                "longest_first_token_wait_s": round(self.longest_first_token_wait, 3),
                "tokens_per_s": round(rate, 1), "tokens_generated": self.tokens_generated}

    def _not_started(self):
        return [job for job in list(self.waiting) + list(self._inbox) if not job.cancelled]

    def load(self):
        """Rows in use or asked for by requests not yet running: how busy this engine is."""
        waiting = self._not_started()
        return self.rows_used + sum(len(job.rows) for job in list(self.prefilling)) \
            + sum(job.request.num_samples for job in waiting)

    def queued(self):
        """Requests submitted that the free rows cannot take now, in order: the real queue."""
        free = self.max_batch - self.rows_used - sum(len(job.rows) for job in list(self.prefilling))
        waiting = self._not_started()
        for i, job in enumerate(waiting):
            if job.request.num_samples > free:
                return len(waiting) - i
            free -= job.request.num_samples
        return 0

    # -------------------------------------------------------------------------
    # The loop thread

    def run(self):
        """Step until close(); sleeps while there is nothing to do. A failing step fails its jobs, not the loop."""
        while True:
            with self._wake:
                while not self._closed and not (self._inbox or self.waiting or self.prefilling or self.decoding):
                    self._wake.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as error:
                logger.exception("batched generation failed")
                self.fail_all(f"{type(error).__name__}: {error}")

    @torch.inference_mode()
    def step(self):
        """One iteration: take new jobs, drop cancelled ones, prefill up to a chunk, sample, one decode forward."""
        events = []
        with self._wake:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
        for job in [job for job in self.prefilling + self.decoding if job.cancelled]:
            self._leave(job)
        self.waiting = deque(job for job in self.waiting if not job.cancelled)
        self._admit(events)
        self._prefill()
        self._sample(events)
        if events:
            self.publish(events)
        if self.decoding:
            self._decode()

    def fail_all(self, message):
        """Every job in flight gets an error and is dropped; all rows are free again (waiting jobs stay queued)."""
        failed = self.prefilling + self.decoding
        self.prefilling, self.decoding, self.rows_used = [], [], 0
        self.owner = [None] * self.max_batch
        for job in failed:
            job.rows, job.logits = [], None
        if failed:
            self.publish([(job, "error", message) for job in failed])

    def _admit(self, events):
        """Give waiting jobs rows, first come first served, while rows are free above everything in use."""
        while self.waiting:
            job = self.waiting[0]
            first_free = max([self.rows_used] + [row + 1 for other in self.prefilling for row in other.rows])
            rows = first_free + job.request.num_samples
            length = max(other.reserved for other in [job, *self.prefilling, *self.decoding])
            if rows > self.max_batch or rows * length > self.kv_cache_tokens:
                return
            if rows > self.cache.max_rows or length > self.cache.max_seq_len:
                self._reshape_cache(rows, length, keep_rows=first_free)
            self.waiting.popleft()
            job.rows = list(range(first_free, first_free + job.request.num_samples))
            for i, row in enumerate(job.rows):
                self.cache.clear_row(row)
                self.owner[row] = (job, i)
            job.rng = torch.Generator(device=self.device)
            job.rng.manual_seed(job.request.seed)
            self.prefilling.append(job)
            events.append((job, "admitted", None))

    def _reshape_cache(self, rows, length, keep_rows):
        """Reallocate the cache to hold at least rows x length, with headroom (fewer reallocations) where the budget allows."""
        candidates = [(min(self.max_batch, 1 << (rows - 1).bit_length()), -(-length // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP),
                      (rows, -(-length // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP), (rows, length)]
        for new_rows, new_length in candidates:
            new_length = min(new_length, self.max_context)
            if new_rows * new_length <= self.kv_cache_tokens:
                self.cache.resize(new_rows, new_length, keep_rows)
                return
        raise AssertionError(f"{rows} x {length} was checked against the budget of {self.kv_cache_tokens}")

    def _prefill(self):
        """Run up to prefill_chunk prompt tokens, oldest job first; a job whose prompt is in joins the batch."""
        budget = self.prefill_chunk
        for job in list(self.prefilling):
            if budget == 0:
                return
            tokens = job.request.tokens
            chunk = tokens[job.prefilled:job.prefilled + budget]
            ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
            row = job.rows[0]
            logits = self.model.forward(ids, kv_cache=self.cache.rows(row, row + 1))
            job.prefilled += len(chunk)
            budget -= len(chunk)
            if job.prefilled == len(tokens):
                # as the Engine: the prompt once, its cache copied into every sample's row
                for other in job.rows[1:]:
                    self.cache.move_row(row, other)
                job.logits = logits[:, -1, :].expand(job.request.num_samples, -1)
                job.states = [RowState(list(tokens)) for _ in job.rows]
                self._join(job)

    def _join(self, job):
        """Move a prefilled job's rows down to the end of the decoding rows."""
        self.prefilling.remove(job)
        for i, row in enumerate(job.rows):
            self._move(row, self.rows_used + i)
        self.rows_used += len(job.rows)
        self.decoding.append(job)

    def _sample(self, events):
        """Every decoding job takes its next column of tokens; finished ones leave."""
        sampled = self._sample_all()
        for job in list(self.decoding):
            column, masks = [], []
            for state, sampled_token in zip(job.states, sampled[job]):
                token, mask = step_row(state, sampled_token, self.special, self.tokenizer)
                column.append(token)
                masks.append(mask)
            for row, token in zip(job.rows, column):
                self.last_tokens[row] = token
            if job.steps == 0:
                self.longest_first_token_wait = max(self.longest_first_token_wait, time.monotonic() - job.submitted)
            job.steps += 1
            self.tokens_generated += len(column)
            events.append((job, "tokens", (column, masks)))
            if job.finished:
                events.append((job, "done", None))
                self._leave(job)
        now = time.monotonic()
        self._rate_samples.append((now, self.tokens_generated))
        while self._rate_samples and now - self._rate_samples[0][0] > RATE_WINDOW_SECONDS:
            self._rate_samples.popleft()

    def _sample_all(self):
        """
        {job: its sampled ids}. Jobs with the same settings share one pass over their logits (top-k,
        softmax: row by row, so each row gets what it would alone); each job then draws from its
        rows with its own generator, exactly as Engine.generate would.
        """
        groups = {}
        for job in self.decoding:
            request = job.request
            groups.setdefault((request.temperature, request.top_k, request.top_p), []).append(job)
        sampled = {}
        for (temperature, top_k, top_p), jobs in groups.items():
            logits = torch.cat([job.logits for job in jobs]) if len(jobs) > 1 else jobs[0].logits
            if temperature == 0:
                ids = torch.argmax(logits, dim=-1)
            else:
                probs, top_ids = sampling_distribution(logits, temperature, top_k, top_p)
                bounds = _cumulative([job.request.num_samples for job in jobs])
                ids = torch.cat([draw(probs[a:b], None, job.rng) for job, (a, b) in zip(jobs, bounds)])
                ids = (ids if top_ids is None else top_ids.gather(-1, ids))[:, 0]
            flat = ids.tolist()  # the one device sync per group
            for job, (a, b) in zip(jobs, _cumulative([job.request.num_samples for job in jobs])):
                sampled[job] = flat[a:b]
        return sampled

    def _decode(self):
        """One forward of every decoding row's last token; each job keeps its rows' logits."""
        ids = torch.tensor(self.last_tokens[:self.rows_used], dtype=torch.long, device=self.device)[:, None]
        logits = self.model.forward(ids, kv_cache=self.cache.rows(0, self.rows_used))[:, -1, :]
        for job in self.decoding:
            first = job.rows[0]
            contiguous = job.rows == list(range(first, first + len(job.rows)))
            job.logits = logits[first:first + len(job.rows)] if contiguous else logits[job.rows]

    def _leave(self, job):
        """Free a job's rows at once; the top decoding rows move into the holes so the batch stays contiguous."""
        if job in self.prefilling:
            self.prefilling.remove(job)
            for row in job.rows:
                self.owner[row] = None
        elif job in self.decoding:
            self.decoding.remove(job)
            freed = set(job.rows)
            for row in job.rows:
                self.owner[row] = None
            new_rows_used = self.rows_used - len(freed)
            holes = sorted(row for row in freed if row < new_rows_used)
            movers = [row for row in range(new_rows_used, self.rows_used) if row not in freed]
            for src, dst in zip(movers, holes):
                self._move(src, dst)
            self.rows_used = new_rows_used
        job.rows = []
        job.logits = None

    def _move(self, src, dst):
        if src == dst:
            return
        self.cache.move_row(src, dst)
        self.last_tokens[dst] = self.last_tokens[src]
        job, i = self.owner[src]
        job.rows[i] = dst
        self.owner[dst], self.owner[src] = (job, i), None


def _cumulative(sizes):
    """[2, 1, 3] -> [(0, 2), (2, 3), (3, 6)]"""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def _call_sinks(events):
    for job, kind, value in events:
        job.sink(kind, value)
