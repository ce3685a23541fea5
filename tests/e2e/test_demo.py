"""The demo: simulated annotators and run folders (fast), and the quick demos end to end (slow: real
models, real processes, real gRPC), including Ctrl-C leaving nothing running and the log and store whole."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loopserve.annotation.top_up import TopUp
from loopserve.cli.demo.annotation import AnnotationDemo, AnnotationDemoOptions, AnnotationRun, ItemLabel, VersionPoint
from loopserve.cli.demo.annotators import AnnotatorPool
from loopserve.cli.demo.stack import link_base_versions
from loopserve.datasets import Example
from loopserve.device import dtype_name, pick_dtype
from loopserve.models.store import ModelStore
from loopserve.policy.v1 import policy_pb2
from tests.support import tiny_models
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


def test_simulated_annotators_err_at_their_rate_and_disagree() -> None:
    pool = AnnotatorPool(["great", "other"], size=5, error_rate=0.1, double_review=0.5, seed=3)
    reviews = [pool.review("great", "great") for _ in range(4000)]
    wrong = sum(r.label != "great" for rs in reviews for r in rs)
    assert 0.06 < wrong / pool.reviews < 0.14
    assert pool.double_reviewed > 1500 and 0.05 < pool.disagreement_rate < 0.35
    kinds = {r.kind for rs in reviews for r in rs}
    assert kinds == {"accept", "correction"}  # a wrong answer about a right served label is a correction


def _chunk(version: str, scores: list[float], threshold: float = 0.8) -> policy_pb2.AnnotateResponse:
    return policy_pb2.AnnotateResponse(
        model_version=version,
        annotations=[
            policy_pb2.Annotation(
                event_id=f"e{i}",
                needs_review=p < threshold,
                labels=[
                    policy_pb2.LabelScore(label="great", score=p),
                    policy_pb2.LabelScore(label="other", score=1 - p),
                ],
            )
            for i, p in enumerate(scores)
        ],
    )


def _checked_store(run: Path, *checked: str) -> None:
    """Manifests for the versions a routing test serves: v0 unchecked, the named ones checked."""
    for version in ("v0", *checked):
        folder = run / "store" / "models" / "annotator" / version
        folder.mkdir(parents=True)
        meta = {"checked": True} if version in checked else {"base": True}
        (folder / "manifest.json").write_text(json.dumps({"meta": meta}))


def test_routing_spends_the_budget_on_a_pace_line_and_never_auto_labels_unchecked(tmp_path: Path) -> None:
    opts = AnnotationDemoOptions(budget_fraction=0.3, audit_fraction=0.0, double_review=0.0)
    demo = AnnotationDemo(opts)
    _checked_store(tmp_path, "v1")
    train = [Example(f"item {i} {['tea', 'coffee', 'cocoa'][i % 3]}", "great", "train") for i in range(400)]
    st = AnnotationRun(opts, tmp_path, ["great", "other"], train, [])
    st.versions.append(VersionPoint("v0", 0, 0.6))
    pool = AnnotatorPool(["great", "other"], size=3, error_rate=0.0, double_review=0.0, seed=0)
    rng = random.Random(0)
    part = train[:100]
    # Cold start: the unchecked base flags everything (as the policy service does); 30 items covering the
    # chunk go to people, none is auto-labelled, the other 70 wait in the backlog.
    cold = demo._review_chunk(st, pool, part, _chunk("v0", [0.5 + 0.004 * i for i in range(100)], 1.1), rng)
    assert len(cold) == 30 and st.human_labels == 30
    assert st.auto_total == 0 and st.auto_unchecked == 0
    assert sum(it.status == "backlog" for it in st.items.values()) == 70
    picked = {int(e.accept.event_id[1:]) for e in cold}
    assert {i % 3 for i in picked} == {0, 1, 2}  # every kind of item is covered
    # The swap to a checked v1 re-annotates the backlog (as _reannotate does): sure of every tenth item,
    # torn on the rest.
    backlog_scores = {k: 0.99 if k % 10 == 0 else 0.52 for k, it in st.items.items() if it.status == "backlog"}
    for k, p in backlog_scores.items():
        st.items[k] = ItemLabel("backlog" if p < 0.8 else "auto", "great", "v1", f"b{k}", np.array([p, 1 - p]))
    # Only flagged items are candidates (this chunk's and the backlog's), and only the chunk's share (30)
    # is spent, the least certain of each cluster; confident items are auto-labelled, the rest backlogged.
    scores = [0.99 if i % 10 == 0 else 0.79 - 0.002 * i for i in range(100)]
    events = demo._review_chunk(st, pool, part, _chunk("v1", scores), rng)
    ids = [e.accept.event_id for e in events]
    assert len(set(ids)) == 30
    assert all(scores[int(x[1:])] < 0.8 for x in ids if x.startswith("e"))
    from_backlog = [int(x[1:]) for x in ids if x.startswith("b")]
    assert from_backlog and all(backlog_scores[k] < 0.8 for k in from_backlog)  # the most torn items waiting
    assert all(st.items[k].status == "human" for k in from_backlog)
    assert st.human_labels == 60 and st.chunks[-1].auto_share == 0.1
    # Nothing left on the pace line: a third chunk only gets its own share; the budget is never exceeded.
    for _ in range(3):
        demo._review_chunk(st, pool, part, _chunk("v1", scores), rng)
    assert st.human_labels == 120 == int(0.3 * len(train))
    assert st.auto_unchecked == 0


@pytest.mark.parametrize("top_up", ["always", "never", "stream-end"])
def test_a_confident_checked_version_spends_the_share_its_flags_leave_only_with_top_up(
    tmp_path: Path, top_up: TopUp
) -> None:
    opts = AnnotationDemoOptions(budget_fraction=0.3, audit_fraction=0.0, double_review=0.0, top_up=top_up)
    demo = AnnotationDemo(opts)
    _checked_store(tmp_path, "v1")
    train = [Example(f"item {i} {['tea', 'coffee', 'cocoa'][i % 3]}", "great", "train") for i in range(400)]
    st = AnnotationRun(opts, tmp_path, ["great", "other"], train, [])
    pool = AnnotatorPool(["great", "other"], size=3, error_rate=0.0, double_review=0.0, seed=0)
    # A checked v1 flags 5 of the chunk's 100 items; the chunk's share is 30.
    scores = [0.6 + 0.01 * i if i < 5 else 0.8 + 0.0019 * i for i in range(100)]
    events = demo._review_chunk(st, pool, train[:100], _chunk("v1", scores), random.Random(0))
    picked = {int(e.accept.event_id[1:]) for e in events}
    assert set(range(5)) <= picked and st.auto_unchecked == 0
    # stream-end: the 300 items to come flag about 15 at this rate, for the 90 interactions they may spend;
    # with this chunk's 25 the stream falls 100 short, spread over this chunk and the three to come: 25 now.
    if top_up != "never":  # the other 25 from the confident items, the least certain of each cluster
        assert len(picked) == 30 == st.human_labels
        extra = sorted(picked - set(range(5)))
        assert {i % 3 for i in extra} == {0, 1, 2}
        assert np.mean([scores[i] for i in extra]) < np.mean(scores[5:])
    else:  # flagged items only: the rest of the share stays unspent, the confident items auto-labelled
        assert picked == set(range(5)) and st.human_labels == 5 and st.auto_total == 95


def test_run_store_hard_links_the_base_versions(tiny_data_dir: Path, tmp_path: Path) -> None:
    run_store = tmp_path / "run" / "store"
    got = link_base_versions(tiny_data_dir / "store", run_store, ["annotator", "reward"])
    assert got == {"annotator": "v0", "reward": "v0"}
    main, run = ModelStore(tiny_data_dir / "store"), ModelStore(run_store)
    assert run.latest("annotator") == "v0"
    run.verify("annotator", "v0")
    for f in main.path("annotator", "v0").iterdir():
        assert (run.path("annotator", "v0") / f.name).stat().st_ino == f.stat().st_ino  # linked, not copied


def _data_dir(tmp_path: Path) -> Path:
    """A data dir whose store is the real one's base versions and whose data is Fine Food."""
    from loopserve.datasets import pull_finefoods
    from loopserve.models import provision

    provision.pull(ModelStore(tiny_models.REAL_STORE))
    (tmp_path / "store").symlink_to(Path(tiny_models.REAL_STORE).resolve())
    src = pull_finefoods(REPO / ".loopserve" / "data")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / src.name).symlink_to(src.resolve())
    return tmp_path


