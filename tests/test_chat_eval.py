"""
tasks/evaluation.py and scripts/chat_eval.py: categorical scoring on a model whose letter logits the test sets (the right
position, only the allowed letters, padded batches of any size), pass@n of generative tasks on a
real tiny model and Engine with a task whose verdicts the test scripts, the ChatCORE formula and
the labels of partial and offline results, and the CLI on the tiny checkpoint saved as an SFT
model: the report section, and 2 gloo ranks scoring exactly what 1 rank scores.
"""

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO_ROOT, build_gpt, child_env, free_port, gloo_aborted
from nanochat.checkpoint_manager import PHASES
from nanochat.common import ConfigError, MissingInputError
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig
from scripts import chat_eval
from tasks import evaluation
from tasks.common import Task, render_mc
from tasks.hub import MANIFEST_NAME, PROVENANCE_NAME, task_data_dir
from tasks.provenance import DataSource



# -----------------------------------------------------------------------------
# Categorical: the letter with the highest logit among the allowed ones, at the last prompt position


class LetterTask(Task):
    """Multiple-choice problems (question, letters, answer) in the format of ARC and MMLU."""

    def __init__(self, problems):
        super().__init__()
        self.problems = problems

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.problems)

    def get_example(self, index):
        question, letters, answer = self.problems[index]
        choices = [f"choice {letter.lower()}" for letter in letters]
        return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                             {"role": "assistant", "content": answer}], "letters": letters}

    def evaluate(self, conversation, response):
        assert response in conversation["letters"], response
        return response == conversation["messages"][-1]["content"]


class LetterLogitsModel(torch.nn.Module):
    """
    The forward(ids) -> logits interface of GPT. For each row it finds the prompt it was given
    (the rest of the row must be <|bos|> padding) and writes: at the prompt's last position, 5 on
    the letter the test chose and 10 on a louder token that is not an allowed letter; at every
    other position, 20 on another letter (so reading the wrong position gives a wrong answer).
    """

    def __init__(self, vocab_size, bos, plans):
        super().__init__()
        self.vocab_size, self.bos, self.plans = vocab_size, bos, plans  # plans: [(prompt ids, chosen, louder, elsewhere)]
        self.rows_seen = []

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        for row, tokens in enumerate(ids.tolist()):
            prompt, chosen, louder, elsewhere = next(p for p in self.plans if tokens[:len(p[0])] == p[0])
            assert all(token == self.bos for token in tokens[len(prompt):]), "prompts are right-padded with <|bos|>"
            logits[row, :, elsewhere] = 20.0
            last = len(prompt) - 1
            logits[row, last, :] = 0.0
            logits[row, last, chosen], logits[row, last, louder] = 5.0, 10.0
            self.rows_seen.append(len(tokens))
        return logits


def letter_problems():
    """7 problems of different lengths: (question, letters, answer, letter the model picks, a louder other token); right on 0, 2, 3, 6."""
    return [
        ("What is two plus two?", ("A", "B", "C", "D"), "B", "B", "the"),
        ("Which of these animals can fly over the tall mountains in winter?", ("A", "B", "C", "D"), "C", "A", "D"),
        ("Pick one.", ("A", "B", "C"), "A", "A", "D"),  # D is louder but not a choice of this question
        ("Which planet is known as the red planet of our solar system?", ("A", "B", "C", "D"), "D", "D", "E"),
        ("Water freezes at what temperature?", ("A", "B", "C", "D"), "A", "C", "the"),
        ("Numbered labels?", ("1", "2", "3", "4"), "3", "4", "A"),
        ("Last one, answer C.", ("A", "B", "C", "D"), "C", "C", "cat"),
    ]


def build_letter_setup(tokenizer):
    rows = letter_problems()
    task = LetterTask([(question, letters, answer) for question, letters, answer, _, _ in rows])
    token = lambda text: tokenizer.encode(text)[0]  # noqa: E731
    plans = []
    for index, (_, letters, _, chosen, louder) in enumerate(rows):
        other = next(letter for letter in letters if letter != chosen)
        plans.append((tokenizer.render_for_completion(task[index]), token(chosen), token(louder), token(other)))
    return task, LetterLogitsModel(tokenizer.get_vocab_size(), tokenizer.get_bos_token_id(), plans)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_categorical_counts_the_chosen_letter_at_the_last_prompt_position_and_ignores_other_tokens(tiny_tokenizer, batch_size, capsys):
    task, model = build_letter_setup(tiny_tokenizer)
    accuracy = evaluation.run_categorical_eval(task, tiny_tokenizer, model, batch_size)
    assert accuracy == pytest.approx(4 / 7)
    assert "Final: 4/7 (57.14%)" in capsys.readouterr().out
    assert len(model.rows_seen) == 7  # every problem in exactly one row


