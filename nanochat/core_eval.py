"""
The CORE metric of a base model (DCLM, arXiv 2406.11794): 22 in-context-learning tasks scored by
the model's own token losses, each accuracy centered by the task's random baseline, then averaged.

    out = evaluate_core(model, tokenizer, device, max_per_task=100)
    out["core_metric"], out["label"], out["centered_results"]

The tasks come from $NANOCHAT_BASE_DIR/eval_bundle (downloaded from EVAL_BUNDLE_URL on first use:
one process downloads under a file lock, and a cut or corrupt zip is refused before anything is
placed), else from $NANOCHAT_BASE_DIR/eval_bundle_offline (rebuilt by `python -m dev.offline_data
core`; its score is labelled "CORE (partial: N of 22 tasks, offline reconstruction)", never a bare
"CORE"). README.md ("CORE") gives the bundle's layout and how an example is scored. Writes nothing
but the downloaded bundle.
"""

import csv
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import yaml
from filelock import FileLock

from nanochat.common import ConfigError, MissingInputError, download_file_with_lock, get_base_dir, print0

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_DIRNAME = "eval_bundle"
OFFLINE_BUNDLE_DIRNAME = "eval_bundle_offline"
OFFLINE_PROVENANCE = "provenance.json"  # only the offline rebuild has it
OFFLINE_BUILDER = "python -m dev.offline_data core"
NUM_CORE_TASKS = 22  # the tasks of DCLM's core.yaml
FEWSHOT_SEED = 1234  # + example index
SHUFFLE_SEED = 1337  # order of a task's examples before --max-per-task crops them
DOWNLOAD_ATTEMPTS = 3
DEFAULT_PACK_TOKENS = 8192  # rows x padded length per packed forward: logits of 8192 x 32768 fp32 = 1 GiB
MAX_PADDING_FRACTION = 0.2  # an example joins a packed forward only while padding stays under this share of it
PREPARE_WINDOW = 256  # examples tokenized and sorted by length at a time (bounds host memory)
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# -----------------------------------------------------------------------------
# Prompts: few-shot blocks, each followed by a blank line, then the example itself


def render_prompts_mc(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per choice: the shots (query, delimiter, gold choice) then query + delimiter + choice."""
    shots = "".join(f"{ex['query']}{continuation_delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot_examples or [])
    return [f"{shots}{item['query']}{continuation_delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per context option, all ending in the same continuation."""
    shots = "".join(f"{ex['context_options'][ex['gold']]}{continuation_delimiter}{ex['continuation']}\n\n"
                    for ex in fewshot_examples or [])
    return [f"{shots}{option}{continuation_delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item, continuation_delimiter, fewshot_examples=None):
    """
    [prompt without the continuation, prompt with it]. Contexts are stripped, and so is the whole
    first prompt: a trailing space there would merge into the continuation's first token and the
    first prompt's tokens would no longer be a prefix of the second's.
    """
    shots = "".join(f"{ex['context'].strip()}{continuation_delimiter}{ex['continuation']}\n\n" for ex in fewshot_examples or [])
    without = f"{shots}{item['context'].strip()}{continuation_delimiter}"
    return [without.strip(), without + item["continuation"]]


RENDERERS = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema, "language_modeling": render_prompts_lm}


def sample_fewshot_indices(idx, num_examples, num_fewshot):
    """
    The k distinct indices other than idx that random.Random(1234 + idx).sample draws from the
    list of all other indices; sampling positions of a range of the same length picks the same
    positions without building that list (O(k), not O(n), per example).
    """
    if num_fewshot <= 0:
        return []
    positions = random.Random(FEWSHOT_SEED + idx).sample(range(num_examples - 1), num_fewshot)
    return [p + (p >= idx) for p in positions]


# -----------------------------------------------------------------------------
# Tokens and the scored spans


def find_common_length(token_sequences, direction="left"):
    """Length of the longest common prefix (direction "left") or suffix ("right") of the sequences."""
    min_len = min(len(seq) for seq in token_sequences)
    for i in range(min_len):
        position = i if direction == "left" else -i - 1
        token = token_sequences[0][position]
        if any(seq[position] != token for seq in token_sequences):
            return i
    return min_len


def batch_sequences_mc(tokenizer, prompts):
    """Tokens of each prompt; the span of a choice starts where the prompts stop agreeing."""
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    start = find_common_length(tokens, direction="left")
    return tokens, [start] * len(tokens), [len(t) for t in tokens]


def batch_sequences_schema(tokenizer, prompts):
    """Tokens of each prompt; the span is the continuation's tokens, the suffix all prompts share."""
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    suffix = find_common_length(tokens, direction="right")
    return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]


