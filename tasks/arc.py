"""
ARC, the AI2 Reasoning Challenge (https://huggingface.co/datasets/allenai/ai2_arc): grade-school
science questions with 3-5 choices, subsets ARC-Easy and ARC-Challenge, splits train /
validation / test.

A conversation: the user asks the question in the multiple-choice format of render_mc with the
dataset's own choice labels (mostly A-D; some questions use 1-4), the assistant answers with the
label of the correct choice. Evaluation is categorical: the sampled label equals the answer.
"""

from tasks.common import HubTask, render_mc

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(HubTask):
    eval_type = "categorical"

    def __init__(self, subset, split, **kwargs):
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.subset, self.split = subset, split
        super().__init__("allenai/ai2_arc", subset, split, **kwargs)

    def get_example(self, index):
        row = self.ds[index]
        letters = row["choices"]["label"]
        if row["answerKey"] not in letters:
            raise ValueError(f"ARC {self.subset} {self.split} row {row['id']}: answer {row['answerKey']!r} is not one of {letters}")
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
            {"role": "assistant", "content": row["answerKey"]},
        ]
        # letters: lets the evaluator restrict the model's prediction to the valid labels
        return {"messages": messages, "letters": letters}

    def evaluate(self, conversation, assistant_response):
        """True if the response is the correct label; it must be one of the question's labels."""
        if assistant_response not in conversation["letters"]:
            raise ValueError(f"ARC response {assistant_response!r} is not one of {conversation['letters']}")
        return assistant_response == conversation["messages"][-1]["content"]
