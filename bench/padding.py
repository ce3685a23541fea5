"""Padding: encoder forwards cut by padded tokens against one forward per batch, side by side in one run.

The batcher hands the runtime a batch of texts; the runtime sorts them by length and runs forwards of at
most `--encoder-token-budget` padded tokens each (loopserve.models.micro_batches; 0: one forward of up
to 32, whatever their lengths, as before the budget existed). For the annotator (`PolicyRuntime.
annotate_batch`) and the reward model (`RewardRuntime.score_batch`), in process, over Fine Food test
reviews (real lengths: the services cut them at --max-input-tokens), in fp32 and bf16: items/s at each
batch size for each budget. Writes bench/results/padding.json (the CPU model recorded) and padding.png.

    .venv/bin/python bench/padding.py [--budgets 0,256,512,1024,2048] [--batches 8,32] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.precision import (  # noqa: E402
    DTYPES,
    add_encoder_bench_args,
    annotator_runtime,
    annotator_speed,
    prepare,
    reward_runtime,
    reward_speed,
)
from loopserve.models.micro_batches import NO_TOKEN_LIMIT  # noqa: E402


def rates(model: str, store: Any, texts: list[str], args: argparse.Namespace, dtype: str, budget: int) -> list:
    """Items/s of `model`'s runtime at each of --batches, in `dtype`, forwards cut at `budget` (0: none)."""
    budget = budget or NO_TOKEN_LIMIT  # the runtimes read 0 as the device's default
    if model == "annotator":
        return annotator_speed(annotator_runtime(store, args, dtype, budget), texts, args)
    return reward_speed(reward_runtime(store, args, dtype, budget), texts, args)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.9), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for dtype in DTYPES:
            for b in result["args"]["batches"]:
                rows = result["models"][model][dtype]
                xs = [r["budget"] for r in rows]
                ys = [next(p["items_per_s"] for p in r["rates"] if p["batch"] == b) for r in rows]
                ax.plot([str(x or "none") for x in xs], ys, marker="o", label=f"{dtype}, batch {b}")
        ax.set_xlabel("padded tokens per forward (none: one forward per batch)")
        ax.set_ylabel("items/s")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.suptitle(result["machine"]["cpu"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_encoder_bench_args(ap, seconds=3.0)
    ap.add_argument("--models", default="annotator,reward")
    ap.add_argument("--budgets", default="0,256,512,1024,2048", help="padded tokens per forward (0: no limit)")
    ap.add_argument("--batches", default="8,32", help="batch sizes the runtime is handed")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    budgets = [max(int(b), 0) for b in args.budgets.split(",")]  # -1 reads as 0: no limit

    from loopserve.models.micro_batches import token_budget

    models = args.models.split(",")
    store, texts, header = prepare(args, models)
    # As the rows record budgets: 0 for "no token limit" (a GPU's default), whatever the runtimes call it.
    result: dict[str, Any] = {**header, "default_budget": max(token_budget(0, args.device), 0), "models": {}}
    for model in models:
        result["models"][model] = {}
        for dtype in DTYPES:
            rows = []
            for budget in budgets:
                measured = rates(model, store, texts, args, dtype, budget)
                rows.append({"budget": budget, "rates": measured})
                shown = ", ".join(f"batch {r['batch']}: {r['items_per_s']:.1f}" for r in measured)
                print(f"  {model:9s} {dtype:8s} budget {budget or 'none':>5}: {shown} items/s", flush=True)
            result["models"][model][dtype] = rows
    # the default against one forward per batch (budget 0), per model, precision and batch size
    if 0 in budgets and result["default_budget"] in budgets:
        result["default_over_one_forward"] = {
            f"{model}/{dtype}/batch {b}": (
                next(p for r in rows if r["budget"] == result["default_budget"] for p in r["rates"] if p["batch"] == b)[
                    "items_per_s"
                ]
                / next(p for r in rows if r["budget"] == 0 for p in r["rates"] if p["batch"] == b)["items_per_s"]
            )
            for model, by_dtype in result["models"].items()
            for dtype, rows in by_dtype.items()
            for b in args.batches
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "padding.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "padding.png")
    print(json.dumps(result.get("default_over_one_forward", {}), indent=2))


if __name__ == "__main__":
    main()
