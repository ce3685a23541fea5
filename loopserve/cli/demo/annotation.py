"""The annotation demo: an app streams the train split through Annotate; humans review some items.

    app ──Annotate(chunk)──▶ policy ──needs_review?──▶ router ──▶ simulated annotators ──Submit──▶ log
                                     │                   └─ flagged, no budget left now: backlog
                                     └─ not flagged (a checked version, confident): auto-labelled
    trainer ◀── log, app's round requests (12, 24, 48, ... then every `round_labels` labels); gate; publish ──▶ swap
    app ──Annotate(backlog + auto-labelled items)──▶ each newly served version re-annotates them
    demo ──Annotate(test split)──▶ accuracy of every version served; `dataset export` ──▶ the labelled set

An unchecked version (the zero-shot base) flags every item, so nothing is auto-labelled on its word;
the router (loopserve.annotation.routing) covers the chunk with the budget while it serves, and spends
it on the least certain item of each cluster once a checked version serves. The product of the run is
its labelled data set (human label, else the latest served version's label), exported from the log
and scored against the data's labels: the report leads with it.

Once a round is due the app asks the trainer for it (`loopserve.annotation.round_requests`, as Label
Studio's "Start training" does) and waits for a round that read its labels (the round's log cursor against
the seqs its Submit calls were acknowledged with), and for the policy to serve what it published, before
it streams on: on 2 CPU cores the stream would otherwise outrun the trainer. That pacing is the only thing
the demo does that a production app would not.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from loopserve.annotation.round_requests import request_round
from loopserve.annotation.routing import route_chunk
from loopserve.annotation.top_up import TopUp
from loopserve.cli.demo import passive, report
from loopserve.cli.demo.annotators import AnnotatorPool
from loopserve.cli.demo.stack import Stack, interrupt_on_signals, link_base_versions, new_run_folder
from loopserve.client import Client
from loopserve.datasets import Example, label_set, load_dataset, pull_finefoods
from loopserve.device import resolved_dtype_name
from loopserve.feedback.v1 import feedback_pb2
from loopserve.models.store import ModelStore, version_number
from trainer.annotation_policy import AnnotationPolicyConfig

logger = logging.getLogger(__name__)

CEILING_REFERENCE = 0.852
"""MiniLM fully fine-tuned on all 4,000 Fine Food train labels (3 epochs, 256 tokens): DESIGN.md. Quoted
only for Fine Food; another data set gets a ceiling only when measured (--measure-ceiling)."""


@dataclass
class AnnotationDemoOptions:
    data_dir: Path = Path("./.loopserve")
    """The main data dir: its store holds the base versions, its runs/ gets this run's folder."""
    store_dir: Path | None = None
    """The store holding the base versions (default <data-dir>/store)."""
    dataset: Path | None = None
    """A JSONL / CSV with text, label[, split]; default: Fine Food (pulled on first use)."""
    quick: bool = False
    """A small run for CI (a subset of the data; minutes)."""
    budget_fraction: float = 0.3
    """Human interactions allowed, as a share of the train items streamed."""
    audit_fraction: float = 0.05
    """Share of the items the policy is sure of that still go to a person (to measure auto-labels)."""
    error_rate: float = 0.05
    """Mean error rate of the simulated annotators."""
    double_review: float = 0.1
    """Share of reviewed items that a second annotator also reviews."""
    annotators: int = 5
    """Simulated annotators in the pool."""
    chunk: int = 100
    """Items per Annotate call of the app."""
    round_labels: int = 150
    """Human labels per trainer round once labels are many (the app asks the trainer for a round at each)."""
    round_growth: float = 1.0
    """Earlier rounds: once the new labels reach this multiple of the labels already trained on (12, 24,
    48, ...), so the first checked version serves after tens of labels (the app asks for them)."""
    review_threshold: float = 0.8
    """needs_review when the top calibrated probability is under this (PolicyConfig)."""
    top_up: TopUp = "never"
    """Once a checked version serves, where the share of the budget its flagged items leave goes
    (loopserve.annotation.top_up.top_up_share). never: it carries over to later flagged items, which a
    stream that goes on gives it. always: the least certain of its confident items take it at once; the
    quick demo read the loop under passive so (-0.030 and -0.065 in two runs, its early share spent on
    items an 18-label version was sure of, against -0.015 and +0.055 without), and the default demo ran an
    extra round (1,405 s against 1,295-1,310 s). stream-end: they take only what the rest of the stream
    cannot absorb at the current flag rate, spread over it, so a stream that ends before the budget is
    spent still spends it (bench/learning.py to 1,000 labels on 4,000 items)."""
    epochs: float = 0.0
    """Passes over the verified labels per round; 0 scales them with the data (many over few labels)."""
    max_steps: int = 0
    """Cap on optimizer steps (batch 16) per round; 0: `epochs` full passes over the replay buffer.
    (A cap makes rounds cheap but a gated round then throws its few steps away and the next one starts
    from the same serving weights with as few: the loop can stall. Full passes grow with the buffer.)"""
    max_length: int = 128
    """Tokens per item in training and serving (the services truncate to it too)."""
    pseudo_label_ratio: float | None = None
    """Self-training's pseudo-labels per human label, for the trainer and the offline baselines alike
    (AnnotationPolicyConfig.pseudo_label_ratio; 0 turns it off). None: the trainer's default (1.5), except
    with --quick, which turns it off: a cross-fitted round then trains 3 models instead of 6 (the two
    stages), and CI's quick demo spent 590 of its 767 s in rounds on an AVX2-only EPYC. Both arms drop it,
    so the quick demo still compares like for like; tests/service cover self-training itself."""
    heldout_fraction: float = 0.15
    """Share of verified items the trainer keeps for its gate."""
    min_eval_items: int = 30
    """Gate: held-out items needed before the first publish."""
    min_lift_z: float = 0.0
    """Gate, many labels: standard errors by which held-out accuracy must beat the held-out majority rate.
    Off in the demo: the held-out slice (items the policy was unsure of) has a skewed majority rate. The
    few-labels gate keeps its own test of signal (cv_serve_z, cv_lift_z)."""
    cv_max_items: int = 300
    """Gate: below this many verified labels rounds are cross-fitted from the base (no held-out slice). 300
    here, where the trainer's default is 600 (GateConfig.cv_max_items): the demo keeps to its wall time on
    2 cores. With 600, the default demo's rounds at 324, 405 and 547 labels took 167, 119 and 219 s on an
    AMD EPYC, where its later held-out rounds (650 to 1,100 labels) took 89 to 141 s: an estimated 4
    minutes more in all (the whole run: 2,165 s). Those were fp32 rounds; in bf16 (--serve-dtype's default
    since) rounds cost about half, which leaves room to revisit this (not measured)."""
    train_items: int = 0
    """Stream only this many train items (0: all)."""
    test_items: int = 0
    """Evaluate on this many test items (0: all)."""
    seed: int = 0
    measure_ceiling: bool = False
    """Train on every train label (slow); without it only Fine Food quotes a (reference) ceiling."""
    label_descriptions: Path | None = None
    """--dataset: JSON {label: description} for the zero-shot base (default: each label's name)."""
    round_timeout_s: float = 600.0
    """Longest the app waits for one trainer round."""
    explore: str = "off"
    """How the policy service chooses the served label (--explore): off | epsilon-greedy | softmax | ucb.
    Exploring puts other labels in front of people (each one flagged needs_review, so it costs review
    budget) and logs true propensities for off-policy evaluation."""
    explore_epsilon: float = 0.1
    """epsilon-greedy: share of items served a random label (--explore-epsilon)."""
    online: bool = True
    """Run the annotator's online tier beside the trainer: a head refit every `online_every` labels."""
    online_every: int = 4
    """Online tier: new verified labels per head round."""
    serve_dtype: str = "auto"
    """The policy service's weights: auto (resolved when the demo starts) is bf16 where the hardware
    multiplies it natively (loopserve.device.pick_dtype: ~3x fp32 at batch 32+ on a CPU with AVX512-BF16 or
    AMX) and fp32 elsewhere (an AVX2-only AMD EPYC embedded reviews about 6x slower in emulated bf16 than
    in fp32). The trainers and the offline baselines run in it too, so that the comparison stays like for
    like: their evaluations, calibration and head refits (`--annotator.eval-dtype`) and, as mixed
    precision, their training steps (`--annotator.train-dtype`)."""

    def annotator_config(self) -> AnnotationPolicyConfig:
        """The recipe the trainers and the offline baselines run: these options over the trainer's defaults."""
        return AnnotationPolicyConfig(**_annotator_recipe(self))

    def apply_quick(self) -> None:
        self.train_items, self.test_items = self.train_items or 400, self.test_items or 200
        self.chunk, self.round_labels, self.round_growth = 60, 60, 2.0
        self.max_length, self.max_steps = 64, self.max_steps or 24
        self.pseudo_label_ratio = 0.0 if self.pseudo_label_ratio is None else self.pseudo_label_ratio
        self.heldout_fraction, self.min_eval_items = 0.25, 15
        # round_timeout_s stays: its last round takes about 115 s on two cores and over twice that on one.