def batch_sequences_lm(tokenizer, prompts):
    """Only the prompt with the continuation is scored; its span is what the continuation adds."""
    tokens_without, tokens_with = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    start, end = len(tokens_without), len(tokens_with)
    if not (start < end and tokens_with[:start] == tokens_without):
        raise ValueError(f"the context's tokens are not a prefix of context+continuation's: {prompts[1][-80:]!r}")
    return [tokens_with], [start], [end]


BATCHERS = {"multiple_choice": batch_sequences_mc, "schema": batch_sequences_schema, "language_modeling": batch_sequences_lm}


def crop_left(tokens, starts, ends, max_len):
    """Drop the oldest tokens of rows longer than max_len, shifting their spans; the spans must survive."""
    cropped = ([], [], [])
    for row, start, end in zip(tokens, starts, ends):
        cut = max(len(row) - max_len, 0)
        if start - cut < 1:  # position start-1 predicts the first scored token
            raise ValueError(f"a scored span of {end - start} tokens does not fit the model's {max_len}-token context")
        for out, value in zip(cropped, (row[cut:], start - cut, end - cut)):
            out.append(value)
    return cropped


def stack_sequences(tokens, pad_token_id):
    """(rows, longest) long tensor, right-padded with pad_token_id."""
    input_ids = torch.full((len(tokens), max(len(t) for t in tokens)), pad_token_id, dtype=torch.long)
    for i, row in enumerate(tokens):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return input_ids


@torch.no_grad()
def forward_model(model, input_ids):
    """(losses, predictions), each (B, T): loss and argmax of predicting token t+1 at t; the last column's loss is NaN."""
    batch_size, seq_len = input_ids.size()
    logits = model(input_ids)
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    losses = torch.nn.functional.cross_entropy(logits.view(batch_size * seq_len, -1), targets.view(-1),
                                               reduction="none").view(batch_size, seq_len)
    losses[:, -1] = float("nan")
    return losses, logits.argmax(dim=-1)


def context_limit(model):
    """
    Longest row the model takes: its max_seq_len when it has one (HF GPT-2: 1024), else for a
    nanochat GPT the length of its rotary tables (10 x sequence_len; its forward refuses more).
    """
    return getattr(model, "max_seq_len", None) or getattr(model, "rotary_seq_len", None)


# -----------------------------------------------------------------------------
# Examples


@dataclass
class PreparedExample:
    """The token rows of one example and the span scored in each."""
    idx: int
    task_type: str
    tokens: list
    starts: list
    ends: list
    gold: int = None

    @property
    def padded_len(self):
        return max(len(row) for row in self.tokens)


def prepare_example(idx, tokenizer, data, task_meta, max_len=None):
    task_type = task_meta["task_type"]
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown icl_task_type {task_type!r}; expected one of {', '.join(TASK_TYPES)}")
    item = data[idx]
    fewshot = [data[i] for i in sample_fewshot_indices(idx, len(data), task_meta["num_fewshot"])]
    prompts = RENDERERS[task_type](item, task_meta["continuation_delimiter"], fewshot)
    tokens, starts, ends = BATCHERS[task_type](tokenizer, prompts)
    if max_len is not None:
        tokens, starts, ends = crop_left(tokens, starts, ends, max_len)
    return PreparedExample(idx, task_type, tokens, starts, ends, item.get("gold"))


def judge(example, losses, predictions, input_ids):
    """
    Verdict for an example whose rows are losses/predictions/input_ids (CPU tensors, one row per
    token row). The mean losses go through Python floats, min and list.index, so ties and NaN
    (an empty span) resolve the same way in every path.
    """
    if example.task_type == "language_modeling":
        start, end = example.starts[0], example.ends[0]
        return bool(torch.equal(predictions[0, start - 1:end - 1], input_ids[0, start:end]))
    mean_losses = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(example.starts, example.ends))]
    return mean_losses.index(min(mean_losses)) == example.gold


