"""
scripts.export_hf: a nanochat checkpoint as a Hugging Face transformers directory, and back.

Tiny random models (noisy weights, so no zero-initialized path hides) are exported and loaded
with AutoModelForCausalLM(trust_remote_code=True); transformers must reproduce nanochat's
logits, cached decoding and greedy Engine output; the exported tokenizer must encode and render
chats exactly as ours; importing an export must give the checkpoint back bit for bit; and
lm-evaluation-harness must score the export with the log-likelihoods our own model gives.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping

import pytest

# transformers copies trust_remote_code modules into this cache; keep it out of the home directory
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import torch  # noqa: E402

from conftest import build_gpt, default_shard_dir, run_in_process, small_bundle, synthetic_documents  # noqa: E402
from nanochat.checkpoint_manager import load_model, save_checkpoint  # noqa: E402
from nanochat.common import ConfigError, MissingInputError  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPTConfig  # noqa: E402
from nanochat.tokenizer import RustBPETokenizer  # noqa: E402
from scripts import export_hf  # noqa: E402
from scripts.export_hf import stop_token_ids, write_model_files, write_tokenizer_files  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Depths 1-4; GQA; short windows that the 40-token inputs overrun (sequence_len 16 -> window 8);
# vocabs that nanochat pads to 320 (300, 333) and one it does not (320).
CONFIGS = {
    "d1_full_attention": GPTConfig(sequence_len=32, vocab_size=320, n_layer=1, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L"),
    "d2_gqa_padded_vocab": GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=4, n_kv_head=1, n_embd=64, window_pattern="SL"),
    "d3_windows_odd_depth": GPTConfig(sequence_len=16, vocab_size=333, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SSL"),
    "d4_sssl_gqa": GPTConfig(sequence_len=16, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSSL"),
}

VARIED_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "runs   of    spaces\tand\t\ttabs\n\n\nand blank lines\r\nwindows\rold mac",
    "digits 0 12 345 6789 3.14159 1,000,000 2026-12-01 0x1F 1e-10",
    "ünïcödé façade naïve — “quotes” ‘single’ … ß Ω ∑ ∫ ≤ ≥",
    "日本語のテキスト 中文文本 한국어 текст на русском العربية עברית",
    "emoji 🙂👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷 and 🧑‍💻",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { x[i] += y[i] * 2; } // C++ ==> != && ||",
    "I'm sure you're right, they'll see we've done it; HE'S, I'D, WE'LL",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "a" * 50 + " " + "ab" * 25 + " " + "aba" * 20 + " " + "=" * 40,
    "",
    " ",
    "\n",
]


def hf_load(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (nanochat model, transformers model)}, each exported once for the module."""
    cache = {}

    def get(name):
        if name not in cache:
            config = CONFIGS[name]
            model = build_gpt(config, seed=len(cache), perturb=0.05)
            directory = tmp_path_factory.mktemp(name)
            write_model_files(str(directory), config, model.state_dict(), bos_token_id=None, eos_token_ids=None)
            cache[name] = (model, hf_load(str(directory)))
        return cache[name]

    return get


def random_ids(vocab_size, shape, seed):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_logits_equal_nanochat_logits(exported, name):
    model, hf_model = exported(name)
    idx = random_ids(CONFIGS[name].vocab_size, (2, 40), seed=1)
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    assert theirs.shape == (2, 40, CONFIGS[name].vocab_size)  # the padded rows are cut off
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_cached_decoding_gives_the_full_forward_logits(exported):
    """Prefill then one token at a time through transformers' DynamicCache, past every window."""
    model, hf_model = exported("d4_sssl_gqa")
    idx = random_ids(300, (1, 40), seed=2)
    cache = transformers.DynamicCache(config=hf_model.config)
    with torch.no_grad():
        pieces = [hf_model(idx[:, :10], cache=cache, use_cache=True).logits]
        for t in range(10, 40):
            pieces.append(hf_model(idx[:, t:t + 1], cache=cache, use_cache=True).logits)
        expected = model(idx)
    # layers 0-2 are short-window layers ("SSSL", last layer long): they get sliding cache layers
    assert cache.is_sliding == [True, True, True, False]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=0, atol=1e-5)


