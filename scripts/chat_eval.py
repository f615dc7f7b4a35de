"""
Evaluate a chat model (midtrained, SFT or RL) on the chat tasks and compute ChatCORE.

    categorical  ARC-Easy, ARC-Challenge, MMLU: one forward per batch of prompts; the answer is
                 the answer letter with the highest logit at the last prompt position
    generative   GSM8K, HumanEval, SpellingBee: sample num_samples completions per problem with
                 the Engine (calculator tool on); a problem passes if any sample passes (pass@n)

ChatCORE, when all six default tasks ran, is the mean over tasks of the accuracy centered by the
task's chance level: (accuracy - baseline) / (1 - baseline), baseline 0.25 for the 4-choice
tasks and 0 for the generative ones. So 0 is chance and 1 is perfect on every task.

Run it:
    python -m scripts.chat_eval -i sft                                   # all six tasks and ChatCORE
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K"               # some tasks (| separated)
    python -m scripts.chat_eval -i sft -a GSM8K -n 8 -t 1.0              # pass@8 with sampling
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft
    python -m scripts.chat_eval -i sft --device-type cpu -x 32 -m 128    # CPU: 32 problems per task

Reads  $NANOCHAT_BASE_DIR/<source>_checkpoints/<model-tag>/, the tokenizer, and the task data
       (task_data/ and words_alpha.txt: downloaded on first use, or the offline copies of
       `python -m dev.offline_data tasks`; results on offline copies are labelled as such).
Writes the "Chat evaluation <source>" section of the report.
"""

import argparse
import math
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

from nanochat.common import (
    COMPUTE_DTYPE, ConfigError, autodetect_device_type, compute_cleanup, compute_init, get_dist_info,
    parse_flags, print0, run_script,
)
from nanochat.engine import Engine
from nanochat.report import get_report
from scripts.chat_cli import load_chat_model
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.provenance import data_source
from tasks.spellingbee import WORD_LIST_FILENAME, SpellingBee

# The evaluation tasks, by the names -a takes.
TASKS = {
    "HumanEval": HumanEval,
    "MMLU": partial(MMLU, subset="all", split="test"),
    "ARC-Easy": partial(ARC, subset="ARC-Easy", split="test"),
    "ARC-Challenge": partial(ARC, subset="ARC-Challenge", split="test"),
    "GSM8K": partial(GSM8K, subset="main", split="test"),
    "SpellingBee": partial(SpellingBee, size=256, split="test"),
}
DEFAULT_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
# Chance accuracy: a uniform guess among 4 letters; open-ended answers are never right by chance.
BASELINE_ACCURACY = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25,
                     "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
