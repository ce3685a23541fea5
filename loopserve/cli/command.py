"""The `loopserve` command: `loopserve <command> [<subcommand>] [flags]`.

Each command is one typed config (a dataclass; the docstring under each field is its --help) and a
function that runs it. loopserve.config.parse reads every config the same way: environment, then
flags (tyro). The processes' configs live beside the processes (PolicyConfig, RewardConfig, UpConfig,
ServeConfig, TrainerArgs, MLBackendConfig); the one-shot commands' below.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import tyro

from loopserve.annotation.top_up import TopUp
from loopserve.config import DataDirConfig, LogConfig, PolicyConfig, RewardConfig, StoreConfig, parse

if TYPE_CHECKING:
    from loopserve.cli.up import UpConfig


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---- the one-shot commands' configs ------------------------------------------------------------------

BundledModel = Literal["annotator", "generator", "reward"]
BUNDLED_MODELS: tuple[BundledModel, ...] = ("annotator", "generator", "reward")
Output = Annotated[str, tyro.conf.arg(aliases=("-o",))]


@dataclass(kw_only=True)
class ModelsPull(StoreConfig):
    """Write the base versions of the bundled models (idempotent)."""

    model: Annotated[tuple[BundledModel, ...], tyro.conf.UseAppendAction] = ()
    """only this model (repeatable; default: all)"""
    labels: Path | None = None
    """JSON {"task": ..., "labels": [{"name", "description"}]} for the zero-shot annotator"""


@dataclass(kw_only=True)
class ModelsPublish(StoreConfig):
    """Publish weights trained elsewhere as a new version (verified first, as every service would)."""

    model: str
    """annotator | reward | generator"""
    from_dir: Annotated[Path, tyro.conf.arg(name="from")]
    """a folder in the model's format"""
    label_set_change: bool = False
    """the new version's labels differ on purpose"""
    architecture_change: bool = False
    """tensor names or shapes differ on purpose"""
    checked: bool = False
    """annotator: you measured its calibration; it may auto-label (otherwise it flags every item)"""
    stage: bool = False
    """store the version without serving it (LATEST unmoved): shadow it, then promote
    (docs/promote-safely.md)"""
    stage_wait_s: float = 30.0
    """wait up to this long for the services following LATEST to load and verify the version before
    LATEST moves, so they switch in one step (a version one refuses is withdrawn); 0: move it at once"""
    log_level: str = "INFO"
    """Python logging level (of the verification that runs before publishing)"""


@dataclass(kw_only=True)
class ModelsList(StoreConfig):
    """List the store's versions."""


@dataclass(kw_only=True)
class LogExport(LogConfig):
    """Write the feedback log's records as JSON lines."""

    format: Literal["jsonl"] = "jsonl"
    after_seq: int = 0
    """only records after this sequence number"""
    output: Output = "-"
    """a file, or - for stdout"""


@dataclass(kw_only=True)
class LogImport(LogConfig):
    """Read records from JSON lines into the feedback log (idempotent)."""

    input: tyro.conf.Positional[str]
    """a .jsonl file written by `log export`, or - for stdin"""
    demonstrations: bool = False
    """input holds demonstrations for the generator's SFT: {"prompt": ..., "response": ...} lines"""
    task: str = "chat"
    """generation task of imported demonstrations"""


@dataclass(kw_only=True)
class LogStats(LogConfig):
    """Counts by kind, by model version, review rate."""


@dataclass(kw_only=True)
class DatasetExport(StoreConfig, LogConfig):
    """The labelled data set an annotation run produced: per item, the human label, else the latest
    served version's label."""

    task: str = ""
    """only this annotation task (default: all)"""
    output: Output = "-"
    """a file (created 0600), or - for stdout"""


@dataclass(kw_only=True)
class DataPull(DataDirConfig):
    """Download a bundled data set into <data-dir>/data as JSONL."""

    name: tyro.conf.Positional[Literal["finefoods"]]
    """finefoods: Amazon Fine Food reviews (great / other)"""


