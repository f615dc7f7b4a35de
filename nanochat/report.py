"""
The report card: every phase logs a markdown section to $NANOCHAT_BASE_DIR/report/<slug>.md, and
`generate` stitches them after an environment header into report/report.md (also copied into
the current directory).

    python -m nanochat.report reset      # at the start of a run: clear old sections, write the header
    python -m nanochat.report generate   # at the end (the default command)

Scripts call get_report().log(section="Base model training", data=[{...}, "markdown", ...]);
on ranks other than 0 get_report() returns a DummyReport that does nothing.
"""

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys

from nanochat.common import get_base_dir, get_dist_info

# Section files in report order (slugs of the section names the scripts log).
SECTION_ORDER = [
    "tokenizer-training", "tokenizer-evaluation", "base-model-training", "base-model-loss",
    "base-model-evaluation", "midtraining", "chat-evaluation-mid", "chat-sft", "chat-evaluation-sft",
    "chat-rl", "chat-evaluation-rl",
]
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
# Rough on-demand cloud prices per GPU-hour (Lambda-like), for the header's hourly rate.
GPU_HOURLY_USD = [("h100", 3.00), ("a100", 1.79), ("v100", 0.55)]
DEFAULT_GPU_HOURLY_USD = 2.00
BLOAT_EXTENSIONS = ("py", "md", "rs", "html", "toml", "sh")


def slugify(section):
    return section.lower().replace(" ", "-")


def _format_value(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10000:
        return f"{value:,}"
    return str(value)


def _run(command):
    """Output of a shell command, or None if it fails or takes over 5 s (the header must never crash a run)."""
    try:
        result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=5)
        return result.stdout.strip() if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# -----------------------------------------------------------------------------
# The environment header


def _git_lines():
    commit = _run("git rev-parse --short HEAD")
    if commit is None:
        return ["- Not a git checkout (or git is missing)"]
    dirty = bool(_run("git status --porcelain"))
    message = (_run("git log -1 --pretty=%B") or "").replace("\n", " ").strip()[:80]
    return [f"- Branch: {_run('git rev-parse --abbrev-ref HEAD')}",
            f"- Commit: {commit} ({'dirty' if dirty else 'clean'})",
            f"- Message: {message}"]


