"""
Where a task's data came from: the hub's own download, or what `python -m dev.offline_data tasks`
wrote in its place. The offline builder leaves a provenance.json beside each split it writes
("source", and "substitute" when something else stands in for the real rows) and records the word
list it wrote, with its sha256, in task_data/offline_tasks.json. The mixtures, chat_rl and chat_eval
all label their data through data_source().
"""

import hashlib
import json
import os
from dataclasses import dataclass

from nanochat.common import get_base_dir
from tasks.hub import PROVENANCE_NAME, task_data_dir
from tasks.spellingbee import WORD_LIST_FILENAME

OFFLINE_SUMMARY_NAME = "offline_tasks.json"  # in task_data/, written by the offline builder


@dataclass(frozen=True)
class DataSource:
    kind: str  # "offline copy" (the real rows, rebuilt offline) or "offline substitute" (something else stands in)
    description: str

    @property
    def substitute(self):
        """What stands in for the real data, or None when these are the real rows."""
        return self.description if self.kind == "offline substitute" else None


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_source(location):
    """
    None for the hub's own data; a DataSource when the offline builder wrote it. location is a hub
    split (repo_id, subset, split) or WORD_LIST_FILENAME; the word list counts as the builder's only
    while its sha256 is the one the builder recorded (a downloaded list may have replaced it since).
    """
    if isinstance(location, tuple):
        path = os.path.join(task_data_dir(*location), PROVENANCE_NAME)
        if not os.path.exists(path):
            return None
        provenance = _read_json(path)
        if provenance.get("substitute"):
            return DataSource("offline substitute", provenance["substitute"])
        return DataSource("offline copy", f"the hub's rows rebuilt offline from {provenance.get('source', 'a registry package')}")
    if location == WORD_LIST_FILENAME:
        summary_path = os.path.join(get_base_dir(), "task_data", OFFLINE_SUMMARY_NAME)
        words_path = os.path.join(get_base_dir(), WORD_LIST_FILENAME)
        if not (os.path.exists(summary_path) and os.path.exists(words_path)):
            return None
        written = _read_json(summary_path).get("outputs", {}).get(WORD_LIST_FILENAME)
        if isinstance(written, dict) and written.get("sha256") == _file_sha256(words_path):
            return DataSource("offline substitute", written.get("substitute") or "the offline builder's word list")
    return None
