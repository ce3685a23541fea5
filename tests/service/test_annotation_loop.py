"""The annotation loop where labels are scarce: the few-labels round and gate, cold-start routing, the
backlog re-annotated by a newly served version, and the labelled data set exported from the log.

Tiny annotators learn a planted signal (sentiment words) here: these tests are about the mechanics and
the statistics of the gate; bench/learning.py measures the learning on real data."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from loopserve.annotation.routing import pick_for_review, route_chunk
from loopserve.annotation.top_up import top_up_share
from loopserve.feedback_log import Feedback, open_feedback_log
from loopserve.feedback_log.labelled_dataset import export_dataset, labelled_dataset
from loopserve.models import encoder_heads
from loopserve.models.encoder_heads import AnnotatorModel
from loopserve.models.store import ModelStore
from tests.e2e.test_trainer_loop import (  # noqa: F401  (fixtures)
    LOG_LABEL_SETS,
    base_store,
    data_dir,
    label_decision,
    review,
    small_args,
    write_label_stream,
)
from trainer import annotation_head, annotation_round, checkpoint
from trainer.annotation_head import HeadConfig, head_round
from trainer.annotation_policy import AnnotationPolicyConfig
from trainer.annotation_round import cross_fit_round
from trainer.checkpoint import load_checkpoint
from trainer.examples import LabelExample
from trainer.gate import GateConfig, gate_against_serving, gate_annotator_cv
from trainer.head_fit import fit_head
from trainer.loop import read_rounds, run_trainer
from trainer.oof_evidence import fresh_evidence, loo_calibrated_probs, signal_test


def few_label_args(data_dir: Path, **kw):  # type: ignore[no-untyped-def]  # noqa: F811
    args = small_args(data_dir, models="annotator", **kw)
    args.gate = GateConfig(cv_max_items=300, cv_folds=2, min_cv_items=12)
    args.annotator.epochs = 0.0  # scaled with the data, as the few-labels recipe runs
    return args


def test_a_few_dozen_labels_publish_a_checked_version_with_no_held_out_slice(data_dir: Path) -> None:  # noqa: F811
    """64 verified labels: no 30-item held-out slice could exist at a 15-25% share, yet the cross-fitted
    round publishes, calibrated out of fold, and says so in the manifest."""
    with open_feedback_log(str(data_dir / "feedback.sqlite3")) as log:
        write_label_stream(log, random.Random(11), 64)
    args = few_label_args(data_dir)
    run_trainer(args)
    [row] = read_rounds(args)
    assert row["result"] == "published", (row["reasons"], row["metrics"])
    m = row["metrics"]
    assert m["n"] == 64 and m["accuracy"] > m["majority_rate"] and m["folds"] == 2
    assert m["signal_z"] > 2.0 and m["brier_gain"] > 0  # signal, and calibrated probabilities beat the base rate
    manifest = ModelStore(data_dir / "store").get("annotator", row["version"])
    assert manifest.meta["checked"] is True and manifest.meta["evidence"] == "cross-fit"
    assert manifest.meta["cursor"] > 0  # later labels are the ones this version never saw


def test_a_checked_version_self_trains_on_the_items_nobody_labelled(data_dir: Path) -> None:  # noqa: F811
    """Held-out rounds with self-training on (trainer.pseudo_labels): the unchecked base never
    pseudo-labels; a checked version labels the pooled items nobody labelled, held-out items left out;
    off by default."""
    rng = random.Random(7)

    def unlabelled(n: int, start: int) -> list:  # served labels nobody answered
        return [label_decision(f"U{i}", review(rng, rng.random() < 0.5), "great") for i in range(start, start + n)]

    with open_feedback_log(str(data_dir / "feedback.sqlite3")) as log:
        write_label_stream(log, rng, 200)
        log.append_decisions(unlabelled(300, 0))
    args = small_args(data_dir, models="annotator")
    from trainer.__main__ import read_args

    flag = read_args(["--annotator.heldout-self-training"], environ={}).annotator.heldout_self_training
    args.annotator.heldout_self_training = flag  # off by default
    state = run_trainer(args)
    [first] = read_rounds(args)
    assert first["result"] == "published" and first["metrics"]["n_pseudo"] == 0  # v0 is unchecked
    assert ModelStore(data_dir / "store").get("annotator", "v1").meta["checked"] is True
    assert len(state.items) == 500  # every served item is pooled, labelled or not
    assert list(load_checkpoint(data_dir / "trainer")[0].items) == list(state.items)
    folder = checkpoint.current(data_dir / "trainer")
    assert folder is not None  # its examples hold users' texts: private, as the log is
    assert (folder / checkpoint.EXAMPLES_FILE).stat().st_mode & 0o777 == 0o600

    with open_feedback_log(str(data_dir / "feedback.sqlite3")) as log:
        write_label_stream(log, rng, 60, start=1000)
        log.append_decisions(unlabelled(100, 1000))
    run_trainer(args)
    second = read_rounds(args)[-1]["metrics"]
    cap = 1.5 * second["n_train"]
    assert cap / 2 <= second["n_pseudo"] <= cap, second  # ~300 of the 400 unlabelled items are not held out

    with open_feedback_log(str(data_dir / "feedback.sqlite3")) as log:
        write_label_stream(log, rng, 40, start=2000)
    args.annotator.heldout_self_training = False  # the default
    run_trainer(args)
    assert read_rounds(args)[-1]["metrics"]["n_pseudo"] == 0


def test_the_cross_fitted_round_self_trains_each_fold_on_texts_it_never_saw_labelled(
    data_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--annotator.pseudo-label-ratio` in the few-labels regime (trainer.pseudo_labels.self_train): each
    fold model teaches a student from the base with its own labels on the pooled items nobody labelled,
    the candidate likewise on every label, so the evidence judged is the recipe served. No fold's
    student sees its fold's labels, nor any labelled text as a pseudo-label."""
    rng = random.Random(11)
    with open_feedback_log(str(data_dir / "feedback.sqlite3")) as log:
        write_label_stream(log, rng, 64)
        log.append_decisions([label_decision(f"U{i}", review(rng, rng.random() < 0.5), "great") for i in range(120)])
    calls: list[tuple[set[str], set[str], float]] = []
    real = annotation_round.self_train

    def recording(load_base, teacher, tokenizer, labelled, pool, cfg, **kw):  # type: ignore[no-untyped-def]
        student, m = real(load_base, teacher, tokenizer, labelled, pool, cfg, **kw)
        calls.append(({x.text for x in labelled}, set(kw["answered"]), m["n_pseudo"]))
        return student, m

    monkeypatch.setattr(annotation_round, "self_train", recording)
    args = few_label_args(data_dir)
    args.annotator.pseudo_label_ratio = 1.5  # the default
    run_trainer(args)
    [row] = read_rounds(args)
    assert row["result"] == "published", (row["reasons"], row["metrics"])
    texts = calls[-1][0]  # the candidate: every verified label
    assert len(calls) == 3 and len(texts) == 64 and row["metrics"]["n_pseudo"] == calls[-1][2] > 0
    (fold0, answered0, n0), (fold1, answered1, n1) = calls[:2]
    assert fold0 | fold1 == texts and not fold0 & fold1  # each fold model trained on the other fold only
    assert answered0 == answered1 == calls[-1][1] == texts and n0 > 0 and n1 > 0


