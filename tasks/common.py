"""
Datasets as conversations: the base class every task derives from, mixtures and sequences of
tasks, the base of the tasks read from the hub, and the multiple-choice prompt.

A conversation is a dict {"messages": [{"role": "user"|"assistant", "content": ...}, ...], ...}
with task-specific extra fields (e.g. "letters" for multiple choice). An assistant content is a
string or a list of parts ({"type": "text"|"python"|"python_output", "text": ...}), which
tokenizer.render_conversation turns into tokens and a training mask.
"""

import random

from tasks.hub import load_hub_dataset


class Task:
    """
    A lazy slice view over a dataset: task[i] is example start + i*step, for i < len(task).
    Subclasses implement num_examples(), get_example(index), eval_type ("generative" or
    "categorical") and evaluate(conversation, response); RL tasks also reward(conversation, response).
    """

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"need 0 <= start <= stop and step >= 1, got start={start}, stop={stop}, step={step}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def eval_type(self):
        raise NotImplementedError(f"{type(self).__name__} does not define eval_type")

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, response):
        raise NotImplementedError(f"{type(self).__name__} has no evaluation")

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))  # ceil

    def __getitem__(self, index):
        if not isinstance(index, int):
            raise TypeError(f"task indices are ints, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a task of {len(self)} examples")
        return self.get_example(self.start + index * self.step)


class HubTask(Task):
    """
    A task over one split of a hub dataset (tasks.hub), in the order upstream's
    `datasets` `.shuffle(seed=42)` gives. Subclasses set eval_type and get_example.
    """

    def __init__(self, repo_id, subset, split, **kwargs):
        super().__init__(**kwargs)
        self.ds = load_hub_dataset(repo_id, subset, split).shuffle(seed=42)

    def num_examples(self):
        return len(self.ds)


class TaskMixture(Task):
    """
    Every example of every task, shuffled once with random.Random(42) (the same order in every
    run and on every rank). Passing a task twice oversamples it.
    """

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(task_index, local) for task_index, task in enumerate(self.tasks) for local in range(len(task))]
        random.Random(42).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        task_index, local = self.index_map[index]
        return self.tasks[task_index][local]


class TaskSequence(Task):
    """The tasks one after another, in order (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(task) for task in self.tasks]

    def num_examples(self):
        return sum(self.lengths)

    def get_example(self, index):
        for task, length in zip(self.tasks, self.lengths):
            if index < length:
                return task[index]
            index -= length
        raise IndexError(index)


def render_mc(question, letters, choices):
    """
    The user prompt of a multiple-choice question. Each choice is written "- <choice>=<letter>":
    the letter after the choice and no space after "=", so it is the same token as the bare
    letter the assistant answers with (as upstream nanochat does).
    """
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines += ["", "Respond only with the letter of the correct answer."]
    return "\n".join(lines)