def _demo(data_dir: Path, *flags: str) -> tuple[Path, dict]:  # type: ignore[type-arg]
    r = subprocess.run(
        [sys.executable, "-m", "loopserve", "demo", "--quick", "--data-dir", str(data_dir), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = Path(r.stdout.strip().splitlines()[-1])  # the run folder is the demo's last line
    return run, json.loads((run / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.timeout(1800)
def test_quick_annotation_demo_improves_the_annotator(tmp_path: Path) -> None:
    run, s = _demo(_data_dir(tmp_path))
    assert s["accuracy_final"] > s["accuracy_base"], s
    assert s["human_labels"] <= 0.3 * s["train_items"]
    # Level with passive random sampling at the same budget, within one standard error of the difference
    # on the test split; and no item auto-labelled on the word of an unchecked version.
    se = (2 * 0.25 / s["test_items"]) ** 0.5
    assert s["accuracy_final"] >= s["accuracy_passive"] - se, s
    assert s["auto_labelled_by_unchecked_versions"] == 0, s
    assert s["dataset_items"] > 0 and s["dataset_accuracy"] is not None
    assert (run / "dataset.jsonl").stat().st_mode & 0o777 == 0o600
    for key in ("accuracy_passive", "accuracy_ceiling", "train_items"):
        assert key in s
    assert len(s["versions"]) >= 2  # at least one version published, swapped in and evaluated
    # The app asked for each round and waited for one that read its labels (the round's log cursor): the
    # last round read every label spent, whatever the CPU's speed (time-triggered rounds on a slow CPU
    # once trained on 52 of 120).
    assert s["rounds"][-1]["human_labels"] == s["human_labels"], s["rounds"]
    for f in ("report.md", "accuracy_vs_labels.png", "review_and_auto_labels.png"):
        assert (run / f).stat().st_size > 0
    assert "simulated" in (run / "report.md").read_text()
    # --quick trains both arms without self-training (its objectives file, and the report says so).
    assert json.loads((run / "objectives.json").read_text())["annotator"]["pseudo_label_ratio"] == 0.0
    assert "No self-training" in (run / "report.md").read_text()
    # The trainers run in the precision the demo's policy serves (auto: bf16 where this CPU multiplies it
    # natively, fp32 elsewhere): they are handed it, and the online tier fits its heads on embeddings made in it.
    served = pick_dtype("auto", torch.device("cpu"))
    annotator = json.loads((run / "objectives.json").read_text())["annotator"]
    assert (annotator["eval_dtype"], annotator["train_dtype"]) == (dtype_name(served),) * 2
    assert f"labels in {served}" in (run / "logs" / "trainer-online.log").read_text()
    assert f"weights served in {dtype_name(served)}" in (run / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.timeout(1800)
def test_quick_generation_demo_raises_the_reward(tmp_path: Path) -> None:
    run, s = _demo(_data_dir(tmp_path), "--generation")
    rounds = [
        {k: r.get(k) for k in ("model", "result", "reasons", "metrics")}
        for r in map(json.loads, (run / "trainer" / "rounds.jsonl").read_text().splitlines())
    ]
    assert s["final_version"] != "v0", rounds  # a GRPO candidate passed the gate and was swapped in
    assert s["reward_final"] > s["reward_base"], s
    assert 0 < s["kl_final"] <= 0.5, s
    # The reward model ranks held-out pairs better than chance. The trainer's held-out slice alone is ~23 pairs
    # in a quick run, a coin flip of a test (CI once read 11 of 23 from a model that, paired against the
    # base, fixed 11 and broke none); pooled with the disjoint pairs of the evaluation prompts' base samples
    # (~30) it is a question of ~50 pairs.
    rm = [r for r in rounds if r["model"] == "reward" and r["result"] == "published"][-1]["metrics"]
    eval_agree = (s["rm_pairwise_accuracy_eval_prompts"] or 0.0) * s["rm_eval_pairs"]
    agree = rm["pairwise_accuracy"] * rm["n_pairs"] + eval_agree
    assert agree / (rm["n_pairs"] + s["rm_eval_pairs"]) > 0.5, (rm, s)
    assert (run / "report.md").stat().st_size > 0
    assert list(run.glob("*.png"))
    # One precision for the policy and the RL trainers, the hardware's: bf16 only where it is native.
    served = dtype_name(pick_dtype("auto", torch.device("cpu")))
    objectives = json.loads((run / "objectives.json").read_text())
    assert objectives["grpo"]["precision"] == objectives["ppo"]["precision"] == {"bfloat16": "bf16"}.get(served, "fp32")
    assert f"served in {served})" in (run / "report.md").read_text()


def _processes_mentioning(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("inherited_sigint", ["default", "ignored"])
def test_ctrl_c_stops_every_process_and_leaves_log_and_store_whole(tmp_path: Path, inherited_sigint: str) -> None:
    """Also when the demo starts with SIGINT ignored, as a job a shell starts in the background without
    job control does: Python then installs no KeyboardInterrupt handler unless the demo sets one (it ran to
    its end and exited 0 before; that was this test's flake in some full-suite runs)."""
    data_dir = _data_dir(tmp_path)
    # Its output goes to a file, as a terminal would take it: a pipe nobody reads until the end fills
    # (64 KiB) on a long run, and a demo blocked writing to it could neither stream nor say it stopped.
    out = (tmp_path / "demo.out").open("wb")
    demo = subprocess.Popen(
        [sys.executable, "-m", "loopserve", "demo", "--quick", "--data-dir", str(data_dir)],
        cwd=REPO,
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=_ignore_sigint if inherited_sigint == "ignored" else None,
    )
    out.close()  # the child holds its own copy

    def streaming_run() -> Path | None:
        """The run folder, once the app is streaming (feedback in its log)."""
        runs = sorted((data_dir / "runs").glob("*")) if (data_dir / "runs").is_dir() else []
        if not runs or not (runs[0] / "feedback.sqlite3").exists():
            return None
        try:
            with sqlite3.connect(runs[0] / "feedback.sqlite3", timeout=5.0) as db:
                return runs[0] if db.execute("select count(*) from records").fetchone()[0] > 0 else None
        except sqlite3.OperationalError:  # the log's file exists, its schema is still being created
            return None

    wait_until(streaming_run, 300, "the demo to start streaming", interval_s=0.5)
    run = streaming_run()
    assert run is not None
    assert _processes_mentioning(str(run))  # the stack is up
    demo.send_signal(signal.SIGINT)
    demo.wait(120)
    said = (tmp_path / "demo.out").read_text(errors="replace")
    assert demo.returncode != 0, said[-3000:]
    assert "interrupted: stopped every process the demo started" in said, said[-3000:]
    assert _processes_mentioning(str(run)) == []
    with sqlite3.connect(run / "feedback.sqlite3") as db:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
    store = ModelStore(run / "store")
    for model in store.models():
        for v in store.list(model):
            store.verify(model, v)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_passive_baseline_trains_offline_and_evaluates_in_the_served_dtype(tiny_data_dir: Path, dtype) -> None:
    """The baseline is evaluated the way the services load a version (encoder in the serving dtype, head
    in fp32), so that it compares like for like with the loop's served versions."""
    from loopserve.cli.demo import passive
    from trainer.annotation_policy import AnnotationPolicyConfig

    base = ModelStore(tiny_data_dir / "store").path("annotator", "v0")
    rng = random.Random(0)
    labelled = [(f"review {i} {'good' if i % 2 else 'bad'}", "great" if i % 2 else "other") for i in range(40)]
    test = [Example(f"test {i} {'good' if i % 2 else 'bad'}", "great" if i % 2 else "other", "test") for i in range(20)]
    rng.shuffle(labelled)
    cfg = AnnotationPolicyConfig(epochs=1.0, max_length=16, eval_dtype=dtype)
    res = passive.train_offline(base, labelled, [20, 40], test, cfg, heldout_fraction=0.2)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["steps"] > 0 and res["labels"] == 40
    # Self-training on the pool, as the trainer does: under cv_max_items the round's model teaches a
    # student from the base (the cross-fitted candidate's self_train); from then on a round continues the
    # last one's weights, which label the pool (the trainer's held-out rounds, when turned on for them).
    # With the ratio 0, neither happens.
    pool = [f"unlabelled {i} {'good' if i % 2 else 'bad'}" for i in range(30)]
    said: list[str] = []
    cfg = AnnotationPolicyConfig(epochs=1.0, max_length=16, pseudo_label_ratio=1.5, heldout_self_training=True)
    on = passive.train_offline(
        base, labelled, [20, 40], test, cfg, heldout_fraction=0.2, cv_max_items=30, pool=pool, progress=said.append
    )
    assert not said[0].endswith(" 0 pseudo-labels") and not said[1].endswith(" 0 pseudo-labels"), said
    said = []
    cfg = AnnotationPolicyConfig(epochs=1.0, max_length=16, pseudo_label_ratio=0.0)
    off = passive.train_offline(
        base, labelled, [20, 40], test, cfg, heldout_fraction=0.2, cv_max_items=30, pool=pool, progress=said.append
    )
    assert all(x.endswith(" 0 pseudo-labels") for x in said) and off["steps"] < on["steps"], said
    # Rounds under cv_max_items each start from the base, so only the last of a run of them is trained:
    # the same weights (same seed) as a schedule that starts there.
    said = []
    cfg = AnnotationPolicyConfig(epochs=1.0, max_length=16)
    early = passive.train_offline(
        base, labelled, [10, 20, 30], test, cfg, heldout_fraction=0.2, cv_max_items=100, progress=said.append
    )
    direct = passive.train_offline(base, labelled, [30], test, cfg, heldout_fraction=0.2, cv_max_items=100)
    assert said == ["round 3/3: 30 labels, 0 pseudo-labels"]
    assert (early["steps"], early["accuracy"]) == (direct["steps"], direct["accuracy"])
