"""
tasks/: the slice view of Task, TaskMixture's deterministic shuffle and oversampling,
TaskSequence's order, the multiple-choice prompt, CustomJSON's line-by-line validation; the hub
loader against a local HTTP server; and every concrete task (ARC, MMLU, GSM8K, HumanEval,
SmolTalk, SpellingBee, SimpleSpelling) on tiny local copies of its data, down to the tokens and
training mask render_conversation makes of each conversation. No test touches the network.
"""

import io
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import LocalHTTPServer, QuietHandler, free_port
from nanochat.common import MissingInputError
from tasks import hub, spellingbee
from tasks.arc import ARC
from tasks.common import Task, TaskMixture, TaskSequence, render_mc
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, answer_parts, extract_answer
from tasks.hub import load_hub_dataset, task_data_dir
from tasks.humaneval import HumanEval, build_program, extract_imports, extract_program
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee, spelling_parts


class Numbers(Task):
    def __init__(self, name, n, **kwargs):
        super().__init__(**kwargs)
        self.name, self.n = name, n

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.name}{index}"},
                             {"role": "assistant", "content": "ok"}]}


def names(task):
    return [task[i]["messages"][0]["content"] for i in range(len(task))]


def test_task_slices_are_lazy_views_with_ceil_length():
    assert names(Numbers("a", 10)) == [f"a{i}" for i in range(10)]
    assert names(Numbers("a", 10, start=2, stop=9, step=3)) == ["a2", "a5", "a8"]
    assert len(Numbers("a", 10, start=3)) == 7 and len(Numbers("a", 10, start=0, stop=10, step=4)) == 3
    assert names(Numbers("a", 4, stop=100)) == ["a0", "a1", "a2", "a3"]  # a stop past the end is the end
    with pytest.raises(IndexError):
        Numbers("a", 10, stop=4)[4]
    with pytest.raises(TypeError):
        Numbers("a", 10)[1:3]
    with pytest.raises(ValueError, match="step"):
        Numbers("a", 10, step=0)


def test_mixture_is_a_fixed_shuffle_of_every_example_and_oversamples_repeats():
    a, b = Numbers("a", 5), Numbers("b", 3)
    mixture = TaskMixture([a, b, b])
    assert len(mixture) == 11
    got = names(mixture)
    assert sorted(got) == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(3)] * 2)
    assert got == names(TaskMixture([Numbers("a", 5), Numbers("b", 3), Numbers("b", 3)]))  # same order every run
    assert got != [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(3)] * 2  # it is shuffled
    assert names(TaskMixture([a, b], stop=4)) == names(TaskMixture([a, b]))[:4]


def test_sequence_keeps_the_order():
    assert names(TaskSequence([Numbers("a", 2), Numbers("b", 3, start=1)])) == ["a0", "a1", "b1", "b2"]


def test_render_mc_puts_the_letter_after_the_choice_without_a_space():
    assert render_mc("What is 2+2?", ["A", "B"], ["3", "4"]) == (
        "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n\nRespond only with the letter of the correct answer.")
    with pytest.raises(ValueError):
        render_mc("q", ["A"], ["x", "y"])


def test_customjson_reports_bad_lines_by_number_and_keeps_the_good_ones(tmp_path, capsys):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    lines = [json.dumps(good), "{not json", json.dumps(good[:1]),
             json.dumps([good[1], good[0]]), json.dumps([good[0], {"role": "assistant", "content": ["x"]}]),
             "", json.dumps(good + good)]
    path = tmp_path / "conversations.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = CustomJSON(str(path))
    assert len(task) == 2 and task[0] == {"messages": good} and task[1] == {"messages": good + good}
    assert [number for number, _ in task.problems] == [2, 3, 4, 5]
    out = capsys.readouterr().out
    assert f"{path}:2: skipped: not valid JSON" in out
    assert f"{path}:3: skipped: a conversation needs at least 2 messages" in out
    assert f"{path}:4: skipped: message 0 has role 'assistant', expected 'user'" in out
    assert f"{path}:5: skipped: message 1 content must be a string" in out


