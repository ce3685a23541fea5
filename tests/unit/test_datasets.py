"""Users' own data sets: JSONL and CSV with text and label (and optional split) columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopserve.datasets import label_set, load_dataset
from loopserve.errors import InvalidArgument, NotFoundError


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_with_splits_keeps_them_and_takes_the_labels_from_the_data(tmp_path: Path) -> None:
    rows = [
        {"text": f"t{i}", "label": ["spam", "ham", "eggs"][i % 3], "split": "test" if i < 3 else "train"}
        for i in range(9)
    ]
    train, test = load_dataset(_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.text for e in test] == ["t0", "t1", "t2"] and len(train) == 6
    assert label_set(train + test) == ["eggs", "ham", "spam"]


def test_csv_without_splits_is_split_reproducibly(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f'"review, number {i}",{"pos" if i % 2 else "neg"}\n' for i in range(200)))
    train, test = load_dataset(path, test_fraction=0.25, seed=3)
    assert len(train) + len(test) == 200 and 30 < len(test) < 70
    assert train[0].text.startswith("review, number")  # quoted commas stay in the text
    assert (train, test) == load_dataset(path, test_fraction=0.25, seed=3)
    assert (train, test) != load_dataset(path, test_fraction=0.25, seed=4)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a", "label": "x", "split": "train"}\n{"text": "b"\n', ":2: not JSON"),
        ('{"text": "a", "label": "x", "split": "train"}\n["a", "x"]\n', ":2: each line must be a JSON object"),
        ('{"text": "a", "label": "x", "split": "train"}\n{"text": "", "label": "y"}\n', ":2: needs non-empty"),
        ('{"text": "a", "label": "x", "split": "dev"}\n', "split must be train or test"),
        ('{"text": "a", "label": "x", "split": "train"}\n{"text": "b", "label": "x", "split": "test"}\n', "two labels"),
        ('{"text": "a", "label": "x", "split": "train"}\n{"text": "b", "label": "y", "split": "train"}\n', "both"),
    ],
)
def test_bad_files_are_refused_with_the_line_that_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(InvalidArgument, match=message):
        load_dataset(path)


def test_unknown_formats_and_missing_files_say_so(tmp_path: Path) -> None:
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(InvalidArgument, match=r"\.jsonl or \.csv"):
        load_dataset(tmp_path / "d.parquet")
    with pytest.raises(NotFoundError):
        load_dataset(tmp_path / "missing.jsonl")