@dataclass(kw_only=True)
class DemoConfig(StoreConfig):
    """The loop end to end on real data, with simulated annotators; a report. Each run writes its own
    log and picks its own device and dtype (CUDA if present; bf16 where the hardware runs it natively, fp32
    elsewhere: loopserve.device.pick_dtype), so it shows no flags for those."""

    dataset: Path | None = None
    """JSONL / CSV with text, label[, split] (default: Fine Food)"""
    quick: bool = False
    """a small run (minutes; what CI runs)"""
    generation: bool = False
    """the generation demo (preferences, GRPO)"""
    objective: Literal["grpo", "ppo", "dpo"] | None = None
    """generation: the generator's objective (default grpo)"""
    seed: int = 0
    label_descriptions: Path | None = None
    """--dataset: JSON {"label": "what it means", ...} for the zero-shot base (default: the label names)"""
    measure_ceiling: bool = False
    """train on all train labels (slow)"""
    budget_fraction: float | None = None
    """human interactions / train items (default 0.3)"""
    error_rate: float | None = None
    """simulated annotators' mean error rate (default 0.05)"""
    audit_fraction: float | None = None
    """share of confident items still reviewed (0.05)"""
    review_threshold: float | None = None
    """needs_review under this probability (0.8)"""
    top_up: TopUp | None = None
    """what a checked version's flagged items leave of the budget goes to its least certain confident items:
    never, what the rest of the stream cannot absorb (stream-end), or all at once (default never)"""
    explore: Literal["off", "epsilon-greedy", "softmax", "ucb"] | None = None
    """how the policy chooses the served label (default off; see docs/promote-safely.md)"""
    explore_epsilon: float | None = None
    """epsilon-greedy: share of random labels (0.1)"""
    pseudo_label_ratio: float | None = None
    """self-training: pseudo-labels per human label for the trainer and the passive baseline; 0 turns it
    off (default 1.5; --quick: 0)"""
    train_items: int | None = None
    """stream only this many train items"""
    test_items: int | None = None
    """evaluate on this many test items"""


# ---- models ---------------------------------------------------------------------------------------


