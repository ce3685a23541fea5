"""The `loopserve` command as users run it: model provisioning and the feedback log tools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loopserve.models import encoder_heads
from loopserve.models.store import ModelStore

REPO = Path(__file__).resolve().parents[2]


def loopserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loopserve", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_models_pull_builds_a_zero_shot_annotator_once(tmp_path: Path) -> None:
    first = loopserve("models", "pull", "--data-dir", str(tmp_path), "--model", "annotator")
    assert first.returncode == 0, first.stderr
    store = ModelStore(tmp_path / "store")
    assert store.latest("annotator") == "v0"
    manifest = store.verify("annotator", "v0")  # sha256 of every file matches
    assert "model.safetensors" in manifest.files and manifest.meta["labels"] == ["great", "other"]

    second = loopserve("models", "pull", "--data-dir", str(tmp_path), "--model", "annotator")
    assert second.returncode == 0 and "annotator: v0" in second.stdout
    assert store.list("annotator") == ["v0"]  # idempotent: nothing new

    # Version 0 is not random: each head row is the scaled embedding of its label's description.
    model = encoder_heads.load(store.path("annotator", "v0"))
    norms = model.head.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 20.0), atol=1e-3)


def test_log_export_import_and_stats(tmp_path: Path) -> None:
    from loopserve.feedback_log import Decision, Feedback, open_feedback_log

    src = tmp_path / "a.sqlite3"
    with open_feedback_log(str(src)) as log:
        log.append_decisions(
            [
                Decision(
                    "e1", "sentiment", "label", "t", (("great", 0.9), ("other", 0.1)), 0.9, "prob", "annotator", "v0"
                )
            ]
        )
        log.append_feedback(
            [Feedback("correction", "k1", event_id="e1", label="other")], {"sentiment": ["great", "other"]}
        )
    out = tmp_path / "dump.jsonl"
    r = loopserve("log", "export", "--log-url", str(src), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 2
    dst = tmp_path / "b.sqlite3"
    for _ in range(2):  # importing twice stores nothing twice
        r = loopserve("log", "import", "--log-url", str(dst), str(out))
        assert r.returncode == 0, r.stderr
    stats = json.loads(loopserve("log", "stats", "--log-url", str(dst)).stdout)
    assert stats["decisions"] == 1 and stats["feedback"] == 1 and stats["feedback_by_kind"] == {"correction": 1}