def test_categorical_max_problems_and_the_registry_entry_point(tiny_tokenizer, monkeypatch):
    task, model = build_letter_setup(tiny_tokenizer)
    monkeypatch.setitem(evaluation.TASKS, "Letters", lambda: task)
    # the first 3 problems: right, wrong, right
    accuracy = evaluation.run_chat_eval("Letters", model, tiny_tokenizer, Engine(model, tiny_tokenizer), batch_size=2, max_problems=3)
    assert accuracy == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="unknown task 'Nope'"):
        evaluation.run_chat_eval("Nope", model, tiny_tokenizer, None)


def test_a_letter_that_is_several_tokens_is_a_clear_error(tiny_tokenizer):
    label = "Zq9"
    assert len(tiny_tokenizer.encode(label)) > 1
    task = LetterTask([("Odd labels?", ("A", label), "A")])
    model = LetterLogitsModel(tiny_tokenizer.get_vocab_size(), tiny_tokenizer.get_bos_token_id(), [
        (tiny_tokenizer.render_for_completion(task[0]), 0, 1, 2)])
    with pytest.raises(ConfigError, match=f"answer letter '{label}' encodes to"):
        evaluation.run_categorical_eval(task, tiny_tokenizer, model, batch_size=1)


# -----------------------------------------------------------------------------
# Generative: pass@n through the real Engine


class ScriptedTask(Task):
    """Three problems whose verdicts the test scripts: never, only the 3rd sample, always."""

    def __init__(self):
        super().__init__()
        self.calls = {0: [], 1: [], 2: []}

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return 3

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"Problem number {index}: the cat sees the moon."},
                             {"role": "assistant", "content": "#### 1"}], "problem": index}

    def evaluate(self, conversation, completion):
        calls = self.calls[conversation["problem"]]
        calls.append(completion)
        return {0: False, 1: len(calls) == 3, 2: True}[conversation["problem"]]


@pytest.fixture(scope="module")
def tiny_engine(tiny_tokenizer):
    config = GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1,
                       n_embd=64, window_pattern="L")
    model = build_gpt(config, seed=3, perturb=0.5)
    return model, Engine(model, tiny_tokenizer)


def test_generative_pass_at_n_passes_a_problem_when_any_sample_passes(tiny_tokenizer, tiny_engine, capsys):
    model, engine = tiny_engine
    sampling = dict(max_new_tokens=6, temperature=1.0, top_k=50)
    task = ScriptedTask()
    assert evaluation.run_generative_eval(task, tiny_tokenizer, model, engine, 4, **sampling) == pytest.approx(2 / 3)
    assert "Final: 2/3 (66.67%)" in capsys.readouterr().out
    for index, completions in task.calls.items():
        # each completion is the decoded generated part of the Engine's sample, without the prompt
        prompt = tiny_tokenizer.render_for_completion(task[index])
        samples, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=6, temperature=1.0, top_k=50)
        assert completions == [tiny_tokenizer.decode(sample[len(prompt):]) for sample in samples]
    assert len(set(task.calls[1])) > 1  # the samples really differ
    # one sample: problem 1 never reaches its passing 3rd sample
    assert evaluation.run_generative_eval(ScriptedTask(), tiny_tokenizer, model, engine, 1, **sampling) == pytest.approx(1 / 3)


# -----------------------------------------------------------------------------
# ChatCORE and the labels of the report lines


