"""Which first labels the annotation loop buys while no checked version serves: the router's coverage
picks against random picks from the same streamed chunks, over many seeds.

While the serving version is unchecked, the app covers each streamed chunk (loopserve.annotation.routing:
k-means over the chunk's hashed TF-IDF, the item nearest each centre goes to a person). Whether those
labels teach more than random ones is measured here without a fine-tune per seed, so that twenty seeds
take minutes: each strategy's labels train (a) a head on the frozen base encoder, as the trainer's online
tier fits its heads (trainer.head_fit.fit_head, pulled towards the encoder's own head), and (b) TF-IDF +
logistic regression, both scored on the test split. The labels are the data's own (no annotator noise),
so the two strategies differ only in which items they pick. A third strategy, k-means over the base
encoder's embeddings, is a reference the app cannot run (its routing sees only texts and Annotate's
answers). A fourth, `loop`, is the app's routing as it runs before a fine-tune serves: coverage while
unchecked, then, once the online tier's head passes the gate, uncertainty among the items it flags
(OnlineTierLoop). Seeds shuffle the stream as bench/learning.py does. Two more probes of every strategy's
labels ask how far they carry without a fit: a nearest-prototype classifier (cosine to each label's mean
unit embedding of its labelled items, `nearest_prototype`), alone and with the label's description (its
row of the zero-shot head) counted as one more item.

A slower probe closest to what the loop serves, `--fine-tune-at N`, fine-tunes the replay's recipe from the
base on each of `--fine-tune-strategies`' labels at N (clean labels, no self-training pool; with
`--fine-tune-self-training`, self-trained on the streamed items the strategy did not buy, as bench/learning.py's
passive baseline is).

    python bench/cold_start.py --data-dir .loopserve --seeds 20 --chunks 8   # JSON + plot in bench/results/
    python bench/cold_start.py --data-dir .loopserve --seeds 20 --chunk 25 --quota 6 --chunks 8 \
        --out bench/results/cold_start-prototypes-48.json   # the first 48 labels, 6 a chunk
    python bench/cold_start.py --data-dir .loopserve --seeds 6 --chunks 2 --fine-tune-at 50
    python bench/cold_start.py --data-dir .loopserve --first-seed 3 --seeds 3 --chunks 2 --fine-tune-at 50 \
        --fine-tune-self-training
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    add_annotation_data_args,
    annotation_results_header,
    load_annotation_data,
    mean_se,
    merge_results,
    save_figure,
)
from bench.learning import head_version, reannotate, tfidf_accuracy
from loopserve.annotation.routing import per_cluster, pick_for_review, route_chunk
from loopserve.datasets import Example
from loopserve.models import encoder_heads
from loopserve.models.encoder_heads import AnnotatorModel
from trainer.annotation_head import HeadConfig, head_round
from trainer.annotation_policy import embed_texts
from trainer.examples import LabelExample
from trainer.gate import GateConfig
from trainer.head_fit import fit_head

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("coverage", "random", "embedding-coverage", "loop")
PROBES = (
    "head_accuracy",
    "prototype_accuracy",
    "prototype_described_accuracy",
    "tfidf_accuracy",
    "majority_share",
    "labels",
    "fine_tune_accuracy",
)


def embedding_coverage(vectors: np.ndarray, k: int, rng: random.Random) -> list[int]:
    """The router's cold-start rule (routing.per_cluster: per k-means cluster, the item nearest its centre) on
    the base encoder's embeddings instead of TF-IDF."""
    n = len(vectors)
    return per_cluster(list(range(n)), np.zeros(n), k, rng, least_certain=False, features=lambda c: vectors[c])


def nearest_prototype(
    x: torch.Tensor, y: torch.Tensor, descriptions: torch.Tensor, description_weight: float, queries: torch.Tensor
) -> torch.Tensor:
    """The label of each query by cosine to each label's prototype: the mean of its labelled items' unit
    embeddings (x, y), with the label's description (its row of the zero-shot head, `descriptions`) counted
    as `description_weight` items; a label nobody labelled yet keeps its description alone."""
    unit = torch.nn.functional.normalize(x, dim=-1)
    described = torch.nn.functional.normalize(descriptions, dim=-1)
    protos = []
    for c in range(len(descriptions)):
        mine = unit[y == c]
        weight = description_weight if len(mine) else 1.0
        protos.append((mine.sum(0) + weight * described[c]) / (len(mine) + weight))
    centres = torch.nn.functional.normalize(torch.stack(protos), dim=-1)
    return (torch.nn.functional.normalize(queries, dim=-1) @ centres.T).argmax(-1)