def test_customjson_missing_file_is_an_empty_task_with_a_warning(tmp_path, capsys):
    task = CustomJSON(str(tmp_path / "nope.jsonl"))
    assert len(task) == 0
    assert "does not exist" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# The hub loader: parquet shards listed by the hub API, downloaded once, read locally

def parquet_bytes(rows):
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def write_split(repo_id, subset, split, rows, shard_size=None, provenance=None):
    """A local copy as the loader (or the offline builder) leaves it: shards, then the manifest."""
    directory = task_data_dir(repo_id, subset, split)
    os.makedirs(directory, exist_ok=True)
    shard_size = shard_size or max(1, len(rows))
    names = []
    for start in range(0, len(rows), shard_size):
        names.append(f"{len(names):05d}.parquet")
        with open(os.path.join(directory, names[-1]), "wb") as f:
            f.write(parquet_bytes(rows[start:start + shard_size]))
    if provenance is not None:
        with open(os.path.join(directory, hub.PROVENANCE_NAME), "w") as f:
            json.dump(provenance, f)
    with open(os.path.join(directory, hub.MANIFEST_NAME), "w") as f:
        json.dump(names, f)
    return directory


class HubServer(LocalHTTPServer):
    """
    The two hub endpoints the loader uses, on 127.0.0.1: the parquet listing
    /api/datasets/<repo>/parquet/<subset>/<split> (a JSON list of shard URLs) and the shards.
    splits[(repo, subset, split)] = [shard bytes, ...]; plan[shard url path] = behaviours, one per
    GET, the last repeats: "ok", "short" (full Content-Length, half the body), "html" (a 200 page
    that is not parquet). requests lists every path asked for.
    """

    def __init__(self, splits):
        self.splits, self.plan, self.requests = splits, {}, []
        server = self

        class Handler(QuietHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.body(self.path)
                if body is None:
                    self.send_error(404)
                    return
                steps = server.plan.get(self.path, ["ok"])
                behaviour = steps[min(server.requests.count(self.path), len(steps)) - 1]
                if behaviour == "html":
                    body = b"<html>rate limited</html>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body if behaviour != "short" else body[: len(body) // 2])
                self.close_connection = True

        super().__init__(Handler)
        self.url = self.address

    def body(self, path):
        for (repo, subset, split), shards in self.splits.items():
            if path == f"/api/datasets/{repo}/parquet/{subset}/{split}":
                return json.dumps([f"{self.url}/files/{repo}/{subset}/{split}/{i}.parquet" for i in range(len(shards))]).encode()
            for i, shard in enumerate(shards):
                if path == f"/files/{repo}/{subset}/{split}/{i}.parquet":
                    return shard
        return None


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_HUB_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens: no hub
    return tmp_path


ROWS = [{"question": f"q{i}", "answer": i} for i in range(10)]


def test_hub_split_is_downloaded_once_in_listing_order_then_read_without_network(base_dir, monkeypatch):
    splits = {("org/data", "main", "test"): [parquet_bytes(ROWS[:6]), parquet_bytes(ROWS[6:])]}
    with HubServer(splits) as server:
        monkeypatch.setenv("NANOCHAT_HUB_URL", server.url)
        ds = load_hub_dataset("org/data", "main", "test")
        assert len(server.requests) == 3  # the listing and two shards
        again = load_hub_dataset("org/data", "main", "test")
        assert len(server.requests) == 3  # the manifest is there: no network
    assert [ds[i] for i in range(len(ds))] == ROWS and [again[i] for i in range(10)] == ROWS
    directory = base_dir / "task_data" / "org--data" / "main" / "test"
    assert sorted(os.listdir(directory)) == ["00000.parquet", "00001.parquet", "manifest.json", "manifest.json.lock"]
    assert json.loads((directory / "manifest.json").read_text()) == ["00000.parquet", "00001.parquet"]
    with pytest.raises(IndexError):
        ds[10]


# datasets 5.2.0: Dataset.from_list([{"x": i} for i in range(12)]).shuffle(seed=42)["x"]
DATASETS_SHUFFLE_42_OF_12 = [0, 7, 6, 9, 11, 3, 5, 2, 4, 10, 1, 8]


def test_shuffle_is_the_numpy_permutation_that_datasets_uses(base_dir):
    rows = [{"x": i} for i in range(50)]
    write_split("org/data", "default", "train", rows, shard_size=20)  # 3 shards, read as one table
    shuffled = load_hub_dataset("org/data", "default", "train").shuffle(seed=42)
    assert [shuffled[i]["x"] for i in range(50)] == list(np.random.default_rng(42).permutation(50))
    write_split("org/data", "default", "small", rows[:12])
    small = load_hub_dataset("org/data", "default", "small").shuffle(seed=42)
    assert [small[i]["x"] for i in range(12)] == DATASETS_SHUFFLE_42_OF_12


def test_no_hub_and_no_local_copy_is_one_error_naming_the_offline_builder(base_dir, capsys):
    with pytest.raises(MissingInputError, match=r"python -m dev\.offline_data tasks") as error:
        load_hub_dataset("org/data", "main", "test")
    assert "\n" not in str(error.value) and "ConnectionError" in str(error.value)
    assert not os.path.exists(os.path.join(task_data_dir("org/data", "main", "test"), "manifest.json"))


@pytest.mark.parametrize("failure,reason", [("short", "cut short"), ("html", "not a parquet file")])
def test_a_bad_shard_leaves_no_manifest_and_the_next_load_completes(base_dir, monkeypatch, failure, reason):
    splits = {("org/data", "main", "test"): [parquet_bytes(ROWS[:6]), parquet_bytes(ROWS[6:])]}
    with HubServer(splits) as server:
        monkeypatch.setenv("NANOCHAT_HUB_URL", server.url)
        server.plan["/files/org/data/main/test/1.parquet"] = [failure, "ok"]
        with pytest.raises(MissingInputError, match=reason):
            load_hub_dataset("org/data", "main", "test")
        directory = task_data_dir("org/data", "main", "test")
        assert "manifest.json" not in os.listdir(directory)
        assert not [name for name in os.listdir(directory) if name.endswith(".tmp")]
        ds = load_hub_dataset("org/data", "main", "test")
    assert [ds[i] for i in range(len(ds))] == ROWS


def test_an_unknown_split_says_http_404(base_dir, monkeypatch):
    with HubServer({}) as server:
        monkeypatch.setenv("NANOCHAT_HUB_URL", server.url)
        with pytest.raises(MissingInputError, match="HTTP 404.*check the dataset, subset and split names"):
            load_hub_dataset("org/data", "main", "nope")


def test_a_local_substitute_says_so_when_loaded(base_dir, capsys):
    write_split("org/data", "main", "train", ROWS, provenance={"substitute": "rows 0-9 of the test split"})
    assert len(load_hub_dataset("org/data", "main", "train")) == 10
    assert "org/data main/train: offline substitute, not the hub's data: rows 0-9 of the test split" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# The concrete tasks on tiny local copies (no network)

ARC_ROWS = [
    {"id": "Mercury_1", "question": "Which animal is a mammal?",
     "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"id": "NYSEDREGENTS_2", "question": "Which is a gas at room temperature?",
     "choices": {"text": ["iron", "water", "oxygen", "salt"], "label": ["1", "2", "3", "4"]}, "answerKey": "3"},
]
MMLU_ROWS = [
    {"question": "2+2=?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1},
    {"question": "H2O is?", "subject": "high_school_chemistry", "choices": ["salt", "acid", "water", "gold"], "answer": 2},
]
GSM8K_ANSWER = ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
                "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10")
GSM8K_ROWS = [{"question": "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes. How much did she earn?",
               "answer": GSM8K_ANSWER}]
HUMANEVAL_ROWS = [{
    "task_id": "HumanEval/0",
    "prompt": 'from typing import List\nimport math\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n',
    "canonical_solution": "    return sum(xs)\n",
    "test": "\n\ndef check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n",
    "entry_point": "total",
}]
SMOLTALK_ROWS = [
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Thanks"},
                  {"role": "assistant", "content": "You're welcome."}]},
]
WORDS = ["apple", "banana", "cherry", "kiwi", "strawberry"]


