"""
Evaluate a chat model (midtrained, SFT or RL) on the chat tasks and compute ChatCORE: ARC-Easy,
ARC-Challenge and MMLU by the answer letter's logit, GSM8K, HumanEval and SpellingBee by sampled
completions (pass@n, calculator on). README.md ("Phases") defines ChatCORE.

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

import sys

from nanochat.precision import add_dtype_flag, apply_dtype_flag, check_dtype_flag

apply_dtype_flag(sys.argv[1:])  # -d/--dtype sets NANOCHAT_DTYPE before nanochat.common fixes the compute dtype

import argparse
import time


from nanochat.common import (
    COMPUTE_DTYPE, ConfigError, autodetect_device_type, compute_cleanup, compute_init, parse_flags, print0, run_script,
)
from nanochat.engine import Engine
from nanochat.report import get_report
from tasks.evaluation import DEFAULT_TASKS, TASK_DATA, TASKS, chatcore_metric, evaluate_task
from tasks.evaluation import run_chat_eval  # noqa: F401  (upstream's chat_sft imports it from here)
from nanochat.checkpoint_manager import load_model
from tasks.provenance import data_source



def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a chat model on the chat tasks (and ChatCORE)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-i", "--source", type=str, required=True, choices=["mid", "sft", "rl"],
                        help="which phase's model to evaluate")
    parser.add_argument("-a", "--task-name", type=str, default=None,
                        help=f"tasks separated by | (None = all of {'|'.join(DEFAULT_TASKS)})")
    add_dtype_flag(parser)
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
    check_dtype_flag(args.dtype)
    device_type = args.device_type or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
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