@torch.no_grad()
def evaluate_example(idx, model, tokenizer, data, device, task_meta):
    """True when the model gets example idx of data right (one forward for all of its options)."""
    return evaluate_examples([idx], model, tokenizer, data, device, task_meta, pack_tokens=0)[idx]


@torch.no_grad()
def evaluate_examples(indices, model, tokenizer, data, device, task_meta, pack_tokens=None):
    """
    {idx: verdict} for the given examples. pack_tokens <= 0: one forward per example (None: the
    device's default, see default_pack_tokens). Otherwise the examples are sorted by length (a
    window at a time) and as many as fit in pack_tokens (rows x longest row) share a forward (a
    larger example goes alone).
    """
    max_len, pad = context_limit(model), tokenizer.get_bos_token_id()
    pack_tokens = default_pack_tokens(device) if pack_tokens is None else pack_tokens
    verdicts = {}
    for window_start in range(0, len(indices), PREPARE_WINDOW):
        window = [prepare_example(i, tokenizer, data, task_meta, max_len) for i in indices[window_start:window_start + PREPARE_WINDOW]]
        for group in _pack(window, pack_tokens):
            rows = [row for example in group for row in example.tokens]
            input_ids = stack_sequences(rows, pad)
            losses, predictions = forward_model(model, input_ids.to(device))
            losses, predictions = losses.cpu(), predictions.cpu()  # one device sync per forward
            first_row = 0
            for example in group:
                span = slice(first_row, first_row + len(example.tokens))
                verdicts[example.idx] = judge(example, losses[span], predictions[span], input_ids[span])
                first_row = span.stop
    return verdicts


def default_pack_tokens(device):
    """
    Packing pays where a forward has a fixed cost to amortize (a GPU's kernel launches and idle
    lanes); on CPU time is linear in tokens, so there it only adds padding (dev/LOG.md 2026-12-01).
    """
    return DEFAULT_PACK_TOKENS if torch.device(device).type == "cuda" else 0


def _pack(examples, pack_tokens):
    """
    Groups of examples for one forward each: longest first, an example joins the current group
    while the group stays within pack_tokens and mostly real tokens (every padded position costs
    a full forward and a vocabulary-wide logit row, so mixing lengths would waste more than one
    forward per example costs).
    """
    if pack_tokens <= 0:
        return [[example] for example in examples]
    groups, group, real_tokens, rows = [], [], 0, 0
    for example in sorted(examples, key=lambda e: e.padded_len, reverse=True):
        longest = group[0].padded_len if group else example.padded_len
        new_rows, new_real = rows + len(example.tokens), real_tokens + sum(len(row) for row in example.tokens)
        if group and (new_rows * longest > pack_tokens or new_rows * longest > (1 + MAX_PADDING_FRACTION) * new_real):
            groups.append(group)
            group, new_rows, new_real = [], len(example.tokens), sum(len(row) for row in example.tokens)
        group.append(example)
        rows, real_tokens = new_rows, new_real
    return groups + ([group] if group else [])


