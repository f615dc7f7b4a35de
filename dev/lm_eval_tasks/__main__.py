"""
Write the jsonl files the task YAMLs here read, from the task data nanochat already has.

    python -m dev.lm_eval_tasks                          # into $NANOCHAT_BASE_DIR/lm_eval_data
    python -m dev.lm_eval_tasks --output-dir /tmp/lm_eval_data

Reads the ARC and MMLU copies under $NANOCHAT_BASE_DIR/task_data (downloaded by the tasks, or
built offline by `python -m dev.offline_data tasks`; a stand-in split says so when it loads).
Writes arc_easy.jsonl, arc_challenge.jsonl (test splits) and mmlu.jsonl (test, all subjects),
each line {"question", "choices", "answer"} (+ "subject" for MMLU), in the dataset's own order.
"""

import argparse
import json
import os

from dev.lm_eval_tasks.utils import data_dir
from nanochat.common import atomic_open, run_script
from tasks.hub import load_hub_dataset


def arc_rows(subset):
    for row in load_hub_dataset("allenai/ai2_arc", subset, "test").table.to_pylist():
        labels = row["choices"]["label"]
        yield {"question": row["question"], "choices": row["choices"]["text"], "answer": labels.index(row["answerKey"])}


def mmlu_rows():
    for row in load_hub_dataset("cais/mmlu", "all", "test").table.to_pylist():
        yield {"question": row["question"], "choices": row["choices"], "answer": row["answer"], "subject": row["subject"]}


def write_jsonl(path, rows):
    count = 0
    with atomic_open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    print(f"Wrote {count} rows to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dev.lm_eval_tasks", description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output-dir", default=data_dir(), help="where the jsonl files go (the YAMLs read $NANOCHAT_LM_EVAL_DATA, else this default)")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    write_jsonl(os.path.join(args.output_dir, "arc_easy.jsonl"), arc_rows("ARC-Easy"))
    write_jsonl(os.path.join(args.output_dir, "arc_challenge.jsonl"), arc_rows("ARC-Challenge"))
    write_jsonl(os.path.join(args.output_dir, "mmlu.jsonl"), mmlu_rows())


if __name__ == "__main__":
    run_script(main, "lm_eval_tasks")
