"""
SmolTalk (https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk), the "smol" version of
HuggingFace's general chat data, sized for small models: train (~460K conversations) and test
(~24K). Each row's `messages` is used as is: an optional system message (render_conversation
folds it into the first user turn), then at least two strictly alternating user / assistant
messages with string contents. Training only; no evaluation.
"""

from tasks.common import HubTask
from tasks.customjson import conversation_problem

SPLITS = ("train", "test")


class SmolTalk(HubTask):
    eval_type = "generative"

    def __init__(self, split, **kwargs):
        if split not in SPLITS:
            raise ValueError(f"SmolTalk split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.split = split
        super().__init__("HuggingFaceTB/smol-smoltalk", "default", split, **kwargs)

    def get_example(self, index):
        messages = self.ds[index]["messages"]
        has_system = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
        problem = conversation_problem(messages[1:] if has_system else messages)
        if problem:
            raise ValueError(f"SmolTalk {self.split} example {index}: {problem}")
        return {"messages": messages}
