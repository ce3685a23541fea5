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
    part = out.with_suffix(".jsonl.part")
    with part.open("w") as f:
        for name, split in _SPLITS.items():
            df = frames[name]
            for text, label in zip(df["review"], df["score"], strict=True):  # type: ignore[index]
                f.write(json.dumps({"text": str(text), "label": str(label), "split": split}) + "\n")
    part.replace(out)
    return out


def _rows(path: Path) -> Iterator[dict[str, str]]:
    if path.suffix in (".jsonl", ".json"):
        with path.open() as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            yield from csv.DictReader(f)
    else:
        raise InvalidArgument(f"{path}: a dataset is a .jsonl or .csv file with text and label columns")


def load_dataset(path: Path, test_fraction: float = 0.2, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, test). Rows without a `split` column are split at random, reproducibly."""
    rows = list(_rows(Path(path)))
    if not rows or "text" not in rows[0] or "label" not in rows[0]:
        raise InvalidArgument(f"{path}: needs `text` and `label` columns")
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for r in rows:
        split = r.get("split") or ("test" if rng.random() < test_fraction else "train")
        ex = Example(str(r["text"]), str(r["label"]), split)
        (test if split == "test" else train).append(ex)
    return train, test


def label_set(examples: list[Example]) -> list[str]:
    return sorted({e.label for e in examples})