@dataclass
class VersionPoint:
    version: str
    human_labels: int
    accuracy: float
    published_at: float | None = None
    served_at: float | None = None
    eval_seconds: float = 0.0


@dataclass
class ChunkPoint:
    t: float
    items: int
    human_labels: int
    version: str
    review_rate: float
    """Share of the chunk the policy flagged needs_review."""
    auto_share: float
    """Share of the chunk auto-labelled (no person saw it)."""
    auto_accuracy: float | None
    """Accuracy of the auto-labels against the data's labels."""


def _label_probs(ann: Any, labels: list[str]) -> np.ndarray:
    """(L,) the label distribution of one Annotate answer, in `labels` order (absent labels 0)."""
    probs = np.zeros(len(labels))
    for lb in ann.labels:
        probs[labels.index(lb.label)] = lb.score
    return probs


@dataclass
class ItemLabel:
    """Where one streamed item stands: a person labelled it, a checked version auto-labelled it, or it
    waits in the backlog (flagged, and no budget to show it to anyone yet)."""

    status: str
    """"human" | "auto" | "backlog"."""
    label: str = ""
    version: str = ""
    event_id: str = ""
    """The Annotate decision a person's review of this item refers to (the latest one)."""
    probs: np.ndarray | None = None
    """Backlog items: that decision's label distribution, for the router."""