def test_chatcore_centers_each_task_by_its_chance_accuracy_and_needs_all_six():
    results = {"ARC-Easy": 0.25, "ARC-Challenge": 0.625, "MMLU": 1.0, "GSM8K": 0.1, "HumanEval": 0.2, "SpellingBee": 0.3}
    # (0.25-0.25)/0.75 = 0, (0.625-0.25)/0.75 = 0.5, 1, then 0.1, 0.2, 0.3 as they are
    assert evaluation.chatcore_metric(results) == pytest.approx((0 + 0.5 + 1 + 0.1 + 0.2 + 0.3) / 6)
    assert evaluation.chatcore_metric({**results, "ARC-Easy": 0.0}) == pytest.approx((-1 / 3 + 0.5 + 1 + 0.6) / 6)
    assert evaluation.chatcore_metric({k: v for k, v in results.items() if k != "HumanEval"}) is None

    sizes = {"ARC-Easy": 2376, "ARC-Challenge": 1172, "MMLU": 14042, "GSM8K": 1319, "HumanEval": 164, "SpellingBee": 256}
    source = DataSource("offline copy", "rebuilt")
    accuracies, chatcore = chat_eval.result_lines(results, sizes, {"MMLU": source}, max_problems=200)
    assert accuracies["ARC-Easy (200 of 2,376 problems)"] == 0.25
    assert accuracies["MMLU (200 of 14,042 problems; offline copy)"] == 1.0
    assert accuracies["HumanEval"] == 0.2  # 164 problems: all of them ran
    assert list(chatcore) == ["ChatCORE metric (at most 200 problems per task; offline data for MMLU)"]
    accuracies, chatcore = chat_eval.result_lines(results, sizes, {}, max_problems=None)
    assert list(accuracies) == list(results) and list(chatcore) == ["ChatCORE metric"]
    assert chat_eval.result_lines({"GSM8K": 0.5}, sizes, {}, None) == ({"GSM8K": 0.5}, {})


# -----------------------------------------------------------------------------
# The CLI on the tiny checkpoint, saved as an SFT model, with hand-made task data

ARC_QUESTIONS = ["Which is a gas?", "What do plants need to grow well in a garden?", "Which is hot?",
                 "What melts ice fastest?", "Which tool measures the length of a long road?", "Pick the metal.",
                 "Which animal lives in the quiet sea near a red house?"]
RIGHT = {0, 2, 3, 5}  # ARC questions whose answer key is the model's own prediction
GSM8K_ROWS = [{"question": f"The cat sees {n} stars and {n} more. How many?", "answer": f"{n} + {n} = <<{n}+{n}={2 * n}>>{2 * n}\n#### {2 * n}"}
              for n in (2, 3, 5)]
FLAGS = ["-i", "sft", "-a", "ARC-Easy|GSM8K", "-b", "2", "-m", "4", "--device-type", "cpu"]


def write_split(repo_id, subset, split, rows, provenance):
    """The layout tasks.hub reads (a shard, the provenance the offline builder writes, the manifest last)."""
    directory = task_data_dir(repo_id, subset, split)
    os.makedirs(directory, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(directory, "00000.parquet"))
    with open(os.path.join(directory, PROVENANCE_NAME), "w") as f:
        json.dump(provenance, f)
    with open(os.path.join(directory, MANIFEST_NAME), "w") as f:
        json.dump(["00000.parquet"], f)


def arc_rows(answer_keys):
    return [{"id": f"q{i}", "question": question, "choices": {"text": ["ice", "steam", "rock", "iron"], "label": list("ABCD")},
             "answerKey": answer_keys[i]} for i, question in enumerate(ARC_QUESTIONS)]


def reference_predictions(model, tokenizer, task):
    """{question: letter}: each prompt alone, one forward, argmax over the four letters at its last token."""
    letter_ids = [tokenizer.encode(letter)[0] for letter in "ABCD"]
    predictions = {}
    with torch.inference_mode():
        for index in range(len(task)):
            conversation = task[index]
            prompt = tokenizer.render_for_completion(conversation)
            logits = model(torch.tensor([prompt]))[0, -1, letter_ids]
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] > 1e-5, "a near tie would make the check depend on rounding"
            question = conversation["messages"][0]["content"].split("\n")[0].removeprefix("Multiple Choice question: ")
            predictions[question] = "ABCD"[logits.argmax().item()]
    return predictions


