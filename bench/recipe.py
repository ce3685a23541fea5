"""Annotator round recipes compared on the same labels and batch orders, from the zero-shot base.

    python bench/recipe.py [--budgets 300,500] [--seeds 0,1] [--shuffles 0,1,2]
        [--recipes flat= trapezoid=warmup_ratio:0.1,decay_ratio:0.3]

For each seed, `--budgets` random items of the train split get labels from the demo's simulated
annotators (`--error-rate`, as bench/learning.py's passive learner). For each budget, each shuffle (the
generator that orders the batches) and each recipe, a model is trained from the zero-shot base on those
labels with the trainer's own round (trainer.annotation_policy.train_annotation_policy, epochs scaled to
the data unless a recipe sets them) and scored on the test split as the services serve it (bf16 encoder).
Same labels, same shuffle, only the recipe differs, so the recipes are compared pair by pair against the
first (the round seeds its dropout from the shuffle's generator too, so a pair shares the masks as well).

A recipe is `name=FIELD:VALUE,...`: overrides of trainer.annotation_policy.AnnotationPolicyConfig over the
defaults the trainer runs with (`name=` alone: the defaults), e.g. `flat=warmup_ratio:0,decay_ratio:0` or
`long=epochs:6`. A recipe with `pseudo_label_ratio` above 0 is self-training from the base: the first
recipe's model of the same labels and shuffle (the teacher) labels the `--pool-per-label` x budget train
items streamed after the labelled ones (trainer.pseudo_labels: class-balanced to the human labels' shares,
most confident first), and the student trains from the base on the human labels and those.

Writes bench/results/recipe-stability.json (CPU model recorded) and a plot of every run. Not run in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_annotation_data_args, annotation_results_header, load_annotation_data, save_plot
from loopserve.cli.demo.annotators import AnnotatorPool
from loopserve.datasets import label_set
from loopserve.device import resolved_dtype_name
from loopserve.models import encoder_heads
from loopserve.models.encoder_heads import AnnotatorModel
from trainer.annotation_policy import AnnotationPolicyConfig, eval_dtype, predict_logits, train_annotation_policy
from trainer.examples import LabelExample
from trainer.pseudo_labels import pseudo_labels

RESULTS = Path(__file__).resolve().parent / "results"
CASTS: dict[str, Any] = {"float": float, "int": int, "str": str, "bool": lambda v: v.lower() in ("1", "true", "yes")}
"""AnnotationPolicyConfig's field types (strings: the module is `from __future__ import annotations`)."""


def parse_recipe(text: str) -> tuple[str, dict[str, Any]]:
    """`name=FIELD:VALUE,...` -> (name, overrides of AnnotationPolicyConfig), each value cast to its field's
    type; an unknown field or a value that does not cast is an argparse error, before anything trains."""
    name, _, spec = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"recipe {text[:40]!r}: NAME=FIELD:VALUE,... (NAME= for the defaults)")
    types = {f.name: f.type for f in dataclasses.fields(AnnotationPolicyConfig)}
    overrides: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition(":")
        kind = types.get(key)
        if kind is None:
            raise argparse.ArgumentTypeError(f"recipe {name[:40]!r}: no AnnotationPolicyConfig field {key[:40]!r}")
        try:
            overrides[key] = CASTS[kind](value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"recipe {name[:40]!r}: {key}: {e}") from None
    try:  # the config's own checks (dtypes, ratios, exclusive options) now; recipes start without self-training
        AnnotationPolicyConfig(**{"pseudo_label_ratio": 0.0, **overrides})
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"recipe {name[:40]!r}: {e}") from None
    return name, overrides


