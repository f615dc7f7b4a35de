"""
Supervised fine-tuning (SFT): train the midtrained (or base) model on a small curated mixture of
conversations, one per row, with the loss only on what the assistant says (upstream's recipe of
January 2026; README.md, "Phases", lists the mixture, the schedule and later upstream's flags).

Run it:
    python -m scripts.chat_sft                                                  # one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run=sft
    python -m scripts.chat_sft --device-type=cpu --device-batch-size=4 --target-examples-per-step=16 \
        --num-iterations=100 --eval-every=50 --eval-steps=8 --eval-metrics-every=-1   # CPU
    python -m scripts.chat_sft ... --save-every=50 --resume-from-step=50          # continue a run

Reads  $NANOCHAT_BASE_DIR/<mid|base>_checkpoints/<model-tag>/, tokenizer/, task_data/,
       identity_conversations.jsonl (else a small offline identity set, labelled), words_alpha.txt.
Writes $NANOCHAT_BASE_DIR/chatsft_checkpoints/<model-tag or d<depth>>/{model,meta,optim}_<step>.* and the
"Chat SFT" report section.
"""

import os
import sys

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

from nanochat.precision import apply_dtype_flag, check_dtype_flag  # noqa: E402

apply_dtype_flag(sys.argv[1:])  # -d/--dtype sets NANOCHAT_DTYPE before nanochat.common fixes the compute dtype

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanochat.chat_data import loader_state_for_rank, padded_conversation_batches
from nanochat.common import (
    COMPUTE_DTYPE, ConfigError, compute_cleanup, get_base_dir, parse_flags, print0, print_banner, run_script,
)
from nanochat.engine import Engine
from nanochat.checkpoint_manager import load_model
from nanochat.report import get_report
from nanochat.resume import (
    check_resume_step, load_resumable, load_resumable_optimizer, save_resumable, warm_start_optimizer,
)
from nanochat.training import (
    add_checkpoint_flags, add_optimizer_flags, add_source_flags, build_post_training_optimizer, init_runtime, init_wandb,
    manage_garbage_collection, phase_parser, synchronize, update_weights, warmup_warmdown_lr,
)
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.mixtures import MixturePart, load_mixture, mixture_markdown
from tasks.identity import identity_conversations
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import WORD_LIST_FILENAME, SimpleSpelling, SpellingBee


def parse_args(argv=None):
    parser = phase_parser("Supervised fine-tuning on conversations")
    parser.add_argument("--source", type=str, default="mid", choices=("base", "mid"), help="the phase whose model is fine-tuned")
    add_source_flags(parser, "source model")
    # horizon and batch
    parser.add_argument("--num-epochs", type=int, default=1, help="passes over the mixture (when --num-iterations=-1)")
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = from --num-epochs)")
    parser.add_argument("--device-batch-size", type=int, default=4, help="conversations per micro-batch per rank")
    parser.add_argument("--target-examples-per-step", type=int, default=32, help="conversations per optimizer step, all ranks together")
    # optimization
    add_optimizer_flags(parser, init_lr_frac=0.02, init_lr_note=" (later upstream: 0.8)")
    parser.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear LR warmup")
    parser.add_argument("--warmdown-ratio", type=float, default=1.0, help="fraction of steps of linear LR warmdown at the end (1.0 = decay from the first step, the recipe's; later upstream: 0.5)")
    parser.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end as a fraction of the initial LR")
    parser.add_argument("--load-optimizer", type=int, default=0, choices=(0, 1), help="1 = warm-start the optimizer state from the source checkpoint, with this run's LRs (later upstream's default)")
    # mixture
    parser.add_argument("--mmlu-epochs", type=int, default=0, help="copies of MMLU auxiliary_train added to the mixture (later upstream: 3)")
    parser.add_argument("--gsm8k-epochs", type=int, default=1, help="copies of GSM8K main train in the mixture (later upstream: 4)")
    # evaluation and saving
    parser.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps and at the end (-1 = off)")
    parser.add_argument("--eval-steps", type=int, default=100, help="batches per validation loss")
    parser.add_argument("--eval-metrics-every", type=int, default=200, help="MMLU and ARC-Easy accuracy every N steps and at the end (-1 = off)")
    parser.add_argument("--eval-metrics-max-problems", type=int, default=1024, help="problems per accuracy evaluation")
    add_checkpoint_flags(parser)
    args = parse_flags(parser, argv)
    check_dtype_flag(args.dtype)
    return args