def test_left_padded_batch_gives_each_rows_own_logits(exported):
    """A padding mask and the position ids generate() derives from it leave every row as if alone."""
    model, hf_model = exported("d2_gqa_padded_vocab")
    long_row, short_row = random_ids(300, (12,), seed=3), random_ids(300, (7,), seed=4)
    pad = 5
    idx = torch.stack([long_row, torch.cat([torch.zeros(pad, dtype=torch.long), short_row])])
    attention_mask = torch.ones_like(idx)
    attention_mask[1, :pad] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = hf_model(idx, attention_mask=attention_mask, position_ids=position_ids).logits
        torch.testing.assert_close(logits[0], model(long_row[None])[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[1, pad:], model(short_row[None])[0], rtol=0, atol=1e-5)


def test_greedy_generate_equals_the_engine_token_for_token(exported, tiny_tokenizer):
    model, hf_model = exported("d4_sssl_gqa")  # vocab 300 = tiny_tokenizer's
    prompt = tiny_tokenizer.encode("The cat sees the moon.", prepend="<|bos|>")
    engine_tokens = []
    for column, _ in Engine(model, tiny_tokenizer).generate(prompt, num_samples=1, max_tokens=40, temperature=0):
        engine_tokens.append(column[0])
    with torch.no_grad():
        output = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, use_cache=True,
                                   eos_token_id=None, pad_token_id=0)
    hf_tokens = output[0, len(prompt):].tolist()
    assert len(prompt) + len(hf_tokens) > 2 * 16  # generation ran past sequence_len, so every window mattered
    if len(engine_tokens) < 40:  # the Engine stops at <|assistant_end|> / <|bos|>; transformers was told not to
        assert engine_tokens[-1] in stop_token_ids(tiny_tokenizer)
    assert hf_tokens[:len(engine_tokens)] == engine_tokens


# -----------------------------------------------------------------------------
# The tokenizer


@pytest.fixture(scope="module")
def varied_tokenizer():
    """A tokenizer whose merges cover code, digits, whitespace runs and non-Latin text."""
    texts = synthetic_documents(100, seed=3) + VARIED_TEXTS * 20
    return RustBPETokenizer.train_from_iterator(texts, 700)


@pytest.fixture(scope="module")
def hf_tokenizers(tiny_base_dir, varied_tokenizer, tmp_path_factory):
    """{name: (our tokenizer, the exported one loaded by AutoTokenizer)}."""
    ours = {"tok_train": RustBPETokenizer.from_directory(str(tiny_base_dir / "tokenizer")), "varied": varied_tokenizer}
    pairs = {}
    for name, tokenizer in ours.items():
        directory = tmp_path_factory.mktemp(f"tokenizer_{name}")
        write_tokenizer_files(str(directory), tokenizer, sequence_len=64)
        pairs[name] = (tokenizer, transformers.AutoTokenizer.from_pretrained(str(directory)))
    return pairs


@pytest.mark.parametrize("name", ["tok_train", "varied"])
def test_exported_tokenizer_encodes_like_ours(hf_tokenizers, name):
    ours, theirs = hf_tokenizers[name]
    corpus = VARIED_TEXTS + synthetic_documents(30, seed=11) + ["\n".join(VARIED_TEXTS)]
    for text in corpus:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, repr(text)
        assert theirs.decode(ids) == ours.decode(ids)
    assert len(theirs) == ours.get_vocab_size()
    for special in ours.get_special_tokens():
        assert theirs.convert_tokens_to_ids(special) == ours.encode_special(special)


