"""
nanochat.report: section files, value formatting, rank handling, reset and the generated report.
"""

import datetime

from nanochat.report import DummyReport, Report, get_report, slugify


def test_log_writes_a_section_file_with_formatted_values(tmp_path):
    report = Report(str(tmp_path))
    path = report.log("Chat evaluation sft", [
        {"ARC-Easy": 0.123456, "steps": 21400, "small": 9999, "flag": True, "name": "d20"},
        None, {}, "",  # falsy items are skipped
        "| a | b |\n|---|---|\n",
    ])
    assert path == str(tmp_path / "chat-evaluation-sft.md")
    lines = (tmp_path / "chat-evaluation-sft.md").read_text().split("\n")
    assert lines[0] == "## Chat evaluation sft"
    datetime.datetime.strptime(lines[1], "timestamp: %Y-%m-%d %H:%M:%S")
    assert lines[2:] == ["", "- ARC-Easy: 0.1235", "- steps: 21,400", "- small: 9999", "- flag: True", "- name: d20",
                         "", "| a | b |", "|---|---|", "", ""]


def test_log_overwrites_the_previous_section(tmp_path):
    report = Report(str(tmp_path))
    report.log("Base model loss", [{"val_bpb": 1.0}])
    report.log("Base model loss", [{"val_bpb": 0.5}])
    text = (tmp_path / "base-model-loss.md").read_text()
    assert "0.5000" in text and "1.0000" not in text


def test_get_report_is_a_no_op_on_ranks_other_than_zero(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    report = get_report()
    assert isinstance(report, DummyReport)
    report.log("Tokenizer training", [{"x": 1}])
    assert not (tmp_path / "report").exists()
    monkeypatch.setenv("RANK", "0")
    assert isinstance(get_report(), Report)


def test_reset_then_generate_assembles_sections_and_summary(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    report = Report(str(tmp_path / "report"))
    report.log("Tokenizer training", [{"vocab_size": 32768}])
    report.reset()
    assert not (tmp_path / "report" / "tokenizer-training.md").exists()  # a new run starts clean
    header = (tmp_path / "report" / "header.md").read_text()
    assert header.startswith("# nanochat training report") and "Run started: " in header and "### Bloat" in header

    report.log("Tokenizer evaluation", ["### Comparison with GPT-2\n"])
    report.log("Base model evaluation", [{"CORE metric": 0.2219}])
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.38, "MMLU": 0.31, "ChatCORE metric": 0.25}])
    report.log("Chat evaluation rl", [{"GSM8K": 0.07}])
    report.generate()
    text = (tmp_path / "report.md").read_text()  # copied into the working directory
    assert text == (tmp_path / "report" / "report.md").read_text()
    assert text.index("## Tokenizer evaluation") < text.index("## Base model evaluation") < text.index("## Chat evaluation sft")
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:6]]
             for line in text.splitlines() if line.startswith("| ") and "Metric" not in line}
    assert table["CORE"] == ["0.2219", "-", "-", "-"]
    assert table["ARC-Easy"] == ["-", "-", "0.3800", "-"]
    assert table["ChatCORE"] == ["-", "-", "0.2500", "-"]
    assert table["GSM8K"] == ["-", "-", "-", "0.0700"]
    assert list(table)[0] == "CORE" and list(table)[-1] == "ChatCORE"
    assert "Total wall clock time: 0h0m" in text


def test_slugify():
    assert slugify("Chat evaluation mid") == "chat-evaluation-mid"


def test_partial_and_offline_labels_reach_the_summary_table(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    report = Report(str(tmp_path / "report"))
    report.reset()
    report.log("Base model evaluation", [{"CORE (partial: 9 of 22 tasks, offline reconstruction)": 0.1234}])
    report.log("Chat evaluation mid", [{"ARC-Easy": 0.3, "GSM8K (offline substitute: held-out GSM8K test)": 0.02}])
    text = open(report.generate(), encoding="utf-8").read()
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:6]]
             for line in text.splitlines() if line.startswith("| ") and "Metric" not in line}
    assert table["CORE"] == ["0.1234*", "-", "-", "-"]
    assert table["ARC-Easy"] == ["-", "0.3000", "-", "-"]  # unlabelled values stay bare
    assert table["GSM8K"] == ["-", "0.0200*", "-", "-"]
    assert "- \\* CORE (BASE): partial: 9 of 22 tasks, offline reconstruction" in text
    assert "- \\* GSM8K (MID): offline substitute: held-out GSM8K test" in text


def test_report_links_the_plots_of_the_report_dir(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    report_dir = tmp_path / "base" / "report"
    report = Report(str(report_dir))
    report.reset()
    report.log("Base model training", [{"Minimum validation bpb": 1.9}])
    (report_dir / "d4_loss.png").write_bytes(b"\x89PNG fake")
    text = open(report.generate(), encoding="utf-8").read()
    assert "## Plots\n\n![d4_loss](d4_loss.png)\n" in text  # relative: beside report/report.md
    copy = (tmp_path / "report.md").read_text()
    assert f"![d4_loss]({report_dir / 'd4_loss.png'})" in copy  # the working-directory copy links by absolute path
    assert text.index("## Base model training") < text.index("## Plots") < text.index("## Summary")
