"""What every benchmark records and needs: the machine it ran on, free ports, a service process; the
annotator benches' data and plots."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(**extra: Any) -> dict[str, Any]:
    """The CPU model, cores, platform and (where one is used) the GPU: figures differ between machines."""
    out: dict[str, Any] = {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {**out, **extra}


def start_policy(data_dir: Path, port: int, metrics_port: int, flags: Sequence[str]) -> subprocess.Popen[bytes]:
    """`loopserve policy` in its own process, as a deployment runs it; quiet logs, no store polling."""
    argv = [
        sys.executable,
        "-m",
        "loopserve",
        "policy",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--log-level",
        "WARNING",
        "--watch-interval-s",
        "60",
        *flags,
    ]
    return subprocess.Popen(argv, cwd=REPO)


def add_annotation_data_args(ap: argparse.ArgumentParser, *, test_items: int) -> None:
    """--dataset, --data-dir and --test-items, as the annotator's learning benches take them."""
    ap.add_argument("--dataset", type=Path, default=None, help="JSONL/CSV (text, label[, split]); default Fine Food")
    ap.add_argument("--data-dir", type=Path, default=Path(".loopserve"), help="holds the store with the base annotator")
    ap.add_argument("--test-items", type=int, default=test_items, help="0: the whole test split")


def load_annotation_data(args: argparse.Namespace) -> tuple[Path, list[Any], list[Any], Path]:
    """The data set's path, its train and test splits (the test split sampled down to --test-items, the same
    items every run) and the base annotator's folder."""
    from loopserve.datasets import load_dataset, pull_finefoods

    path = args.dataset or pull_finefoods(args.data_dir / "data")
    train, test = load_dataset(path)
    if args.test_items:
        test = random.Random(1).sample(test, min(args.test_items, len(test)))
    return path, train, test, args.data_dir / "store" / "models" / "annotator" / "v0"


def mean_se(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard error of the mean (NaN for one value: a single seed has no spread) and count."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": mean, "se": se, "n": len(values)}


def save_plot(fig: Any, ax: Any, out: Path, title: str) -> None:
    """A one-panel plot: `ax`'s title and legend, then the figure (save_figure)."""
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, out)


def save_figure(fig: Any, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def merge_results(
    ap: argparse.ArgumentParser,
    args: argparse.Namespace,
    files: Sequence[Path],
    same: Callable[[list[dict[str, Any]]], Sequence[Iterable[str]]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The earlier result files a bench's `--merge` names: their contents, and what the new results record
    of each (file, machine, threads, seconds, arguments). `same(contents of every file)`: per file, the
    arguments it must share with this run; a file measured with other settings in any of them is a usage
    error (exit 2), not a mixed mean. A file of earlier code that lacks an argument ran as its default does now."""
    earlier = [json.loads(f.read_text()) for f in files]
    for f, r, keys in zip(files, earlier, same(earlier), strict=True):
        differ = [k for k in keys if _comparable(r["args"].get(k, ap.get_default(k))) != _comparable(getattr(args, k))]
        if differ:
            ap.error(f"--merge {f.name}: measured with other {', '.join(differ)}")
    records = [
        {"file": f.name, **{k: r.get(k) for k in ("cpu", "threads", "seconds")}, "args": r.get("args")}
        for f, r in zip(files, earlier, strict=True)
    ]
    return earlier, records


def _comparable(value: Any) -> Any:
    """An argument as a result file's JSON holds it (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def annotation_results_header(
    args: argparse.Namespace, path: Path, train: list[Any], test: list[Any]
) -> dict[str, Any]:
    """What an annotator learning bench's JSON starts with: the machine, the data, the arguments."""
    import torch

    labels = {e.label for e in train + test}
    return {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "dataset": str(path),
        "train_items": len(train),
        "test_items": len(test),
        "majority_rate": max(sum(e.label == y for e in test) for y in labels) / len(test),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
