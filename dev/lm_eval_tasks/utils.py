"""
The loader the task YAMLs name (custom_dataset): one local jsonl file per task, no hub.

lm-evaluation-harness imports this file by path from the YAML's directory, so it imports nothing
from nanochat. Rows: {"question": str, "choices": [str, ...], "answer": int}.
"""

import json
import os


def data_dir():
    """$NANOCHAT_LM_EVAL_DATA, else $NANOCHAT_BASE_DIR/lm_eval_data (the default base dir is ~/.cache/nanochat)."""
    if os.environ.get("NANOCHAT_LM_EVAL_DATA"):
        return os.environ["NANOCHAT_LM_EVAL_DATA"]
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    return os.path.join(base_dir, "lm_eval_data")


def load_jsonl(jsonl_name, **_metadata):
    """{"test": datasets.Dataset} of <data dir>/<jsonl_name>.jsonl."""
    import datasets

    path = os.path.join(data_dir(), f"{jsonl_name}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: write it with `python -m dev.lm_eval_tasks` "
                                "(or point NANOCHAT_LM_EVAL_DATA at a directory that has it)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
