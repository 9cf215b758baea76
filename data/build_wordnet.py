"""Build the compact WordNet synonym table that `mfkit.augment` ships: data/wordnet_synonyms.json.gz.

    python data/build_wordnet.py                 # fetch the Debian package into a temporary folder
    python data/build_wordnet.py --raw /tmp/raw  # reuse (or keep) the downloaded package in /tmp/raw

Source: Debian `wordnet-base` (WordNet 3.0, Princeton University; WordNet licence, kept in DATASHEET.md), fetched
with `apt-get download` and unpacked with `dpkg-deb -x`. From its `data.{noun,verb,adj,adv}` files each synset
gives its single-word lemmas; two words are synonyms when they share a synset. The table keeps only words that
occur in the shipped spam mails (lower case, letters only, seen at least twice), each with at most
`MAX_SYNONYMS` synonyms in WordNet's order, so it stays well under a megabyte. Written as JSON with sorted keys,
gzip mtime 0: a rebuild from the same package is byte-identical.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))
DATA_DIR = Path(__file__).resolve().parent
if str(DATA_DIR) not in sys.path:
    sys.path.insert(0, str(DATA_DIR))

from build_data import Source, _run, fetch  # noqa: E402

from mfkit.paths import atomic_path  # noqa: E402

WORDNET_SOURCE = Source("apt", "wordnet-base", "1:3.0-37", "wordnet-base_*.deb")
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
MAX_SYNONYMS = 8
MIN_COUNT = 2
WORD = re.compile(r"^[a-z]+$")
TARGET = DATA_DIR / "wordnet_synonyms.json.gz"


def _lines(path: Path) -> list[list[str]]:
    """The records of a WordNet database file as lists of fields, without its licence header."""
    text = path.read_text(encoding="latin-1")
    return [line.split(" ") for line in text.splitlines() if not line.startswith("  ")]


def sense_ranks(index_file: Path) -> dict[tuple[str, str], int]:
    """(lemma, synset offset) -> the sense's rank for that lemma in one `index.*` file (0: most frequent)."""
    ranks = {}
    for fields in _lines(index_file):
        lemma, synset_count, pointer_count = fields[0], int(fields[2]), int(fields[3])
        offsets = fields[6 + pointer_count : 6 + pointer_count + synset_count]
        ranks.update({(lemma, offset): rank for rank, offset in enumerate(offsets)})
    return ranks


def synsets(data_file: Path) -> list[tuple[str, list[str]]]:
    """(offset, single-word lemmas) of every synset in one WordNet `data.*` file (see wndb(5WN))."""
    out = []
    for fields in _lines(data_file):
        count = int(fields[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).lower() for i in range(count)]
        out.append((fields[0], [w for w in dict.fromkeys(lemmas) if WORD.match(w)]))
    return out


def synonym_table(
    groups: list[tuple[Callable[[str], int], list[str]]], keep: set[str], limit: int = MAX_SYNONYMS
) -> dict[str, list[str]]:
    """word -> up to `limit` other words sharing a synset with it, for the words in `keep`.

    `groups` are (rank of a word's sense, lemmas) pairs, where a lower rank is a more frequent sense of the word; a word's synonyms
    come from its most frequent senses first.
    """
    found: dict[str, list[tuple[int, int, str]]] = {}
    for position, (rank_of, group) in enumerate(groups):
        for word in group:
            if word in keep:
                found.setdefault(word, []).extend((rank_of(word), position, w) for w in group if w != word)
    table = {}
    for word in sorted(found):
        ordered = [w for _, _, w in sorted(found[word])]
        if ordered:
            table[word] = list(dict.fromkeys(ordered))[:limit]
    return table


def licence_notice(copyright_file: Path) -> str:
    """The WordNet 3.0 licence from the package's Debian copyright file (it must travel with every copy)."""
    lines, inside = [], False
    for line in copyright_file.read_text(encoding="utf-8").splitlines():
        if line.startswith("License: WordNet"):
            inside = True
            continue
        if inside and line and not line.startswith(" "):
            break
        if inside:
            lines.append("" if line.strip() == "." else line.strip())
    if not lines:
        raise SystemExit(f"No WordNet licence found in {copyright_file}.")
    return "\n".join(lines).strip()


def spam_vocabulary(min_count: int = MIN_COUNT) -> set[str]:
    """Lower-case alphabetic words seen at least `min_count` times in the shipped spam mails (all splits)."""
    from mfkit.data import load_data

    counts: Counter[str] = Counter()
    for split in load_data("spam").values():
        for text in split["text"]:
            counts.update(re.findall(r"[a-z]+", text.lower()))
    return {w for w, c in counts.items() if c >= min_count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, help="folder for (or with) the downloaded .deb")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = args.raw or Path(tmp) / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        deb = fetch(WORDNET_SOURCE, raw)
        unpacked = Path(tmp) / "wordnet"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        folder = unpacked / "usr" / "share" / "wordnet"
        notice = licence_notice(unpacked / "usr" / "share" / "doc" / "wordnet-base" / "copyright")
        groups = []
        for pos in PARTS_OF_SPEECH:
            ranks = sense_ranks(folder / f"index.{pos}")
            for offset, lemmas in synsets(folder / f"data.{pos}"):
                groups.append((lambda w, o=offset, r=ranks: r.get((w, o), 99), lemmas))
    table = synonym_table(groups, spam_vocabulary())
    payload = json.dumps(
        {
            "source": f"WordNet 3.0, Debian wordnet-base {WORDNET_SOURCE.version}",
            "licence": notice,
            "synonyms": table,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    with (
        atomic_path(TARGET) as tmp_path,
        open(tmp_path, "wb") as raw_file,
        gzip.GzipFile(fileobj=raw_file, mode="wb", mtime=0, filename="") as gz,
    ):
        gz.write(payload)
    print(f"{len(groups):,} synsets -> {len(table):,} words with synonyms, {TARGET.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