# Where each task's data lives: (repo, subset, split) under task_data/, or the word list.
TASK_DATA = {
    "HumanEval": ("openai/openai_humaneval", "openai_humaneval", "test"),
    "MMLU": ("cais/mmlu", "all", "test"),
    "ARC-Easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "ARC-Challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "GSM8K": ("openai/gsm8k", "main", "test"),
    "SpellingBee": WORD_LIST_FILENAME,
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a chat model on the chat tasks (and ChatCORE)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-i", "--source", type=str, required=True, choices=["mid", "sft", "rl"],
                        help="which phase's model to evaluate")
    parser.add_argument("-a", "--task-name", type=str, default=None,
                        help=f"tasks separated by | (None = all of {'|'.join(DEFAULT_TASKS)})")
    parser.add_argument("-d", "--dtype", type=str, default="", choices=["", *DTYPES],
                        help="compute dtype; nanochat fixes it at import from NANOCHAT_DTYPE (else bf16 on SM80+ "
                             "CUDA, fp32 elsewhere), so this only checks it (empty = whatever that gives)")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512, help="longest completion (generative tasks)")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="completions per problem, pass@n (generative tasks)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="problems per forward pass (categorical tasks)")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint directory (None = the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (None = the last one)")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="evaluate at most this many problems per task (None = all)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    args = parse_flags(parser, argv)
    for flag, value in (("--batch-size", args.batch_size), ("--num-samples", args.num_samples),
                        ("--max-new-tokens", args.max_new_tokens), ("--max-problems", args.max_problems)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.temperature < 0 or args.top_k < 0:
        raise ConfigError(f"--temperature and --top-k must be >= 0, got {args.temperature} and {args.top_k}")
    return args


def select_tasks(task_name):
    """The task names of -a in order (duplicates dropped); every name must be in the registry."""
    if task_name is None:
        return list(DEFAULT_TASKS)
    names = list(dict.fromkeys(name.strip() for name in task_name.split("|") if name.strip()))
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ConfigError(f"unknown task {', '.join(unknown) or repr(task_name)} in -a; choose from {'|'.join(TASKS)}")
    return names


def check_dtype(name):
    """-d names the dtype this process computes in, or is empty; anything else cannot be honoured now."""
    if name and DTYPES[name] != COMPUTE_DTYPE:
        current = str(COMPUTE_DTYPE).removeprefix("torch.")
        raise ConfigError(f"-d {name} asks for another compute dtype than this process has ({current}); nanochat "
                          f"fixes it at import: run with NANOCHAT_DTYPE={name} instead")


# -----------------------------------------------------------------------------
# Scoring


def _all_reduce_counts(passed, total, device):
    """Sum (passed, total) over the ranks (a no-op on one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return passed, total
    counts = torch.tensor([passed, total], dtype=torch.long, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return int(counts[0]), int(counts[1])


def _num_problems(task_object, max_problems):
    num_problems = len(task_object) if max_problems is None else min(len(task_object), max_problems)
    if num_problems < 1:
        raise ConfigError(f"{type(task_object).__name__} has no problems to evaluate")
    return num_problems


def letter_token_id(tokenizer, letter, cache):
    """The one token id of an answer letter; a letter that is several tokens cannot be scored by one logit."""
    if letter not in cache:
        ids = tokenizer.encode(letter)
        if len(ids) != 1:
            raise ConfigError(f"answer letter {letter!r} encodes to {len(ids)} tokens {ids} with this tokenizer; "
                              "categorical scoring reads one logit per letter, so every letter must be a single token")
        cache[letter] = ids[0]
    return cache[letter]


@torch.inference_mode()
def run_categorical_eval(task_object, tokenizer, model, batch_size, max_problems=None):
    """
    Accuracy of the letter with the highest logit at each prompt's last position (the
    <|assistant_start|> token), among the letters the problem allows. Prompts are batched,
    right-padded with <|bos|> (causal attention: padding never changes earlier positions),
    and the batches are strided over the ranks.
    """
    _, rank, _, world_size = get_dist_info()
    device = model.get_device()
    bos = tokenizer.get_bos_token_id()
    num_problems = _num_problems(task_object, max_problems)
    letter_ids = {}
    passed = total = 0
    for batch_index in range(rank, math.ceil(num_problems / batch_size), world_size):
        first = batch_index * batch_size
        conversations = [task_object[i] for i in range(first, min(first + batch_size, num_problems))]
        prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
        width = max(len(prompt) for prompt in prompts)
        ids = torch.tensor([prompt + [bos] * (width - len(prompt)) for prompt in prompts], dtype=torch.long, device=device)
        logits = model(ids)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            candidates = [letter_token_id(tokenizer, letter, letter_ids) for letter in letters]
            choice = logits[row, len(prompt) - 1, candidates].argmax().item()
            passed += int(task_object.evaluate(conversation, letters[choice]))
            total += 1
    passed, total = _all_reduce_counts(passed, total, device)
    print0(f"Final: {passed}/{total} ({100 * passed / total:.2f}%)")
    return passed / total


class ProgressLine:
    """This rank's running pass count: rewritten in place on a terminal, a line per ~10% in a log."""

    def __init__(self, rank, num_problems):
        self.rank = rank
        self.every = max(1, num_problems // 10)
        self.interactive = sys.stdout.isatty()
        self.printed = None

    def update(self, passed, total, last=False):
        text = f"Rank {self.rank} | {passed}/{total} ({100 * passed / max(total, 1):.2f}%)"
        if self.interactive:
            print(f"\r\033[K{text}", end="\n" if last else "", flush=True)
        elif (last or total % self.every == 0) and total != self.printed:
            print(text, flush=True)
            self.printed = total


def run_generative_eval(task_object, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k,
                        max_problems=None):
    """
    pass@num_samples: the fraction of problems for which at least one of num_samples
    completions passes task_object.evaluate. Problems are strided over the ranks; the
    completion is the decoded generated part only (without the prompt).
    """
    _, rank, _, world_size = get_dist_info()
    num_problems = _num_problems(task_object, max_problems)
    progress = ProgressLine(rank, len(range(rank, num_problems, world_size)))
    passed = total = 0
    for index in range(rank, num_problems, world_size):
        conversation = task_object[index]
        prompt = tokenizer.render_for_completion(conversation)
        samples, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k)
        completions = [tokenizer.decode(sample[len(prompt):]) for sample in samples]
        # every sample is scored (as upstream), so a sandboxed evaluation's cost does not depend on luck
        outcomes = [task_object.evaluate(conversation, completion) for completion in completions]
        passed += int(any(outcomes))
        total += 1
        progress.update(passed, total)
    progress.update(passed, total, last=True)
    passed, total = _all_reduce_counts(passed, total, model.get_device())
    print0("=" * 50)
    print0(f"Final: {passed}/{total} ({100 * passed / total:.2f}%)")
    return passed / total


