"""Labelled text datasets: the bundled Amazon Fine Food reviews, and users' own JSONL / CSV files.

Fine Food reviews (5,000 labelled great / other; train 4,000, test 1,000) ship in Debian's
`r-cran-modeldata` as an R lazy-load database. `pull_finefoods` downloads that .deb (download only: the
package would pull all of R), and reads the two data frames out of `Rdata.rdb` with the PyPI package
`rdata`: the `.rdx` index is gzip'd R serialisation mapping names to (offset, length) in the `.rdb`;
each object there is a 4-byte big-endian length, a type byte (`Z`: a raw LZMA2 stream), then the data.
"""

from __future__ import annotations

import csv
import gzip
import json
import lzma
import random
import struct
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loopserve.errors import InvalidArgument, NotFoundError

FINEFOODS_DEB = "r-cran-modeldata"
_RDATA_DIR = "usr/lib/R/site-library/modeldata/data"
_SPLITS = {"training_data": "train", "testing_data": "test"}


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    split: str


def _read_lazyload(data_dir: Path, names: list[str]) -> dict[str, object]:
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare serialisation is "assumed RDS"
        index = rdata.conversion.convert(
            rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
        )
        blob = (data_dir / "Rdata.rdb").read_bytes()
        out = {}
        for name in names:
            offset, length = (int(x) for x in index["variables"][name])
            rec = blob[offset : offset + length]
            (size,) = struct.unpack(">I", rec[:4])
            kind, payload = rec[4:5], rec[5:]
            if kind != b"Z":
                raise NotFoundError(f"unsupported compression {kind!r} for {name} in Rdata.rdb")
            raw = lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
            if len(raw) != size:
                raise NotFoundError(f"{name}: expected {size} bytes, got {len(raw)}")
            out[name] = rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))
    return out


def pull_finefoods(dest: Path, deb: Path | None = None) -> Path:
    """Write <dest>/finefoods.jsonl (text, label, split). Idempotent."""
    out = dest / "finefoods.jsonl"
    if out.is_file():
        return out
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        if deb is None:
            subprocess.run(["apt-get", "download", FINEFOODS_DEB], cwd=tmpd, check=True, capture_output=True)
            deb = next(tmpd.glob(f"{FINEFOODS_DEB}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmpd / "x")], check=True)
        frames = _read_lazyload(tmpd / "x" / _RDATA_DIR, list(_SPLITS))
    # A part file of its own: two pulls at once (the test suite's workers) each write whole and rename.
    with tempfile.NamedTemporaryFile("w", dir=dest, prefix="finefoods.", suffix=".part", delete=False) as f:
        for name, split in _SPLITS.items():
            df = frames[name]
            for text, label in zip(df["review"], df["score"], strict=True):  # type: ignore[index]
                f.write(json.dumps({"text": str(text), "label": str(label), "split": split}) + "\n")
    Path(f.name).replace(out)
    return out


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) pairs; a line that is not a JSON object is refused with its number."""
    if not path.is_file():
        raise NotFoundError(f"{path}: no such data set file")
    if path.suffix in (".jsonl", ".json"):
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidArgument(f"{path}:{n}: not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise InvalidArgument(f"{path}:{n}: each line must be a JSON object")
                yield n, row
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            yield from enumerate(csv.DictReader(f), 2)  # line 1 is the header
    else:
        raise InvalidArgument(f"{path}: a dataset is a .jsonl or .csv file with text and label columns")


def load_dataset(path: Path, test_fraction: float = 0.2, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, test) from a JSONL or CSV file with `text` and `label` (and optionally `split`: train /
    test) columns. Rows without a split are split at random, reproducibly (`seed`); the label set is
    whatever labels the file holds. A row without text or label is refused with its line number."""
    path = Path(path)
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for n, r in _rows(path):
        text, label = r.get("text"), r.get("label")
        if text is None or label is None or not str(text).strip() or not str(label).strip():
            raise InvalidArgument(f"{path}:{n}: needs non-empty `text` and `label` columns")
        split = str(r.get("split") or "").strip() or ("test" if rng.random() < test_fraction else "train")
        if split not in ("train", "test"):
            raise InvalidArgument(f"{path}:{n}: split must be train or test, not {split!r}")
        ex = Example(str(text), str(label).strip(), split)
        (test if split == "test" else train).append(ex)
    if not train or not test:
        raise InvalidArgument(f"{path}: needs both train and test rows (got {len(train)} / {len(test)})")
    if len(label_set(train + test)) < 2:
        raise InvalidArgument(f"{path}: needs at least two labels")
    return train, test


def label_set(examples: list[Example]) -> list[str]:
    return sorted({e.label for e in examples})
