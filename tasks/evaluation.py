"""
Scoring a chat model on the chat tasks: categorical tasks (ARC, MMLU) by the answer letter with the
highest logit at the last prompt position; generative tasks (GSM8K, HumanEval, SpellingBee) by
pass@n over Engine samples with the calculator tool. ChatCORE is the mean over the six default
tasks of the accuracy centered by the task's chance level. Problems are strided over the ranks
when torch.distributed is initialized. Used by scripts.chat_eval and chat_sft's evaluations.
"""

import math
import sys
from functools import partial

import torch
import torch.distributed as dist

from nanochat.common import ConfigError, get_dist_info, print0
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
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
