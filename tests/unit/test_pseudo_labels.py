"""Self-training's choice of pseudo-labels (trainer.pseudo_labels): class-balanced to the human labels,
most confident first, capped."""

from __future__ import annotations

from pathlib import Path

import torch

from loopserve.models import encoder_heads
from loopserve.models.encoder_heads import AnnotatorModel
from tests.support import tiny_models
from trainer.annotation_policy import AnnotationPolicyConfig
from trainer.examples import LabelExample, heldout
from trainer.pseudo_labels import PSEUDO_SOURCE, pick_pseudo_labels, pseudo_labels, self_train

NAMES = ["great", "other"]


def human(great: int, other: int) -> list[LabelExample]:
    labels = ["great"] * great + ["other"] * other
    return [LabelExample(f"h{i}", y, f"e{i}", i + 1) for i, y in enumerate(labels)]


def test_pseudo_labels_follow_the_human_label_shares_most_confident_first() -> None:
    # The model predicts "great" for 8 items and "other" for 4; the people said half are "other".
    p_great = torch.tensor([0.99, 0.6, 0.95, 0.7, 0.9, 0.8, 0.65, 0.97, 0.2, 0.4, 0.05, 0.3])
    probs = torch.stack([p_great, 1 - p_great], -1)  # (12, 2)
    texts = [f"t{i}" for i in range(12)]
    picked = pick_pseudo_labels(probs, texts, NAMES, human(20, 20), cap=8)
    by_label = {y: [x.text for x in picked if x.label == y] for y in NAMES}
    # 4 of each, most confident first; not the 8 most confident items overall (6 "great", 2 "other").
    assert by_label == {"great": ["t0", "t7", "t2", "t4"], "other": ["t10", "t8", "t11", "t9"]}
    assert all(x.source == PSEUDO_SOURCE for x in picked)


def test_no_pseudo_labels_without_a_cap_people_or_items() -> None:
    probs = torch.tensor([[0.9, 0.1]])
    assert pick_pseudo_labels(probs, ["t"], NAMES, human(3, 1), cap=0) == []
    assert pick_pseudo_labels(probs, ["t"], NAMES, [], cap=5) == []
    assert pick_pseudo_labels(torch.zeros(0, 2), [], NAMES, human(3, 1), cap=5) == []


def test_a_class_the_model_never_predicts_gets_no_pseudo_labels_and_takes_none_of_the_others_share() -> None:
    probs = torch.tensor([[0.9, 0.1]] * 10)
    picked = pick_pseudo_labels(probs, [f"t{i}" for i in range(10)], NAMES, human(5, 5), cap=8)
    assert [x.label for x in picked] == ["great"] * 4


def test_only_the_items_nobody_labelled_and_not_held_out_are_pseudo_labelled(tmp_path: Path) -> None:
    """pseudo_labels filters the pool itself (the trainer, the demo's passive baseline and the bench all
    call it): a human label's text, an `answered` text (a reject) and a held-out item are never scored."""
    model = encoder_heads.load(tiny_models.tiny_annotator(tmp_path / "annotator"))
    assert isinstance(model, AnnotatorModel)
    tokenizer = encoder_heads.load_tokenizer(tmp_path / "annotator")
    pool = [f"item number {i}" for i in range(200)]
    frac = 0.3
    people = [LabelExample(t, NAMES[i % 2], f"e{i}", i + 1) for i, t in enumerate(pool[:20]) if not heldout(t, frac)]
    rejected = pool[20:30]
    cfg = AnnotationPolicyConfig(pseudo_label_ratio=10.0, pseudo_label_max=1000, pseudo_pool_max=0, max_length=16)
    picked = pseudo_labels(model, tokenizer, pool, people, cfg, heldout_fraction=frac, answered=rejected)
    eligible = [t for t in pool[30:] if not heldout(t, frac)]
    assert 0 < len(eligible) < 170  # the hash holds some out
    assert picked and {x.text for x in picked} <= set(eligible)
    cfg.pseudo_pool_max = 5  # only the latest eligible items are scored
    assert {x.text for x in pseudo_labels(model, tokenizer, pool, people, cfg, heldout_fraction=frac)} <= set(
        eligible[-5:]
    )
    cfg.pseudo_label_ratio = 0.0  # off: nothing scored
    assert pseudo_labels(model, tokenizer, pool, people, cfg, heldout_fraction=frac) == []


def test_self_train_teaches_a_student_from_the_base_on_the_items_nobody_labelled(tmp_path: Path) -> None:
    """The cross-fit regime's self-training: the teacher's pseudo-labels on the pool train a fresh model
    from the base beside the human labels; with nothing to label (every pooled text labelled or answered,
    or the ratio 0) the teacher is returned as it is."""
    folder = tiny_models.tiny_annotator(tmp_path / "annotator")

    def load_base() -> AnnotatorModel:
        model = encoder_heads.load(folder)
        assert isinstance(model, AnnotatorModel)
        return model

    tokenizer = encoder_heads.load_tokenizer(folder)
    pool = [f"item number {i}" for i in range(80)]
    people = [LabelExample(t, NAMES[i % 2], f"e{i}", i + 1) for i, t in enumerate(pool[:20])]
    cfg = AnnotationPolicyConfig(pseudo_label_ratio=1.5, epochs=1.0, max_length=16)
    teacher = load_base()
    student, m = self_train(load_base, teacher, tokenizer, people, pool, cfg, answered=pool[20:30])
    assert student is not teacher and 0 < m["n_pseudo"] <= 30 and m["steps"] > 0  # 1.5 per human label
    base = load_base().state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in student.state_dict().items())  # it trained
    same, m = self_train(load_base, teacher, tokenizer, people, pool[:30], cfg, answered=pool[20:30])
    assert same is teacher and m == {"n_pseudo": 0.0}  # labelled and answered texts are never pseudo-labelled
    cfg.pseudo_label_ratio = 0.0
    assert self_train(load_base, teacher, tokenizer, people, pool, cfg)[0] is teacher