def training_mixture(args):
    return [
        MixturePart("ARC-Easy train", lambda: ARC(subset="ARC-Easy", split="train"), ("allenai/ai2_arc", "ARC-Easy", "train")),
        MixturePart("ARC-Challenge train", lambda: ARC(subset="ARC-Challenge", split="train"), ("allenai/ai2_arc", "ARC-Challenge", "train")),
        MixturePart("GSM8K main train", lambda: GSM8K(subset="main", split="train"), ("openai/gsm8k", "main", "train"),
                    copies=args.gsm8k_epochs),
        MixturePart("SmolTalk train (first 10K)", lambda: SmolTalk(split="train", stop=10_000),
                    ("HuggingFaceTB/smol-smoltalk", "default", "train")),
        MixturePart("identity conversations", identity_conversations),
        MixturePart("SimpleSpelling (300)", lambda: SimpleSpelling(size=300, split="train"), WORD_LIST_FILENAME),
        MixturePart("SpellingBee (300)", lambda: SpellingBee(size=300, split="train"), WORD_LIST_FILENAME),
        MixturePart("MMLU auxiliary_train", lambda: MMLU(subset="auxiliary_train", split="train"), ("cais/mmlu", "all", "auxiliary_train"),
                    copies=args.mmlu_epochs),
    ]


def validation_mixture():
    return [MixturePart("SmolTalk test", lambda: SmolTalk(split="test"), ("HuggingFaceTB/smol-smoltalk", "default", "test"))]


def check_args(args, world_size):
    examples_per_fwdbwd = args.device_batch_size * world_size
    if args.device_batch_size < 1 or args.target_examples_per_step < 1 or args.target_examples_per_step % examples_per_fwdbwd:
        raise ConfigError(f"--target-examples-per-step={args.target_examples_per_step} must be a positive multiple of "
                          f"device_batch_size * world_size = {args.device_batch_size} * {world_size} = {examples_per_fwdbwd}")
    if args.num_iterations < 0 and args.num_epochs < 1:
        raise ConfigError(f"--num-epochs={args.num_epochs}: pass at least 1, or an explicit --num-iterations")
    if args.eval_every > 0 and args.eval_steps < 1:
        raise ConfigError(f"--eval-steps={args.eval_steps}: pass at least 1, or --eval-every=-1")
    if args.gsm8k_epochs < 0 or args.mmlu_epochs < 0:
        raise ConfigError("--gsm8k-epochs and --mmlu-epochs count copies in the mixture: pass 0 or more")
    return args.target_examples_per_step // examples_per_fwdbwd


@dataclass
class LoopState:
    """What the loop carries from step to step; saved in every checkpoint's meta as loop_state."""
    step: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    metrics: dict = field(default_factory=dict)  # the last MMLU / ARC-Easy accuracies
    total_training_time: float = 0.0  # seconds, excluding the first 10 steps


def evaluate_val_loss(model, tokenizer, val_dataset, args, max_tokens, runtime):
    """Mean cross-entropy over --eval-steps batches of the validation mixture, averaged over ranks."""
    model.eval()
    batches = padded_conversation_batches(val_dataset, tokenizer, args.device_batch_size, max_tokens, device=runtime.device)
    losses = []
    with torch.no_grad():
        for _ in range(args.eval_steps):
            inputs, targets, _ = next(batches)
            losses.append(model(inputs, targets, loss_reduction="sum") / (targets >= 0).sum().clamp(min=1))
    val_loss = torch.stack(losses).mean()
    if runtime.ddp:
        dist.all_reduce(val_loss, op=dist.ReduceOp.SUM)  # gloo has no AVG
        val_loss = val_loss / runtime.world_size
    model.train()
    return val_loss.item()


def evaluate_metrics(model, tokenizer, engine, args):
    from tasks.evaluation import run_chat_eval  # imported when needed: evaluation pulls in every task's code

    model.eval()
    metrics = {}
    with torch.no_grad():
        for key, task_name in (("mmlu_acc", "MMLU"), ("arc_easy_acc", "ARC-Easy")):
            # no gradients are kept, so twice the training batch fits
            metrics[key] = run_chat_eval(task_name, model, tokenizer, engine, batch_size=2 * args.device_batch_size,
                                         max_problems=args.eval_metrics_max_problems)
    model.train()
    return metrics


