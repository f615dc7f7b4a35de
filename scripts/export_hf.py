"""
Export a nanochat checkpoint to a Hugging Face transformers model directory, or import one back.
The export loads with transformers alone (pip install 'nanochat[hf]'); README.md ("Export to
Hugging Face") shows how, and how to run lm-evaluation-harness on it.

Run it (CPU is enough: nothing is computed but a format change):
    python -m scripts.export_hf -i sft --output hf/d20-sft                  # largest sft model, last step
    python -m scripts.export_hf -i base -g d20 -s 21400 --output hf/d20-base
    python -m scripts.export_hf -i sft --output hf/d20-sft --force          # replace an earlier export
    python -m scripts.export_hf --import hf/d20-sft -i sft -g d20-tuned     # back to a nanochat checkpoint

Reads  $NANOCHAT_BASE_DIR/<phase>_checkpoints/<tag>/, the tokenizer, and report/*.md if present.
Writes DIR/: model.safetensors, config.json, our modeling code (from scripts/hf_export/), generation
       and tokenizer files (with the chat template) and a model card; built in a temporary directory
       beside DIR and renamed into place, so DIR is complete or absent. --import writes
       <phase>_checkpoints/<tag>/model_<step>.pt and meta_<step>.json (no optimizer).
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile

import torch

from nanochat.checkpoint_manager import checkpoints_dir_for, config_of, load_checkpoint, locate_checkpoint, save_checkpoint
from nanochat.common import ConfigError, MissingInputError, get_base_dir, parse_flags, print0, run_script
from nanochat.gpt import GPT, UPSTREAM_CONFIG_FIELDS
from nanochat.report import SECTION_ORDER
from nanochat.tokenizer import get_tokenizer

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_export")
MODELING_FILES = ("configuration_nanochat_gpt.py", "modeling_nanochat_gpt.py")
WEIGHTS_FILE = "model.safetensors"
AUTO_MAP = {
    "AutoConfig": "configuration_nanochat_gpt.NanochatGPTConfig",
    "AutoModelForCausalLM": "modeling_nanochat_gpt.NanochatGPTForCausalLM",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Export a nanochat checkpoint to Hugging Face format, or import one",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-i", "--source", type=str, default="sft", choices=["base", "mid", "sft", "rl"],
                        help="phase whose checkpoint to export (with --import: the phase to write)")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint directory (default: the largest model; with --import: the export's directory name)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last one; with --import: 0)")
    parser.add_argument("--output", type=str, default=None, help="directory to write the Hugging Face model to")
    parser.add_argument("--force", action="store_true", help="replace --output (or the imported checkpoint) if it exists")
    parser.add_argument("--import", dest="import_dir", type=str, default=None, help="an exported directory to turn back into a nanochat checkpoint")
    args = parse_flags(parser, argv)
    if (args.output is None) == (args.import_dir is None):
        raise ConfigError("pass either --output DIR (export a checkpoint) or --import DIR (make a checkpoint of an export)")
    return args


def _require_hf():
    missing = [name for name in ("transformers", "safetensors", "tokenizers") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"the Hugging Face export needs {', '.join(missing)} (the [hf] extra): pip install 'nanochat[hf]'")


# -----------------------------------------------------------------------------
# What the modeling file supports


def checked_model_config(meta, model_data, where):
    """
    The GPTConfig of a checkpoint (its meta's model_config and model_options, its state dict), after
    checking that it is exactly the architecture the exported modeling file implements: the 2026-01
    model. Anything else is a ConfigError naming what is not supported.
    """
    try:
        config = config_of(meta, model_data)
        with torch.device("meta"):
            expected = GPT(config).state_dict()
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: model config {meta.get('model_config')} is not supported by the exported modeling "
                          f"file: {error}") from error
    if config.recipe() != "2026-01":
        raise ConfigError(f"{where} is a {config.recipe() or 'custom'} model (smear, backout, ...): the exported modeling "
                          "file implements the 2026-01 architecture only; train with --recipe=2026-01 to export")
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    missing, extra = sorted(set(expected) - set(model_data)), sorted(set(model_data) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(model_data) if tuple(expected[k].shape) != tuple(model_data[k].shape))
    if missing or extra or wrong_shape:
        problems = [f"missing {', '.join(missing)}" if missing else "", f"unexpected {', '.join(extra)}" if extra else "",
                    f"wrong shape {', '.join(wrong_shape)}" if wrong_shape else ""]
        raise ConfigError(f"{where}: the weights do not match the architecture the exported modeling file implements "
                          f"({'; '.join(p for p in problems if p)})")
    return config, model_data


# -----------------------------------------------------------------------------
# Export


def model_card(model_name, source, step, config, num_params):
    """README.md: what the model is, how to load and evaluate it, and the training report if there is one."""
    lines = [
        "---", "library_name: transformers", "tags: [nanochat]", "---", "",
        f"# {model_name}", "",
        f"A nanochat model (phase `{source}`, step {step}): depth {config.n_layer}, width {config.n_embd}, "
        f"{config.n_head} query / {config.n_kv_head} key-value heads, context {config.sequence_len}, "
        f"window pattern `{config.window_pattern}`, vocab {config.vocab_size}, {num_params:,} parameters.", "",
        "It uses its own modeling code (value embeddings, per-layer residual scalars, sliding windows, "
        "logit soft-capping), so load it with `trust_remote_code=True`:", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(DIR)",
        "ids = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"Hi!\"}], add_generation_prompt=True, return_tensors=\"pt\")",
        "```", "",
    ]
    report_dir = os.path.join(get_base_dir(), "report")
    report_path = os.path.join(report_dir, "report.md")
    if os.path.exists(report_path):
        paths = [report_path]
    else:
        paths = [p for p in (os.path.join(report_dir, f"{slug}.md") for slug in SECTION_ORDER) if os.path.exists(p)]
    if paths:
        lines += ["## Training report", "", "From nanochat's report card:", ""]
        for path in paths:
            with open(path, encoding="utf-8") as f:
                lines += [f.read().strip(), ""]
    else:
        lines += ["No nanochat report card was found for this model.", ""]
    return "\n".join(lines)


def write_model_files(directory, config, model_data, bos_token_id=None, eos_token_ids=None):
    """model.safetensors, config.json, the modeling files and generation_config.json for a nanochat GPT."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from scripts.hf_export.configuration_nanochat_gpt import NanochatGPTConfig

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_data.items()}
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    hf_config = NanochatGPTConfig(**config.meta_entries()["model_config"], bos_token_id=bos_token_id, eos_token_id=eos_token_ids,
                                  pad_token_id=bos_token_id)
    hf_config.architectures = ["NanochatGPTForCausalLM"]
    hf_config.auto_map = dict(AUTO_MAP)
    hf_config.dtype = "float32"  # nanochat keeps fp32 master weights (embeddings may be bf16 in the file)
    hf_config.to_json_file(os.path.join(directory, "config.json"), use_diff=False)
    for name in MODELING_FILES:
        shutil.copyfile(os.path.join(TEMPLATE_DIR, name), os.path.join(directory, name))
    generation = GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_ids, pad_token_id=bos_token_id)
    generation.save_pretrained(directory)