def _hardware_lines():
    import psutil
    import torch

    lines = [f"- Platform: {platform.system()}",
             f"- CPUs: {psutil.cpu_count(logical=False)} cores ({psutil.cpu_count(logical=True)} logical)",
             f"- Memory: {psutil.virtual_memory().total / 1024**3:.1f} GB"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(count)]
        vram = sum(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / 1024**3
        per_gpu = next((price for key, price in GPU_HOURLY_USD if key in names[0].lower()), DEFAULT_GPU_HOURLY_USD)
        lines += [f"- GPUs: {count}x {names[0]}" + ("" if len(set(names)) == 1 else f" (mixed: {', '.join(sorted(set(names)))})"),
                  f"- GPU Memory: {vram:.1f} GB total",
                  f"- CUDA Version: {torch.version.cuda}",
                  f"- Hourly Rate: ${per_gpu * count:.2f}/hour"]
    else:
        lines.append("- GPUs: none")
    return lines


def bloat_stats():
    """Size of the git-tracked source (py md rs html toml sh): characters, lines, files, approx tokens, uv.lock lines."""
    files = [f for f in (_run("git ls-files") or "").splitlines() if f.rsplit(".", 1)[-1] in BLOAT_EXTENSIONS]
    characters = lines = 0
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        characters += len(text)
        lines += text.count("\n")
    stats = {"Characters": characters, "Lines": lines, "Files": len(files), "Tokens (approx)": characters // 4}
    if os.path.exists("uv.lock"):
        with open("uv.lock", encoding="utf-8") as f:
            stats["Dependencies (uv.lock lines)"] = sum(1 for _ in f)
    return stats


def generate_header():
    import torch

    now = datetime.datetime.now().strftime(TIMESTAMP_FORMAT)
    bloat = [f"- {key}: {value:,}" for key, value in bloat_stats().items()]
    parts = ["# nanochat training report", "", f"Generated: {now}", "", "## Environment", "",
             "### Git Information", *_git_lines(), "", "### Hardware", *_hardware_lines(), "",
             "### Software", f"- Python: {platform.python_version()}", f"- PyTorch: {torch.__version__}", "",
             "### Bloat", *bloat, ""]
    return "\n".join(parts) + "\n"


# -----------------------------------------------------------------------------
# Reports


class Report:
    def __init__(self, report_dir):
        os.makedirs(report_dir, exist_ok=True)
        self.report_dir = report_dir

    def log(self, section, data):
        """Write (overwrite) <slug>.md: header, timestamp, then each truthy item (str verbatim, dict as bullets)."""
        path = os.path.join(self.report_dir, f"{slugify(section)}.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"## {section}\n")
            f.write(f"timestamp: {datetime.datetime.now().strftime(TIMESTAMP_FORMAT)}\n\n")
            for item in data:
                if not item:
                    continue
                if isinstance(item, str):
                    f.write(item)
                else:
                    for key, value in item.items():
                        f.write(f"- {key}: {_format_value(value)}\n")
                f.write("\n")
        return path

    def reset(self):
        """Start a new run: remove the previous sections and report, write header.md with the start time."""
        for name in SECTION_ORDER + ["report"]:
            path = os.path.join(self.report_dir, f"{name}.md")
            if os.path.exists(path):
                os.remove(path)
        with open(os.path.join(self.report_dir, "header.md"), "w", encoding="utf-8") as f:
            f.write(generate_header())
            f.write(f"Run started: {datetime.datetime.now().strftime(TIMESTAMP_FORMAT)}\n\n---\n\n")
        print(f"Reset report and wrote header to {os.path.join(self.report_dir, 'header.md')}")

    def generate(self):
        """Write report.md = header + sections in pipeline order + summary table; copy it to the cwd."""
        header_path = os.path.join(self.report_dir, "header.md")
        header = ""
        if os.path.exists(header_path):
            with open(header_path, encoding="utf-8") as f:
                header = f.read()
        else:
            print(f"Warning: {header_path} is missing; run `python -m nanochat.report reset` at the start of a run")
        start_time = _first_timestamp(header, r"^Run started: (.+)$")

        sections, end_time = {}, None
        for slug in SECTION_ORDER:
            path = os.path.join(self.report_dir, f"{slug}.md")
            if not os.path.exists(path):
                print(f"Warning: {path} does not exist, skipping")
                continue
            with open(path, encoding="utf-8") as f:
                sections[slug] = f.read()
            if "rl" not in slug.split("-"):  # RL is optional; the wall clock covers the main pipeline
                end_time = _first_timestamp(sections[slug], r"^timestamp: (.+)$") or end_time

        bloat_header = re.search(r"### Bloat\n(.*?)\n\n", header, re.DOTALL)
        summary = ["## Summary", ""]
        if bloat_header:
            summary += [bloat_header.group(1), ""]
        summary += _summary_table(sections) + [""]
        if start_time and end_time:
            minutes = int((end_time - start_time).total_seconds() // 60)
            summary.append(f"Total wall clock time: {minutes // 60}h{minutes % 60}m")
        else:
            summary.append("Total wall clock time: unknown")

        from nanochat.plots import plots_markdown  # the PNGs the run scripts drew into the report dir

        body = header + "".join(sections.values())
        tail = "\n".join(summary) + "\n"
        report_path = os.path.join(self.report_dir, "report.md")
        with open(report_path, "w", encoding="utf-8") as f:
            f.write(body + plots_markdown(self.report_dir) + tail)
        print(f"Generated report at {report_path}")
        # the copy in the working directory links the same PNGs by absolute path
        with open(os.path.join(os.getcwd(), "report.md"), "w", encoding="utf-8") as f:
            f.write(body + plots_markdown(self.report_dir, link_prefix=os.path.abspath(self.report_dir) + os.sep) + tail)
        return report_path


def _first_timestamp(text, pattern):
    match = re.search(pattern, text, re.MULTILINE)
    if not match:
        return None
    try:
        return datetime.datetime.strptime(match.group(1).strip(), TIMESTAMP_FORMAT)
    except ValueError:
        return None


def _metric_value(section_text, metric):
    """
    (value, label) from the first bullet line that starts with the metric name: the value is the
    text after the first ':', the label what the line says in parentheses before it, as in
    "- CORE (partial: 9 of 22 tasks, offline reconstruction): 0.1234". ("-", None) when absent.
    """
    for line in (section_text or "").splitlines():
        if line.startswith(f"- {metric}"):
            key, value = _split_bullet(line[2:])
            label = re.search(r"\((.*)\)", key[len(metric):])
            return value, (label.group(1) if label else None)
    return "-", None


def _split_bullet(text):
    """Split "key (may: contain colons): value" at the first ':' outside parentheses."""
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == ":" and depth == 0:
            return text[:i], text[i + 1:].strip()
    return text, ""


def _summary_table(sections):
    """The Metric | BASE | MID | SFT | RL table; a labelled (partial, offline) value gets a * and a note below."""
    columns = {"BASE": ("base-model-evaluation", ["CORE"]),
               "MID": ("chat-evaluation-mid", ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]),
               "SFT": ("chat-evaluation-sft", ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]),
               "RL": ("chat-evaluation-rl", ["GSM8K"])}
    metrics = {m for _, names in columns.values() for m in names}
    middle = sorted(metrics - {"CORE", "ChatCORE"})
    rows = ["CORE"] + middle + ["ChatCORE"]
    lines = [f"| {'Metric':<15} | " + " | ".join(f"{c:<8}" for c in columns) + " |",
             f"|{'-' * 17}|" + "|".join("-" * 10 for _ in columns) + "|"]
    notes = []
    for metric in rows:
        values = []
        for column, (slug, names) in columns.items():
            value, label = _metric_value(sections.get(slug), metric) if metric in names else ("-", None)
            if label:
                value += "*"
                notes.append(f"- \\* {metric} ({column}): {label}")
            values.append(value)
        lines.append(f"| {metric:<15} | " + " | ".join(f"{v:<8}" for v in values) + " |")
    return lines + ([""] + notes if notes else [])


class DummyReport:
    """What ranks other than 0 get: logging is a no-op."""

    def log(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        pass


def get_report():
    """Rank 0 writes to $NANOCHAT_BASE_DIR/report; other ranks get a DummyReport."""
    _, rank, _, _ = get_dist_info()
    if rank == 0:
        return Report(os.path.join(get_base_dir(), "report"))
    return DummyReport()


def main():
    parser = argparse.ArgumentParser(description="Reset or generate the nanochat report card")
    parser.add_argument("command", nargs="?", default="generate", choices=["generate", "reset"])
    args = parser.parse_args()
    report = get_report()
    if args.command == "reset":
        report.reset()
    else:
        report.generate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