@pytest.fixture
def task_copies(base_dir):
    """Local copies of every task's data, as the loader or the offline builder leaves them."""
    for subset in ("ARC-Easy", "ARC-Challenge"):
        write_split("allenai/ai2_arc", subset, "test", ARC_ROWS)
    write_split("cais/mmlu", "all", "test", MMLU_ROWS)
    write_split("cais/mmlu", "all", "auxiliary_train", [{"train": row} for row in MMLU_ROWS])
    write_split("openai/gsm8k", "main", "test", GSM8K_ROWS)
    write_split("openai/openai_humaneval", "openai_humaneval", "test", HUMANEVAL_ROWS)
    write_split("HuggingFaceTB/smol-smoltalk", "default", "train", SMOLTALK_ROWS)
    (base_dir / "words_alpha.txt").write_text("\r\n".join(WORDS) + "\r\n")  # dwyl's file has CRLF line ends
    return base_dir


def by_question(task, needle):
    return next(task[i] for i in range(len(task)) if needle in task[i]["messages"][0]["content"])


def test_arc_renders_multiple_choice_with_the_dataset_labels(task_copies):
    task = ARC("ARC-Challenge", "test")
    assert len(task) == 2 and task.eval_type == "categorical"
    mammal = by_question(task, "mammal")
    assert mammal["messages"] == [
        {"role": "user", "content": "Multiple Choice question: Which animal is a mammal?\n- shark=A\n- whale=B\n- trout=C\n\n"
                                    "Respond only with the letter of the correct answer."},
        {"role": "assistant", "content": "B"}]
    assert mammal["letters"] == ["A", "B", "C"]
    gas = by_question(task, "gas")
    assert "- oxygen=3\n" in gas["messages"][0]["content"] and gas["messages"][1]["content"] == "3"
    assert task.evaluate(mammal, "B") is True and task.evaluate(mammal, "A") is False
    with pytest.raises(ValueError, match="not one of"):
        task.evaluate(mammal, "D")
    with pytest.raises(ValueError, match="subset"):
        ARC("ARC-Hard", "test")


