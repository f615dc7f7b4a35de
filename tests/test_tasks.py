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