def evaluate_task(model, tokenizer, data, device, task_meta, pack_tokens=None):
    """Accuracy on data; under torchrun rank r takes examples r, r+W, ... and the verdicts are summed over ranks."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    verdicts = evaluate_examples(list(range(rank, len(data), world_size)), model, tokenizer, data, device, task_meta, pack_tokens)
    correct = torch.zeros(len(data), dtype=torch.float32)
    for idx, verdict in verdicts.items():
        correct[idx] = float(verdict)
    correct = correct.to(device)
    if world_size > 1:
        dist.barrier()
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()


def centered_accuracy(accuracy, random_baseline_percent):
    """0 at chance, 1 at perfect: (acc - b) / (1 - b) with the baseline b as a fraction."""
    baseline = 0.01 * random_baseline_percent
    return (accuracy - baseline) / (1.0 - baseline)


# -----------------------------------------------------------------------------
# The eval bundle


@dataclass
class CoreTask:
    label: str
    task_meta: dict  # task_type, dataset_uri, num_fewshot, continuation_delimiter
    random_baseline: float  # percent
    data_path: str


def read_bundle(bundle_dir):
    """The tasks of a bundle in core.yaml order; anything missing or malformed is one MissingInputError."""
    def broken(reason):
        return MissingInputError(f"eval bundle {bundle_dir} is incomplete or corrupt: {reason}; delete it and run again "
                                 f"(it is downloaded from {EVAL_BUNDLE_URL}, or rebuilt offline by `{OFFLINE_BUILDER}`)")

    try:
        with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
            config = yaml.safe_load(f)
        with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8", newline="") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (OSError, yaml.YAMLError, KeyError, ValueError, TypeError) as error:
        raise broken(f"{type(error).__name__}: {error}") from None
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise broken("core.yaml has no icl_tasks list")
    tasks = []
    for entry in entries:
        try:
            label, task_type = entry["label"], entry["icl_task_type"]
            meta = {"task_type": task_type, "dataset_uri": entry["dataset_uri"], "num_fewshot": int(entry["num_fewshot"][0]),
                    "continuation_delimiter": entry.get("continuation_delimiter", " ")}
        except (KeyError, TypeError, IndexError, ValueError):
            raise broken(f"core.yaml entry {entry!r} lacks label, dataset_uri, num_fewshot or icl_task_type") from None
        if task_type not in TASK_TYPES:
            raise broken(f"task {label}: unknown icl_task_type {task_type!r}")
        if label not in baselines:
            raise broken(f"eval_meta_data.csv has no random baseline for {label}")
        data_path = os.path.join(bundle_dir, "eval_data", meta["dataset_uri"])
        if not os.path.isfile(data_path):
            raise broken(f"{data_path} is missing")
        tasks.append(CoreTask(label, meta, baselines[label], data_path))
    return tasks


def place_eval_bundle(zip_path, target_dir):
    """
    Unzip the downloaded bundle beside target_dir, check every member's CRC-32 and that the
    bundle reads (core.yaml, baselines, every task file), then rename it into place. A bad zip
    is deleted (the next run downloads again) and nothing is left at target_dir.
    """
    staging = tempfile.mkdtemp(prefix=".eval_bundle-", dir=os.path.dirname(target_dir))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; it may become the bundle directory
    try:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                bad_member = archive.testzip()
                if bad_member is not None:
                    raise zipfile.BadZipFile(f"CRC mismatch in {bad_member}")
                archive.extractall(staging)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as error:
            os.remove(zip_path)
            raise MissingInputError(f"the downloaded eval bundle {zip_path} is corrupt ({error}); deleted it: run again "
                                    f"to download {EVAL_BUNDLE_URL} afresh") from None
        inner = os.path.join(staging, BUNDLE_DIRNAME)
        try:
            read_bundle(inner if os.path.isdir(inner) else staging)
        except MissingInputError as error:
            os.remove(zip_path)
            raise MissingInputError(f"the downloaded eval bundle {zip_path} is not a CORE bundle ({error}); deleted it") from None
        os.rename(inner if os.path.isdir(inner) else staging, target_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_DOWNLOAD_FAILURE = {}  # url -> reason, so a process that found no network does not retry at every call


def bundle_url():
    """Where the eval bundle is downloaded from: $NANOCHAT_EVAL_BUNDLE_URL (a mirror) or upstream's."""
    return os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL


def download_bundle(base_dir):
    """$base_dir/eval_bundle, downloaded and placed if needed; None (with the reason remembered) when it cannot be."""
    url = bundle_url()
    target = os.path.join(base_dir, BUNDLE_DIRNAME)
    if url in _DOWNLOAD_FAILURE:
        return None
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            zip_path = download_file_with_lock(url, "eval_bundle.zip")
            break
        except OSError as error:  # urllib's URLError and a cut-short body are OSErrors
            reason = f"{type(error).__name__}: {error}"
            if attempt == DOWNLOAD_ATTEMPTS:
                _DOWNLOAD_FAILURE[url] = reason
                print0(f"Could not download the eval bundle from {url} ({reason})")
                return None
            time.sleep(attempt)
    with FileLock(target + ".lock"):  # a zip left by an earlier run that died before placing it is placed here too
        if not os.path.isdir(target):
            place_eval_bundle(zip_path, target)
    return target