def test_mmlu_renders_letters_a_to_d_and_unwraps_auxiliary_train(task_copies):
    task = MMLU("all", "test")
    water = by_question(task, "H2O")
    assert water["messages"][0]["content"] == ("Multiple Choice question: H2O is?\n- salt=A\n- acid=B\n- water=C\n- gold=D\n\n"
                                               "Respond only with the letter of the correct answer.")
    assert water["messages"][1]["content"] == "C" and water["subject"] == "high_school_chemistry"
    assert water["letters"] == ("A", "B", "C", "D")
    assert task.evaluate(water, "C") is True and task.evaluate(water, "B") is False
    with pytest.raises(ValueError):
        task.evaluate(water, "E")
    # the older spelling reads the same local copy as subset "all", split "auxiliary_train"
    old, new = MMLU("auxiliary_train", "train"), MMLU("all", "auxiliary_train")
    assert [old[i] for i in range(2)] == [new[i] for i in range(2)]
    assert sorted(new[i]["messages"][1]["content"] for i in range(2)) == ["B", "C"]
    with pytest.raises(ValueError, match="splits"):
        MMLU("auxiliary_train", "test")


def test_gsm8k_turns_calculator_markers_into_python_and_output_parts(task_copies):
    task = GSM8K("main", "test")
    example = task[0]
    assert example["messages"][0] == {"role": "user", "content": GSM8K_ROWS[0]["question"]}
    assert example["messages"][1]["content"] == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $"},
        {"type": "python", "text": "0.2*50"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"},
    ]
    assert task.evaluate(example, "so she earned $10.\n#### 10") == 1
    assert task.evaluate(example, "#### 11") == 0 and task.evaluate(example, "ten dollars") == 0
    assert task.reward(example, "#### 10") == 1.0 and task.reward(example, "#### 9") == 0.0