def main(argv=None):
    args = parse_args(argv)
    user_config = dict(vars(args))
    print_banner()
    runtime = init_runtime(args.device_type)
    device = runtime.device
    grad_accum_steps = check_args(args, runtime.world_size)
    wandb_run = init_wandb("nanochat-sft", args.run, user_config, runtime.rank)

    model, tokenizer, _ = load_model(args.source, device, phase="train", model_tag=args.model_tag, step=args.model_step)
    max_tokens = model.config.sequence_len  # rows never outgrow the context the model was trained on
    checkpoint_dir = os.path.join(get_base_dir(), "chatsft_checkpoints", args.model_tag or f"d{model.config.n_layer}")
    resuming = args.resume_from_step >= 0
    if resuming:
        check_resume_step(checkpoint_dir, args.resume_from_step)
    train_mixture = load_mixture("Training mixture", training_mixture(args))
    val_mixture = load_mixture("Validation mixture", validation_mixture())
    num_iterations = args.num_iterations
    if num_iterations < 0:
        num_iterations = (len(train_mixture.task) // args.target_examples_per_step) * args.num_epochs
    if num_iterations < 1:
        raise ConfigError(f"{len(train_mixture.task):,} training rows make no step of --target-examples-per-step="
                          f"{args.target_examples_per_step}: pass --num-iterations or a smaller batch")
    if args.resume_from_step > num_iterations:
        raise ConfigError(f"--resume-from-step={args.resume_from_step} is past the end of this run ({num_iterations} steps); "
                          "resume with the horizon flags of the original run")
    print0(f"Gradient accumulation steps: {grad_accum_steps} | number of iterations: {num_iterations:,}")
    flops_per_token = model.estimate_flops()
    engine = Engine(model, tokenizer)

    loop, loader_state = LoopState(), None
    if resuming:
        _, loop, loader_states = load_resumable(checkpoint_dir, args.resume_from_step, model, LoopState, runtime)
        loader_state = loader_state_for_rank(loader_states, runtime.rank, runtime.world_size)
    optimizer = build_post_training_optimizer(args, model)
    if resuming:
        load_resumable_optimizer(optimizer, checkpoint_dir, args.resume_from_step, runtime)
    elif args.load_optimizer:
        warm_start_optimizer(optimizer, args.source, runtime, args.model_tag, args.model_step)
    scaler = torch.amp.GradScaler(runtime.device_type) if COMPUTE_DTYPE == torch.float16 else None  # fp16 only

    train_loader = padded_conversation_batches(train_mixture.task, tokenizer, args.device_batch_size, max_tokens,
                                               device=device, resume_state=loader_state)
    consumed_loader_state = loader_state
    first_step = loop.step
    mfu = 0.0

    while True:
        step = loop.step
        last_step = step == num_iterations
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            loop.val_loss = evaluate_val_loss(model, tokenizer, val_mixture.task, args, max_tokens, runtime)
            print0(f"Step {step:05d} | Validation loss: {loop.val_loss:.6f}")
            wandb_run.log({"step": step, "val_loss": loop.val_loss})
        if args.eval_metrics_every > 0 and (last_step or (step > 0 and step % args.eval_metrics_every == 0)):
            loop.metrics = evaluate_metrics(model, tokenizer, engine, args)
            print0(f"Step {step:05d} | " + ", ".join(f"{key}: {value:.6f}" for key, value in loop.metrics.items()))
            wandb_run.log({"step": step, **loop.metrics})

        periodic_save = args.save_every > 0 and step > 0 and step != args.resume_from_step and step % args.save_every == 0
        if last_step or periodic_save:
            save_resumable(checkpoint_dir, step, model, optimizer, loop, consumed_loader_state, runtime,
                           keep=args.keep_checkpoints, val_loss=loop.val_loss, **loop.metrics, user_config=user_config,
                           source=args.source, num_iterations=num_iterations)
        if last_step:
            break

        synchronize(device)
        t0 = time.time()
        num_tokens = torch.zeros((), dtype=torch.long, device=device)  # supervised targets, all ranks
        num_positions = 0  # tokens the model ran on, this rank
        for _ in range(grad_accum_steps):
            inputs, targets, consumed_loader_state = next(train_loader)
            supervised = (targets >= 0).sum()
            # the sum over the supervised targets, divided by their count: the mean cross-entropy, and 0
            # (not NaN) for a micro-batch whose assistant turns were all cut off by the context length
            loss = model(inputs, targets, loss_reduction="sum") / supervised.clamp(min=1)
            train_loss = loss.detach()
            (scaler.scale(loss / grad_accum_steps) if scaler else loss / grad_accum_steps).backward()
            num_tokens += supervised
            num_positions += inputs.numel()
        if runtime.ddp:
            dist.all_reduce(num_tokens, op=dist.ReduceOp.SUM)
        lrm = warmup_warmdown_lr(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        update_weights(model, optimizer, scaler, runtime.ddp)
        loop.train_loss = train_loss.item()
        synchronize(device)
        dt = time.time() - t0

        tok_per_sec = int(num_positions * runtime.world_size / dt)
        mfu = 100 * flops_per_token * num_positions / dt / runtime.peak_flops
        if step > 10:
            loop.total_training_time += dt
        print0(f"Step {step:05d}/{num_iterations:05d} | Training loss: {loop.train_loss:.6f}| lrm: {lrm:.6f}| "
               f"num_tokens: {num_tokens.item():,} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.2f}")
        wandb_run.log({"step": step, "lrm": lrm, "train_loss": loop.train_loss, "num_tokens": num_tokens.item(),
                       "train/tok_per_sec": tok_per_sec, "train/mfu": mfu})
        manage_garbage_collection(step, first_step)
        loop.step += 1

    print0(f"Total training time: {loop.total_training_time / 60:.2f}m")
    get_report().log(section="Chat SFT", data=[
        user_config,
        {"Training rows": len(train_mixture.task), "Number of iterations": num_iterations,
         "Training loss": loop.train_loss, "Validation loss": loop.val_loss, **loop.metrics},
        mixture_markdown("Training mixture", train_mixture),
        mixture_markdown("Validation mixture", val_mixture),
    ])
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    run_script(main, "chat_sft")
