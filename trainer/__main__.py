"""`python -m trainer` (and `loopserve train`): run the trainer process.

Flags are TrainerArgs' flat fields (`--round-min-events 32`, env `LOOPSERVE_ROUND_MIN_EVENTS`); the
objectives' configs can be overridden from a JSON file, `--objectives-json`, e.g.
{"annotator": {"epochs": 2}, "grpo": {"beta": 0.02}, "lora": {"r": 8}, "gate": {"kl_bound": 0.3}}.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import logging
import signal
import textwrap
import threading
import typing
from pathlib import Path
from typing import Any

from loopserve.config import ENV_PREFIX, from_namespace
from loopserve.device import configure_threads
from loopserve.metrics import serve_metrics
from trainer.config import TrainerArgs
from trainer.loop import run_trainer
from trainer.reward_client import ServiceReward

logger = logging.getLogger("trainer")

NESTED = {f.name for f in dataclasses.fields(TrainerArgs) if dataclasses.is_dataclass(f.default_factory)}  # type: ignore[arg-type]


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (cleanrl style), for --help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in itertools.pairwise(body):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per flat TrainerArgs field, with its docstring as help (env LOOPSERVE_<FIELD> too)."""
    docs = field_docs(TrainerArgs)
    hints = typing.get_type_hints(TrainerArgs)
    for f in dataclasses.fields(TrainerArgs):
        if f.name in NESTED:
            continue
        flag, help_ = (
            "--" + f.name.replace("_", "-"),
            f"{docs.get(f.name, '')} (env {ENV_PREFIX}{f.name.upper()})",
        )
        tp = (
            next(a for a in typing.get_args(hints[f.name]) if a is not type(None))
            if f.default is None
            else hints[f.name]
        )
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=None, help=help_)


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


def run(args: TrainerArgs, metrics_port: int = -1) -> int:
    """Serve metrics, stop on SIGTERM / SIGINT, build the reward client, run."""
    configure_threads()
    serve_metrics(metrics_port)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    add_flags(parser)
    parser.add_argument("--objectives-json", type=Path, help="JSON overrides of the objective configs")
    parser.add_argument("--metrics-port", type=int, default=9103, help="Prometheus /metrics port; -1 disables")
    parser.add_argument("--log-level", default="INFO")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = from_namespace(TrainerArgs, ns)
    if ns.objectives_json:
        apply_objectives_json(args, ns.objectives_json)
    return run(args, ns.metrics_port)


if __name__ == "__main__":
    raise SystemExit(main())
