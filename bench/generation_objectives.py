"""PPO beside GRPO in the generation demo: the same prompts, the same rollout budget, the same machine.

Runs the quick generation demo (`loopserve demo --generation --quick --objective <o>`) for each objective
(alternating the order from seed to seed, so a busy spell on a shared machine does not favour one), and
records from each run's
rounds.jsonl, per generator round: the held-out mean reward of the serving version and of the
candidate (the reward service's normalised reward, what the gate compares), the candidate's KL to the
reference, the reward and KL seen during training, the wall time of the round and of its training
phase, and the gate's verdict; and per run the demo's own before/after figures (final reward model's
raw score and the simulated labeller's positivity of base and final samples).

Both objectives draw 4 prompts x 4 samples per rollout batch, `grpo_steps` batches per round: the same
reward-service calls and sampling cost. PPO then runs `ppo_epochs` epochs of 2 minibatches on each batch,
GRPO one update: the extra wall time is PPO's.

Writes bench/results/generation_objectives.json (and the demos' run folders under --data-dir).

    .venv/bin/python bench/generation_objectives.py [--seeds 0] [--objectives grpo,ppo]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import cpu_model  # noqa: E402


def run_demo(data_dir: Path, objective: str, seed: int, round_timeout_s: float) -> dict[str, Any]:
    """`loopserve demo --generation --quick --objective <objective> --seed <seed>`, run through the demo's
    Python API only to give it a longer wait for the trainer's round on a busy shared machine."""
    t0 = time.monotonic()
    code = (
        "from pathlib import Path; from loopserve.cli.demo.generation import GenerationDemo, GenerationDemoOptions; "
        f"GenerationDemo(GenerationDemoOptions(data_dir=Path({str(data_dir)!r}), quick=True, "
        f"objective={objective!r}, seed={seed}, round_timeout_s={round_timeout_s})).run()"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=4 * 3600)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        return {"objective": objective, "seed": seed, "error": (r.stdout + r.stderr)[-2000:], "wall_s": wall}
    run = Path(r.stdout.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(x) for x in (run / "trainer" / "rounds.jsonl").read_text().splitlines() if x.strip()]
    rounds = []
    for row in rows:
        if row["model"] != "generator" or row["result"] in ("skipped", "deferred"):
            continue
        m, sm = row["metrics"], row["serving_metrics"]
        prefix = "train_ppo_" if objective == "ppo" else "train_grpo_"
        rounds.append(
            {
                "round": row["round"],
                "result": row["result"],
                "reasons": row["reasons"],
                "serving_mean_reward": sm.get("mean_reward"),
                "candidate_mean_reward": m.get("mean_reward"),
                "candidate_kl": m.get("kl"),
                "train_reward": m.get(f"{prefix}reward"),
                "train_kl": m.get(f"{prefix}kl"),
                "train_value_loss": m.get("train_ppo_v_loss"),
                "round_s": row["seconds"],
                "train_s": row["phases"].get("train"),
                "phases": row["phases"],
            }
        )
    keys = ("reward_base", "reward_final", "positivity_base", "positivity_final", "kl_final", "final_version")
    return {
        "objective": objective,
        "seed": seed,
        "run_folder": str(run),
        "wall_s": wall,
        "generator_rounds": rounds,
        **{k: summary.get(k) for k in keys},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated demo seeds")
    ap.add_argument("--objectives", default="grpo,ppo")
    ap.add_argument("--data-dir", type=Path, default=REPO / ".loopserve")
    ap.add_argument("--round-timeout-s", type=float, default=3600.0, help="the demo's wait for a trainer round")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "generation_objectives.json")
    ns = ap.parse_args()
    objectives = [o for o in ns.objectives.split(",") if o]
    runs = []
    for i, seed in enumerate(int(s) for s in ns.seeds.split(",")):
        for objective in objectives if i % 2 == 0 else objectives[::-1]:
            print(f"seed {seed}: {objective} ...", flush=True)
            runs.append(run_demo(ns.data_dir, objective, seed, ns.round_timeout_s))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "generator_rounds"}), flush=True)
    import torch

    result = {
        "benchmark": "generation_objectives",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "note": "quick demo settings: 1 round of 24 prompts; 6 rollout batches of 4 prompts x 4 samples per "
        "generator round; PPO 4 epochs x 2 minibatches per batch; LoRA r=8; bf16 sampling",
        "runs": runs,
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=2))
    print(ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