@pytest.fixture(scope="module")
def sft_base(tiny_base_dir, tiny_checkpoint, tmp_path_factory):
    """
    A base dir with the tiny model as the SFT checkpoint for_loss, ARC-Easy test labelled an offline
    copy whose answer keys make the model right on exactly RIGHT, and GSM8K test labelled a
    substitute. The 2-rank run starts here, so it overlaps the in-process tests.
    """
    from nanochat.checkpoint_manager import load_model
    from tasks.arc import ARC

    base = tmp_path_factory.mktemp("chat_eval_base")
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    source = tiny_base_dir / "base_checkpoints" / "for_loss"
    target = base / PHASES["sft"][0] / "for_loss"
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name.startswith(("model_", "meta_")):
            shutil.copy(path, target / path.name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOCHAT_BASE_DIR", str(base))
        write_split("allenai/ai2_arc", "ARC-Easy", "test", arc_rows("A" * len(ARC_QUESTIONS)), {"substitute": None, "source": "hand-made"})
        write_split("openai/gsm8k", "main", "test", GSM8K_ROWS, {"substitute": "three hand-made problems stand in for GSM8K test"})
        model, tokenizer, _ = load_model("sft", "cpu", phase="eval")
        predicted = reference_predictions(model, tokenizer, ARC("ARC-Easy", "test"))
        keys = [predicted[q] if i in RIGHT else "ABCD"[("ABCD".index(predicted[q]) + 1) % 4] for i, q in enumerate(ARC_QUESTIONS)]
        write_split("allenai/ai2_arc", "ARC-Easy", "test", arc_rows(keys), {"substitute": None, "source": "hand-made"})

    ranks = start_two_ranks(base)
    yield base, ranks
    for process in ranks:
        if process.poll() is None:
            process.kill()
            process.wait()


def start_two_ranks(base):
    """
    chat_eval as 2 gloo ranks. Each process gets the variables torchrun would set (RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), without the launcher's own interpreter (~5 s of CPU).
    """
    port = free_port()
    ranks = []
    for rank in range(2):
        env = dict(child_env(base), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        ranks.append(subprocess.Popen([sys.executable, "-m", "scripts.chat_eval", *FLAGS], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return ranks


def communicate(ranks):
    """[(returncode, stdout, stderr)] of each rank."""
    outputs = [process.communicate(timeout=300) for process in ranks]
    return [(process.returncode, stdout, stderr) for process, (stdout, stderr) in zip(ranks, outputs)]


def final_lines(text):
    return [line for line in text.splitlines() if line.startswith(("Final:", "ARC-Easy accuracy", "GSM8K accuracy"))]


@pytest.fixture(scope="module")
def one_rank_run(sft_base):
    """chat_eval's main() in this process (1 rank) on FLAGS; returns its stdout."""
    base, _ = sft_base
    import contextlib
    import io

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setenv("NANOCHAT_BASE_DIR", str(base))
        chat_eval.main(FLAGS)
    return out.getvalue()


def test_cli_scores_the_known_answers_and_labels_the_offline_data_in_the_report(sft_base, one_rank_run):
    base, _ = sft_base
    assert final_lines(one_rank_run) == ["Final: 4/7 (57.14%)", "ARC-Easy accuracy: 57.14%", "Final: 0/3 (0.00%)", "GSM8K accuracy: 0.00%"]
    assert "GSM8K: offline substitute: three hand-made problems stand in for GSM8K test" in one_rank_run
    section = (base / "report" / "chat-evaluation-sft.md").read_text()
    assert section.startswith("## Chat evaluation sft\n")
    assert "- ARC-Easy (offline copy): 0.5714\n" in section
    assert "- GSM8K (offline substitute): 0.0000\n" in section
    assert "- data of GSM8K: offline substitute: three hand-made problems stand in for GSM8K test" in section
    assert "- dtype: float32\n" in section
    assert "ChatCORE" not in section  # only two of the six tasks ran


def test_two_ranks_score_exactly_what_one_rank_scores(sft_base, one_rank_run):
    base, ranks = sft_base
    results = communicate(ranks)
    if gloo_aborted(results):  # a rare gloo abort at exit: once more
        results = communicate(start_two_ranks(base))
    for code, _, err in results:
        assert code == 0, err
    (_, rank0, _), (_, rank1, _) = results
    assert final_lines(rank0) == final_lines(one_rank_run)  # the totals are all-reduced; rank 0 prints them
    assert final_lines(rank1) == []
    # GSM8K's 3 problems: rank 0 takes problems 0 and 2, rank 1 takes problem 1
    assert "Rank 0 | 0/2 (0.00%)" in rank0 and "Rank 1 | 0/1 (0.00%)" in rank1


def test_missing_checkpoint_and_unknown_task_are_one_line_errors(sft_base, monkeypatch):
    base, _ = sft_base
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    with pytest.raises(MissingInputError, match=r"no mid checkpoint in .*: run `python -m scripts.mid_train` first \(checkpoints of other phases exist: .*sft"):
        chat_eval.main(["-i", "mid", "--device-type", "cpu"])
    with pytest.raises(ConfigError, match="unknown task MMLU-Pro in -a"):
        chat_eval.main(["-i", "sft", "-a", "ARC-Easy|MMLU-Pro"])
    with pytest.raises(ConfigError, match="--max-problems must be at least 1"):
        chat_eval.main(["-i", "sft", "-x", "0"])
    # the tests compute in float32 (NANOCHAT_DTYPE): a different -d cannot be honoured after import
    with pytest.raises(ConfigError, match="start it with -d bfloat16 on the command line"):
        chat_eval.main(["-i", "sft", "-d", "bfloat16"])
