"""
MMLU (https://huggingface.co/datasets/cais/mmlu): 4-choice questions over 57 subjects.
Subset "all" has the splits test (14,042), validation (1,531), dev (285, 5 per subject) and
auxiliary_train (99,842 questions from ARC, OBQA, RACE and MCTest, used for midtraining).
MMLU("auxiliary_train", "train"), the older spelling, is the same data as MMLU("all", "auxiliary_train").

A conversation: render_mc with letters A-D, the assistant answers with the letter; extras
`subject` and `letters`. Evaluation is categorical: the sampled letter equals the answer.
"""

from tasks.common import HubTask, render_mc

SPLITS = {"all": ("test", "validation", "dev", "auxiliary_train"), "auxiliary_train": ("train",)}


class MMLU(HubTask):
    eval_type = "categorical"
    letters = ("A", "B", "C", "D")
    # the 57 subjects, in the order the "all" subset concatenates them (alphabetical)
    groups = (
        "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
        "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
        "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
        "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_european_history", "high_school_geography",
        "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
        "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
        "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
        "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
        "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
        "prehistory", "professional_accounting", "professional_law", "professional_medicine",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
        "virology", "world_religions",
    )

    def __init__(self, subset, split, **kwargs):
        if subset not in SPLITS:
            raise ValueError(f"MMLU subset must be one of {', '.join(SPLITS)}, got {subset!r}")
        if split not in SPLITS[subset]:
            raise ValueError(f"MMLU subset {subset!r} has the splits {', '.join(SPLITS[subset])}, got {split!r}")
        self.subset, self.split = subset, split
        hub_subset, hub_split = ("all", "auxiliary_train") if subset == "auxiliary_train" else (subset, split)
        super().__init__("cais/mmlu", hub_subset, hub_split, **kwargs)

    def get_example(self, index):
        row = self.ds[index]
        if isinstance(row.get("train"), dict):  # the auxiliary_train subset nests each row in a `train` field
            row = row["train"]
        if len(row["choices"]) != 4:
            raise ValueError(f"MMLU {self.split} row {index} has {len(row['choices'])} choices, expected 4")
        messages = [
            {"role": "user", "content": render_mc(row["question"], self.letters, row["choices"])},
            {"role": "assistant", "content": self.letters[row["answer"]]},
        ]
        return {"messages": messages, "subject": row["subject"], "letters": self.letters}

    def evaluate(self, conversation, assistant_response):
        """True if the response is the correct letter; it must be one of A-D."""
        if assistant_response not in self.letters:
            raise ValueError(f"MMLU response {assistant_response!r} is not one of {self.letters}")
        return assistant_response == conversation["messages"][-1]["content"]