def write_tokenizer_files(directory, tokenizer, sequence_len):
    from scripts.hf_export.hf_tokenizer import build_hf_tokenizer

    hf_tokenizer = build_hf_tokenizer(tokenizer)
    hf_tokenizer.model_max_length = sequence_len
    hf_tokenizer.save_pretrained(directory)


def stop_token_ids(tokenizer):
    """What generation stops on, as nanochat's Engine: <|assistant_end|> and <|bos|>."""
    return [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]


@dataclasses.dataclass
class ResolvedCheckpoint:
    checkpoint_dir: str
    model_tag: str
    step: int


def resolve_checkpoint(source, model_tag, step):
    checkpoint_dir, step = locate_checkpoint(source, model_tag, step)
    return ResolvedCheckpoint(checkpoint_dir, os.path.basename(checkpoint_dir), step)


def _replace_directory(staging, destination):
    """Move the finished staging directory onto destination; an existing destination is swapped out, then removed."""
    old = None
    if os.path.exists(destination):
        old = destination.rstrip(os.sep) + ".old-" + os.path.basename(staging)
        os.rename(destination, old)
    os.rename(staging, destination)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def export(source, model_tag, step, output, force=False):
    """Write the Hugging Face directory `output` for a nanochat checkpoint. Returns the resolved checkpoint."""
    _require_hf()
    output = os.path.abspath(output)
    if os.path.exists(output) and not force:
        raise ConfigError(f"{output} already exists: pass --force to replace it, or choose another --output")
    checkpoint = resolve_checkpoint(source, model_tag, step)
    model_data, _, meta = load_checkpoint(checkpoint.checkpoint_dir, checkpoint.step, "cpu")
    where = f"{checkpoint.checkpoint_dir} step {checkpoint.step}"
    config, model_data = checked_model_config(meta, model_data, where)
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ConfigError(f"the tokenizer in {os.path.join(get_base_dir(), 'tokenizer')} has {tokenizer.get_vocab_size()} "
                          f"tokens but {where} was trained with {config.vocab_size}: restore the model's tokenizer")

    os.makedirs(os.path.dirname(output), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=os.path.dirname(output))
    try:
        write_model_files(staging, config, model_data, tokenizer.get_bos_token_id(), stop_token_ids(tokenizer))
        write_tokenizer_files(staging, tokenizer, config.sequence_len)
        num_params = sum(v.numel() for v in model_data.values())
        card = model_card(f"nanochat {checkpoint.model_tag} ({source})", source, checkpoint.step, config, num_params)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        _replace_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print0(f"Exported {where} to {output}")
    return checkpoint


