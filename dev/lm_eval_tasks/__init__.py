"""
lm-evaluation-harness tasks that read local jsonl files instead of the Hugging Face hub.

    python -m dev.lm_eval_tasks                     # jsonl from the task copies in $NANOCHAT_BASE_DIR/task_data
    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True \\
        --include_path dev/lm_eval_tasks --tasks nanochat_offline

The YAMLs here name a loader in utils.py that reads <data dir>/<name>.jsonl, where the data dir
is $NANOCHAT_LM_EVAL_DATA, else $NANOCHAT_BASE_DIR/lm_eval_data (~/.cache/nanochat/lm_eval_data).
Each line is {"question": str, "choices": [str, ...], "answer": index of the right choice}.
"""
