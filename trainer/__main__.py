"""`python -m trainer` (and `loopserve train`): run the trainer process.

Its one config is TrainerArgs, read by loopserve.config.parse as every process's: flat fields are flags
(`--round-min-events 32`, env `LOOPSERVE_ROUND_MIN_EVENTS`), the objectives' configs are `--section.field`
flags (`--annotator.epochs 2`, `--gate.kl-bound 0.3`), or a JSON file of overrides, `--objectives-json`,
e.g. {"annotator": {"epochs": 2}, "grpo": {"beta": 0.02}, "lora": {"r": 8}, "gate": {"kl_bound": 0.3}}.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loopserve.config import parse
from loopserve.device import configure_threads
from loopserve.metrics import serve_metrics
from trainer.config import TrainerArgs
from trainer.loop import run_trainer
from trainer.reward_client import ServiceReward

logger = logging.getLogger("trainer")

NESTED = {f.name for f in dataclasses.fields(TrainerArgs) if dataclasses.is_dataclass(f.default_factory)}  # type: ignore[arg-type]


def apply_objectives_json(args: TrainerArgs, path: Path) -> None:
    """Override fields of the nested objective configs from a JSON object keyed by their names."""
    overrides: dict[str, dict[str, Any]] = json.loads(path.read_text())
    for name, values in overrides.items():
        if name not in NESTED:
            raise ValueError(f"{path}: unknown section {name!r}; known: {', '.join(sorted(NESTED))}")
        section = getattr(args, name)
        known = {f.name for f in dataclasses.fields(section)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown {name} fields {sorted(unknown)}")
        if "targets" in values:
            values["targets"] = tuple(values["targets"])
        setattr(args, name, dataclasses.replace(section, **values))


def read_args(argv: Sequence[str] = (), environ: dict[str, str] | None = None) -> TrainerArgs:
    """TrainerArgs from the environment, the flags, then the JSON overrides it names."""
    args = parse(TrainerArgs, argv, environ=environ, prog="loopserve train")
    if args.objectives_json:
        apply_objectives_json(args, args.objectives_json)
    return args


def run(args: TrainerArgs) -> int:
    """Serve metrics, stop on SIGTERM / SIGINT, build the reward client, run."""
    configure_threads()
    serve_metrics(args.metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    reward = ServiceReward.from_token_file(
        args.reward_target,
        args.token_path,
        root_certificates=args.reward_tls_ca,
        normalised=args.reward_normalised,
        clip=args.reward_clip,
    )
    try:
        run_trainer(args, reward_fn=reward, stop=stop)
    finally:
        reward.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    args = read_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