# -----------------------------------------------------------------------------
# Import


def import_export(directory, source, model_tag=None, step=None, force=False):
    """
    Write a nanochat checkpoint (model + meta, no optimizer state) from a Hugging Face directory this
    script exported (possibly fine-tuned elsewhere). Returns the checkpoint directory.
    """
    _require_hf()
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(directory, "config.json"), os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise MissingInputError(f"no {os.path.basename(path)} in {directory}: pass a directory written by "
                                    "python -m scripts.export_hf (a single-file safetensors export)")
    with open(config_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    if hf_config.get("model_type") != "nanochat_gpt":
        raise ConfigError(f"{config_path} has model_type {hf_config.get('model_type')!r}; only nanochat_gpt exports "
                          "(written by python -m scripts.export_hf) can be imported")
    model_config = {name: hf_config[name] for name in UPSTREAM_CONFIG_FIELDS if name in hf_config}
    model_data = load_file(weights_path)
    config, model_data = checked_model_config({"model_config": model_config}, model_data, directory)
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ConfigError(f"{directory} has a vocab of {config.vocab_size} but the tokenizer in "
                          f"{os.path.join(get_base_dir(), 'tokenizer')} has {tokenizer.get_vocab_size()}: "
                          "restore the tokenizer the model was trained with")

    model_tag = model_tag or os.path.basename(os.path.abspath(directory).rstrip(os.sep))
    step = 0 if step is None else step
    checkpoint_dir = os.path.join(checkpoints_dir_for(source), model_tag)
    meta_file = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if os.path.exists(meta_file) and not force:
        raise ConfigError(f"{meta_file} already exists: pass --force to overwrite it, or choose another -g/-s")
    meta = {"step": step, **config.meta_entries(), "imported_from": os.path.abspath(directory)}
    save_checkpoint(checkpoint_dir, step, model_data, None, meta)
    print0(f"Imported {directory} as {checkpoint_dir} step {step}")
    return checkpoint_dir


def main(argv=None):
    args = parse_args(argv)
    if args.import_dir:
        import_export(args.import_dir, args.source, args.model_tag, args.step, args.force)
    else:
        export(args.source, args.model_tag, args.step, args.output, args.force)


if __name__ == "__main__":
    run_script(main, "export_hf")