@dataclass
class AnnotationRun:
    opts: AnnotationDemoOptions
    run: Path
    labels: list[str]
    train: list[Example]
    test: list[Example]
    t0: float = field(default_factory=time.monotonic)
    versions: list[VersionPoint] = field(default_factory=list)
    chunks: list[ChunkPoint] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    human_labels: int = 0
    items_seen: int = 0
    auto_total: int = 0
    auto_correct: int = 0
    auto_unchecked: int = 0
    """Items auto-labelled on the word of an unchecked version: must stay 0."""
    items: dict[int, ItemLabel] = field(default_factory=dict)
    reannotated: int = 0
    """Annotate decisions spent re-annotating the backlog and the auto-labelled items after swaps."""
    dataset: dict[str, Any] = field(default_factory=dict)
    """The exported labelled data set, scored against the data's labels."""
    labels_at_last_round: int = 0
    submitted: list[tuple[int, int]] = field(default_factory=list)
    """(log seq, human labels): after each Submit, the last seq it was acknowledged with and the labels
    counted by then, so a round's log cursor says how many of the app's labels it read."""
    serving: str = "v0"
    status: str = "starting"
    passive: dict[str, float] = field(default_factory=dict)
    ceiling: dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _dataset(opts: AnnotationDemoOptions) -> tuple[list[Example], list[Example]]:
    path = opts.dataset or pull_finefoods(opts.data_dir / "data")
    train, test = load_dataset(path, seed=opts.seed)
    rng = random.Random(opts.seed)
    rng.shuffle(train)  # the order the app streams them in
    if opts.train_items:
        train = train[: opts.train_items]
    if opts.test_items:
        test = random.Random(opts.seed + 1).sample(test, min(opts.test_items, len(test)))
    return train, test