CONVERSATIONS = [
    [{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Rayleigh scattering."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi  there\n"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "What is 12*34?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "}, {"type": "python", "text": "12*34"},
                                       {"type": "python_output", "text": "408"}, {"type": "text", "text": " It is 408."}]}],
    [{"role": "user", "content": "ünïcödé 🙂 and   spaces"}, {"role": "assistant", "content": "日本語 ok"}],
]


def chat_ids(tokenizer, messages, **kwargs):
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_template_renders_like_render_conversation(hf_tokenizers, index):
    ours, theirs = hf_tokenizers["varied"]
    conversation = {"messages": CONVERSATIONS[index]}
    assert chat_ids(theirs, conversation["messages"]) == ours.render_conversation(conversation)[0]
    prompt = chat_ids(theirs, conversation["messages"][:-1], add_generation_prompt=True)
    assert prompt == ours.render_for_completion(conversation)


def test_chat_template_rejects_what_render_conversation_rejects(hf_tokenizers):
    from jinja2.exceptions import TemplateError

    ours, theirs = hf_tokenizers["varied"]
    for messages in ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                     [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
                     [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]):
        with pytest.raises(ValueError):
            ours.render_conversation({"messages": messages})
        with pytest.raises(TemplateError):
            chat_ids(theirs, messages)


# -----------------------------------------------------------------------------
# The script: export, import, errors


@pytest.fixture
def own_base_dir(tiny_checkpoint, tiny_checkpoint_2026_01, tiny_base_dir, tmp_path, monkeypatch):
    """
    A base dir of our own (imports write here, not in the shared one) with the tiny tokenizer, the
    tiny 2026-01 base model as for_loss (the architecture the export implements) and the 2026-07 one as latest.
    """
    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    shutil.copytree(tiny_checkpoint_2026_01, base / "base_checkpoints" / "for_loss")
    shutil.copytree(tiny_base_dir / "base_checkpoints" / "for_loss", base / "base_checkpoints" / "latest")
    (base / "report").mkdir()
    (base / "report" / "base-model-training.md").write_text("## Base model training\n\n- Minimum validation bpb: 3.1416\n")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


def only_checkpoint_step(checkpoint_dir):
    (name,) = [n for n in os.listdir(checkpoint_dir) if n.startswith("model_")]
    return int(name[len("model_"):-len(".pt")])


def test_export_then_import_reproduces_the_checkpoint_bit_for_bit(own_base_dir, tmp_path):
    output = tmp_path / "hf" / "tiny"
    export_hf.main(["-i", "base", "-g", "for_loss", "--output", str(output)])
    required = {"README.md", "config.json", "configuration_nanochat_gpt.py", "generation_config.json", "model.safetensors",
                "modeling_nanochat_gpt.py", "tokenizer.json", "tokenizer_config.json"}
    # transformers 5 writes the chat template to its own file, earlier versions into tokenizer_config.json
    assert required <= set(os.listdir(output)) <= required | {"chat_template.jinja", "special_tokens_map.json"}
    assert [n for n in os.listdir(output.parent) if n != "tiny"] == []  # no staging directory left behind
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "nanochat_gpt" and config["architectures"] == ["NanochatGPTForCausalLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert "Minimum validation bpb: 3.1416" in (output / "README.md").read_text()

    model, tokenizer, _ = load_model("base", "cpu", phase="eval", model_tag="for_loss")
    hf_model = hf_load(str(output))
    idx = torch.tensor([tokenizer.encode("The old king paints a red house.", prepend="<|bos|>")])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, model(idx), rtol=0, atol=1e-5)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(output))
    assert hf_tokenizer.encode("a small bird crosses the river", add_special_tokens=False) == tokenizer.encode("a small bird crosses the river")
    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["eos_token_id"] == stop_token_ids(tokenizer)

    export_hf.main(["--import", str(output), "-i", "sft", "-g", "back", "-s", "7"])
    source_dir = own_base_dir / "base_checkpoints" / "for_loss"
    original = torch.load(source_dir / f"model_{only_checkpoint_step(source_dir):06d}.pt", weights_only=True)
    imported = torch.load(own_base_dir / "chatsft_checkpoints" / "back" / "model_000007.pt", weights_only=True)
    assert set(imported) == set(original)
    for key, tensor in original.items():
        assert imported[key].dtype == tensor.dtype and torch.equal(imported[key], tensor), key
    reloaded, _, meta = load_model("sft", "cpu", phase="eval", model_tag="back")
    assert {k: meta[k] for k in ("model_config", "model_options")} == model.config.meta_entries()
    with torch.no_grad():
        assert torch.equal(reloaded(idx), model(idx))


