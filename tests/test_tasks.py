"""
tasks/: the slice view of Task, TaskMixture's deterministic shuffle and oversampling,
TaskSequence's order, the multiple-choice prompt, and CustomJSON's line-by-line validation.
"""

import json

import pytest

from tasks.common import Task, TaskMixture, TaskSequence, render_mc
from tasks.customjson import CustomJSON


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

import http.server
import io
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import free_port
from nanochat.common import MissingInputError
from tasks import hub
from tasks.hub import load_hub_dataset, task_data_dir


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


class HubServer:
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

        class Handler(http.server.BaseHTTPRequestHandler):
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

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def body(self, path):
        for (repo, subset, split), shards in self.splits.items():
            if path == f"/api/datasets/{repo}/parquet/{subset}/{split}":
                return json.dumps([f"{self.url}/files/{repo}/{subset}/{split}/{i}.parquet" for i in range(len(shards))]).encode()
            for i, shard in enumerate(shards):
                if path == f"/files/{repo}/{subset}/{split}/{i}.parquet":
                    return shard
        return None

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


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


def test_shuffle_is_the_numpy_permutation_that_datasets_uses(base_dir):
    rows = [{"x": i} for i in range(50)]
    write_split("org/data", "default", "train", rows, shard_size=20)
    shuffled = load_hub_dataset("org/data", "default", "train").shuffle(seed=42)
    permutation = np.random.default_rng(42).permutation(50)
    assert [shuffled[i]["x"] for i in range(50)] == list(permutation)
    datasets = pytest.importorskip("datasets")
    reference = datasets.Dataset.from_list(rows).shuffle(seed=42)
    assert [shuffled[i]["x"] for i in range(50)] == [reference[i]["x"] for i in range(50)]


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