def test_gsm8k_answer_extraction_and_marker_edge_cases():
    assert extract_answer("a\n#### 1,234") == "1234"
    assert extract_answer("#### -3.5 dollars") == "-3.5"
    assert extract_answer("the answer is 7") is None
    assert answer_parts("x <<a=b=3>> y") == [{"type": "text", "text": "x "}, {"type": "python", "text": "a=b"},
                                           {"type": "python_output", "text": "3"}, {"type": "text", "text": " y"}]
    assert answer_parts("<<2+2>>") == [{"type": "text", "text": ""}, {"type": "python", "text": "2+2"},
                                       {"type": "python_output", "text": ""}, {"type": "text", "text": ""}]


def test_humaneval_conversation_and_program(task_copies):
    task = HumanEval()
    example = task[0]
    row = HUMANEVAL_ROWS[0]
    assert example["messages"] == [{"role": "user", "content": row["prompt"]},
                                   {"role": "assistant", "content": row["prompt"] + "\n" + row["canonical_solution"]}]
    assert example["entry_point"] == "total" and example["test"] == row["test"]
    assert extract_imports(row["prompt"]) == "from typing import List\nimport math"
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nand ```\nother\n```") == "def f():\n    return 1"
    assert extract_program("  def f(): pass \n") == "def f(): pass"
    completion = "```python\ndef total(xs):\n    return sum(xs)\n```"
    assert build_program(example, completion) == (
        "from typing import List\nimport math\n\ndef total(xs):\n    return sum(xs)\n\n" + row["test"] + "\ncheck(total)")


def test_humaneval_evaluate_runs_the_tests_in_the_sandbox(task_copies):
    task = HumanEval()
    example = task[0]
    assert task.evaluate(example, "```python\ndef total(xs: List[int]) -> int:\n    return math.fsum(xs)\n```") is True
    assert task.evaluate(example, "def total(xs):\n    return 0") is False


def test_smoltalk_keeps_messages_as_they_are_with_an_optional_system_message(task_copies):
    task = SmolTalk("train")
    conversations = sorted((task[i] for i in range(len(task))), key=lambda c: len(c["messages"]))
    assert conversations == [{"messages": row["messages"]} for row in SMOLTALK_ROWS]
    write_split("HuggingFaceTB/smol-smoltalk", "default", "test",
                [{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}])
    with pytest.raises(ValueError, match="SmolTalk test example 0: message 0 has role 'assistant'"):
        SmolTalk("test")[0]