def test_base_loss_and_base_eval_score_the_export_as_they_score_the_checkpoint(own_base_dir, tiny_base_dir, tmp_path):
    from scripts import base_eval, base_loss

    output = tmp_path / "hf" / "tiny"
    export_hf.main(["-i", "base", "-g", "for_loss", "--output", str(output)])
    shutil.copytree(default_shard_dir(tiny_base_dir), default_shard_dir(own_base_dir))
    bundle = small_bundle(str(tmp_path / "bundle"), offline=True)
    bpb, tables = {}, {}
    for name, flags in (("checkpoint", ["--model-tag=for_loss"]), ("export", [f"--hf-path={output}"])):
        code, out, err = run_in_process(base_loss.main, "base_loss", own_base_dir,
                                        ["--device-type=cpu", "--device-batch-size=4", "--split-tokens=512", *flags])
        assert code == 0, out + err
        bpb[name] = [float(line.split(": ")[1]) for line in out.splitlines() if line.startswith(("train bpb", "val bpb"))]
        code, out, err = run_in_process(base_eval.main, "base_eval", own_base_dir,
                                        ["--device-type=cpu", f"--bundle-dir={bundle}", *flags])
        assert code == 0, out + err
        (csv_name,) = [n for n in os.listdir(own_base_dir / "base_eval") if n not in tables.values()]
        tables[name] = csv_name
    assert len(bpb["export"]) == 2 and bpb["export"] == pytest.approx(bpb["checkpoint"], abs=1e-4)
    # the same model and tokenizer: the same prompts, verdicts and score on every task
    assert tables == {"checkpoint": "base_model_000003.csv", "export": "tiny.csv"}
    checkpoint_table, export_table = ((own_base_dir / "base_eval" / tables[n]).read_text() for n in ("checkpoint", "export"))
    assert export_table == checkpoint_table and len(export_table.splitlines()) == 5