def cmd_models_pull(cfg: ModelsPull) -> int:
    from loopserve.models.store import ModelStore

    start = time.perf_counter()
    store = ModelStore(cfg.store_path)
    models = list(cfg.model) or list(BUNDLED_MODELS)
    missing = [m for m in models if store.latest(m) is None]
    if missing:
        # torch and transformers load only when there is something to build: a second run is a no-op.
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from loopserve.models import provision

        _setup_logging("WARNING")
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns) as bar:
            task = bar.add_task("models", total=len(missing))
            for name in missing:
                bar.update(task, description=f"{name}: building the base version")
                provision.pull(store, models=[name], labels_file=cfg.labels)
                bar.advance(task)
    for name in models:
        version = store.latest(name) or ""
        print(f"{name}: {version}  ({store.path(name, version)})")
    print(f"model store ready at {store.root} in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_models_publish(cfg: ModelsPublish) -> int:
    from loopserve.errors import LoopserveError, VerificationError
    from loopserve.models.staging import publish_staged
    from loopserve.models.store import ModelStore
    from loopserve.models.verify import verify_folder

    _setup_logging(cfg.log_level)
    store = ModelStore(cfg.store_path)
    src = Path(cfg.from_dir)
    parent = store.latest(cfg.model)
    meta: dict[str, object] = {"published_by": "operator"}
    if cfg.checked:
        meta["checked"] = True
    if cfg.label_set_change:
        meta["label_set_change"] = True  # type: ignore[assignment]
    if cfg.architecture_change:
        meta["architecture_change"] = True  # type: ignore[assignment]
    try:  # refuse before publishing what no service could load
        verify_folder(cfg.model, src, store, meta=meta)
    except LoopserveError:
        raise
    except Exception as exc:  # a garbled config or tokenizer file: one line, not a traceback
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise VerificationError(f"{src} does not load as a {cfg.model}: {type(exc).__name__}: {reason}") from None
    if cfg.stage:  # in the store, not served: shadow it first (ModelAdmin.StartShadow), then promote
        manifest = store.publish_version(cfg.model, src, parent=parent, meta=meta, set_latest=False)
        print(f"staged {cfg.model} {manifest.version} (serving stays {parent}; StartShadow to try it on live traffic)")
        return 0
    manifest, staging = publish_staged(store, cfg.model, src, stage_wait_s=cfg.stage_wait_s, parent=parent, meta=meta)
    how = ""
    if staging is not None and (staging.staged or staging.waiting):
        how = f"; {len(staging.staged)} service(s) staged it in {staging.waited_s:.2f}s"
        how += f", {len(staging.waiting)} still loading it" if staging.waiting else ""
    print(f"published {cfg.model} {manifest.version} (parent {parent}{how})")
    return 0


def cmd_models_list(cfg: ModelsList) -> int:
    from loopserve.models.store import ModelStore

    store = ModelStore(cfg.store_path)
    for model in store.models():
        latest = store.latest(model)
        for v in store.list(model):
            m = store.get(model, v)
            mark = " (LATEST)" if v == latest else ""
            print(f"{model}\t{v}{mark}\tparent={m.parent}\tcreated={m.created}\t{m.metrics}")
    return 0


# ---- the feedback log -----------------------------------------------------------------------------


def _open_log(cfg: LogConfig):  # type: ignore[no-untyped-def]
    from loopserve.feedback_log import open_feedback_log

    return open_feedback_log(cfg.feedback_log_url)


def cmd_log_export(cfg: LogExport) -> int:
    with _open_log(cfg) as log:
        if cfg.output == "-":
            n = log.export_jsonl(sys.stdout, after_seq=cfg.after_seq)
        else:
            n = log.export_jsonl(Path(cfg.output), after_seq=cfg.after_seq)
    print(f"exported {n} records", file=sys.stderr)
    return 0


def cmd_log_import(cfg: LogImport) -> int:
    if cfg.demonstrations:
        return _import_demonstrations(cfg)
    with _open_log(cfg) as log:
        r = log.import_jsonl(sys.stdin if cfg.input == "-" else Path(cfg.input))
    print(f"imported {r.decisions} decisions and {r.feedback} feedback events; {r.skipped} already present")
    return 0


def _import_demonstrations(cfg: LogImport) -> int:
    import io

    from loopserve.feedback_log.demonstrations import as_export_lines, read_demonstrations

    src = sys.stdin if cfg.input == "-" else Path(cfg.input).open()
    try:
        lines = "".join(as_export_lines(read_demonstrations(src, cfg.task)))  # all checked before any write
    finally:
        if src is not sys.stdin:
            src.close()
    with _open_log(cfg) as log:
        r = log.import_jsonl(io.StringIO(lines))
    print(f"imported {r.decisions} demonstrations; {r.skipped} already present")
    return 0


def cmd_dataset_export(cfg: DatasetExport) -> int:
    from collections import Counter

    from loopserve.feedback_log.labelled_dataset import export_dataset, labelled_dataset
    from loopserve.models.store import ModelStore

    sources: Counter[str] = Counter()

    def counted(rows):  # type: ignore[no-untyped-def]
        for row in rows:
            sources[row.source if row.source == "human" or row.model_checked else f"{row.source} (unchecked)"] += 1
            yield row

    with _open_log(cfg) as log:
        rows = counted(labelled_dataset(log, cfg.task, ModelStore(cfg.store_path)))
        n = export_dataset(rows, sys.stdout if cfg.output == "-" else Path(cfg.output))
    print(f"exported {n} items: " + ", ".join(f"{v} {k}" for k, v in sorted(sources.items())), file=sys.stderr)
    return 0


def cmd_log_stats(cfg: LogStats) -> int:
    import json

    with _open_log(cfg) as log:
        st = log.stats()
    out = {
        "max_seq": st.max_seq,
        "decisions": st.decisions,
        "feedback": st.feedback,
        "feedback_by_kind": st.feedback_by_kind,
        "decisions_by_model_version": st.decisions_by_model_version,
        "review_rate": st.review_rate,
    }
    print(json.dumps(out, indent=2))
    return 0


# ---- services -------------------------------------------------------------------------------------


def cmd_policy(cfg: PolicyConfig) -> int:
    _setup_logging(cfg.log_level)
    from policy_service.app import run

    asyncio.run(run(cfg))
    return 0


def cmd_reward(cfg: RewardConfig) -> int:
    _setup_logging(cfg.log_level)
    from reward_service.app import run

    asyncio.run(run(cfg))
    return 0


def cmd_up(cfg: UpConfig) -> int:
    from loopserve.cli.up import run_embedded, stack_configs

    policy, reward = stack_configs(cfg)
    _setup_logging(policy.log_level)
    return run_embedded(
        policy,
        reward,
        train=cfg.trainer,
        tls_ca=cfg.tls_ca,
        ml_backend_port=cfg.ml_backend_port,
        label_studio_url=cfg.label_studio_url,
    )


# ---- data and the demo ------------------------------------------------------------------------------


def cmd_data_pull(cfg: DataPull) -> int:
    from loopserve.datasets import label_set, load_dataset, pull_finefoods

    path = pull_finefoods(cfg.data_dir / "data")
    train, test = load_dataset(path)
    print(f"{cfg.name}: {len(train)} train, {len(test)} test, labels {label_set(train + test)} at {path}")
    return 0


ANNOTATION_DEMO_FLAGS = (
    "budget_fraction",
    "error_rate",
    "audit_fraction",
    "review_threshold",
    "top_up",
    "train_items",
    "test_items",
    "label_descriptions",
    "explore",
    "explore_epsilon",
    "pseudo_label_ratio",
)
"""DemoConfig's settings of the annotation demo alone (None: its default)."""


def demo_options(cfg: DemoConfig) -> Any:
    """The demo's options from its flags: AnnotationDemoOptions, or GenerationDemoOptions with --generation.
    A setting of one demo given to the other is a usage error (exit 2), not a flag that does nothing."""
    if cfg.generation:
        given = [n for n in ANNOTATION_DEMO_FLAGS if getattr(cfg, n) is not None]
        given += ["measure_ceiling"] if cfg.measure_ceiling else []
        _refuse(given, "the annotation demo's, not --generation's")
        from loopserve.cli.demo.generation import GenerationDemoOptions

        gen = GenerationDemoOptions(
            data_dir=cfg.data_dir, store_dir=cfg.store_path, dataset=cfg.dataset, quick=cfg.quick, seed=cfg.seed
        )
        if cfg.objective is not None:
            gen.objective = cfg.objective
        return gen
    _refuse(["objective"] if cfg.objective is not None else [], "the generation demo's: add --generation")
    from loopserve.cli.demo.annotation import AnnotationDemoOptions

    opts = AnnotationDemoOptions(
        data_dir=cfg.data_dir,
        store_dir=cfg.store_path,
        dataset=cfg.dataset,
        quick=cfg.quick,
        seed=cfg.seed,
        measure_ceiling=cfg.measure_ceiling,
    )
    for name in ANNOTATION_DEMO_FLAGS:
        if getattr(cfg, name) is not None:
            setattr(opts, name, getattr(cfg, name))
    return opts


def _refuse(names: list[str], why: str) -> None:
    if names:
        flags = ", ".join("--" + n.replace("_", "-") for n in names)
        print(f"loopserve demo: {flags}: {why} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def cmd_demo(cfg: DemoConfig) -> int:
    _setup_logging("WARNING")
    opts = demo_options(cfg)
    if cfg.generation:
        from loopserve.cli.demo.generation import GenerationDemo

        GenerationDemo(opts).run()
    else:
        from loopserve.cli.demo.annotation import AnnotationDemo

        AnnotationDemo(opts).run()
    return 0


# ---- dispatch -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    config: type[Any]
    run: Callable[[Any], int]


def commands() -> dict[str, Command | dict[str, Command]]:
    """Every command: `loopserve <name> [flags]`, or `loopserve <group> <name> [flags]` (and `loopserve
    train`, the trainer's own entry point, trainer/__main__.py)."""
    from loopserve.cli.serve import ServeConfig, cmd_serve
    from loopserve.cli.up import UpConfig
    from loopserve.labelstudio.cli import ConnectConfig, cmd_connect, cmd_ml_backend
    from loopserve.labelstudio.config import MLBackendConfig

    return {
        "policy": Command(PolicyConfig, cmd_policy),
        "reward": Command(RewardConfig, cmd_reward),
        "up": Command(UpConfig, cmd_up),
        "serve": Command(ServeConfig, cmd_serve),
        "ml-backend": Command(MLBackendConfig, cmd_ml_backend),
        "demo": Command(DemoConfig, cmd_demo),
        "models": {
            "pull": Command(ModelsPull, cmd_models_pull),
            "publish": Command(ModelsPublish, cmd_models_publish),
            "list": Command(ModelsList, cmd_models_list),
        },
        "log": {
            "export": Command(LogExport, cmd_log_export),
            "import": Command(LogImport, cmd_log_import),
            "stats": Command(LogStats, cmd_log_stats),
        },
        "dataset": {"export": Command(DatasetExport, cmd_dataset_export)},
        "data": {"pull": Command(DataPull, cmd_data_pull)},
        "labelstudio": {"connect": Command(ConnectConfig, cmd_connect)},
    }


def _summary(config: type[Any]) -> str:
    """The first sentence of a config's docstring: what the command does."""
    return " ".join((config.__doc__ or "").split()).split(". ")[0].rstrip(".")


def usage(table: dict[str, Command | dict[str, Command]]) -> str:
    from trainer.config import TrainerArgs

    lines = ["usage: loopserve <command> [flags]    (`loopserve <command> --help` lists its flags)", "", "commands:"]
    rows = [("train", TrainerArgs)]
    for name, entry in table.items():
        if isinstance(entry, Command):
            rows.append((name, entry.config))
        else:
            rows += [(f"{name} {sub}", cmd.config) for sub, cmd in entry.items()]
    lines += [f"  {name:<20} {_summary(config)}" for name, config in rows]
    return "\n".join(lines)


def resolve(argv: Sequence[str]) -> tuple[str, Command, list[str]]:
    """(the command's name as typed, the command, its flags) from the command line. An unknown or
    missing command prints the usage and exits (2; 0 for --help)."""
    table = commands()
    args = list(argv)
    entry = table.get(args[0]) if args else None
    if isinstance(entry, dict):
        sub = entry.get(args[1]) if len(args) > 1 else None
        if sub is None:
            print(f"usage: loopserve {args[0]} {{{','.join(entry)}}} [flags]", file=sys.stderr)
            raise SystemExit(0 if args[1:2] in (["-h"], ["--help"]) else 2)
        return f"loopserve {args[0]} {args[1]}", sub, args[2:]
    if entry is None:
        print(usage(table), file=sys.stderr)
        raise SystemExit(0 if args[:1] in (["-h"], ["--help"]) else 2)
    return f"loopserve {args[0]}", entry, args[1:]


def parse_command(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> tuple[Command, Any]:
    """The command and its config, as `main` reads them (tests read configs through this)."""
    prog, cmd, rest = resolve(argv)
    return cmd, parse(cmd.config, rest, environ=environ, prog=prog)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["train"]:
        from trainer.__main__ import main as train_main

        return train_main(args[1:])
    cmd, cfg = parse_command(args)
    try:
        return int(cmd.run(cfg) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the CLI says what went wrong in one line; --log-level DEBUG for more
        from loopserve.errors import LoopserveError

        if isinstance(e, LoopserveError | ValueError | FileNotFoundError):
            print(f"loopserve: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
