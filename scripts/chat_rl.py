"""
Reinforcement learning on GSM8K from the SFT model: on-policy REINFORCE with a mean baseline
(upstream's "GRPO"; README.md, "How RL trains"). Each step samples --num-samples answers to
--examples-per-step questions, rewards a correct "#### <number>" and trains on the sampled tokens.

Run it:
    python -m scripts.chat_rl                                             # one GPU, from the SFT model
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=rl1
    python -m scripts.chat_rl --device-type=cpu --examples-per-step=2 --num-samples=4 \\
        --device-batch-size=4 --max-new-tokens=64 --num-steps=10 --eval-every=5 --eval-examples=8   # CPU
    python -m scripts.chat_rl ... --save-every=5 --resume-from-step=5     # continue a run

Reads  $NANOCHAT_BASE_DIR/chatsft_checkpoints/ (--source mid: mid_checkpoints/), tokenizer/ and
       task_data/openai--gsm8k/ (offline: the labelled copies of `python -m dev.offline_data tasks`).
Writes $NANOCHAT_BASE_DIR/chatrl_checkpoints/<model-tag or d<depth>>/{model,meta,optim}_<step>.*
       and the "Chat RL" report section.
"""

import dataclasses
import os
import sys

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

from nanochat.precision import apply_dtype_flag, check_dtype_flag  # noqa: E402

apply_dtype_flag(sys.argv[1:])  # -d/--dtype sets NANOCHAT_DTYPE before nanochat.common fixes the compute dtype

import time
from dataclasses import dataclass, field

import torch

from nanochat.checkpoint_manager import build_model, checkpoints_dir_for, locate_checkpoint
from nanochat.common import (
    COMPUTE_DTYPE, ConfigError, compute_cleanup, parse_flags, print0, print_banner, run_script,
)
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.resume import check_resume_step, load_resumable, load_resumable_optimizer, save_resumable
from nanochat.training import (
    add_checkpoint_flags, add_optimizer_flags, add_source_flags, all_reduce_floats, build_post_training_optimizer,
    init_runtime, init_wandb, linear_decay_lr, phase_parser, synchronize, update_weights,
)
from tasks.gsm8k import GSM8K
from tasks.provenance import data_source

SOURCES = ("mid", "sft")  # phases whose model RL can start from
EVAL_SEED = 42  # every test problem is sampled with the same seed (the Engine's default), as upstream


def parse_args(argv=None):
    parser = phase_parser("Reinforcement learning on GSM8K (REINFORCE with a mean baseline)")
    parser.add_argument("--source", type=str, default="sft", choices=SOURCES, help="phase whose model to train")
    add_source_flags(parser, "source model")
    # horizon and batch
    parser.add_argument("--num-epochs", type=int, default=1, help="passes over GSM8K train")
    parser.add_argument("--num-steps", type=int, default=-1,
                        help="optimizer steps (-1 = (train problems // examples per step) * epochs)")
    parser.add_argument("--device-batch-size", type=int, default=8,
                        help="rows per training forward pass; also k of the pass@k evaluation")
    parser.add_argument("--examples-per-step", type=int, default=16, help="questions per optimizer step, all ranks together")
    parser.add_argument("--num-samples", type=int, default=16, help="sampled answers per question")
    # sampling (rollouts and evaluation)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest sampled answer, in tokens")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    # optimization
    add_optimizer_flags(parser, init_lr_frac=0.05)
    # evaluation and saving
    parser.add_argument("--eval-every", type=int, default=60, help="pass@k on GSM8K test every N steps (-1 = off)")
    parser.add_argument("--eval-examples", type=int, default=400, help="GSM8K test problems per evaluation")
    add_checkpoint_flags(parser, save_every=60)
    args = parse_flags(parser, argv)
    check_dtype_flag(args.dtype)
    return args


# -----------------------------------------------------------------------------
# The math of one update: rollouts as tensors, advantages, the policy-gradient loss


def rollout_seed(step, example_index, sampling_step=0):
    """The sampling seed of one question's rollouts (a tuple of ints hashes the same in every process)."""
    return hash((step, example_index, sampling_step)) & 0x7FFFFFFF


def rollout_tensors(sequences, masks, pad_id, device=None):
    """(inputs, targets) of prompt+answer rows and their Engine masks (1 = sampled), padded with pad_id;
    targets are -1 wherever the predicted token was not sampled, so only sampled tokens train."""
    longest = max(len(sequence) for sequence in sequences)
    ids = torch.tensor([s + [pad_id] * (longest - len(s)) for s in sequences], dtype=torch.long, device=device)
    sampled = torch.tensor([m + [0] * (longest - len(m)) for m in masks], dtype=torch.long, device=device)
    inputs = ids[:, :-1]
    targets = ids[:, 1:].clone()
    targets[sampled[:, 1:] == 0] = -1
    return inputs, targets