def picks(
    strategy: str, chunk: list[Example], quota: int, emb: dict[str, torch.Tensor], rng: random.Random
) -> list[int]:
    if strategy == "coverage":  # the app's routing while the serving version is unchecked
        n = len(chunk)
        return pick_for_review([e.text for e in chunk], np.zeros((n, 2)), [True] * n, quota, checked=False, rng=rng)
    if strategy == "random":
        return rng.sample(range(len(chunk)), quota)
    return embedding_coverage(torch.stack([emb[e.text] for e in chunk]).numpy(), quota, rng)


class OnlineTierLoop:
    """The app's routing with the trainer's online tier alone: coverage while the serving version is unchecked;
    after each chunk a head round on the frozen encoder's embeddings (trainer.annotation_head.head_round,
    the real gate); once a head is checked, only the items it flags (probability under `review_threshold`)
    and the backlog of flagged items are candidates, least certain within clusters, with the random audit
    (loopserve.annotation.routing.route_chunk). What the loop buys while heads are its checked versions,
    before a fine-tune serves; items are not re-annotated except the backlog after a new head."""

    def __init__(
        self, model: AnnotatorModel, emb: dict[str, torch.Tensor], review_threshold: float, audit_fraction: float = 0.05
    ) -> None:
        self.serving, self.emb, self.threshold, self.audit_fraction = model, emb, review_threshold, audit_fraction
        self.gate, self.head_cfg = GateConfig(), HeadConfig()
        self.checked, self.cursor = False, 0
        self.labelled: list[LabelExample] = []
        self.backlog: dict[str, np.ndarray] = {}

    def probs(self, items: list[Example]) -> np.ndarray:
        x = torch.stack([self.emb[e.text] for e in items])
        with torch.no_grad():
            return torch.softmax(self.serving.logits_of(x), -1).numpy()

    def chunk(self, chunk: list[Example], quota: int, rng: random.Random, by_text: dict[str, Example]) -> None:
        probs = self.probs(chunk)
        needs = [not self.checked or float(p.max()) < self.threshold for p in probs]
        waiting = list(self.backlog)
        routed = route_chunk(
            [e.text for e in chunk], probs, needs, waiting, [self.backlog[t] for t in waiting], quota,
            checked=self.checked, audit_fraction=self.audit_fraction, rng=rng,
        )  # fmt: skip
        items = [*chunk, *(by_text[t] for t in waiting)]
        for i in routed[:quota]:
            e = items[i]
            self.labelled.append(LabelExample(e.text, e.label, f"e{len(self.labelled) + 1}", len(self.labelled) + 1))
            self.backlog.pop(e.text, None)
        bought = {x.text for x in self.labelled}
        self.backlog.update(
            {e.text: p for e, p, n in zip(chunk, probs, needs, strict=True) if n and e.text not in bought}
        )
        if len(self.labelled) >= self.gate.min_cv_items:
            self.head_round(by_text)

    def head_round(self, by_text: dict[str, Example]) -> None:
        x = torch.stack([self.emb[e.text] for e in self.labelled])
        cand = head_round(self.serving, x, self.labelled, self.cursor, self.head_cfg, self.gate, self.checked)
        if cand.decision.publish:  # a head-only version, as Replay.head_round serves it
            self.serving, self.checked = head_version(self.serving, cand), cand.decision.checked
            self.cursor = len(self.labelled)
            if self.backlog:  # the new version re-annotates the backlog: confident items leave it
                probs = self.probs([by_text[t] for t in self.backlog])
                reannotate(self.backlog, probs, self.checked, self.threshold)