@pytest.mark.parametrize("pseudo_label_ratio", [0.0, 1.5])
def test_random_labels_are_refused_by_the_few_labels_gate(
    data_dir: Path,  # noqa: F811
    pseudo_label_ratio: float,
) -> None:
    """Self-trained or not, a fold's answers never depend on its own labels, so the permutation test
    refuses labels that carry nothing to learn."""
    rng = random.Random(5)
    with open_feedback_log(str(data_dir / "feedback.sqlite3")) as log:
        write_label_stream(log, rng, 60, random_labels=True)
        log.append_decisions([label_decision(f"U{i}", review(rng, rng.random() < 0.5), "great") for i in range(90)])
    args = few_label_args(data_dir)
    args.annotator.pseudo_label_ratio = pseudo_label_ratio
    run_trainer(args)
    [row] = read_rounds(args)
    assert row["result"] == "gated" and any("no clear signal" in r for r in row["reasons"]), row
    assert ModelStore(data_dir / "store").latest("annotator") == "v0"


def test_too_few_labels_skip_the_round() -> None:
    d = gate_annotator_cv(
        {"n": 8, "accuracy": 1.0, "majority_rate": 0.5, "brier_gain": 0.5, "signal_z": 3.0}, GateConfig()
    )
    assert not d.publish and "need 12" in d.summary()


def test_a_significant_regression_on_labels_serving_never_saw_is_refused() -> None:
    oof = {"n": 200, "accuracy": 0.8, "majority_rate": 0.6, "brier_gain": 0.2, "signal_z": 6.0}
    assert gate_annotator_cv({**oof, "broken": 12, "fixed": 10}, GateConfig()).publish  # noise
    d = gate_annotator_cv({**oof, "broken": 30, "fixed": 5}, GateConfig())
    assert not d.publish and "never saw" in d.summary()


