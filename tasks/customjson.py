"""
Conversations from a local JSONL file: one JSON array of {"role", "content"} messages per line,
at least two, alternating user / assistant and starting with user, string contents (e.g. the
identity conversations that give the model its persona). A bad line is reported with its line
number and the reason, and the good lines still load.
"""

import json
import os

from tasks.common import Task


def conversation_problem(messages):
    """None if messages is a valid conversation, else what is wrong with it."""
    if not isinstance(messages, list):
        return f"expected a JSON array of messages, got {type(messages).__name__}"
    if len(messages) < 2:
        return f"a conversation needs at least 2 messages, got {len(messages)}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) < {"role", "content"}:
            return f"message {i} must be an object with 'role' and 'content'"
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            return f"message {i} has role {message['role']!r}, expected {expected!r} (roles alternate, user first)"
        if not isinstance(message["content"], str):
            return f"message {i} content must be a string, got {type(message['content']).__name__}"
    return None


class CustomJSON(Task):
    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = filepath
        self.conversations = []
        self.problems = []  # (line number, reason) of every line that was skipped
        if not os.path.exists(filepath):
            print(f"Warning: {filepath} does not exist, so this task has no conversations. "
                  "For the identity conversations, run the identity data step of speedrun.sh "
                  "(or dev/gen_synthetic_data.py) first.")
            return
        with open(filepath, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    messages = json.loads(line)
                except json.JSONDecodeError as error:
                    self.problems.append((line_number, f"not valid JSON ({error.msg})"))
                    continue
                problem = conversation_problem(messages)
                if problem:
                    self.problems.append((line_number, problem))
                    continue
                self.conversations.append({"messages": messages})
        for line_number, reason in self.problems:
            print(f"{filepath}:{line_number}: skipped: {reason}")

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]