def evaluate_task(task_object, model, tokenizer, engine, batch_size=1, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None):
    """The accuracy of one task object, by its eval_type."""
    if task_object.eval_type == "categorical":
        return run_categorical_eval(task_object, tokenizer, model, batch_size, max_problems=max_problems)
    if task_object.eval_type == "generative":
        return run_generative_eval(task_object, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k,
                                   max_problems=max_problems)
    raise ValueError(f"{type(task_object).__name__} has eval_type {task_object.eval_type!r}, not categorical or generative")


def run_chat_eval(task_name, model, tokenizer, engine, batch_size=1, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None):
    """Accuracy of the model on the registry task `task_name` (chat_sft calls this during training)."""
    if task_name not in TASKS:
        raise ConfigError(f"unknown task {task_name!r}; choose from {'|'.join(TASKS)}")
    return evaluate_task(TASKS[task_name](), model, tokenizer, engine, batch_size=batch_size, num_samples=num_samples,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, max_problems=max_problems)


def chatcore_metric(results):
    """
    Mean over the default tasks of (accuracy - baseline) / (1 - baseline); None unless every
    default task is in results (a mean over fewer tasks would not be comparable).
    """
    if any(name not in results for name in DEFAULT_TASKS):
        return None
    centered = [(results[name] - BASELINE_ACCURACY[name]) / (1.0 - BASELINE_ACCURACY[name]) for name in DEFAULT_TASKS]
    return sum(centered) / len(centered)


# -----------------------------------------------------------------------------
# Where the data came from


# -----------------------------------------------------------------------------
# The run


def metric_key(name, notes):
    """'ARC-Easy' or 'ARC-Easy (32 of 2,376 problems; offline copy)': the report table carries the label."""
    return f"{name} ({'; '.join(notes)})" if notes else name


def result_lines(results, sizes, sources, max_problems):
    """{labelled task name: accuracy} and the ChatCORE dict ({} unless all default tasks ran)."""
    accuracies = {}
    for name, accuracy in results.items():
        notes = []
        if max_problems is not None and max_problems < sizes[name]:
            notes.append(f"{max_problems:,} of {sizes[name]:,} problems")
        if sources.get(name):
            notes.append(sources[name].kind)
        accuracies[metric_key(name, notes)] = accuracy
    chatcore = chatcore_metric(results)
    if chatcore is None:
        return accuracies, {}
    notes = []
    if max_problems is not None and any(max_problems < sizes[name] for name in DEFAULT_TASKS):
        notes.append(f"at most {max_problems:,} problems per task")
    offline = [name for name in DEFAULT_TASKS if sources.get(name)]
    if offline:
        notes.append(f"offline data for {', '.join(offline)}")
    return accuracies, {metric_key("ChatCORE metric", notes): chatcore}


def data_note(sources):
    """Markdown naming the tasks that ran on offline copies or substitutes, or '' when none did."""
    if not any(sources.values()):
        return ""
    lines = ["Task data that is not the hub's download:"]
    lines += [f"- data of {name}: {source.kind}: {source.description}" for name, source in sources.items() if source]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    task_names = select_tasks(args.task_name)
    check_dtype(args.dtype)
    device_type = args.device_type or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, meta = load_chat_model(args.source, device, model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)

    # Load every task first, so missing data stops the run before any evaluation time is spent.
    task_objects = {name: TASKS[name]() for name in task_names}
    sources = {name: data_source(TASK_DATA[name]) for name in task_names}
    results, sizes = {}, {}
    for name, task_object in task_objects.items():
        sizes[name] = len(task_object)
        if sources[name]:
            print0(f"{name}: {sources[name].kind}: {sources[name].description}")
        start = time.time()
        results[name] = evaluate_task(task_object, model, tokenizer, engine, batch_size=args.batch_size,
                                      num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_k=args.top_k, max_problems=args.max_problems)
        num_problems = min(sizes[name], args.max_problems or sizes[name])
        print0(f"{name}: {num_problems} problems in {time.time() - start:.1f}s")
        print0(f"{name} accuracy: {100 * results[name]:.2f}%")

    accuracies, chatcore = result_lines(results, sizes, sources, args.max_problems)
    print0("=" * 50)
    for key, value in {**accuracies, **chatcore}.items():
        print0(f"{key}: {value:.4f}")
    note = data_note(sources)
    if note:
        print0(note, end="")
    get_report().log(section=f"Chat evaluation {args.source}", data=[
        dict(vars(args), dtype=str(COMPUTE_DTYPE).removeprefix("torch."), checkpoint_step=meta.get("step")),
        accuracies, chatcore, note,
    ])
    compute_cleanup()


if __name__ == "__main__":
    run_script(main, "chat_eval")