def test_the_router_covers_the_chunk_before_trusting_confidence() -> None:
    rng = random.Random(0)
    topics = ["tea leaves", "dog food", "hot sauce", "coffee beans"]
    texts = [f"{topics[i % 4]} review number {i}" for i in range(80)]
    probs = np.array([[0.5 + i / 200, 0.5 - i / 200] for i in range(80)])
    # Unchecked: confidence ignored, one typical item per cluster: every topic is covered.
    picks = pick_for_review(texts, probs, [True] * 80, 4, checked=False, rng=rng)
    assert len(picks) == 4 and {i % 4 for i in picks} == {0, 1, 2, 3}
    # Checked: only flagged items, the least certain of each cluster.
    flagged = [i % 2 == 0 for i in range(80)]
    picks = pick_for_review(texts, probs, flagged, 2, checked=True, rng=rng)
    assert len(picks) == 2 and all(flagged[i] for i in picks)
    assert {i % 4 for i in picks} == {0, 2}
    for i in picks:  # the least certain (lowest index, closest to 0.5) of its topic among flagged items
        assert i == min(j for j in range(80) if j % 4 == i % 4)
    assert pick_for_review(texts, probs, [False] * 80, 5, checked=True, rng=rng) == []
    # top_up: what the flagged items leave of the quota goes to the least certain confident items,
    # one per cluster; the flagged ones come first and are all taken.
    few = [i in (40, 41) for i in range(80)]
    picks = pick_for_review(texts, probs, few, 6, checked=True, rng=random.Random(0), top_up=4)
    assert len(picks) == 6 and {40, 41} <= set(picks) and len(set(picks)) == 6
    extra = [i for i in picks if i not in (40, 41)]
    assert {i % 4 for i in extra} == {0, 1, 2, 3}  # a topic each, not the four least certain of one
    assert all(i == min(j for j in range(80) if j % 4 == i % 4 and j not in (40, 41)) for i in extra)
    assert pick_for_review(texts, probs, few, 6, checked=True, rng=rng) == [40, 41]  # off: unspent
    partly = pick_for_review(texts, probs, few, 6, checked=True, rng=random.Random(0), top_up=2)
    assert len(partly) == 4 and {40, 41} <= set(partly)  # at most `top_up` confident items
    # Items already going to a person (the app's audit) are never picked again: the quota goes elsewhere.
    audit = set(extra[:2])
    again = pick_for_review(texts, probs, few, 6, checked=True, rng=random.Random(0), top_up=4, taken=audit)
    assert len(again) == 6 and not audit & set(again)
    # The app's whole decision (route_chunk): the audit of confident chunk items first, then the waiting
    # flagged items, then the top-up; indices into chunk + waiting, none twice, at most the quota.
    waiting = ([texts[40], texts[41]], [probs[40], probs[41]])
    chunk = (texts[:40], probs[:40], [False] * 40)
    order = route_chunk(*chunk, *waiting, 6, checked=True, audit_fraction=0.1, top_up="always", rng=random.Random(0))
    assert len(order) == 6 == len(set(order)) and order.index(40) >= 1 and 41 in order
    assert all(i < 40 for i in order[: order.index(40)])  # audited first
    plain = route_chunk(*chunk, *waiting, 6, checked=True, audit_fraction=0.0, top_up="never", rng=random.Random(0))
    assert plain == [40, 41]
    # stream-end: the flagged items leave 4; 120 items to come at this chunk's flag rate (none flagged) may
    # spend 8, so the stream falls 12 short, spread over this chunk and the three to come: 3 now.
    ending = route_chunk(
        *chunk, *waiting, 6, checked=True, audit_fraction=0.0, top_up="stream-end", rng=random.Random(0),
        items_left=120, budget_after=8,
    )  # fmt: skip
    assert len(ending) == 5 and {40, 41} <= set(ending)
    assert route_chunk(
        *chunk, *waiting, 6, checked=True, audit_fraction=0.0, top_up="stream-end", rng=random.Random(0)
    ) == [40, 41]  # fmt: skip  (a stream that goes on)
    # What a stream that flags enough absorbs is never topped up; what it cannot is, spread over it.
    assert top_up_share("stream-end", 4, 100, 0.3, 1000, 250) == 0  # 300 flagged to come for 250 + 4
    assert top_up_share("stream-end", 4, 100, 0.2, 1000, 250) == 4  # 54 short over 11 chunks: 5, at most 4
    assert top_up_share("stream-end", 40, 100, 0.2, 1000, 250) == 9  # 90 short over 11 chunks
    assert top_up_share("stream-end", 40, 100, 0.0, 0, 0) == 40  # the last chunk takes what is left
    assert top_up_share("always", 40, 100, 0.3, 1000, 250) == 40 and top_up_share("never", 40, 100, 0, 0, 0) == 0
    # An unchecked version's picks never depend on top_up (everything is a candidate already).
    assert len(pick_for_review(texts, probs, few, 4, checked=False, rng=random.Random(1), top_up=4)) == 4