def bought_labels(
    strategy: str,
    stream: list[Example],
    chunk: int,
    quota: int,
    model: AnnotatorModel,
    emb: dict[str, torch.Tensor],
    review_threshold: float,
    seed: int,
) -> list[list[Example]]:
    """The items `strategy` has bought after each `chunk` items of `stream`, at `quota` labels a chunk (the
    loop's unspent share carries over, as the app's pace line does)."""
    rng, bought, out = random.Random(seed + 1), [], []
    loop = OnlineTierLoop(model, emb, review_threshold)
    by_text = {e.text: e for e in stream}
    for c in range(len(stream) // chunk):
        part = stream[c * chunk : (c + 1) * chunk]
        if strategy == "loop":
            loop.chunk(part, quota * (c + 1) - len(loop.labelled), rng, by_text)
            bought = [by_text[x.text] for x in loop.labelled]
        else:
            bought = bought + [part[i] for i in picks(strategy, part, quota, emb, rng)]
        out.append(bought)
    return out


class FineTuneProbe:
    """Test accuracy of the replay's recipe (bench/learning.py's configs: epochs scaled to the data, fp32)
    fine-tuned from the base on a strategy's items with their own labels: the probe closest to what the loop
    serves, with no annotator noise. With `self_training`, the passive baseline's whole recipe: the model
    then pseudo-labels the streamed items nobody bought and a student from the base trains on both
    (trainer.pseudo_labels.self_train, the trainer's ratio). The base and tokenizer load once."""

    def __init__(self, base: Path, test: list[Example], max_length: int, self_training: bool):
        from bench.learning import make_configs
        from bench.learning import parser as learning_parser

        cfg, _ = make_configs(learning_parser().parse_args([]))  # the replay's recipe at its defaults
        self.cfg = dataclasses.replace(
            cfg,
            max_length=max_length,
            eval_dtype="float32",
            train_dtype="float32",
            pseudo_label_ratio=cfg.pseudo_label_ratio if self_training else 0.0,
        )
        base_model = encoder_heads.load(base)
        assert isinstance(base_model, AnnotatorModel)
        self.base_model, self.tokenizer, self.test = base_model, encoder_heads.load_tokenizer(base), test

    def load_base(self) -> AnnotatorModel:
        return copy.deepcopy(self.base_model)

    def run(self, items: list[Example], pool: list[str], seed: int) -> dict[str, float]:
        """`fine_tune_accuracy` on the test split, and `fine_tune_pseudo_labels`: how many the student had."""
        from bench.learning import train_ungated
        from loopserve.cli.demo.passive import accuracy_on

        labelled = [LabelExample(e.text, e.label, f"e{i}", i) for i, e in enumerate(items, 1)]
        gen = torch.Generator().manual_seed(seed)
        model, m = train_ungated(self.load_base, self.tokenizer, labelled, pool, self.cfg, gen)
        return {
            "fine_tune_accuracy": accuracy_on(model, self.tokenizer, self.test, self.cfg),
            "fine_tune_pseudo_labels": m["n_pseudo"],
        }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_annotation_data_args(ap, test_items=0)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--chunk", type=int, default=100, help="items per streamed chunk (bench/learning.py's)")
    ap.add_argument("--quota", type=int, default=25, help="labels per chunk (bench/learning.py's --fraction 0.25)")
    ap.add_argument("--chunks", type=int, default=2, help="chunks streamed: budgets quota, 2 x quota, ...")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--review-threshold", type=float, default=0.8, help="the loop strategy's needs_review line")
    ap.add_argument(
        "--fine-tune-at",
        type=int,
        default=0,
        help="at this many labels also fine-tune the replay's recipe (bench/learning.py's, fp32, no self-training) "
        "from the base on each of --fine-tune-strategies' labels, scored on the test split (slow; 0: off)",
    )
    ap.add_argument(
        "--fine-tune-self-training",
        action="store_true",
        help="the fine-tune probe self-trains on the streamed items the strategy did not buy, as the passive "
        "baseline of bench/learning.py does",
    )
    ap.add_argument("--fine-tune-strategies", type=lambda s: s.split(","), default=["coverage", "random"])
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        help="earlier result files (same chunks, quota and fine-tune probe) whose seeds to include; "
        "--seeds 0 --merge A B: no new run",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "cold_start.json")
    return ap


Runs = dict[str, dict[int, list[dict[str, float]]]]
"""strategy -> labels -> one row of probes per seed (the same seed order for every strategy: paired)."""


def measure(args: argparse.Namespace, train: list[Example], test: list[Example], base: Path) -> tuple[Runs, float]:
    """Every strategy's labels, probed, for each of the seeds asked for; and the zero-shot head's test
    accuracy (the labels' descriptions alone, the base version)."""
    model, tokenizer = encoder_heads.load(base), encoder_heads.load_tokenizer(base)
    assert isinstance(model, encoder_heads.AnnotatorModel)
    names = model.spec.label_names
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    streams = []
    for seed in seeds:
        order = list(train)
        random.Random(seed).shuffle(order)
        streams.append(order[: args.chunk * args.chunks])
    probe = FineTuneProbe(base, test, args.max_length, args.fine_tune_self_training) if args.fine_tune_at else None
    texts = sorted({e.text for s in streams for e in s} | {e.text for e in test})
    emb = dict(zip(texts, embed_texts(model, tokenizer, texts, 64, args.max_length, torch.float32), strict=True))
    w0, b0 = encoder_heads.encoder_head(model)
    x_test = torch.stack([emb[e.text] for e in test])
    y_test = torch.tensor([names.index(e.label) for e in test])

    def accuracy(predicted: torch.Tensor) -> float:
        return float((predicted == y_test).float().mean())

    def frozen_encoder_probes(items: list[Example]) -> dict[str, float]:
        """The probes on the base encoder's embeddings of `items` (stacked once for all three)."""
        x = torch.stack([emb[e.text] for e in items])
        y = torch.tensor([names.index(e.label) for e in items])
        w, b = fit_head(x, y, w0, b0, l2=1e-2, max_iter=100)
        return {
            "head_accuracy": accuracy((x_test @ w.T + b).argmax(-1)),
            "prototype_accuracy": accuracy(nearest_prototype(x, y, w0, 0.0, x_test)),
            "prototype_described_accuracy": accuracy(nearest_prototype(x, y, w0, 1.0, x_test)),
        }

    budgets = [args.quota * (c + 1) for c in range(args.chunks)]
    runs: Runs = {s: {b: [] for b in budgets} for s in STRATEGIES}
    for seed, stream in zip(seeds, streams, strict=True):
        for strategy in STRATEGIES:
            sets = bought_labels(strategy, stream, args.chunk, args.quota, model, emb, args.review_threshold, seed)
            for c, (budget, bought) in enumerate(zip(budgets, sets, strict=True)):
                bought_texts = {e.text for e in bought}
                left = [e.text for e in stream[: (c + 1) * args.chunk] if e.text not in bought_texts]
                runs[strategy][budget].append(
                    {
                        "seed": float(seed),
                        **frozen_encoder_probes(bought),
                        "tfidf_accuracy": tfidf_accuracy([(e.text, e.label) for e in bought], test),
                        "majority_share": max(sum(e.label == y for e in bought) for y in names) / len(bought),
                        "labels": float(len(bought)),
                        **(
                            probe.run(bought, left, seed)
                            if probe and budget == args.fine_tune_at and strategy in args.fine_tune_strategies
                            else {}
                        ),
                    }
                )
        print(seed, {s: round(runs[s][budgets[-1]][-1]["head_accuracy"], 3) for s in STRATEGIES}, flush=True)
    return runs, accuracy((x_test @ w0.T + b0).argmax(-1))


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if not set(args.fine_tune_strategies) <= set(STRATEGIES):
        ap.error(f"--fine-tune-strategies: choose among {', '.join(STRATEGIES)}")
    args.fine_tune_strategies = sorted({*args.fine_tune_strategies, "random"})  # the others are paired with it
    budgets = [args.quota * (c + 1) for c in range(args.chunks)]
    same = ("chunk", "quota", "chunks", "max_length", "fine_tune_at", "fine_tune_self_training")
    earlier, merged = merge_results(ap, args, args.merge, lambda files: [same] * len(files))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path, train, test, base = load_annotation_data(args)
    t0 = time.monotonic()
    runs: Runs = {s: {b: [] for b in budgets} for s in STRATEGIES}
    zero_shot = earlier[0].get("zero_shot_accuracy") if earlier else None
    if args.seeds:
        runs, zero_shot = measure(args, train, test, base)
    for s in STRATEGIES:  # the merged files' seeds first, in the order given, then this run's
        for b in budgets:
            runs[s][b] = [row for r in earlier for row in r["runs"][s][str(b)]] + runs[s][b]
    n_seeds = len(runs["random"][budgets[0]])
    results: dict[str, Any] = {
        **annotation_results_header(args, path, train, test),
        "seconds": round(time.monotonic() - t0, 1),
        "zero_shot_accuracy": zero_shot,
        "merged": merged,
        "summary": summarise(runs, budgets),
        "runs": {s: {str(b): v for b, v in r.items()} for s, r in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    plot(results["summary"], budgets, args.out.with_suffix(".png"), f"{path.name}: {n_seeds} seeds", results)
    print(json.dumps(results["summary"], indent=1))


def summarise(runs: dict[str, dict[int, list[dict[str, float]]]], budgets: list[int]) -> dict[str, Any]:
    """Per strategy and budget: mean and standard error of each probe, and the paired difference from random
    (same seed, same stream)."""

    out: dict[str, Any] = {}
    for s in STRATEGIES:
        for b in budgets:
            row = {}
            for probe in PROBES:
                if not runs[s][b] or any(probe not in r for r in runs[s][b] + runs["random"][b]):
                    continue  # fine_tune_accuracy: only at --fine-tune-at, for --fine-tune-strategies
                values = [r[probe] for r in runs[s][b]]
                row[probe] = mean_se(values)
                if s != "random":
                    diff = [v - r[probe] for v, r in zip(values, runs["random"][b], strict=True)]
                    row[f"{probe}_minus_random"] = mean_se(diff)
            out.setdefault(s, {})[str(b)] = row
    return out


def plot(summary: dict[str, Any], budgets: list[int], out: Path, title: str, results: dict[str, Any]) -> None:
    """The head and TF-IDF probes against labels, and where the fine-tune probe ran, a third panel: its
    accuracy per strategy at that budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = [(s, b) for s in STRATEGIES for b in budgets if "fine_tune_accuracy" in summary[s][str(b)]]
    panels = [p for p in PROBES[:4] if all(p in summary[s][str(b)] for s in STRATEGIES for b in budgets)]
    fig, axes = plt.subplots(1, len(panels) + bool(tuned), figsize=(5 * (len(panels) + bool(tuned)), 4))
    for ax, probe in zip(axes, panels, strict=False):
        for i, s in enumerate(STRATEGIES):
            xs = [b + (i - 1) * 0.6 for b in budgets]
            ys = [summary[s][str(b)][probe]["mean"] for b in budgets]
            es = [2 * summary[s][str(b)][probe]["se"] for b in budgets]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=s)
        ax.axhline(results["majority_rate"], color="grey", ls=":", label="majority rate")
        ax.set_xlabel("labels (first chunks of the stream)")
        ax.set_ylabel(probe.replace("_", " ") + " (test, +-2 s.e.)")
        ax.set_title(f"{title}: {probe.removesuffix('_accuracy').replace('_', ' ')}")
        ax.legend(fontsize=8)
    if tuned:
        ax = axes[-1]
        for i, (s, b) in enumerate(tuned):
            row = summary[s][str(b)]["fine_tune_accuracy"]
            ax.errorbar([i], [row["mean"]], yerr=[2 * row["se"]], marker="o", capsize=3, label=f"{s} at {b} labels")
        ax.axhline(results["majority_rate"], color="grey", ls=":", label="majority rate")
        ax.set_xticks(range(len(tuned)), [s for s, _ in tuned])
        ax.set_ylabel("fine-tune accuracy (test, +-2 s.e.)")
        mode = "self-trained" if results["args"].get("fine_tune_self_training") else "no self-training"
        ax.set_title(f"fine-tune probe ({mode})")
        ax.legend(fontsize=8)
    save_figure(fig, out)


if __name__ == "__main__":
    main()
