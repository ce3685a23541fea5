"""Serving precision on this machine: fp32 against bf16, side by side in one run, for what `--dtype auto` decides.

`--dtype auto` serves in bf16 where the hardware multiplies it natively (CUDA; a CPU with AVX512-BF16 or
AMX) and in fp32 elsewhere (loopserve.device.pick_dtype). This bench is the evidence on a given machine,
for each model the services run, in process, through the services' own runtimes:

  - throughput at several batch sizes: the annotator (`PolicyRuntime.annotate_batch`) and the reward
    model (`RewardRuntime.score_batch`) in items/s over Fine Food test reviews (the first
    --max-input-tokens tokens, as the services cut them), the generator (`policy_service.sampling.generate`)
    in tokens/s, --new-tokens each;
  - agreement with fp32 on the same inputs: the annotator's top label and the largest gap between the
    two precisions' probabilities; the reward model's scores through a probe head (its base head is
    zero, so it would agree trivially): the largest gap and the order of each pair of reviews; the
    generator's next-token distribution at each prompt (mean total variation distance) and how many
    tokens greedy continuations share before they part.

Writes bench/results/precision.json (the CPU model, whether it has native bf16, and what auto picks
recorded) and precision.png.

    .venv/bin/python bench/precision.py [--seconds 4] [--batches 1,8,32] [--test-items 400]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import add_annotation_data_args, load_annotation_data, machine  # noqa: E402

DTYPES = ("float32", "bfloat16")
PROMPTS = [
    "Write a short review of a coffee you liked.",
    "Describe the taste of green tea in two sentences.",
    "What should I look for when buying dog food?",
    "Summarise why someone might return a box of chocolates.",
    "Give one tip for storing fresh bread.",
    "Explain what makes a snack healthy.",
    "Recommend a breakfast cereal for a child.",
    "Compare instant noodles with fresh pasta.",
]


def rate(run: Callable[[int], int], batch: int, seconds: float) -> float:
    """Units per second of `run(batch)` (which returns the units it made), after one warm-up call."""
    run(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += run(batch)
    return done / (time.perf_counter() - start)


def annotate_calls(texts: list[str], batch: int, at: int) -> list[Any]:
    """`batch` one-item Annotate calls over `texts` from position `at` (wrapping)."""
    from policy_service.types import AnnotateCall

    return [AnnotateCall("", (f"i{k}",), (texts[(at + k) % len(texts)],), 0) for k in range(batch)]


def annotator_runtime(store: Any, args: argparse.Namespace, dtype: str, budget: int = 0) -> Any:
    """A PolicyRuntime serving the annotator in `dtype` (a torch dtype's name) with the services' input cut
    and token budget (as `--encoder-token-budget`; 0: the services' default on --device)."""
    import torch

    from policy_service.runtime import PolicyRuntime, RuntimeOptions

    opts = RuntimeOptions(
        torch.device(args.device),
        getattr(torch, dtype),
        max_input_tokens=args.max_input_tokens,
        token_budget=budget,
        generator=False,
    )
    rt = PolicyRuntime(store, opts)
    rt.load()
    return rt


def annotator_speed(rt: Any, texts: list[str], args: argparse.Namespace) -> list[dict[str, float]]:
    """Items/s of `rt.annotate_batch` at each of --batches, over `texts` from random positions (the same
    positions for every runtime measured)."""
    handle, cursor = rt.annotator.current, random.Random(0)

    def run(n: int) -> int:
        return len(rt.annotate_batch(handle, annotate_calls(texts, n, cursor.randrange(len(texts)))))

    return [{"batch": b, "items_per_s": rate(run, b, args.seconds)} for b in args.batches]


def annotator_at(store: Any, texts: list[str], args: argparse.Namespace, name: str) -> tuple[Any, list[dict]]:
    """The annotator served in `name`: its probabilities over `texts` (N, L) and its items/s."""
    import torch

    rt = annotator_runtime(store, args, name)
    handle = rt.annotator.current
    probs = []
    for k in range(0, len(texts), 32):
        for anns in rt.annotate_batch(handle, annotate_calls(texts, min(32, len(texts) - k), k)):
            assert not isinstance(anns, Exception)
            by = {ls.label: ls.score for ls in anns[0].labels}
            probs.append([by[lb] for lb in handle.model.labels])
    speed = annotator_speed(rt, texts, args)
    for row in speed:
        print(f"  annotator {name:8s} batch {row['batch']:3d}: {row['items_per_s']:7.1f} items/s", flush=True)
    return torch.tensor(probs), speed


def annotator_side(store: Any, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    runs = {name: annotator_at(store, texts, args, name) for name in DTYPES}
    p32, p16 = runs["float32"][0], runs["bfloat16"][0]
    return {
        "speed": {name: speed for name, (_, speed) in runs.items()},
        "items": len(texts),
        "top_label_agreement": float((p32.argmax(-1) == p16.argmax(-1)).float().mean()),
        "max_abs_prob_gap": float((p32 - p16).abs().max()),
        "mean_abs_prob_gap": float((p32 - p16).abs().mean()),
    }


REWARD_PROMPT = "Write a review of something you bought."


def reward_runtime(store: Any, args: argparse.Namespace, dtype: str, budget: int = 0) -> Any:
    """A RewardRuntime serving in `dtype` with the services' input cut and token budget (as annotator_runtime)."""
    import torch

    from reward_service.runtime import RewardRuntime, RuntimeOptions

    opts = RuntimeOptions(
        torch.device(args.device),
        getattr(torch, dtype),
        max_input_tokens=args.max_input_tokens,
        token_budget=budget,
    )
    rt = RewardRuntime(store, opts)
    rt.load()
    return rt


def reward_speed(rt: Any, texts: list[str], args: argparse.Namespace) -> list[dict[str, float]]:
    """Pairs/s of `rt.score_batch` (one pair a call: REWARD_PROMPT and a review) at each of --batches."""
    from reward_service.types import ScoreCall

    handle, cursor = rt.reward.current, random.Random(0)

    def run(n: int) -> int:
        at = cursor.randrange(len(texts))
        calls = [ScoreCall(((REWARD_PROMPT, texts[(at + k) % len(texts)]),)) for k in range(n)]
        return len(rt.score_batch(handle, calls))

    return [{"batch": b, "items_per_s": rate(run, b, args.seconds)} for b in args.batches]


def reward_at(store: Any, texts: list[str], args: argparse.Namespace, name: str) -> tuple[Any, list[dict]]:
    """The reward model served in `name`: its scores of `texts` as responses (N,) through the runtime's
    batched path, and its items/s."""
    import torch

    rt = reward_runtime(store, args, name)
    handle = rt.reward.current
    # The base reward model's head is zero (every pair scores alike until it trains), so agreement is read
    # through a probe head, the same in both precisions: a fixed random direction of the pooled embedding,
    # as a trained head would read it.
    head = handle.model.model.head
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
        head.bias.zero_()
    scores = torch.tensor(rt.rewards(handle.model, [(REWARD_PROMPT, t) for t in texts]))
    speed = reward_speed(rt, texts, args)
    for row in speed:
        print(f"  reward    {name:8s} batch {row['batch']:3d}: {row['items_per_s']:7.1f} items/s", flush=True)
    return scores, speed


def reward_side(store: Any, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    runs = {name: reward_at(store, texts, args, name) for name in DTYPES}
    s32, s16 = runs["float32"][0], runs["bfloat16"][0]
    i, j = torch.triu_indices(len(texts), len(texts), 1)
    return {
        "speed": {name: speed for name, (_, speed) in runs.items()},
        "items": len(texts),
        "probe_head": "a fixed random direction of the pooled embedding (seed 0), the base head being zero",
        "max_abs_score_gap": float((s32 - s16).abs().max()),
        "score_std_fp32": float(s32.std()),
        "pair_order_agreement": float((torch.sign(s32[i] - s32[j]) == torch.sign(s16[i] - s16[j])).float().mean()),
    }


def generator_at(
    store: Any, args: argparse.Namespace, name: str
) -> tuple[Any, list[list[int]], list[dict[str, float]]]:
    """The generator served in `name`: its next-token distributions at PROMPTS (P, V), its greedy
    continuations, and its tokens/s at each batch size (sampled, temperature 1)."""
    import torch

    from loopserve.models import generator
    from policy_service import sampling
    from policy_service.types import SamplingParams

    folder = store.path("generator", store.latest("generator"))
    tok = generator.load_tokenizer(folder)
    # as the policy service reads a Generate prompt (chat template applied)
    ids = [list(tok(generator.prompt_text(tok, p, True), add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    model = generator.load(folder, torch.device(args.device), getattr(torch, name))
    with torch.inference_mode():
        nexts = torch.stack([torch.softmax(model(input_ids=torch.tensor([x])).logits[0, -1].float(), -1) for x in ids])
    greedy = [
        r.token_ids
        for r in sampling.generate(
            model, tok, [sampling.SequenceRequest(x, SamplingParams(args.new_tokens, temperature=0.0)) for x in ids]
        )
    ]

    def run(n: int) -> int:
        params = SamplingParams(args.new_tokens, temperature=1.0)
        # Row k's prompt is distinct (its index before it): rows with one prompt would share its prefill
        # (sampling.prefill), and this measures the batch's cost, not that saving.
        reqs = [
            sampling.SequenceRequest(
                tok(f"{k}: ", add_special_tokens=False)["input_ids"] + ids[k % len(ids)], params, row_seed=k
            )
            for k in range(n)
        ]
        return sum(len(r.token_ids) for r in sampling.generate(model, tok, reqs))

    speed = [{"batch": b, "tokens_per_s": rate(run, b, args.seconds)} for b in args.batches]
    for row in speed:
        print(f"  generator {name:8s} batch {row['batch']:3d}: {row['tokens_per_s']:7.1f} tokens/s", flush=True)
    return nexts, greedy, speed


def first_difference(a: list[int], b: list[int]) -> int:
    """Tokens two continuations share before they part (the shorter's length when one extends the other)."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def generator_side(store: Any, args: argparse.Namespace) -> dict[str, Any]:
    runs = {name: generator_at(store, args, name) for name in DTYPES}
    (n32, g32, _), (n16, g16, _) = runs["float32"], runs["bfloat16"]
    tv = 0.5 * (n32 - n16).abs().sum(-1)  # (P,): total variation distance of the next-token distributions
    return {
        "speed": {name: speed for name, (_, _, speed) in runs.items()},
        "prompts": len(PROMPTS),
        "new_tokens": args.new_tokens,
        "next_token_tv_distance_mean": float(tv.mean()),
        "next_token_tv_distance_max": float(tv.max()),
        "greedy_tokens_shared_before_parting": [first_difference(a, b) for a, b in zip(g32, g16, strict=True)],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ("annotator", "reward", "generator") if m in result]
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        unit = "tokens_per_s" if model == "generator" else "items_per_s"
        for name in DTYPES:
            rows = result[model]["speed"][name]
            ax.plot([r["batch"] for r in rows], [r[unit] for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit.replace("_per_s", "/s"))
        ax.set_title(model)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['machine']['cpu']}: auto picks {result['auto_picks']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_encoder_bench_args(ap: argparse.ArgumentParser, *, seconds: float) -> None:
    """What this bench and bench/padding.py share: the reviews, the timing, the services' cut, where to write."""
    add_annotation_data_args(ap, test_items=400)
    ap.add_argument("--seconds", type=float, default=seconds, help="timed seconds per point")
    ap.add_argument("--max-input-tokens", type=int, default=256, help="as the services cut inputs (their default)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")


def prepare(args: argparse.Namespace, models: list[str]) -> tuple[Any, list[str], dict[str, Any]]:
    """(the store with `models`' base versions, the test reviews, the result's header: machine and args)."""
    import torch

    from loopserve.device import configure_threads
    from loopserve.models import provision
    from loopserve.models.store import ModelStore

    configure_threads()
    store = ModelStore(args.data_dir / "store")
    provision.pull(store, models=models)
    _, _, test, _ = load_annotation_data(args)
    header = {
        "machine": machine(device=args.device, threads=torch.get_num_threads()),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    return store, [e.text for e in test], header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_encoder_bench_args(ap, seconds=4.0)
    ap.add_argument("--models", default="annotator,reward,generator")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes (comma-separated)")
    ap.add_argument("--new-tokens", type=int, default=32, help="generator: tokens per request")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]

    import torch

    from loopserve.device import dtype_name, native_bf16, pick_dtype

    models = args.models.split(",")
    store, texts, header = prepare(args, models)
    device = torch.device(args.device)
    result: dict[str, Any] = {
        **header,
        "native_bf16": native_bf16(device),
        "auto_picks": dtype_name(pick_dtype("auto", device)),
    }
    if "annotator" in models:
        result["annotator"] = annotator_side(store, texts, args)
    if "reward" in models:
        result["reward"] = reward_side(store, texts[:200], args)
    if "generator" in models:
        result["generator"] = generator_side(store, args)
    for model in ("annotator", "reward", "generator"):
        if model in result:
            unit = "tokens_per_s" if model == "generator" else "items_per_s"
            fp32, bf16 = (result[model]["speed"][name] for name in DTYPES)
            result[model]["bf16_over_fp32"] = {
                str(a["batch"]): b[unit] / a[unit] for a, b in zip(fp32, bf16, strict=True)
            }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "precision.png")
    print(json.dumps({m: result[m]["bf16_over_fp32"] for m in models if m in result}, indent=2))


if __name__ == "__main__":
    main()