def test_export_errors_are_one_line_and_leave_nothing_behind(own_base_dir, tmp_path):
    output = tmp_path / "out"
    with pytest.raises(MissingInputError, match="no base checkpoint in"):
        export_hf.main(["-i", "base", "-g", "nope", "--output", str(output)])
    with pytest.raises(MissingInputError):
        export_hf.main(["-i", "sft", "--output", str(output)])
    assert not output.exists()

    output.mkdir()
    (output / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--force"):
        export_hf.main(["-i", "base", "-g", "for_loss", "--output", str(output)])
    assert os.listdir(output) == ["mine.txt"]
    export_hf.main(["-i", "base", "-g", "for_loss", "--output", str(output), "--force"])
    assert "model.safetensors" in os.listdir(output) and "mine.txt" not in os.listdir(output)

    # a checkpoint of an architecture the modeling file does not implement: the 2026-07 recipe, or unknown fields
    with pytest.raises(ConfigError, match="is a 2026-07 model .*implements the 2026-01 architecture only"):
        export_hf.main(["-i", "base", "-g", "latest", "--output", str(tmp_path / "out_latest")])
    assert not (tmp_path / "out_latest").exists()
    model, _, meta = load_model("base", "cpu", phase="eval", model_tag="for_loss")
    newer = own_base_dir / "base_checkpoints" / "newer"
    state = model.state_dict()
    save_checkpoint(str(newer), 1, state, None, {**meta, "model_config": {**meta["model_config"], "smear_channels": 24}})
    extra = own_base_dir / "base_checkpoints" / "extra"
    save_checkpoint(str(extra), 1, {**state, "smear_lambda": torch.zeros(1)}, None, meta)
    for tag, message in (("newer", "smear_channels"), ("extra", "smear_lambda")):
        target = tmp_path / f"out_{tag}"
        with pytest.raises(ConfigError, match=message) as error:
            export_hf.main(["-i", "base", "-g", tag, "--output", str(target)])
        assert "\n" not in str(error.value)
        assert not target.exists()
    assert sorted(os.listdir(tmp_path)) == ["base", "out"]  # no staging directories anywhere

    with pytest.raises(ConfigError, match="--output DIR"):
        export_hf.main(["-i", "base"])
    with pytest.raises(MissingInputError, match="config.json"):
        export_hf.main(["--import", str(tmp_path / "base")])


# -----------------------------------------------------------------------------
# lm-evaluation-harness on an export


def lm_eval_loglikelihood(model, tokenizer, context, continuation):
    """What lm-eval's HF model scores: sum of log p(continuation tokens | context), no BOS, the
    continuation's ids cut from the encoding of the whole string."""
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    continuation_ids = whole[len(context_ids):]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1])[0], dim=-1)
    positions = range(len(context_ids) - 1, ids.size(1) - 1)
    return sum(logprobs[p, ids[0, p + 1]].item() for p in positions)


def test_lm_eval_scores_the_export_with_our_loglikelihoods(tiny_tokenizer, tmp_path, monkeypatch, capsys):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    # a context long enough for every prompt: lm-eval would cut a longer one from the left
    config = dataclasses.replace(CONFIGS["d2_gqa_padded_vocab"], sequence_len=128)
    model = build_gpt(config, seed=5, perturb=0.05)
    directory = tmp_path / "export"
    directory.mkdir()
    write_model_files(str(directory), config, model.state_dict(), tiny_tokenizer.get_bos_token_id(), stop_token_ids(tiny_tokenizer))
    write_tokenizer_files(str(directory), tiny_tokenizer, config.sequence_len)
    data = tmp_path / "lm_eval_data"
    data.mkdir()
    arc = [{"question": f"What does the cat see {i}?", "choices": ["the moon", "a red house", "the quiet sea", "many stars"],
            "answer": i % 4} for i in range(3)]
    mmlu = [{"question": f"The dog follows {i}", "choices": ["the river", "a bird", "our city", "the king"],
             "answer": (i + 1) % 4, "subject": "synthetic"} for i in range(3)]
    for name, rows in (("arc_easy", arc), ("mmlu", mmlu)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setenv("NANOCHAT_LM_EVAL_DATA", str(data))

    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={directory},trust_remote_code=True,dtype=float32",
        tasks=["nanochat_offline"], device="cpu", batch_size=4,
        task_manager=TaskManager(include_path=os.path.join(REPO_ROOT, "dev", "lm_eval_tasks"), include_defaults=False))
    print(make_table(results))
    assert "nanochat_arc_easy" in capsys.readouterr().out

    for task, rows in (("nanochat_arc_easy", arc), ("nanochat_mmlu", mmlu)):
        samples = results["samples"][task]
        assert len(samples) == len(rows)
        correct = 0
        for sample in samples:
            ours = [lm_eval_loglikelihood(model, tiny_tokenizer, context, continuation) for context, continuation in sample["arguments"]]
            theirs = [loglikelihood for loglikelihood, _ in sample["filtered_resps"]]
            assert theirs == pytest.approx(ours, abs=1e-4)
            correct += max(range(len(ours)), key=ours.__getitem__) == sample["target"]
        assert results["results"][task]["acc,none"] == pytest.approx(correct / len(rows))
