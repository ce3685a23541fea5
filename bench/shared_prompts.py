"""Rows that share a prompt share its pass: a GRPO step and a request's n completions, each side by side
in one run with the one pass per row it replaced.

**The trainer.** A GRPO step samples k completions for each of a few prompts, then takes the policy's and
the reference's log-probs of them and back-propagates the loss (trainer/generation_rl.py). Each row
carries its prompt: with the chat template's system turn that is about 40 tokens before a 24-token
completion. The trainer runs each distinct prompt once and gathers its cache per row
(trainer/causal_lm.completion_forward, and `sample`'s prefill); the baseline is one full pass per row
(`share_prompts=False`, `share_prefill=False`). Both run the same steps on the bundled generator
(SmolLM2-135M, LoRA r=8 on q/v as the demo trains it), the same seeds, alternating which goes first. Per
phase (sampling, the policy's forward, the reference's forward, backward), the median seconds over the
steps, and the largest log-prob difference between the two (float rounding, no more).

**The policy service.** Its decode loop (policy_service.sampling.generate, in process) on `--prompts`
requests of `--group` completions each, which prefills each distinct prompt once, against the same rows
with each prompt made distinct by its last token (the same lengths: the same work, nothing to share).
Median seconds to the first token (the prefill) and to the end of the call.

Writes bench/results/shared_prompts.json (the CPU model recorded).

    .venv/bin/python bench/shared_prompts.py [--steps 4] [--prompts 4] [--group 4] [--max-new-tokens 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import machine  # noqa: E402
from loopserve.cli.demo.generation import _prompts  # noqa: E402
from loopserve.models import generator  # noqa: E402
from loopserve.models.store import ModelStore  # noqa: E402
from trainer.causal_lm import LoraSettings, add_lora, completion_logprobs, sample  # noqa: E402
from trainer.generation_rl import group_advantages, grpo_loss  # noqa: E402
from trainer.optim import lm_optimizer  # noqa: E402

MODES = {"one_pass": False, "shared": True}


def step(policy: Any, ref: Any, tok: Any, prompts: list[str], args: argparse.Namespace, share: bool) -> dict[str, Any]:
    """One GRPO step's compute, timed by phase (the reward is each completion's length: no service)."""
    t: dict[str, float] = {}
    start = time.perf_counter()
    ro = sample(
        policy, tok, prompts, args.group, max_new_tokens=args.max_new_tokens, max_prompt_tokens=256,
        temperature=0.7, share_prefill=share,
    )  # fmt: skip
    t["sample_s"] = time.perf_counter() - start
    batch = (ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    policy.train()
    start = time.perf_counter()
    logp = completion_logprobs(policy, *batch, temperature=0.7, share_prompts=share)
    t["policy_forward_s"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        ref_logp = completion_logprobs(ref, *batch, temperature=0.7, share_prompts=share)
    t["ref_forward_s"] = time.perf_counter() - start
    rewards = ro.completion_mask.sum(-1).float().view(-1, args.group)
    adv = group_advantages(rewards, scale=True).flatten()
    loss, _ = grpo_loss(logp, ref_logp, adv, ro.completion_mask, 0.05)
    start = time.perf_counter()
    loss.backward()
    t["backward_s"] = time.perf_counter() - start
    policy.eval()
    t["step_s"] = sum(t.values())
    t["tokens"] = {"prompt": int(ro.prompt_mask.sum()), "completion": int(ro.completion_mask.sum())}
    t["logp"] = (logp.detach() * ro.completion_mask).sum(-1)
    t["completion_ids"] = ro.completion_ids
    return t


def n_completions(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The policy service's decode loop (policy_service.sampling.generate, in process) on `--prompts`
    requests of `--group` completions each, the demo's chat-templated prompts, against the same rows with
    each prompt made distinct by its last token (the same lengths: the same work with nothing to share).
    Median seconds to every row's first token (the prefill) and to the end, over `--steps` calls each."""
    from loopserve.models.generator import prompt_text
    from policy_service import sampling
    from policy_service.types import SamplingParams

    model, tok = generator.load(folder).eval(), generator.load_tokenizer(folder)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.7)
    texts = [prompt_text(tok, p, True) for p in _prompts(1)]

    def rows(i: int, shared: bool) -> list[sampling.SequenceRequest]:
        out = []
        for j, text in enumerate(texts[i * args.prompts : (i + 1) * args.prompts]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for k in range(args.group):
                last = ids[-1] if shared else 100 + k  # a distinct last token: a prompt of its own
                out.append(sampling.SequenceRequest([*ids[:-1], last], params, row_seed=97 * j + k))
        return out

    def timed(reqs: list[sampling.SequenceRequest]) -> tuple[float, float]:
        first: list[float] = []
        for r in reqs:
            r.on_token = lambda d: first.append(time.perf_counter())
        start = time.perf_counter()
        sampling.generate(model, tok, reqs)
        return min(first) - start if first else float("nan"), time.perf_counter() - start

    kinds = {"distinct_prompts": False, "shared": True}
    got: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    for i in range(args.steps + 1):
        order = list(kinds) if i % 2 == 0 else list(kinds)[::-1]
        for kind in order:
            t = timed(rows(i, kinds[kind]))
            if i:
                got[kind].append(t)
    return {
        kind: {"prefill_s": statistics.median(p for p, _ in ts), "call_s": statistics.median(c for _, c in ts)}
        for kind, ts in got.items()
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=REPO / ".loopserve", help="holds store/ (models pull)")
    ap.add_argument("--steps", type=int, default=4, help="steps (and service calls) per mode, after one warm-up")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (the demo's 4)")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt, k (the demo's 4)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="completion length (the quick demo's 24)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "shared_prompts.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    store = ModelStore(args.data_dir / "store")
    folder = store.path("generator", "v0")
    tok = generator.load_tokenizer(folder)
    ref = generator.load(folder).requires_grad_(False)
    policy = add_lora(generator.load(folder), LoraSettings(r=8))
    opt = lm_optimizer(policy, 1e-3, 0.0)
    prompts = _prompts(0)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    max_logp_diff: float | None = None  # over the steps whose two draws agree (none: nothing compared)
    for i in range(args.steps + 1):  # step 0 warms both up and is not counted
        batch = prompts[i * args.prompts : (i + 1) * args.prompts]
        order = list(MODES) if i % 2 == 0 else list(MODES)[::-1]
        got = {}
        for mode in order:
            torch.manual_seed(1000 + i)  # the same draws for both
            opt.zero_grad(set_to_none=True)
            got[mode] = step(policy, ref, tok, batch, args, MODES[mode])
        opt.step()  # the gradient of whichever mode ran last (the two agree): the policy moves as it would in training
        same_draws = torch.equal(got["one_pass"]["completion_ids"], got["shared"]["completion_ids"])
        if same_draws:
            diff = (got["one_pass"]["logp"] - got["shared"]["logp"]).abs().max().item()
            max_logp_diff = max(max_logp_diff or 0.0, diff)
        if i == 0:
            continue
        for mode in MODES:
            row = {k: v for k, v in got[mode].items() if k not in {"logp", "completion_ids"}}
            runs[mode].append({**row, "same_draws": same_draws})
        print(f"step {i}: " + ", ".join(f"{m} {got[m]['step_s']:.2f}s" for m in MODES), flush=True)
    service = n_completions(folder, args)
    phases = ["sample_s", "policy_forward_s", "ref_forward_s", "backward_s", "step_s"]
    medians = {m: {p: statistics.median(r[p] for r in runs[m]) for p in phases} for m in MODES}
    result = {
        "machine": machine(threads=torch.get_num_threads()),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": "generator v0 (SmolLM2-135M), LoRA r=8 on q_proj/v_proj, fp32",
        "median_s": medians,
        "speedup": {p: medians["one_pass"][p] / medians["shared"][p] for p in phases},
        "max_sequence_logp_diff": max_logp_diff,
        "steps": runs,
        "service_n_completions": {
            "what": f"{args.prompts} requests x n={args.group}, policy_service.sampling.generate in process",
            "median_s": service,
            "speedup": {k: service["distinct_prompts"][k] / service["shared"][k] for k in ("prefill_s", "call_s")},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for p in phases:
        print(f"{p:18s} one pass {medians['one_pass'][p]:6.2f}  shared {medians['shared'][p]:6.2f}  "
              f"x{result['speedup'][p]:.2f}")  # fmt: skip
    for k in ("prefill_s", "call_s"):
        print(f"service {k:10s} distinct {service['distinct_prompts'][k]:6.2f}  shared {service['shared'][k]:6.2f}")
    print(f"largest sequence log-prob difference {max_logp_diff}; wrote {args.out}")


if __name__ == "__main__":
    main()
