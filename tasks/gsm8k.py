"""
GSM8K, grade-school math word problems (https://huggingface.co/datasets/openai/gsm8k): subsets
main and socratic, splits train (7,473) and test (1,319). A reference answer reads

    Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.
    Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.
    #### 10

Each <<expr=result>> is a calculator call. The assistant message is a list of parts: the text
between the markers as "text" parts, and every marker as a "python" part (the expression, the
text before the last "=") followed by a "python_output" part (the result after it), so the model
learns to call the calculator tool and the tool's output is not trained on.

Evaluation is generative: the number after "#### " in the completion, commas removed, must equal
the reference's (the normalization of OpenAI's grade-school-math code); reward is that as a float.
"""

import re

from tasks.common import HubTask

SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
CALCULATOR_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(completion):
    """The number after the '#### ' marker with commas removed ('1,234' -> '1234'), or None."""
    match = ANSWER_RE.search(completion)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "")


def answer_parts(answer):
    """A GSM8K answer as assistant parts: text, and python + python_output for each <<expr=result>>."""
    parts = []
    for piece in CALCULATOR_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expression, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expression})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def score_final_answer(conversation, assistant_response):
    """1 if the response's '#### ' number equals the one in the reference's last text part, else 0."""
    if not isinstance(assistant_response, str):
        raise TypeError(f"the response must be a string, got {type(assistant_response).__name__}")
    reference = conversation["messages"][-1]
    if reference["role"] != "assistant" or not isinstance(reference["content"], list):
        raise ValueError("the conversation must end with an assistant message made of parts")
    return int(extract_answer(assistant_response) == extract_answer(reference["content"][-1]["text"]))


class GSM8K(HubTask):
    eval_type = "generative"

    def __init__(self, subset, split, **kwargs):
        if subset not in SUBSETS:
            raise ValueError(f"GSM8K subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"GSM8K split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.subset, self.split = subset, split
        super().__init__("openai/gsm8k", subset, split, **kwargs)

    def get_example(self, index):
        row = self.ds[index]
        messages = [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_parts(row["answer"])},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        return score_final_answer(conversation, assistant_response)

    def reward(self, conversation, assistant_response):
        return float(self.evaluate(conversation, assistant_response))
