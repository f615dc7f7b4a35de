"""
Chat with a trained model in the terminal. Answers stream as they are generated.

Run it (one process; CUDA, MPS or CPU):
    python -m scripts.chat_cli                                  # the SFT model (largest tag, last step)
    python -m scripts.chat_cli -i mid -g d20 -t 0.7 -k 40       # another phase, tag and sampling
    python -m scripts.chat_cli -i sft -p "Why is the sky blue?" # answer one prompt, then exit
    python -m scripts.chat_cli -i base --device-type cpu        # on CPU
    python -m scripts.chat_cli -d float32                       # the compute dtype (as NANOCHAT_DTYPE sets it)

At the "User:" prompt type a message and press Enter. `clear` starts a new conversation;
`quit`, `exit`, Ctrl-D or Ctrl-C end the program. Each answer is at most 256 tokens.

Reads $NANOCHAT_BASE_DIR/<phase>_checkpoints/<model-tag>/ and $NANOCHAT_BASE_DIR/tokenizer/.
Writes nothing.
"""

import sys

from nanochat.precision import add_dtype_flag, apply_dtype_flag, check_dtype_flag

apply_dtype_flag(sys.argv[1:])  # -d/--dtype sets NANOCHAT_DTYPE before nanochat.common fixes the compute dtype

import argparse

from nanochat.checkpoint_manager import PHASES, load_model
from nanochat.common import autodetect_device_type, compute_init, parse_flags, run_script
from nanochat.engine import Engine
from nanochat.tokenizer import IncrementalDecoder

MAX_ANSWER_TOKENS = 256
QUIT_COMMANDS = ("quit", "exit")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Chat with a trained model in the terminal",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-i", "--source", type=str, default="sft", choices=list(PHASES),
                        help="which phase's model to load")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint directory (None = the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (None = the last one)")
    parser.add_argument("-p", "--prompt", type=str, default="", help="answer this one prompt and exit (empty = interactive)")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    add_dtype_flag(parser)
    args = parse_flags(parser, argv)
    check_dtype_flag(args.dtype)
    return args


# -----------------------------------------------------------------------------
# Loading


# -----------------------------------------------------------------------------
# The conversation


class Conversation:
    """The token history of one chat (it starts with <|bos|>) and how a turn extends it."""

    def __init__(self, engine, tokenizer, temperature, top_k):
        self.engine = engine
        self.tokenizer = tokenizer
        self.sampling = dict(temperature=temperature, top_k=top_k)
        special = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.user_start, self.user_end = special("<|user_start|>"), special("<|user_end|>")
        self.assistant_start, self.assistant_end = special("<|assistant_start|>"), special("<|assistant_end|>")
        self.tokens = [self.bos]

    def clear(self):
        self.tokens = [self.bos]

    def answer(self, user_text, write):
        """Append the user's message, stream the answer through write(text), and keep it in the history."""
        turn = [self.user_start, *self.tokenizer.encode(user_text), self.user_end, self.assistant_start]
        # Positions past the model's rotary table cannot be computed at all.
        room = self.engine.model.rotary_seq_len - len(self.tokens) - len(turn)
        if room < 1:
            write(f"(the conversation fills the model's {self.engine.model.rotary_seq_len} positions: "
                  "type 'clear' to start a new one)")
            return
        self.tokens += turn
        stream = IncrementalDecoder(self.tokenizer)
        answer = []
        for token_column, _ in self.engine.generate(self.tokens, num_samples=1, max_tokens=min(MAX_ANSWER_TOKENS, room),
                                                    **self.sampling):
            token = token_column[0]
            answer.append(token)
            if token in (self.assistant_end, self.bos):  # the end of the answer, not part of its text
                break
            write(stream.add(token))
        write(stream.flush())
        # Every assistant turn in the history ends with <|assistant_end|>, as in training, also
        # when the answer was cut at the token limit.
        if answer[-1] != self.assistant_end:
            answer.append(self.assistant_end)
        self.tokens += answer


def write_now(text):
    if text:
        print(text, end="", flush=True)


def ask_and_answer(conversation, user_text):
    print("\nAssistant: ", end="", flush=True)
    conversation.answer(user_text, write_now)
    print()


def interact(conversation):
    print("\nnanochat interactive mode")
    print("-" * 50)
    print("Type 'quit' or 'exit' (or press Ctrl-D) to end the conversation")
    print("Type 'clear' to start a new conversation")
    print("-" * 50)
    while True:
        try:
            user_text = input("\nUser: ").strip()
        except EOFError:
            break
        if user_text.lower() in QUIT_COMMANDS:
            break
        if user_text.lower() == "clear":
            conversation.clear()
            print("Conversation cleared.")
            continue
        if user_text:
            ask_and_answer(conversation, user_text)
    print("\nGoodbye!")


def main(argv=None):
    args = parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    conversation = Conversation(Engine(model, tokenizer), tokenizer, args.temperature, args.top_k)
    try:
        if args.prompt:
            ask_and_answer(conversation, args.prompt)
        else:
            interact(conversation)
    except KeyboardInterrupt:  # Ctrl-C, at the prompt or mid-answer: leave quietly
        print("\nGoodbye!")


if __name__ == "__main__":
    run_script(main, "chat_cli")