def _prepare_store(opts: AnnotationDemoOptions, run: Path, labels: list[str]) -> None:
    main_store = opts.store_dir or opts.data_dir / "store"
    link_base_versions(main_store, run / "store", ["annotator", "reward"])
    store = ModelStore(run / "store")
    served = json.loads((store.path("annotator", "v0") / "head.json").read_text())
    if sorted(x["name"] for x in served["labels"]) != sorted(labels):
        # Another data set: a fresh zero-shot base annotator for its labels, in this run's store only.
        import shutil

        from loopserve.models import provision

        shutil.rmtree(run / "store" / "models" / "annotator")
        described: dict[str, str] = {}
        if opts.label_descriptions is not None:
            described = {str(k): str(v) for k, v in json.loads(Path(opts.label_descriptions).read_text()).items()}
            unknown = sorted(set(described) - set(labels))
            if unknown:
                raise ValueError(f"--label-descriptions names labels the data set does not have: {unknown[:5]}")
        spec = {
            "task": served.get("task", "sentiment"),
            "labels": [{"name": x, "description": described.get(x, x)} for x in labels],
        }
        (run / "labels.json").write_text(json.dumps(spec))
        provision.pull(store, models=["annotator"], labels_file=run / "labels.json")


def _policy_flags(opts: AnnotationDemoOptions) -> list[str]:
    return [
        *["--review-threshold", str(opts.review_threshold)],
        *["--max-input-tokens", str(opts.max_length)],
        *["--dtype", opts.serve_dtype],
        *["--explore", opts.explore, "--explore-epsilon", str(opts.explore_epsilon)],
    ]


def _annotator_recipe(opts: AnnotationDemoOptions) -> dict[str, Any]:
    """The AnnotationPolicyConfig fields the trainers and the offline baselines share: the same recipe, in
    the precision the policy serves (judged, calibrated and refitted on embeddings as served)."""
    recipe: dict[str, Any] = {
        "epochs": opts.epochs,
        "max_length": opts.max_length,
        "max_steps": opts.max_steps,
        "eval_dtype": opts.serve_dtype,
        "train_dtype": opts.serve_dtype,
    }
    if opts.pseudo_label_ratio is not None:
        recipe["pseudo_label_ratio"] = opts.pseudo_label_ratio
    return recipe


def _trainer_flags(opts: AnnotationDemoOptions, run: Path) -> list[str]:
    objectives = {
        "annotator": _annotator_recipe(opts),
        "gate": {
            "min_eval_items": opts.min_eval_items,
            "min_lift_z": opts.min_lift_z,
            "cv_max_items": opts.cv_max_items,
        },
    }
    path = run / "objectives.json"
    path.write_text(json.dumps(objectives, indent=2))
    return [
        "--models",
        "annotator",
        # The app asks for each full round when it is due (`_wait_round`: round_labels new labels, or
        # round_growth times those it had) and waits for one that read its labels, so the trainer's own
        # triggers are off (--rounds-on-request). With them on (a round after 15 or 30 s with any new label),
        # a slow CPU's rounds started on part of what the app counted: an AVX2-only EPYC's quick demo trained
        # its versions on 16, 28 and 52 of the 18, 58 and 120 labels its report said they had.
        "--rounds-on-request",
        "--heldout-fraction",
        str(opts.heldout_fraction),
        "--poll-interval-s",
        "0.5",
        "--seed",
        str(opts.seed),
        "--objectives-json",
        str(path),
    ]