def test_spelling_parts_spell_count_and_check_with_python():
    parts = spelling_parts("abca", "a")
    assert parts == [
        {"type": "text", "text": "We are asked to find the number 'a' in the word 'abca'. Let me try a manual approach first.\n\n"
                                 "First spell the word out:\nabca:a,b,c,a\n\nThen count the occurrences of 'a':\n"
                                 "1:a hit! count=1\n2:b\n3:c\n4:a hit! count=2\n\nThis gives us 2."},
        {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
        {"type": "python", "text": "'abca'.count('a')"},
        {"type": "python_output", "text": "2"},
        {"type": "text", "text": "\n\nPython gives us 2.\n\nMy final answer is:\n\n#### 2"},
    ]
    assert spelling_parts("xyz", "q")[3]["text"] == "0"


def reference_spelling_question(seed):
    """SpellingBee's user message, drawn from random.Random(seed) in the documented order."""
    rng = random.Random(seed)
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(spellingbee.LETTERS)
    template = rng.choice(spellingbee.USER_MSG_TEMPLATES)
    if rng.random() < 0.3:
        template = template.lower()
    letter_quote, word_quote = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
    message = template.format(letter=letter_quote + letter + letter_quote, word=word_quote + word + word_quote)
    return word, letter, message + ("?" if rng.random() < 0.5 else "")


def test_spellingbee_examples_are_fixed_by_the_index_and_split(task_copies):
    train, test = SpellingBee(size=20, split="train"), SpellingBee(size=5, split="test")
    assert train.words == WORDS and len(train) == 20 and len(spellingbee.USER_MSG_TEMPLATES) == 51
    for task, offset in ((train, 0), (test, 10_000_000)):
        for index in range(len(task)):
            word, letter, question = reference_spelling_question(offset + index)
            example = task[index]
            assert example["messages"][0] == {"role": "user", "content": question}
            assert example["messages"][1]["content"] == spelling_parts(word, letter)
            assert task.evaluate(example, f"... #### {word.count(letter)}") == 1
            assert task.reward(example, f"#### {word.count(letter) + 1}") == 0.0
    assert train[3] == SpellingBee(size=20, split="train")[3]
    assert [train[i] for i in range(5)] != [test[i] for i in range(5)]


def test_simple_spelling_spells_words_from_its_own_shuffle(task_copies):
    task = SimpleSpelling(size=10, split="train")
    shuffled = list(WORDS)
    random.Random(42).shuffle(shuffled)
    for index in range(10):
        word = random.Random(index).choice(shuffled)
        assert task[index]["messages"] == [{"role": "user", "content": f"Spell the word: {word}"},
                                           {"role": "assistant", "content": f"{word}:{','.join(word)}"}]


def test_spellingbee_without_word_list_or_internet_names_the_offline_builder(base_dir, monkeypatch):
    monkeypatch.setattr(spellingbee, "WORD_LIST_URL", f"http://127.0.0.1:{free_port()}/words_alpha.txt")
    with pytest.raises(MissingInputError, match=r"python -m dev\.offline_data tasks"):
        SpellingBee()


def trained_text(conversation):
    """What the model is trained to produce: assistant text and tool calls, never the tool's output."""
    pieces = []
    for message in conversation["messages"]:
        if message["role"] != "assistant":
            continue
        parts = [{"type": "text", "text": message["content"]}] if isinstance(message["content"], str) else message["content"]
        for part in parts:
            if part["type"] == "text":
                pieces.append(part["text"])
            elif part["type"] == "python":
                pieces.append(f"<|python_start|>{part['text']}<|python_end|>")
        pieces.append("<|assistant_end|>")
    return "".join(pieces)


def test_every_task_renders_to_tokens_whose_mask_covers_exactly_the_assistant_output(task_copies, tiny_tokenizer):
    tasks = [ARC("ARC-Easy", "test"), MMLU("all", "test"), MMLU("all", "auxiliary_train"), GSM8K("main", "test"),
             HumanEval(), SmolTalk("train"), SpellingBee(size=3), SimpleSpelling(size=3)]
    for task in tasks:
        for index in range(len(task)):
            conversation = task[index]
            ids, mask = tiny_tokenizer.render_conversation(conversation, max_tokens=100_000)
            assert len(ids) == len(mask) and ids[0] == tiny_tokenizer.get_bos_token_id()
            assert tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m]) == trained_text(conversation), type(task).__name__
            untrained = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if not m])
            for message in conversation["messages"]:  # user turns (a system message too) and tool outputs
                parts = message["content"] if isinstance(message["content"], list) else []
                if message["role"] != "assistant":
                    assert message["content"] in untrained
                assert all(p["text"] in untrained for p in parts if p["type"] == "python_output")