def advantages_from_rewards(rewards):
    """REINFORCE with the question's mean reward as the baseline (no division by the std)."""
    return rewards - rewards.mean()


def policy_gradient_loss(token_log_probs, targets, advantages, normalizer):
    """-sum of log p(token) x its row's advantage over trained tokens, / (their number x normalizer: passes per
    question x questions per rank, so that the accumulated gradient is the mean over the rank's questions)."""
    trained = targets >= 0
    num_trained = trained.sum().clamp(min=1)
    weighted = torch.where(trained, token_log_probs, 0.0) * advantages.unsqueeze(-1)
    return -weighted.sum() / (num_trained * normalizer)


# -----------------------------------------------------------------------------
# Setup


def check_flags(args, world_size):
    """Flag combinations that cannot work, each one line before anything is loaded."""
    positive = ["device_batch_size", "examples_per_step", "num_samples", "max_new_tokens", "num_epochs"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.examples_per_step % world_size:
        raise ConfigError(f"--examples-per-step={args.examples_per_step} must be a multiple of the number of ranks ({world_size})")
    if args.num_samples % args.device_batch_size:
        raise ConfigError(f"--num-samples={args.num_samples} must be a multiple of --device-batch-size={args.device_batch_size} "
                          "(the samples of a question are trained in passes of that many rows)")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if args.eval_every > 0 and args.eval_examples < 1:
        raise ConfigError(f"--eval-examples must be >= 1 when evaluating, got {args.eval_examples}; or pass --eval-every=-1")


@dataclass
class Source:  # the checkpoint RL starts from
    phase: str
    checkpoint_dir: str
    step: int


@dataclass
class Plan:
    num_steps: int
    examples_per_rank: int
    passes_per_question: int
    num_train_problems: int


def plan_run(args, num_train_problems, world_size):
    derived = (num_train_problems // args.examples_per_step) * args.num_epochs
    num_steps = args.num_steps if args.num_steps > 0 else derived
    if num_steps < 1:
        raise ConfigError(f"GSM8K train has {num_train_problems} problems, fewer than --examples-per-step="
                          f"{args.examples_per_step}: lower it or pass --num-steps")
    if args.resume_from_step >= num_steps - 1:
        raise ConfigError(f"--resume-from-step={args.resume_from_step} leaves nothing to do: this run has {num_steps} steps "
                          f"(0..{num_steps - 1}); resume with the horizon flags of the original run")
    how = "user-provided" if args.num_steps > 0 else f"{num_train_problems} problems // {args.examples_per_step} x {args.num_epochs} epochs"
    print0(f"Number of steps: {num_steps} ({how})")
    return Plan(num_steps, args.examples_per_step // world_size, args.num_samples // args.device_batch_size,
                num_train_problems)


@dataclass
class LoopState:
    """What a checkpoint carries besides weights and optimizer: saved in its meta as loop_state."""
    step: int = 0  # the next step to run
    example_position: int = 0  # global position of the next question; question = position % len(train)
    mean_reward: float | None = None  # of the last step
    pass_at_k: list = field(default_factory=list)  # of the last evaluation


def resume(args, checkpoint_dir, model, plan, runtime):
    """The RL checkpoint of --resume-from-step into the model; returns the loop state to continue with."""
    meta, loop, _ = load_resumable(checkpoint_dir, args.resume_from_step, model, LoopState, runtime)
    if meta.get("num_steps") != plan.num_steps:
        raise ConfigError(f"the checkpoint at step {args.resume_from_step} belongs to a run of {meta.get('num_steps')} "
                          f"steps, these flags give {plan.num_steps}: resume with the original "
                          "--examples-per-step/--num-epochs/--num-steps")
    loop.step = args.resume_from_step + 1  # a checkpoint is saved after its step ran
    return loop


# -----------------------------------------------------------------------------
# Rollouts and evaluation


def sample_answers(engine, tokenizer, conversation, num_samples, args, seed):
    """(prompt ids, sequences = prompt + answer ids, Engine masks, answers as text): one prefill, num_samples rows."""
    prompt = tokenizer.render_for_completion(conversation)
    sequences, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=args.max_new_tokens,
                                             temperature=args.temperature, top_k=args.top_k, seed=seed)
    answers = [tokenizer.decode(sequence[len(prompt):]) for sequence in sequences]
    return prompt, sequences, masks, answers


@dataclass
class Rollout:
    sequences: list
    inputs: torch.Tensor
    targets: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    num_generated: int  # tokens the Engine produced for this question (sampled and forced)


@torch.no_grad()
def rollout(engine, tokenizer, task, example_index, step, args, device):
    conversation = task[example_index]
    prompt, sequences, masks, answers = sample_answers(engine, tokenizer, conversation, args.num_samples, args,
                                                       seed=rollout_seed(step, example_index))
    rewards = torch.tensor([task.reward(conversation, answer) for answer in answers], dtype=torch.float, device=device)
    inputs, targets = rollout_tensors(sequences, masks, tokenizer.encode_special("<|assistant_end|>"), device)
    num_generated = sum(len(sequence) - len(prompt) for sequence in sequences)
    return Rollout(sequences, inputs, targets, rewards, advantages_from_rewards(rewards), num_generated)


@torch.no_grad()
def evaluate_pass_at_k(engine, tokenizer, task, args, runtime):
    """
    pass@k for k = 1..device_batch_size on the first --eval-examples test problems (strided over
    ranks): the fraction of problems with a correct answer among the first k samples.
    """
    k_max = args.device_batch_size
    num_problems = min(args.eval_examples, len(task))
    solved = [0] * k_max
    for index in range(runtime.rank, num_problems, runtime.world_size):
        conversation = task[index]
        _, _, _, answers = sample_answers(engine, tokenizer, conversation, k_max, args, seed=EVAL_SEED)
        correct = [task.evaluate(conversation, answer) for answer in answers]
        for k in range(1, k_max + 1):
            solved[k - 1] += int(any(correct[:k]))
    num_here = len(range(runtime.rank, num_problems, runtime.world_size))
    *solved, num_counted = all_reduce_floats([*solved, num_here], runtime)
    return [s / num_counted for s in solved]


# -----------------------------------------------------------------------------
# One step


@dataclass
class StepResult:
    mean_reward: float  # over all ranks
    mean_sequence_length: float
    rollout_seconds: float
    train_seconds: float
    trained_tokens: int  # rows x positions through the training forward pass, all ranks
    generated_tokens: int  # all ranks


def train_step(model, engine, tokenizer, task, optimizer, scaler, loop, plan, args, runtime):
    """Rollouts and gradients for this rank's questions, then the update. Advances the example position."""
    step, device = loop.step, runtime.device
    rollout_seconds = train_seconds = 0.0
    rewards, lengths, trained_tokens, generated_tokens = [], [], 0, 0
    for example_step in range(plan.examples_per_rank):
        position = loop.example_position + runtime.rank + example_step * runtime.world_size
        synchronize(device)
        t0 = time.time()
        model.eval()
        batch = rollout(engine, tokenizer, task, position % len(task), step, args, device)
        synchronize(device)
        t1 = time.time()
        model.train()
        for pass_index in range(plan.passes_per_question):
            rows = slice(pass_index * args.device_batch_size, (pass_index + 1) * args.device_batch_size)
            inputs, targets = batch.inputs[rows], batch.targets[rows]
            token_log_probs = -model(inputs, targets, loss_reduction="none").view_as(inputs)
            loss = policy_gradient_loss(token_log_probs, targets, batch.advantages[rows],
                                        plan.passes_per_question * plan.examples_per_rank)
            (scaler.scale(loss) if scaler else loss).backward()
            print0(f"Step {step}/{plan.num_steps} | Example step {example_step} | Pass {pass_index} | "
                   f"loss: {loss.item():.6f} | Average reward: {batch.rewards[rows].mean().item()}")
        synchronize(device)
        rollout_seconds += t1 - t0
        train_seconds += time.time() - t1
        rewards.append(batch.rewards.mean().item())
        lengths.extend(len(sequence) for sequence in batch.sequences)
        trained_tokens += batch.inputs.numel()
        generated_tokens += batch.num_generated

    t0 = time.time()
    lrm = linear_decay_lr(step, plan.num_steps)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
    update_weights(model, optimizer, scaler, runtime.ddp)
    synchronize(device)
    train_seconds += time.time() - t0

    reward_sum, length_sum, num_lengths, trained_tokens, generated_tokens = all_reduce_floats(
        [sum(rewards) / len(rewards), sum(lengths), len(lengths), trained_tokens, generated_tokens], runtime)
    loop.example_position += args.examples_per_step
    return StepResult(reward_sum / runtime.world_size, length_sum / num_lengths, rollout_seconds, train_seconds,
                      int(trained_tokens), int(generated_tokens)), lrm


def write_report(user_config, source, plan, loop, world_size):
    def labelled(split):
        data = data_source(("openai/gsm8k", "main", split))
        return f" (offline substitute: {data.substitute})" if data and data.substitute else ""

    get_report().log(section="Chat RL", data=[
        user_config,
        {
            "Source": f"{source.phase} {source.checkpoint_dir} step {source.step}",
            "GSM8K train": f"{plan.num_train_problems} problems{labelled('train')}",
            "GSM8K test": f"first {user_config['eval_examples']} problems for pass@k{labelled('test')}",
            "Number of steps": plan.num_steps,
            "DDP world size": world_size,
            "Final average reward": loop.mean_reward,
            **{f"Last pass@{k}": p for k, p in enumerate(loop.pass_at_k, start=1)},
        },
    ])


# -----------------------------------------------------------------------------
# Main


def main(argv=None):
    args = parse_args(argv)
    user_config = dict(vars(args))
    print_banner()
    runtime = init_runtime(args.device_type)
    check_flags(args, runtime.world_size)
    wandb_run = init_wandb("nanochat-rl", args.run, user_config, runtime.rank)

    source = Source(args.source, *locate_checkpoint(args.source, args.model_tag, args.model_step))
    train_task = GSM8K(subset="main", split="train")
    val_task = GSM8K(subset="main", split="test")
    print0(f"GSM8K: {len(train_task):,} train problems, {len(val_task):,} test problems")
    plan = plan_run(args, len(train_task), runtime.world_size)
    print0(f"Starting from {source.phase} checkpoint {source.checkpoint_dir} step {source.step}")
    model, tokenizer, _ = build_model(source.checkpoint_dir, source.step, runtime.device, phase="train")
    checkpoint_dir = os.path.join(checkpoints_dir_for("rl"), args.model_tag or f"d{model.config.n_layer}")
    resuming = args.resume_from_step >= 0
    if resuming:
        check_resume_step(checkpoint_dir, args.resume_from_step)
    loop = resume(args, checkpoint_dir, model, plan, runtime) if resuming else LoopState()
    optimizer = build_post_training_optimizer(args, model)
    if resuming:
        load_resumable_optimizer(optimizer, checkpoint_dir, args.resume_from_step, runtime)
    scaler = torch.amp.GradScaler(runtime.device_type) if COMPUTE_DTYPE == torch.float16 else None  # fp16 only
    engine = Engine(model, tokenizer)
    flops_per_token = model.estimate_flops()  # forward + backward; a sampled token costs about a third

    for step in range(loop.step, plan.num_steps):
        loop.step = step
        if args.eval_every > 0 and step % args.eval_every == 0:
            model.eval()
            loop.pass_at_k = evaluate_pass_at_k(engine, tokenizer, val_task, args, runtime)
            print0(f"Step {step} | " + ", ".join(f"Pass@{k}: {p:.4f}" for k, p in enumerate(loop.pass_at_k, start=1)))
            wandb_run.log({"step": step, **{f"pass@{k}": p for k, p in enumerate(loop.pass_at_k, start=1)}})

        result, lrm = train_step(model, engine, tokenizer, train_task, optimizer, scaler, loop, plan, args, runtime)
        loop.mean_reward = result.mean_reward
        dt = result.rollout_seconds + result.train_seconds
        flops = flops_per_token * (result.trained_tokens + result.generated_tokens / 3)
        mfu = 100 * flops / dt / (runtime.peak_flops * runtime.world_size)
        print0(f"Step {step}/{plan.num_steps} | Average reward: {result.mean_reward} | "
               f"Average sequence length: {result.mean_sequence_length:.2f} | lrm: {lrm:.4f} | "
               f"rollout: {result.rollout_seconds * 1000:.0f}ms | train: {result.train_seconds * 1000:.0f}ms | "
               f"tok/sec: {int(result.trained_tokens / dt):,} | mfu: {mfu:.2f}")
        wandb_run.log({"step": step, "reward": result.mean_reward, "sequence_length": result.mean_sequence_length,
                       "lrm": lrm, "rollout_time": result.rollout_seconds, "train_time": result.train_seconds})

        last_step = step == plan.num_steps - 1
        if last_step or (args.save_every > 0 and step > 0 and step % args.save_every == 0):
            save_resumable(checkpoint_dir, step, model, optimizer, loop, None, runtime, keep=args.keep_checkpoints,
                           user_config=user_config, num_steps=plan.num_steps, source=dataclasses.asdict(source))

    write_report(user_config, source, plan, loop, runtime.world_size)
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    run_script(main, "chat_rl")