def _evaluate(client: Client, test: list[Example], batch: int = 128) -> tuple[str, float]:
    """Accuracy of the served top label on the test split, through Annotate; (version, accuracy)."""
    for _attempt in range(3):
        versions, correct = set(), 0
        for i in range(0, len(test), batch):
            part = test[i : i + batch]
            r = client.annotate([e.text for e in part], top_k=1, timeout_s=300)
            versions.add(r.model_version)
            correct += sum(a.labels[0].label == e.label for a, e in zip(r.annotations, part, strict=True))
        if len(versions) == 1:
            return versions.pop(), correct / len(test)
        # A swap landed mid-evaluation: evaluate again on the one version now serving.
    raise RuntimeError("the served version kept changing during evaluation")


def _annotator_rounds(run: Path) -> list[dict[str, Any]]:
    path = run / "trainer" / "rounds.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("model") == "annotator"]


@functools.lru_cache(maxsize=256)
def _manifest(run: Path, version: str) -> dict[str, Any]:
    """A published version's manifest (versions never change once published: read each once)."""
    return dict(json.loads((run / "store" / "models" / "annotator" / version / "manifest.json").read_text()))


def _checked(run: Path, version: str) -> bool:
    """Whether the trainer's gate checked `version` (its manifest says so): only then may it auto-label."""
    return bool(_manifest(run, version).get("meta", {}).get("checked"))