def test_the_labelled_data_set_takes_people_first_then_the_latest_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    for version, meta in (("v0", {"base": True}), ("v1", {"checked": True})):
        src = tmp_path / version
        src.mkdir()
        (src / "weights.txt").write_text(version)
        store.publish_version("annotator", src, meta=meta)
    with open_feedback_log(str(tmp_path / "log.sqlite3")) as log:
        log.append_decisions(
            [
                label_decision("a0", "tea is great", "great", 0.6),
                label_decision("b0", "tea is bad", "great", 0.55),
                label_decision("c0", "tea is fine", "other", 0.7),
            ]
        )
        later = label_decision("c1", "tea is fine", "great", 0.9)
        log.append_decisions([type(later)(**{**later.to_dict(), "model_version": "v1", "output": later.output})])
        log.append_feedback(
            [
                Feedback("accept", "k1", event_id="a0"),
                Feedback("correction", "k2", event_id="b0", label="other"),
            ],
            LOG_LABEL_SETS,
        )
        rows = {r.text: r for r in labelled_dataset(log, store=store)}
        out = tmp_path / "dataset.jsonl"
        assert export_dataset(iter(rows.values()), out) == 3
    assert (rows["tea is great"].label, rows["tea is great"].source) == ("great", "human")
    assert (rows["tea is bad"].label, rows["tea is bad"].source) == ("other", "human")
    fine = rows["tea is fine"]  # nobody labelled it: the latest version's answer, with its probability
    assert (fine.label, fine.source, fine.model_version, fine.model_checked) == ("great", "model", "v1", True)
    assert fine.probability == pytest.approx(0.9)
    assert out.stat().st_mode & 0o777 == 0o600


