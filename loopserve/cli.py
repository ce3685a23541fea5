"""The `loopserve` command. Each subcommand builds its process's one typed config here, in main()."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

from loopserve.config import (
    CommonConfig,
    PolicyConfig,
    RewardConfig,
    add_arguments,
    from_namespace,
)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---- models ---------------------------------------------------------------------------------------


BUNDLED_MODELS = ("annotator", "generator", "reward")


def cmd_models_pull(ns: argparse.Namespace) -> int:
    from loopserve.model_store import ModelStore

    cfg = from_namespace(CommonConfig, ns)
    start = time.perf_counter()
    store = ModelStore(cfg.store_path)
    models = ns.model or list(BUNDLED_MODELS)
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
                provision.pull(store, models=[name], labels_file=ns.labels)
                bar.advance(task)
    for name in models:
        version = store.latest(name) or ""
        print(f"{name}: {version}  ({store.path(name, version)})")
    print(f"model store ready at {store.root} in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_models_publish(ns: argparse.Namespace) -> int:
    from loopserve.errors import LoopserveError, VerificationError
    from loopserve.model_store import ModelStore
    from loopserve.model_verify import verify_folder

    cfg = from_namespace(CommonConfig, ns)
    _setup_logging(cfg.log_level)
    store = ModelStore(cfg.store_path)
    src = Path(ns.from_dir)
    parent = store.latest(ns.model)
    meta: dict[str, object] = {"published_by": "operator"}
    if getattr(ns, "checked", False):
        meta["checked"] = True
    if ns.label_set_change:
        meta["label_set_change"] = True  # type: ignore[assignment]
    if ns.architecture_change:
        meta["architecture_change"] = True  # type: ignore[assignment]
    try:  # refuse before publishing what no service could load
        verify_folder(ns.model, src, store, meta=meta)
    except LoopserveError:
        raise
    except Exception as exc:  # a garbled config or tokenizer file: one line, not a traceback
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise VerificationError(f"{src} does not load as a {ns.model}: {type(exc).__name__}: {reason}") from None
    manifest = store.publish_version(ns.model, src, parent=parent, meta=meta, set_latest=not ns.stage)
    if ns.stage:  # in the store, not served: shadow it first (ModelAdmin.StartShadow), then promote
        print(f"staged {ns.model} {manifest.version} (serving stays {parent}; StartShadow to try it on live traffic)")
    else:
        print(f"published {ns.model} {manifest.version} (parent {parent})")
    return 0


def cmd_models_list(ns: argparse.Namespace) -> int:
    from loopserve.model_store import ModelStore

    cfg = from_namespace(CommonConfig, ns)
    store = ModelStore(cfg.store_path)
    for model in store.models():
        latest = store.latest(model)
        for v in store.list(model):
            m = store.get(model, v)
            mark = " (LATEST)" if v == latest else ""
            print(f"{model}\t{v}{mark}\tparent={m.parent}\tcreated={m.created}\t{m.metrics}")
    return 0


# ---- the feedback log -----------------------------------------------------------------------------


def _open_log(ns: argparse.Namespace):  # type: ignore[no-untyped-def]
    from loopserve.feedback_log import open_feedback_log

    cfg = from_namespace(CommonConfig, ns)
    return open_feedback_log(cfg.feedback_log_url)


def cmd_log_export(ns: argparse.Namespace) -> int:
    with _open_log(ns) as log:
        if ns.output == "-":
            n = log.export_jsonl(sys.stdout, after_seq=ns.after_seq)
        else:
            n = log.export_jsonl(Path(ns.output), after_seq=ns.after_seq)
    print(f"exported {n} records", file=sys.stderr)
    return 0


def cmd_log_import(ns: argparse.Namespace) -> int:
    if ns.demonstrations:
        return _import_demonstrations(ns)
    with _open_log(ns) as log:
        r = log.import_jsonl(sys.stdin if ns.input == "-" else Path(ns.input))
    print(f"imported {r.decisions} decisions and {r.feedback} feedback events; {r.skipped} already present")
    return 0


def _import_demonstrations(ns: argparse.Namespace) -> int:
    import io

    from loopserve.feedback_log.demonstrations import as_export_lines, read_demonstrations

    src = sys.stdin if ns.input == "-" else Path(ns.input).open()
    try:
        lines = "".join(as_export_lines(read_demonstrations(src, ns.task)))  # all checked before any write
    finally:
        if src is not sys.stdin:
            src.close()
    with _open_log(ns) as log:
        r = log.import_jsonl(io.StringIO(lines))
    print(f"imported {r.decisions} demonstrations; {r.skipped} already present")
    return 0


def cmd_dataset_export(ns: argparse.Namespace) -> int:
    from collections import Counter

    from loopserve.feedback_log.labelled_dataset import export_dataset, labelled_dataset
    from loopserve.model_store import ModelStore

    cfg = from_namespace(CommonConfig, ns)
    sources: Counter[str] = Counter()

    def counted(rows):  # type: ignore[no-untyped-def]
        for row in rows:
            sources[row.source if row.source == "human" or row.model_checked else f"{row.source} (unchecked)"] += 1
            yield row

    with _open_log(ns) as log:
        rows = counted(labelled_dataset(log, ns.task, ModelStore(cfg.store_path)))
        n = export_dataset(rows, sys.stdout if ns.output == "-" else Path(ns.output))
    print(f"exported {n} items: " + ", ".join(f"{v} {k}" for k, v in sorted(sources.items())), file=sys.stderr)
    return 0


def cmd_log_stats(ns: argparse.Namespace) -> int:
    import json

    with _open_log(ns) as log:
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


def cmd_policy(ns: argparse.Namespace) -> int:
    cfg = from_namespace(PolicyConfig, ns)
    _setup_logging(cfg.log_level)
    from policy_service.app import run

    asyncio.run(run(cfg))
    return 0


def cmd_reward(ns: argparse.Namespace) -> int:
    cfg = from_namespace(RewardConfig, ns)
    _setup_logging(cfg.log_level)
    from reward_service.app import run

    asyncio.run(run(cfg))
    return 0


def cmd_up(ns: argparse.Namespace) -> int:
    from loopserve.embedded import StackPorts, reward_config, run_embedded

    policy = from_namespace(PolicyConfig, ns)
    reward = reward_config(policy, from_namespace(RewardConfig, ns), StackPorts(ns.reward_port, ns.reward_metrics_port))
    _setup_logging(policy.log_level)
    return run_embedded(
        policy,
        reward,
        train=not ns.no_trainer,
        tls_ca=ns.tls_ca,
        ml_backend_port=ns.ml_backend_port,
        label_studio_url=ns.label_studio_url,
    )


# ---- data and the demo ------------------------------------------------------------------------------


def cmd_data_pull(ns: argparse.Namespace) -> int:
    from loopserve.datasets import label_set, load_dataset, pull_finefoods

    cfg = from_namespace(CommonConfig, ns)
    path = pull_finefoods(cfg.data_dir / "data")
    train, test = load_dataset(path)
    print(f"{ns.name}: {len(train)} train, {len(test)} test, labels {label_set(train + test)} at {path}")
    return 0


def demo_options(ns: argparse.Namespace) -> Any:
    """The demo's options from its flags: AnnotationDemoOptions, or GenerationDemoOptions with --generation."""
    cfg = from_namespace(CommonConfig, ns)
    if ns.generation:
        from loopserve.demo.generation import GenerationDemoOptions

        return GenerationDemoOptions(
            data_dir=cfg.data_dir,
            store_dir=cfg.store_path,
            dataset=ns.dataset,
            quick=ns.quick,
            objective=ns.objective,
            seed=ns.seed,
        )
    from loopserve.demo.annotation import AnnotationDemoOptions

    opts = AnnotationDemoOptions(
        data_dir=cfg.data_dir,
        store_dir=cfg.store_path,
        dataset=ns.dataset,
        quick=ns.quick,
        seed=ns.seed,
        measure_ceiling=ns.measure_ceiling,
    )
    for name in (
        "budget_fraction",
        "error_rate",
        "audit_fraction",
        "review_threshold",
        "train_items",
        "test_items",
        "label_descriptions",
        "explore",
        "explore_epsilon",
    ):
        if getattr(ns, name) is not None:
            setattr(opts, name, getattr(ns, name))
    return opts