def find_bundle(bundle_dir=None):
    """(directory, is_offline_reconstruction) of the bundle to evaluate on."""
    if bundle_dir is not None:
        if not os.path.isdir(bundle_dir):
            raise MissingInputError(f"no eval bundle at {bundle_dir}")
        return bundle_dir, os.path.exists(os.path.join(bundle_dir, OFFLINE_PROVENANCE))
    base_dir = get_base_dir()
    real = os.path.join(base_dir, BUNDLE_DIRNAME)
    offline = os.path.join(base_dir, OFFLINE_BUNDLE_DIRNAME)
    if os.path.isdir(real) or download_bundle(base_dir):
        return real, False
    if os.path.isdir(offline):
        print0(f"Using the offline reconstruction of the CORE tasks in {offline}")
        return offline, True
    raise MissingInputError(f"no CORE eval bundle: {real} is absent and {bundle_url()} cannot be downloaded "
                            f"({_DOWNLOAD_FAILURE.get(bundle_url())}); "
                            f"without internet, rebuild what exists offline with `{OFFLINE_BUILDER}`")


def core_label(num_tasks, offline):
    if num_tasks == NUM_CORE_TASKS and not offline:
        return "CORE"
    return f"CORE (partial: {num_tasks} of {NUM_CORE_TASKS} tasks{', offline reconstruction' if offline else ''})"


def load_task_data(data_path, max_per_task=-1):
    with open(data_path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def check_fewshot_fits(tasks, max_per_task):
    """
    Fail before any evaluation when max_per_task keeps fewer examples than a task's few-shot
    prompts need: they are drawn from the examples kept (as upstream does, so that verdicts match),
    k of them plus the example itself.
    """
    if max_per_task <= 0:
        return
    short = [task for task in tasks if task.task_meta["num_fewshot"] >= max_per_task]
    if short:
        needed = max(task.task_meta["num_fewshot"] for task in tasks) + 1
        names = ", ".join(f"{task.label} ({task.task_meta['num_fewshot']}-shot)" for task in short)
        raise ConfigError(f"CORE on {max_per_task} examples per task is too few for the few-shot prompts of {names}, "
                          f"which are drawn from the examples kept: evaluate at least {needed} per task "
                          f"(base_eval --max-per-task, base_train --core-metric-max-per-task), or all (-1)")


def evaluate_core(model, tokenizer, device, max_per_task=-1, bundle_dir=None, pack_tokens=None):
    """
    Every task of the bundle (see find_bundle for where it comes from), each cropped to
    max_per_task examples after a fixed shuffle (-1: all); pack_tokens as in evaluate_examples. Returns {results: {label: accuracy},
    centered_results: {label: centered accuracy}, core_metric: their mean, num_tasks, label:
    "CORE" or the partial/offline label, details: {label: {accuracy, centered, seconds,
    examples, examples_per_second, task_type, num_fewshot}}, bundle_dir, offline}.
    """
    bundle_dir, offline = find_bundle(bundle_dir)
    tasks = read_bundle(bundle_dir)
    check_fewshot_fits(tasks, max_per_task)
    results, centered_results, details = {}, {}, {}
    for task in tasks:
        meta = task.task_meta
        print0(f"Evaluating: {task.label} ({meta['num_fewshot']}-shot, type: {meta['task_type']})... ", end="", flush=True)
        start = time.time()
        data = load_task_data(task.data_path, max_per_task)
        accuracy = evaluate_task(model, tokenizer, data, device, meta, pack_tokens)
        seconds = time.time() - start
        centered = centered_accuracy(accuracy, task.random_baseline)
        results[task.label], centered_results[task.label] = accuracy, centered
        details[task.label] = {"accuracy": accuracy, "centered": centered, "seconds": seconds, "examples": len(data),
                               "examples_per_second": len(data) / max(seconds, 1e-9), "task_type": meta["task_type"],
                               "num_fewshot": meta["num_fewshot"]}
        print0(f"accuracy: {accuracy:.4f} | centered: {centered:.4f} | time: {seconds:.2f}s | {len(data) / max(seconds, 1e-9):.1f} examples/s")
    core_metric = sum(centered_results.values()) / len(centered_results)
    return {"results": results, "centered_results": centered_results, "core_metric": core_metric,
            "num_tasks": len(results), "label": core_label(len(results), offline), "details": details,
            "bundle_dir": bundle_dir, "offline": offline}
