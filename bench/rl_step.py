"""A GRPO step with shared prompt passes against the one full pass per row, side by side in one run.

A step samples k completions for each of a few prompts, then takes the policy's and the reference's
log-probs of them and back-propagates the loss (trainer/generation_rl.py). Each row carries its prompt:
with the chat template's system turn that is about 40 tokens before a 24-token completion. The trainer
now runs each distinct prompt once and gathers its cache per row (trainer/causal_lm.completion_forward,
and `sample`'s prefill); the baseline is the one full pass per row it replaced (`share_prompts=False`,
`share_prefill=False`). Both run the same steps on the bundled generator (SmolLM2-135M, LoRA r=8 on
q/v as the demo trains it), the same seeds, alternating which goes first. Per phase (sampling, the
policy's forward, the reference's forward, backward and the optimizer step), the median seconds over
the steps, and the largest log-prob difference between the two (float rounding, no more).

Writes bench/results/rl_step.json (the CPU model recorded).

    .venv/bin/python bench/rl_step.py [--steps 4] [--prompts 4] [--group 4] [--max-new-tokens 24]
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
from trainer.causal_lm import LoraSettings, add_lora, completion_forward, sample, selective_log_softmax  # noqa: E402
from trainer.generation_rl import grpo_loss  # noqa: E402
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
    logits, _ = completion_forward(policy, *batch, share_prompts=share)
    logp = selective_log_softmax(logits.float() / 0.7, ro.completion_ids)
    t["policy_forward_s"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        ref_logits, _ = completion_forward(ref, *batch, share_prompts=share)
        ref_logp = selective_log_softmax(ref_logits.float() / 0.7, ro.completion_ids)
    t["ref_forward_s"] = time.perf_counter() - start
    rewards = ro.completion_mask.sum(-1).float().view(-1, args.group)
    adv = ((rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-4)).flatten()
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=REPO / ".loopserve", help="holds store/ (models pull)")
    ap.add_argument("--steps", type=int, default=4, help="steps per mode (after one warm-up step each)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (the demo's 4)")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt, k (the demo's 4)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="completion length (the quick demo's 24)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rl_step.json")
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
    max_logp_diff = 0.0
    for i in range(args.steps + 1):  # step 0 warms both up and is not counted
        batch = prompts[i * args.prompts : (i + 1) * args.prompts]
        order = list(MODES) if i % 2 == 0 else list(MODES)[::-1]
        got = {}
        for mode in order:
            torch.manual_seed(1000 + i)  # the same draws for both
            opt.zero_grad(set_to_none=True)
            got[mode] = step(policy, ref, tok, batch, args, MODES[mode])
        opt.step()  # the shared mode's gradient (the two agree): the policy moves as it would in training
        same_draws = torch.equal(got["one_pass"]["completion_ids"], got["shared"]["completion_ids"])
        if same_draws:
            diff = (got["one_pass"]["logp"] - got["shared"]["logp"]).abs().max().item()
            max_logp_diff = max(max_logp_diff, diff)
        if i == 0:
            continue
        for mode in MODES:
            row = {k: v for k, v in got[mode].items() if k not in {"logp", "completion_ids"}}
            runs[mode].append({**row, "same_draws": same_draws})
        print(f"step {i}: " + ", ".join(f"{m} {got[m]['step_s']:.2f}s" for m in MODES), flush=True)
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
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for p in phases:
        print(f"{p:18s} one pass {medians['one_pass'][p]:6.2f}  shared {medians['shared'][p]:6.2f}  "
              f"x{result['speedup'][p]:.2f}")  # fmt: skip
    print(f"largest sequence log-prob difference {max_logp_diff:.2e}; wrote {args.out}")


if __name__ == "__main__":
    main()