async def test_the_online_tier_publishes_a_head_only_version_that_the_service_swaps_in(
    data_dir: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Corrections through FeedbackService -> a head round on cached embeddings -> a version that shares the
    encoder's weights file with its parent -> the running policy service answers with it. The trainer embeds
    the labels in the precision `--annotator.eval-dtype` names (bf16 here, as the demo's policy serves)."""
    import asyncio
    import dataclasses
    import logging

    from loopserve.feedback.v1 import feedback_pb2
    from loopserve.models.encoder_heads import HEAD_WEIGHTS_FILE, WEIGHTS_FILE
    from tests.e2e.test_trainer_loop import review
    from tests.support.policy_harness import policy_config, start_policy
    from trainer.__main__ import read_args

    running = await start_policy(policy_config(data_dir, generator=False))
    try:
        rng = random.Random(3)
        truth = [rng.random() < 0.5 for _ in range(40)]
        texts = [review(rng, positive) for positive in truth]
        async with running.client() as app, running.client("annotator") as people:
            r = await app.annotate(texts, top_k=0)
            assert r.model_version == "v0" and all(a.needs_review for a in r.annotations)  # unchecked base
            events = []
            for i, (a, positive) in enumerate(zip(r.annotations, truth, strict=True)):
                label = "great" if positive else "other"
                if a.labels[0].label == label:
                    events.append(
                        feedback_pb2.FeedbackEvent(
                            idempotency_key=f"k{i}", accept=feedback_pb2.LabelAccept(event_id=a.event_id)
                        )
                    )
                else:
                    events.append(
                        feedback_pb2.FeedbackEvent(
                            idempotency_key=f"k{i}",
                            correction=feedback_pb2.LabelCorrection(event_id=a.event_id, label=label),
                        )
                    )
            ack = await people.submit(events)
            assert all(x.accepted for x in ack.results)
            args = small_args(data_dir, models="annotator_head", trainer_subdir="trainer-online")
            args.gate = GateConfig(min_cv_items=12)
            dtype = read_args(["--annotator.eval-dtype", "bfloat16"], environ={}).annotator.eval_dtype
            args.annotator = dataclasses.replace(args.annotator, eval_dtype=dtype)
            caplog.set_level(logging.INFO, logger="trainer.learners")
            state = await asyncio.to_thread(run_trainer, args)
            assert "online tier: v0 embeds labels in torch.bfloat16" in caplog.text
            assert args.annotator.pseudo_label_ratio > 0 and not state.items  # it has no use for the item pool
            [row] = read_rounds(args)
            assert row["model"] == "annotator_head" and row["result"] == "published", row
            store = ModelStore(data_dir / "store")
            v1, v0 = store.path("annotator", row["version"]), store.path("annotator", "v0")
            assert (v1 / HEAD_WEIGHTS_FILE).is_file()
            assert (v1 / WEIGHTS_FILE).stat().st_ino == (v0 / WEIGHTS_FILE).stat().st_ino  # shared, not copied
            assert store.get("annotator", row["version"]).meta["checked"] is True
            store.verify("annotator", row["version"])

            async def served() -> bool:
                return (await app.annotate(texts[:2])).model_version == row["version"]

            deadline = asyncio.get_running_loop().time() + 60
            while not await served():
                assert asyncio.get_running_loop().time() < deadline, "the service never swapped to the head version"
                await asyncio.sleep(0.2)
            r = await app.annotate(texts, top_k=0)
            correct = sum(
                a.labels[0].label == ("great" if p else "other") for a, p in zip(r.annotations, truth, strict=True)
            )
            assert correct / len(texts) > 0.75  # it learnt the planted signal from the corrections
            assert all(a.needs_review == (a.labels[0].score < 0.8) for a in r.annotations)  # checked now
    finally:
        await running.app.stop(grace_s=0)


def test_weak_evidence_serves_unchecked_and_never_displaces_a_checked_version() -> None:
    """Between the serve bar and the checking bar a candidate may replace an unchecked version (better
    suggestions, still no auto-labels), but never a checked one whose check the new labels left standing
    (the next test)."""
    weak = {"n": 60, "accuracy": 0.7, "majority_rate": 0.65, "brier_gain": 0.03, "signal_z": 1.8}
    d = gate_annotator_cv(weak, GateConfig())
    assert d.publish and not d.checked
    strong = gate_annotator_cv({**weak, "signal_z": 3.0}, GateConfig())
    assert strong.publish and strong.checked
    # Signal, but probabilities no better than the base rate once calibrated: serves, never auto-labels.
    miscalibrated = gate_annotator_cv({**weak, "signal_z": 3.0, "brier_gain": -0.01}, GateConfig())
    assert miscalibrated.publish and not miscalibrated.checked
    noise = gate_annotator_cv({**weak, "signal_z": 0.4}, GateConfig())
    assert not noise.publish and not noise.checked


def test_a_candidate_clearly_better_than_an_unchecked_version_serves_it_unchecked() -> None:
    """Out-of-fold answers too weak for the permutation test still replace an unchecked version (the
    zero-shot base, which reads under the majority rate) when, paired on the labels that version never saw,
    the candidate is right where it was wrong far more often than the reverse; never a checked one."""
    weak = {"n": 50, "accuracy": 0.74, "majority_rate": 0.74, "brier_gain": -0.06, "signal_z": 0.35}
    cfg = GateConfig()
    d = gate_annotator_cv({**weak, "fixed": 16, "broken": 3}, cfg, serving_checked=False)  # paired z 2.98
    assert d.publish and not d.checked and not d.reasons
    assert not gate_annotator_cv({**weak, "fixed": 16, "broken": 3}, cfg, serving_checked=True).publish
    assert not gate_annotator_cv({**weak, "fixed": 12, "broken": 6}, cfg, serving_checked=False).publish  # z 1.41
    assert not gate_annotator_cv(weak, cfg, serving_checked=False).publish  # the two never disagree


def test_a_check_the_new_labels_refute_gives_way_to_a_serve_worthy_candidate() -> None:
    """A checked version keeps its place against an unchecked candidate only while its own answers on the
    labels it never saw carry signal; answers that do not (here: every item answered alike) lose it."""
    gen = torch.Generator().manual_seed(3)
    labels = (torch.rand(40, generator=gen) < 0.4).long()
    score = (labels.float() * 2 - 1) + torch.randn(40, generator=gen)  # AUC ~0.9
    informative = torch.stack([torch.zeros(40), score], 1)
    alike = torch.tensor([[0.4, 0.0]]).repeat(40, 1)
    unchecked = {"n": 60, "accuracy": 0.7, "majority_rate": 0.6, "brier_gain": 0.03, "signal_z": 1.8}
    cfg = GateConfig()

    def judged(serving_logits: torch.Tensor, n_fresh: int, serving_checked: bool = True):  # type: ignore[no-untyped-def]
        fresh = {"n_fresh": float(n_fresh), **fresh_evidence(serving_logits[:n_fresh], labels[:n_fresh])}
        d = gate_against_serving(unchecked, fresh, cfg, serving_checked=serving_checked)
        return d, fresh

    d, fresh = judged(informative, 40)
    assert fresh["signal_z"] > cfg.cv_serve_z
    assert not d.publish and d.reasons == ["not checked, and would replace a checked version"]
    d, fresh = judged(alike, 40)
    assert fresh["signal_z"] == 0.0 and d.publish and not d.checked and fresh["check_refuted"] == 1.0
    d, _ = judged(alike, cfg.min_cv_items - 1)  # too few new labels to refute anything
    assert not d.publish
    d, fresh = judged(alike, 40, serving_checked=False)
    assert d.publish and "check_refuted" not in fresh
    # A standing check gives way to a candidate that beats the checked version's recipe on the same folds,
    # paired, past cv_serve_z (17 fixed, 5 broken: z 2.56); not to one level with it (12 to 9: z 0.65).
    fresh = {"n_fresh": 0.0}
    d = gate_against_serving(unchecked, fresh, cfg, serving_checked=True, recipe=lambda: {"broken": 5.0, "fixed": 17.0})
    assert d.publish and not d.checked and fresh["check_outdone"] == 1.0
    fresh = {"n_fresh": 0.0}
    d = gate_against_serving(unchecked, fresh, cfg, serving_checked=True, recipe=lambda: {"broken": 9.0, "fixed": 12.0})
    assert not d.publish and "check_outdone" not in fresh


def test_the_online_tier_replaces_a_refuted_check_and_keeps_a_standing_one(base_store: Path) -> None:  # noqa: F811
    """The same rule in the online tier's head round, on a real (tiny) annotator: with checking out of
    reach, a serve-worthy head replaces a checked head that answers every new item alike, and does not
    replace one whose answers on those items carry signal."""
    model = encoder_heads.load(ModelStore(base_store).path("annotator", "v0"))
    assert isinstance(model, AnnotatorModel)
    gen = torch.Generator().manual_seed(5)
    n, dim = 80, model.head.weight.shape[1]
    labels = (torch.rand(n, generator=gen) < 0.4).long()
    emb = torch.randn(n, dim, generator=gen)
    emb[:, 0] += (labels.float() * 2 - 1) * 1.5  # the signal a head can find
    items = [LabelExample(f"item {i}", model.spec.label_names[int(y)], f"e{i}", i + 1) for i, y in enumerate(labels)]
    gate = GateConfig(cv_lift_z=1e9)  # nothing is checked: every candidate that passes serves unchecked
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    refuted = head_round(model, emb, items, 0, HeadConfig(), gate, serving_checked=True)
    assert refuted.decision.publish and not refuted.decision.checked
    assert refuted.serving_metrics["signal_z"] == 0.0 and refuted.serving_metrics["check_refuted"] == 1.0
    cfg = HeadConfig()
    w0, b0 = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    w, b = fit_head(emb, labels, w0, b0, l2=cfg.l2, max_iter=cfg.max_iter)
    with torch.no_grad():
        model.head.weight.copy_(w)
        model.head.bias.copy_(b)
    standing = head_round(model, emb, items, 0, HeadConfig(), gate, serving_checked=True)
    assert standing.serving_metrics["signal_z"] > gate.cv_serve_z
    assert not standing.decision.publish
    assert standing.decision.reasons == ["not checked, and would replace a checked version"]


def test_the_online_tiers_folds_never_start_from_a_head_fitted_on_them(base_store: Path, tmp_path: Path) -> None:  # noqa: F811
    """A head-only version's head was fitted on the labels its successors' cross-validation holds out. The
    online tier's fold fits (and the checked recipe a round's candidate must beat) start from the head
    saved with the encoder's weights, so their out-of-fold answers are the same whichever head serves:
    the base's zero-shot head, or a head-only version fitted on every one of these labels, as loaded
    from the store. (Pulled towards the latter, each fold would read its own labels back.)"""
    store = ModelStore(base_store)
    base = encoder_heads.load(store.path("annotator", "v0"))
    assert isinstance(base, AnnotatorModel) and base.encoder_head is None
    gen = torch.Generator().manual_seed(5)
    n, dim = 60, base.head.weight.shape[1]
    labels = (torch.rand(n, generator=gen) < 0.4).long()
    emb = torch.randn(n, dim, generator=gen)  # no signal: what a fold learns of the others says nothing here
    items = [LabelExample(f"item {i}", base.spec.label_names[int(y)], f"e{i}", i + 1) for i, y in enumerate(labels)]
    cfg, gate = HeadConfig(), GateConfig()
    fitted = head_round(base, emb, items, 0, cfg, gate)
    head, spec = fitted.head_and_spec(base.head, base.spec)
    src = tmp_path / "head-only"
    shared = encoder_heads.save_head(head, spec, src, store.path("annotator", "v0"))
    version = store.publish_version("annotator", src, parent="v0", shared_files=shared).version
    served = encoder_heads.load(store.path("annotator", version))
    assert isinstance(served, AnnotatorModel) and served.encoder_head is not None
    assert torch.equal(served.head.weight, fitted.weight)  # it serves the fitted head ...
    w0, b0 = encoder_heads.encoder_head(served)
    assert torch.equal(w0, base.head.weight.float()) and torch.equal(b0, base.head.bias.float())  # ... on the base's
    again = head_round(served, emb, items, n, cfg, gate, serving_checked=True)
    for key in ("accuracy", "signal_z", "temperature"):
        assert again.metrics[key] == pytest.approx(fitted.metrics[key], abs=1e-6), key
    # The leak this closes: the same folds pulled towards the fitted head read their labels back.
    folds = torch.tensor([annotation_head.fold_of(x.text, cfg.folds) for x in items])
    leaky = annotation_head.head_oof_logits(emb, labels, folds, fitted.weight, fitted.bias, cfg)
    honest = annotation_head.head_oof_logits(emb, labels, folds, w0, b0, cfg)
    nll = {k: torch.nn.functional.cross_entropy(v, labels).item() for k, v in (("leaky", leaky), ("honest", honest))}
    assert nll["leaky"] < nll["honest"] - 0.2, nll


def test_the_cross_fitted_round_replaces_a_refuted_or_outdone_check_and_keeps_a_standing_one(base_store: Path) -> None:  # noqa: F811
    """The rule inside `cross_fit_round` itself, as the trainer calls it (three real fine-tunes of the tiny
    annotator a round): with checking out of reach, the round's serve-worthy candidate replaces a checked
    version that answers every new item alike, and its own weights, which answer those items with signal
    and whose head recipe on the same folds is as good as the next candidate, keep their place against
    it; a version checked at nearly this label count (too few fresh labels to refute) gives way to a
    candidate that beats its recipe on the same folds."""
    folder = ModelStore(base_store).path("annotator", "v0")
    tokenizer = encoder_heads.load_tokenizer(folder)

    def load_base() -> AnnotatorModel:
        model = encoder_heads.load(folder)
        assert isinstance(model, AnnotatorModel)
        return model

    rng = random.Random(11)

    def labelled(i: int) -> LabelExample:
        positive = rng.random() < 0.5
        return LabelExample(review(rng, positive), "great" if positive else "other", f"e{i}", i + 1)

    items = [labelled(i) for i in range(64)]
    cfg = AnnotationPolicyConfig(encoder_lr=1e-3, head_lr=1e-2, epochs=0.0, max_length=32)
    gate = GateConfig(cv_folds=2, min_cv_items=12, cv_lift_z=1e9)  # every candidate that passes serves unchecked
    alike = load_base()
    with torch.no_grad():
        alike.head.weight.zero_()
        alike.head.bias.zero_()
    refuted = cross_fit_round(
        load_base, alike, tokenizer, items, 0, cfg, gate, serving_checked=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert refuted.metrics["signal_z"] > gate.cv_serve_z, refuted.metrics  # the candidate is serve-worthy
    assert refuted.decision.publish and not refuted.decision.checked
    assert refuted.serving_metrics["n_fresh"] == 64 and refuted.serving_metrics["check_refuted"] == 1.0
    more = items + [labelled(i) for i in range(64, 128)]  # the serving weights never saw these 64
    standing = cross_fit_round(
        load_base, refuted.model, tokenizer, more, 64, cfg, gate, serving_checked=True,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert standing.serving_metrics["n_fresh"] == 64 and standing.serving_metrics["signal_z"] > gate.cv_serve_z
    assert not standing.decision.publish and "check_refuted" not in standing.serving_metrics
    assert standing.decision.reasons == ["not checked, and would replace a checked version"]
    assert standing.metrics["recipe_fixed"] <= standing.metrics["recipe_broken"]  # its recipe is as good
    # Checked at nearly this label count (4 fresh labels: nothing can refute it) and answering alike: the
    # head recipe on its encoder, cross-fitted on the candidate's folds, is what the candidate must beat.
    outdone = cross_fit_round(
        load_base, alike, tokenizer, items, 60, cfg, gate, serving_checked=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert (
        outdone.serving_metrics["n_fresh"] == 4 and outdone.metrics["recipe_fixed"] > outdone.metrics["recipe_broken"]
    )
    assert outdone.decision.publish and not outdone.decision.checked
    assert outdone.serving_metrics["check_outdone"] == 1.0
    # The recipe is the online tier's fit as configured (`head_cfg`): its weights pinned to the serving
    # head's zeros, only the bias fits, so each fold answers one label: about a coin toss here.
    pinned = cross_fit_round(
        load_base, alike, tokenizer, items, 60, cfg, gate, serving_checked=True,
        generator=torch.Generator().manual_seed(0), head_cfg=HeadConfig(l2=1e6),
    )  # fmt: skip
    assert pinned.metrics["recipe_accuracy"] < outdone.metrics["recipe_accuracy"] - 0.2, pinned.metrics


def test_the_signal_test_holds_its_false_positive_rate_and_finds_a_weak_real_signal() -> None:
    """Under the null (answers independent of the labels) z is ~N(0, 1): the serve bar (1.645) passes about
    one model in twenty, the checking bar (2) fewer. A weak real signal from 50 items (two folds whose
    models differ in scale by 5x, as fold models trained on 25 labels do) clears the checking bar."""
    gen = torch.Generator().manual_seed(0)
    zs = []
    for _ in range(300):
        labels = (torch.rand(50, generator=gen) < 0.34).long()
        logits = torch.randn(50, 2, generator=gen) * 3
        zs.append(signal_test(logits, labels, torch.arange(50) % 2, permutations=400)[0])
    zs_t = torch.tensor(zs)
    assert abs(float(zs_t.mean())) < 0.2 and 0.8 < float(zs_t.std()) < 1.2
    assert float((zs_t > GateConfig().cv_serve_z).float().mean()) < 0.1
    hits = 0
    for _ in range(20):
        labels = (torch.rand(50, generator=gen) < 0.34).long()
        folds = torch.arange(50) % 2
        score = (labels.float() * 2 - 1) + torch.randn(50, generator=gen) * 1.2  # AUC ~0.8
        scale = torch.where(folds == 0, 1.0, 5.0)
        logits = torch.stack([torch.zeros(50), score * scale], 1)
        z, p = signal_test(logits, labels, folds)
        hits += z > GateConfig().cv_lift_z and p < 0.05
    assert hits >= 16


def test_a_few_confident_mistakes_do_not_hide_a_model_that_orders_the_items_well() -> None:
    """Fold models fine-tuned on tens of labels are confident, right or wrong. Here each of 100 items is
    ordered by a weak real score, except 9 answered wrongly at logit 8: the mean probability of the own
    label (the statistic before fold ranks) found signal above the checking bar in none of 20 draws; the
    fold ranks find it in most. And a fold's scale and shift change nothing."""
    gen = torch.Generator().manual_seed(3)
    folds = torch.arange(100) % 2
    hits = 0
    for _ in range(20):
        labels = (torch.rand(100, generator=gen) < 0.34).long()
        score = (labels.float() * 2 - 1) * 0.3 + torch.randn(100, generator=gen) * 0.5
        score[torch.nonzero(labels == 0).squeeze(1)[:6]] = 8.0  # confidently wrong
        score[torch.nonzero(labels == 1).squeeze(1)[:3]] = -8.0
        logits = torch.stack([torch.zeros(100), score], 1)
        z, _ = signal_test(logits, labels, folds)
        hits += z > GateConfig().cv_lift_z
        other = score.double()
        rescaled = torch.stack([torch.zeros(100), torch.where(folds == 1, other * 5 + 1, other)], 1)
        assert signal_test(rescaled, labels, folds)[0] == z
    assert hits >= 14
    logits[3, 1] = math.nan  # a diverged fold model: no evidence, whatever the ranks would say
    assert math.isnan(signal_test(logits, labels, folds)[0])


def test_leave_one_out_calibration_never_reads_an_items_own_label() -> None:
    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(40, 3, generator=gen) * 4, torch.randint(0, 3, (40,), generator=gen)
    folds = torch.arange(40) % 2
    probs = loo_calibrated_probs(logits, labels, folds)
    flipped = labels.clone()
    flipped[7] = (flipped[7] + 1) % 3
    again = loo_calibrated_probs(logits, flipped, folds)
    assert torch.allclose(probs[7], again[7])  # item 7's temperature came from the other items of its fold
    assert torch.allclose(probs.sum(1), torch.ones(40))