def summarise(runs: list[dict[str, Any]], recipes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for budget in sorted({r["budget"] for r in runs}):
        rows = [r for r in runs if r["budget"] == budget]
        entry: dict[str, Any] = {}
        for name in recipes:
            accs = [r[name]["accuracy"] for r in rows if name in r]
            if accs:
                entry[name] = {
                    "mean": statistics.fmean(accs),
                    "sd": statistics.stdev(accs) if len(accs) > 1 else float("nan"),
                    "min": min(accs),
                    "max": max(accs),
                    "n": len(accs),
                }
        first = recipes[0]
        for name in recipes[1:]:
            diffs = [r[name]["accuracy"] - r[first]["accuracy"] for r in rows if name in r and first in r]
            if len(diffs) > 1:
                entry[f"{name}_minus_{first}"] = {
                    "mean": statistics.fmean(diffs),
                    "se": statistics.stdev(diffs) / len(diffs) ** 0.5,
                    "n": len(diffs),
                }
        out[str(budget)] = entry
    return out


def plot(runs: list[dict[str, Any]], recipes: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in runs})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / len(recipes)
    for k, name in enumerate(recipes):
        for j, budget in enumerate(budgets):
            accs = [r[name]["accuracy"] for r in runs if r["budget"] == budget and name in r]
            xs = [j + (k - (len(recipes) - 1) / 2) * width] * len(accs)
            ax.scatter(xs, accs, color=f"C{k}", alpha=0.7, label=name if j == 0 else None)
            if accs:
                ax.hlines(statistics.fmean(accs), xs[0] - width / 3, xs[0] + width / 3, color=f"C{k}")
    ax.set_xticks(range(len(budgets)), [f"{b} labels" for b in budgets])
    ax.set_ylabel("test accuracy (each run; bar: mean)")
    ax.grid(alpha=0.3, axis="y")
    save_plot(fig, ax, out, title)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_annotation_data_args(ap, test_items=1000)
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[300, 500])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1], help="label draws")
    ap.add_argument("--shuffles", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument(
        "--recipes",
        nargs="+",
        type=parse_recipe,
        default=[("flat", {}), ("trapezoid", {"warmup_ratio": 0.1, "decay_ratio": 0.3})],
        help="NAME=FIELD:VALUE,... overrides of AnnotationPolicyConfig; each is paired against the first",
    )
    ap.add_argument("--error-rate", type=float, default=0.05)
    ap.add_argument("--max-length", type=int, default=128, help="tokens per item (the demo's setting)")
    ap.add_argument(
        "--dtype",
        default="auto",
        help="precision served and evaluated in, and every recipe's training precision unless it sets train_dtype: "
        "auto (bf16 where the CPU multiplies it natively, else fp32) | float32 | bfloat16; results record it",
    )
    ap.add_argument(
        "--pool-per-label",
        type=float,
        default=3.0,
        help="self-training recipes: unlabelled items the teacher scores, per human label (passive sampling at "
        "0.25 interactions an item streams 4 items a label)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "recipe-stability.json")
    args = ap.parse_args()
    args.dtype = resolved_dtype_name(args.dtype, "cpu")
    path, train, test, base = load_annotation_data(args)
    labels = label_set(train + test)
    tokenizer = encoder_heads.load_tokenizer(base)
    names = [name for name, _ in args.recipes]
    # The trainer's defaults, as `loopserve demo` hands them over (epochs 0: scaled with the data), less
    # self-training, which a recipe asks for (it needs the first recipe's model as its teacher).
    cfg0 = AnnotationPolicyConfig(
        epochs=0.0, max_length=args.max_length, train_dtype=args.dtype, eval_dtype=args.dtype, pseudo_label_ratio=0.0
    )
    results: dict[str, Any] = {**annotation_results_header(args, path, train, test), "runs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    for seed in args.seeds:
        order = list(train)
        random.Random(seed).shuffle(order)  # as bench/learning.py orders the stream
        pool = AnnotatorPool(labels, error_rate=args.error_rate, double_review=0.0, seed=seed + 1000)
        noisy = [pool.noisy_label(e.label) for e in order[: max(args.budgets)]]
        pseudo_truth = {e.text: e.label for e in order}
        for budget in args.budgets:
            items = [
                LabelExample(e.text, y, f"e{i}", i + 1)
                for i, (e, y) in enumerate(zip(order[:budget], noisy[:budget], strict=True))
            ]
            unlabelled = [e.text for e in order[budget : budget + int(args.pool_per_label * budget)]]
            for shuffle in args.shuffles:
                run: dict[str, Any] = {"seed": seed, "budget": budget, "shuffle": shuffle}
                teacher: AnnotatorModel | None = None
                for name, overrides in args.recipes:
                    cfg = dataclasses.replace(cfg0, **overrides)
                    t = time.monotonic()
                    pseudo = (
                        pseudo_labels(teacher, tokenizer, unlabelled, items, cfg, heldout_fraction=0.0)
                        if teacher is not None and cfg.pseudo_label_ratio > 0
                        else []
                    )
                    model = encoder_heads.load(base)
                    assert isinstance(model, AnnotatorModel)
                    gen = torch.Generator().manual_seed(1000 * seed + shuffle)
                    train_annotation_policy(model, tokenizer, [*items, *pseudo], [], cfg, generator=gen)
                    seconds = time.monotonic() - t
                    model.encoder.to(eval_dtype(model, cfg))  # as the services serve it
                    if teacher is None:  # the first recipe's model teaches the self-training ones
                        teacher = model
                    pred = predict_logits(model, tokenizer, [e.text for e in test], cfg).argmax(-1)  # (T,)
                    label_names = model.spec.label_names
                    truth = torch.tensor([label_names.index(e.label) for e in test])
                    run[name] = {
                        "accuracy": float((pred == truth).float().mean()),
                        "predicted_share": {y: float((pred == i).float().mean()) for i, y in enumerate(label_names)},
                        "train_seconds": round(seconds, 1),
                        "pseudo_labels": len(pseudo),
                    }
                    if pseudo:
                        right = sum(pseudo_truth[x.text] == x.label for x in pseudo)
                        run[name]["pseudo_label_accuracy"] = right / len(pseudo)
                print(json.dumps(run), flush=True)
                results["runs"].append(run)
                results["summary"] = summarise(results["runs"], names)
                results["seconds"] = round(time.monotonic() - t0, 1)
                args.out.write_text(json.dumps(results, indent=1))
    plot(results["runs"], names, args.out.with_suffix(".png"), f"{path.name}: round recipe, from the base")
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