def _published_at(run: Path, version: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(_manifest(run, version)["created"]).timestamp()


class AnnotationDemo:
    def __init__(self, opts: AnnotationDemoOptions) -> None:
        if opts.quick:
            opts.apply_quick()
        opts.serve_dtype = resolved_dtype_name(opts.serve_dtype)  # one precision for every process it starts
        self.opts = opts

    # ---- the trainer side, as the app sees it ------------------------------------------------------

    def _wait_round(self, st: AnnotationRun, stack: Stack, client: Client, seen: int, refresh: Any) -> int:
        """Ask the trainer for an annotator round (as Label Studio's "Start training" does) and wait, after
        `seen` rows, for one that read every label submitted so far (its log cursor); evaluate what it
        published. A round that started before those labels were read (a race with the request) is
        recorded with the labels it did read, and the app asks again."""
        deadline = time.monotonic() + self.opts.round_timeout_s
        st.status = "trainer round running"
        refresh()
        target = st.submitted[-1][0] if st.submitted else 0
        asked_after = len(_annotator_rounds(st.run))
        request_round(st.run / "trainer", "annotator", "loopserve demo")
        while True:
            stack.check_alive()
            rows = _annotator_rounds(st.run)
            if any(int(r.get("cursor", 0)) >= target for r in rows[seen:]):
                break
            if len(rows) > asked_after:  # a round ran on fewer labels: ask for another
                asked_after = len(rows)
                request_round(st.run / "trainer", "annotator", "loopserve demo")
            if time.monotonic() > deadline:
                logger.warning("no trainer round within %.0fs; streaming on", self.opts.round_timeout_s)
                return seen
            time.sleep(0.3)
            refresh()
        new = [r for r in rows[seen:] if r.get("result") != "skipped"]
        st.labels_at_last_round = st.human_labels
        for row in new:
            labels = max((n for seq, n in st.submitted if seq <= int(row.get("cursor", 0))), default=0)
            st.rounds.append({**row, "human_labels": labels, "t": st.elapsed()})
            if row.get("result") == "published" and row.get("version"):
                self._swap_and_evaluate(st, client, row["version"], labels, refresh)
        return len(rows)

    def _swap_and_evaluate(self, st: AnnotationRun, client: Client, version: str, labels: int, refresh: Any) -> None:
        st.status = f"waiting for the policy to serve {version}"
        refresh()
        deadline = time.monotonic() + 120
        # The online tier may already have published a head on top of `version`: serving that counts.
        while version_number(client.model_info().annotator_version) < version_number(version):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the policy did not swap to {version} within 120s")
            time.sleep(0.1)
        served_at = time.time()
        st.serving = version
        st.status = f"evaluating {version} on the test split"
        refresh()
        t = time.monotonic()
        got, acc = _evaluate(client, st.test)
        st.versions.append(
            VersionPoint(got, labels, acc, _published_at(st.run, version), served_at, time.monotonic() - t)
        )
        st.status = f"{version} re-annotating the backlog and the auto-labelled items"
        refresh()
        self._reannotate(st, client, version)

    # ---- the app ---------------------------------------------------------------------------------------

    def _round_due(self, st: AnnotationRun) -> bool:
        """Whether the app asks for an annotator round now (the trainer's own rule, which the demo turns off in
        the trainer: `round_labels` new labels, or `round_growth` times the labels it had, at least 12)."""
        had, new = st.labels_at_last_round, st.human_labels - st.labels_at_last_round
        early = self.opts.round_growth > 0 and new >= max(12, self.opts.round_growth * had)
        return new >= self.opts.round_labels or early

    def _review_chunk(
        self, st: AnnotationRun, pool: AnnotatorPool, part: list[Example], resp: Any, rng: random.Random
    ) -> list[feedback_pb2.FeedbackEvent]:
        """Route one chunk: the chunk's share of the budget goes to a random audit of the confident items
        (checked versions only), then to the router's picks (coverage while an unchecked version serves,
        the least certain item of each cluster once a checked one does); flagged items left over wait in
        the backlog, and only a checked version's confident items are auto-labelled.

        The share follows a pace line (by the time n items have streamed, at most budget_fraction * n
        interactions are spent, unspent share carrying over), so the budget is spread over the whole
        stream instead of going to whatever comes first."""
        budget = int(self.opts.budget_fraction * len(st.train))
        pace = min(budget, int(self.opts.budget_fraction * (st.items_seen + len(part))))
        anns = resp.annotations
        checked = _checked(st.run, resp.model_version)
        probs = np.stack([_label_probs(a, st.labels) for a in anns]) if anns else np.zeros((0, len(st.labels)))
        needs = [a.needs_review for a in anns]
        quota = max(pace - pool.reviews, 0)
        # The router's candidates: this chunk, then every flagged item still waiting in the backlog, so a
        # person's next item is the most useful one pending rather than one of the last `chunk`.
        waiting = {k: it.probs for k, it in st.items.items() if it.status == "backlog" and it.probs is not None}
        keys = [st.items_seen + i for i in range(len(part))] + list(waiting)
        routed = route_chunk(
            [e.text for e in part],
            probs,
            needs,
            [st.train[k].text for k in waiting],
            list(waiting.values()),
            quota,
            checked=checked,
            audit_fraction=self.opts.audit_fraction,
            rng=rng,
            top_up=self.opts.top_up,
            items_left=len(st.train) - st.items_seen - len(part),
            budget_after=budget - pace,
        )
        order = [keys[j] for j in routed]
        in_chunk = {st.items_seen + i: (anns[i].event_id, anns[i].labels[0].label) for i in range(len(part))}
        events, reviewed = [], set()
        for k in order:
            if pool.reviews >= pace:
                break
            event_id, served = in_chunk.get(k) or (st.items[k].event_id, st.items[k].label)
            reviewed.add(k)
            for rv in pool.review(st.train[k].label, served, max_reviews=pace - pool.reviews):
                key = f"{st.run.name}:{event_id}:{rv.annotator_id}"
                if rv.kind == "accept":
                    ev = feedback_pb2.FeedbackEvent(
                        idempotency_key=key,
                        annotator_id=rv.annotator_id,
                        accept=feedback_pb2.LabelAccept(event_id=event_id),
                    )
                else:
                    ev = feedback_pb2.FeedbackEvent(
                        idempotency_key=key,
                        annotator_id=rv.annotator_id,
                        correction=feedback_pb2.LabelCorrection(event_id=event_id, label=rv.label),
                    )
                events.append(ev)
                st.items[k] = ItemLabel("human", rv.label, resp.model_version)
        auto = auto_ok = 0
        for i, (ex, ann) in enumerate(zip(part, anns, strict=True)):
            if st.items_seen + i in reviewed:
                continue
            if ann.needs_review:
                st.items[st.items_seen + i] = ItemLabel(
                    "backlog", ann.labels[0].label, resp.model_version, ann.event_id, probs[i]
                )
                continue
            auto += 1
            auto_ok += ann.labels[0].label == ex.label
            st.auto_unchecked += not checked
            st.items[st.items_seen + i] = ItemLabel("auto", ann.labels[0].label, resp.model_version, ann.event_id)
        st.auto_total += auto
        st.auto_correct += auto_ok
        st.human_labels = pool.reviews
        st.items_seen += len(part)
        st.chunks.append(
            ChunkPoint(
                st.elapsed(),
                st.items_seen,
                st.human_labels,
                resp.model_version,
                sum(needs) / len(part),
                auto / len(part),
                auto_ok / auto if auto else None,
            )
        )
        return events

    def _reannotate(self, st: AnnotationRun, client: Client, version: str) -> None:
        """The newly served version answers again for every item no person labelled (backlog and
        auto-labelled): one decision per item and version in the log; confident answers of a checked
        version leave the backlog as auto-labels, unsure ones (or any answer of an unchecked version)
        stay in or go back to it."""
        todo = [k for k, it in st.items.items() if it.status != "human"]
        for start in range(0, len(todo), 128):
            keys = todo[start : start + 128]
            r = client.annotate([st.train[k].text for k in keys], top_k=0, timeout_s=300)
            st.reannotated += len(keys)
            for k, ann in zip(keys, r.annotations, strict=True):
                status = "backlog" if ann.needs_review else "auto"
                st.items[k] = ItemLabel(
                    status, ann.labels[0].label, r.model_version, ann.event_id, _label_probs(ann, st.labels)
                )
                st.auto_unchecked += status == "auto" and not _checked(st.run, r.model_version)

    def run(self) -> Path:
        from rich.console import Console

        opts = self.opts
        console = Console()
        train, test = _dataset(opts)
        labels = label_set(train + test)
        run = new_run_folder(opts.data_dir, "annotation")
        (run / "options.json").write_text(json.dumps(asdict(opts), indent=2, default=str))
        st = AnnotationRun(opts, run, labels, train, test)
        console.print(f"run folder: {run}")
        console.print(
            f"data: {len(train)} train items streamed, {len(test)} test items, labels {labels}; "
            f"human budget {int(opts.budget_fraction * len(train))} interactions"
        )
        _prepare_store(opts, run, labels)
        pool = AnnotatorPool(
            labels, size=opts.annotators, error_rate=opts.error_rate, double_review=opts.double_review, seed=opts.seed
        )
        stack = Stack(
            run,
            trainer_flags=_trainer_flags(opts, run),
            online_trainer_flags=(
                [
                    *["--models", "annotator_head", "--trainer-subdir", "trainer-online"],
                    *["--head-round-labels", str(opts.online_every), "--poll-interval-s", "0.5"],
                    *["--objectives-json", str(run / "objectives.json")],
                ]
                if opts.online
                else None
            ),
            policy_flags=_policy_flags(opts),
        )
        interrupt_on_signals()
        rng = random.Random(opts.seed + 1)
        try:
            stack.start()
            st.status = "starting the services"
            with report.LiveView(console, lambda: report.live_table(st), lambda: report.live_line(st)) as view:
                refresh = view.refresh
                refresh()
                ready = stack.wait_ready()
                st.status = f"services ready in {ready:.0f}s; evaluating v0"
                refresh()
                with (
                    Client(stack.policy_target, stack.token("client"), timeout_s=120) as app,
                    Client(stack.policy_target, stack.token("annotator"), timeout_s=120) as people,
                ):
                    t = time.monotonic()
                    version, acc = _evaluate(app, test)
                    st.versions.append(VersionPoint(version, 0, acc, None, None, time.monotonic() - t))
                    st.serving = version
                    seen = 0
                    for i in range(0, len(train), opts.chunk):
                        stack.check_alive()
                        part = train[i : i + opts.chunk]
                        st.status = "streaming"
                        resp = app.annotate([e.text for e in part], top_k=0)
                        events = self._review_chunk(st, pool, part, resp, rng)
                        if events:
                            acked = people.submit(events)
                            seqs = [r.seq for r in acked.results if r.accepted]
                            if seqs:
                                st.submitted.append((max(seqs), st.human_labels))
                        refresh()
                        if self._round_due(st):
                            seen = self._wait_round(st, stack, app, seen, refresh)
                    if st.human_labels > st.labels_at_last_round:
                        st.status = "waiting for the last round"
                        seen = self._wait_round(st, stack, app, seen, refresh)
                    st.status = "loop done; stopping the services"
                    refresh()
            stack.stop()
            st.dataset = self._export_dataset(st)
            self._baselines(st, pool, console)
        except KeyboardInterrupt:
            stack.stop()
            console.print(f"interrupted: stopped every process the demo started; log and store in {run}")
            raise
        finally:
            stack.stop()
        summary = report.write_annotation_report(st, pool)
        console.print(report.summary_lines(summary))
        print(run)
        return run

    def _export_dataset(self, st: AnnotationRun) -> dict[str, Any]:
        """`loopserve dataset export` on the run's log (dataset.jsonl, 0600), scored against the data's labels."""
        from loopserve.feedback_log import open_feedback_log
        from loopserve.feedback_log.labelled_dataset import export_dataset, labelled_dataset

        truth = {e.text: e.label for e in st.train[: st.items_seen]}
        counts: dict[str, list[int]] = {}
        rows = []
        with open_feedback_log(str(st.run / "feedback.sqlite3")) as log:
            for row in labelled_dataset(log, store=ModelStore(st.run / "store")):
                if row.text not in truth:
                    continue
                rows.append(row)
                kind = "human" if row.source == "human" else ("model" if row.model_checked else "unchecked model")
                c = counts.setdefault(kind, [0, 0])
                c[0] += 1
                c[1] += row.label == truth[row.text]
        export_dataset(iter(rows), st.run / "dataset.jsonl")
        n = sum(c[0] for c in counts.values())
        return {
            "items": n,
            "accuracy": sum(c[1] for c in counts.values()) / n if n else float("nan"),
            "by_source": {k: {"items": c[0], "accuracy": c[1] / c[0]} for k, c in counts.items()},
            "file": str(st.run / "dataset.jsonl"),
        }

    def _baselines(self, st: AnnotationRun, pool: AnnotatorPool, console: Any) -> None:
        opts = self.opts
        cfg = opts.annotator_config()
        base = st.run / "store" / "models" / "annotator" / "v0"
        published = [r["human_labels"] for r in st.rounds if r.get("result") == "published"]
        schedule = published or [st.human_labels]
        budget = schedule[-1]
        noisy = AnnotatorPool(
            st.labels, size=opts.annotators, error_rate=opts.error_rate, double_review=0.0, seed=opts.seed + 1
        )
        labelled = passive.passive_labels(st.train, budget, noisy.noisy_label, opts.seed)
        console.print(f"passive baseline: {budget} random items, the loop's schedule {schedule}, trained offline ...")
        res = passive.train_offline(
            base,
            labelled,
            schedule,
            st.test,
            cfg,
            heldout_fraction=opts.heldout_fraction,
            cv_max_items=opts.cv_max_items,
            pool=[e.text for e in st.train[: st.items_seen]],  # what the loop streamed
        )
        st.passive = res
        console.print(f"passive: accuracy {res['accuracy']:.3f} with {budget} labels in {res['seconds']:.0f}s")
        if opts.measure_ceiling:
            console.print(f"ceiling: all {len(st.train)} train labels, 3 epochs, trained offline ...")
            cfg3 = replace(cfg, epochs=3.0, max_steps=0)
            all_labels = [(e.text, e.label) for e in st.train]
            res = passive.train_offline(base, all_labels, [len(all_labels)], st.test, cfg3, heldout_fraction=0.0)
            st.ceiling = {"accuracy": res["accuracy"], "measured": True, "seconds": res["seconds"]}
        elif opts.dataset is None:  # Fine Food: the reference figure, said to be one
            st.ceiling = {"accuracy": CEILING_REFERENCE, "measured": False}
        else:  # no ceiling from another data set
            st.ceiling = {}
