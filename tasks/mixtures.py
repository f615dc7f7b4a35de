"""
The training mixtures of mid_train and chat_sft: named parts, each a task built on demand (with how
many copies it gets), put together into one TaskMixture. load_mixture prints one line per part on
rank 0 (rows; SUBSTITUTE and the offline builder's label where offline data stands in for the real
split; MISSING and why where the data is not there) and keeps those lines for the report.
"""

from dataclasses import dataclass
from typing import Callable

from nanochat.common import MissingInputError, print0
from tasks.common import TaskMixture
from tasks.provenance import data_source


@dataclass
class MixturePart:
    name: str  # as printed, e.g. "SmolTalk train"
    build: Callable  # () -> Task; raises MissingInputError when the data is not there
    data: object = None  # the hub split (repo_id, subset, split), WORD_LIST_FILENAME, or None
    copies: int = 1  # times the part is in the mixture (oversampling)


@dataclass
class Mixture:
    task: TaskMixture
    lines: list  # the printed summary, one line per part


def _substitute_of(part, task):
    """What stands in for the real data of a part (the offline builder's label), or None for the real data."""
    if getattr(task, "substitute", None):
        return task.substitute
    source = data_source(part.data) if part.data is not None else None
    return source.substitute if source else None


def load_mixture(title, parts):
    """
    The TaskMixture of every part whose data is there. Prints (rank 0) one line per part: rows,
    and SUBSTITUTE with the builder's label where offline data stands in for the real split, or
    MISSING with the reason; a mixture with no data at all is a MissingInputError.
    """
    tasks, lines = [], []
    for part in parts:
        if part.copies < 1:
            continue  # e.g. --mmlu-epochs=0
        copies = f" x{part.copies}" if part.copies > 1 else ""
        try:
            task = part.build()
        except MissingInputError as error:
            lines.append(f"{part.name}{copies}: MISSING, left out ({error})")
            continue
        substitute = _substitute_of(part, task)
        lines.append(f"{part.name}{copies}: {len(task):,} rows" + (f", SUBSTITUTE: {substitute}" if substitute else ""))
        tasks += [task] * part.copies
    mixture = TaskMixture(tasks)
    print0(f"{title}: {len(mixture):,} rows")
    for line in lines:
        print0(f"  {line}")
    if len(mixture) == 0:
        raise MissingInputError(f"the {title.lower()} has no data: download the task data, or without internet build "
                                "the offline copies with `python -m dev.offline_data tasks`")
    return Mixture(mixture, lines)


def mixture_markdown(title, mixture):
    return f"### {title} ({len(mixture.task):,} rows)\n" + "".join(f"- {line}\n" for line in mixture.lines)