def cmd_demo(ns: argparse.Namespace) -> int:
    _setup_logging("WARNING")
    opts = demo_options(ns)
    if ns.generation:
        from loopserve.demo.generation import GenerationDemo

        GenerationDemo(opts).run()
    else:
        from loopserve.demo.annotation import AnnotationDemo

        AnnotationDemo(opts).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loopserve", description="Learning from human feedback in production.")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the model store").add_subparsers(dest="models_command", required=True)
    pull = models.add_parser("pull", help="write the base versions of the bundled models (idempotent)")
    add_arguments(pull, CommonConfig)
    pull.add_argument("--model", action="append", help="only this model (repeatable)")
    pull.add_argument("--labels", type=Path, help='JSON {"task": ..., "labels": [{"name", "description"}]}')
    pull.set_defaults(fn=cmd_models_pull)
    publish = models.add_parser("publish", help="publish weights trained elsewhere as a new version")
    add_arguments(publish, CommonConfig)
    publish.add_argument("--model", required=True)
    publish.add_argument("--from", dest="from_dir", required=True, help="a folder in the model's format")
    publish.add_argument("--label-set-change", action="store_true", help="the new version's labels differ on purpose")
    publish.add_argument("--architecture-change", action="store_true", help="tensor names or shapes differ on purpose")
    publish.add_argument(
        "--checked",
        action="store_true",
        help="annotator: you measured its calibration; it may auto-label (otherwise it flags every item)",
    )
    publish.add_argument(
        "--stage",
        action="store_true",
        help="store the version without serving it (LATEST unmoved): shadow it, then promote (docs/promote-safely.md)",
    )
    publish.set_defaults(fn=cmd_models_publish)
    ls = models.add_parser("list", help="list versions")
    add_arguments(ls, CommonConfig)
    ls.set_defaults(fn=cmd_models_list)

    logp = sub.add_parser("log", help="the feedback log").add_subparsers(dest="log_command", required=True)
    export = logp.add_parser("export", help="write records as JSON lines")
    add_arguments(export, CommonConfig)
    export.add_argument("--format", choices=["jsonl"], default="jsonl")
    export.add_argument("--after-seq", type=int, default=0, help="only records after this sequence number")
    export.add_argument("-o", "--output", default="-", help="a file, or - for stdout")
    export.set_defaults(fn=cmd_log_export)
    imp = logp.add_parser("import", help="read records from JSON lines (idempotent)")
    add_arguments(imp, CommonConfig)
    imp.add_argument("input", help="a .jsonl file written by `log export`, or - for stdin")
    imp.add_argument(
        "--demonstrations",
        action="store_true",
        help='input holds demonstrations for the generator\'s SFT: {"prompt": ..., "response": ...} lines',
    )
    imp.add_argument("--task", default="chat", help="generation task of imported demonstrations")
    imp.set_defaults(fn=cmd_log_import)
    stats = logp.add_parser("stats", help="counts by kind, by model version, review rate")
    add_arguments(stats, CommonConfig)
    stats.set_defaults(fn=cmd_log_stats)

    policy = sub.add_parser("policy", help="run the policy service (with FeedbackService and ModelAdmin)")
    add_arguments(policy, PolicyConfig)
    policy.set_defaults(fn=cmd_policy)

    reward = sub.add_parser("reward", help="run the reward service")
    add_arguments(reward, RewardConfig)
    reward.set_defaults(fn=cmd_reward)

    # `loopserve train ...` hands its arguments to the trainer's own parser (TrainerArgs, its one config).
    sub.add_parser("train", help="run the trainer (`loopserve train --help` lists its flags)", add_help=False)

    up = sub.add_parser("up", help="run everything on this machine (policy, reward, trainer)")
    add_arguments(up, PolicyConfig)  # each flag reaches both services, except the policy-only ones
    add_arguments(up, RewardConfig, skip={f.name for f in dataclasses.fields(PolicyConfig)})
    up.add_argument("--policy-port", dest="port", type=int, help="policy port (default 50051)")
    up.add_argument("--reward-port", type=int, default=None, help="reward port (default 50052)")
    up.add_argument(
        "--reward-metrics-port", type=int, default=None, help="reward /metrics port (default 9102; -1 disables)"
    )
    up.add_argument("--no-trainer", action="store_true", help="services only")
    up.add_argument("--ml-backend-port", type=int, default=None, help="also serve Label Studio's ML backend (9090)")
    up.add_argument("--label-studio-url", default="", help="Label Studio's URL, for the ML backend's refreshes")
    up.add_argument(
        "--tls-ca", type=Path, default=None, help="CA the trainer trusts for --tls-cert (default: that certificate)"
    )
    up.set_defaults(fn=cmd_up)

    from loopserve.ray_serve import add_serve_parser  # imports no ray until `serve` runs

    add_serve_parser(sub)

    dataset = sub.add_parser("dataset", help="the labelled data set an annotation run produced")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True)
    dexport = dsub.add_parser("export", help="per item: the human label, else the latest served version's label")
    add_arguments(dexport, CommonConfig)
    dexport.add_argument("--task", default="", help="only this annotation task (default: all)")
    dexport.add_argument("-o", "--output", default="-", help="a file (created 0600), or - for stdout")
    dexport.set_defaults(fn=cmd_dataset_export)

    from loopserve.labelstudio.cli import add_parsers as add_labelstudio_parsers  # `ml-backend`, `labelstudio`

    add_labelstudio_parsers(sub)

    data = sub.add_parser("data", help="labelled data sets").add_subparsers(dest="data_command", required=True)
    dpull = data.add_parser("pull", help="download a bundled data set into <data-dir>/data as JSONL")
    add_arguments(dpull, CommonConfig)
    dpull.add_argument("name", choices=["finefoods"], help="finefoods: Amazon Fine Food reviews (great / other)")
    dpull.set_defaults(fn=cmd_data_pull)

    demo = sub.add_parser("demo", help="the loop end to end on real data, with simulated annotators; a report")
    # Each run writes its own log and picks its own device and dtype (CPU, bf16 serving): those flags
    # would be promises the demo does not keep, so it does not show them.
    add_arguments(demo, CommonConfig, skip={"log_url", "device", "dtype", "log_level"})
    demo.add_argument("--dataset", type=Path, help="JSONL / CSV with text, label[, split] (default: Fine Food)")
    demo.add_argument("--quick", action="store_true", help="a small run (about 3 minutes; what CI runs)")
    demo.add_argument("--generation", action="store_true", help="the generation demo (preferences, GRPO)")
    demo.add_argument(
        "--objective", choices=["grpo", "ppo", "dpo"], default="grpo", help="generation: the generator's objective"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--label-descriptions",
        type=Path,
        help='--dataset: JSON {"label": "what it means", ...} for the zero-shot base (default: the label names)',
    )
    demo.add_argument("--measure-ceiling", action="store_true", help="train on all train labels (slow)")
    demo.add_argument("--budget-fraction", type=float, help="human interactions / train items (default 0.3)")
    demo.add_argument("--error-rate", type=float, help="simulated annotators' mean error rate (default 0.05)")
    demo.add_argument("--audit-fraction", type=float, help="share of confident items still reviewed (0.05)")
    demo.add_argument("--review-threshold", type=float, help="needs_review under this probability (0.8)")
    demo.add_argument(
        "--explore",
        choices=["off", "epsilon-greedy", "softmax", "ucb"],
        help="how the policy chooses the served label (default off; see docs/promote-safely.md)",
    )
    demo.add_argument("--explore-epsilon", type=float, help="epsilon-greedy: share of random labels (0.1)")
    demo.add_argument("--train-items", type=int, help="stream only this many train items")
    demo.add_argument("--test-items", type=int, help="evaluate on this many test items")
    demo.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["train"]:
        from trainer.__main__ import main as train_main

        return train_main(args[1:])
    ns = build_parser().parse_args(args)
    try:
        return int(ns.fn(ns) or 0)
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
