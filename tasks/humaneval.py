"""
HumanEval (https://huggingface.co/datasets/openai/openai_humaneval): 164 Python functions to
complete, each a prompt (imports, signature and docstring), a canonical solution and a test
that defines check(candidate).

A conversation: the user sends the prompt, the assistant answers with the prompt, a newline and
the canonical solution; extras `entry_point` and `test`. Evaluation is generative: the program
is the prompt's leading import lines, the code of the completion (its first ```python / ```
block, else the whole completion), the test and check(<entry_point>), run in the sandbox of
nanochat.execution; success means it ran without error.
"""

import re

from tasks.common import HubTask

CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt):
    """The import lines at the top of a prompt (comments and blank lines skipped), stopping at the first other line."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion):
    """The first markdown code block of a completion, else the whole completion, stripped."""
    blocks = CODE_BLOCK_RE.findall(completion)
    return (blocks[0] if blocks else completion).strip()


def build_program(conversation, completion):
    """The program evaluate runs: imports, the completion's code, the test, the call of check."""
    imports = extract_imports(conversation["messages"][0]["content"])
    return (f"{imports}\n\n{extract_program(completion)}\n\n"
            f"{conversation['test']}\ncheck({conversation['entry_point']})")


class HumanEval(HubTask):
    eval_type = "generative"

    def __init__(self, **kwargs):
        super().__init__("openai/openai_humaneval", "openai_humaneval", "test", **kwargs)

    def get_example(self, index):
        row = self.ds[index]
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
        ]
        return {"messages": messages, "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation, completion):
        """True if the completed program passes the task's test in the sandbox."""
        from nanochat.execution import execute_code  # the sandbox starts child interpreters; only evaluation needs it

        return execute_code(build_program(conversation, completion)).success
