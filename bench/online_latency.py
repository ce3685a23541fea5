"""How long a correction takes to reach the served weights through the annotator's online tier.

    python bench/online_latency.py [--corrections 12] [--warmup-labels 24]

Starts a real policy service (the bundled MiniLM annotator, in the precision `--dtype auto` picks, as
the demo serves it) on a fresh data dir with Fine Food. An app annotates items; a person (simulated from
the data's labels) labels them through FeedbackService. After a warm-up of `--warmup-labels` labels, one
full cross-fitted round (the trainer's own, in-process) fine-tunes the encoder, as the full tier does
behind the online one: that round's seconds are the baseline, what a correction waits for without the
online tier. Then the online tier runs as its own trainer process (`loopserve train --models
annotator_head --trainer-subdir trainer-online`, a head round per new label), and each measured
correction is timed from its acknowledgement to the first `Annotate` answered by a version whose
manifest says it was trained past that correction's log position (meta cursor >= its seq).

Writes bench/results/online_latency.json with the CPU model. Not a CI test (no timed asserts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_model
from loopserve.auth import ensure_token_file, read_token
from loopserve.client import Client
from loopserve.datasets import load_dataset, pull_finefoods
from loopserve.device import resolved_dtype_name
from loopserve.feedback.v1 import feedback_pb2
from loopserve.models.store import ModelStore
from loopserve.ports import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def feedback(event_id: str, served: str, truth: str, key: str) -> feedback_pb2.FeedbackEvent:
    if served == truth:
        return feedback_pb2.FeedbackEvent(idempotency_key=key, accept=feedback_pb2.LabelAccept(event_id=event_id))
    return feedback_pb2.FeedbackEvent(
        idempotency_key=key, correction=feedback_pb2.LabelCorrection(event_id=event_id, label=truth)
    )


def trained_past(store: ModelStore, version: str, seq: int) -> bool:
    return int(store.get("annotator", version).meta.get("cursor", 0)) >= seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=REPO / ".loopserve", help="holds the base store and data")
    ap.add_argument("--corrections", type=int, default=12)
    ap.add_argument("--warmup-labels", type=int, default=60)
    ap.add_argument("--out", type=Path, default=RESULTS / "online_latency.json")
    args = ap.parse_args()
    train, _ = load_dataset(pull_finefoods(args.data_dir / "data"))
    run = Path(tempfile.mkdtemp(prefix="online-latency-"))
    base = args.data_dir / "store" / "models" / "annotator"
    shutil.copytree(base, run / "store" / "models" / "annotator", symlinks=False)
    ensure_token_file(run / "tokens.json")
    port = free_port()
    exe = [sys.executable, "-m", "loopserve"]
    common = ["--data-dir", str(run), "--device", "cpu", "--log-level", "INFO"]
    procs = {
        "policy": [
            *exe,
            "policy",
            "--port",
            str(port),
            *common,
            *["--metrics-port", "-1", "--no-generator", "--watch-interval-s", "0.1", "--dtype", "auto"],
            *["--max-input-tokens", "128", "--threads", "1"],
        ],
        "online": [
            *exe,
            "train",
            *common,
            *["--models", "annotator_head", "--trainer-subdir", "trainer-online", "--head-round-labels", "1"],
            *["--poll-interval-s", "0.1", "--metrics-port", "-1"],
        ],
    }
    (run / "logs").mkdir()

    def start(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(procs[name], stdout=(run / "logs" / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)

    running = {"policy": start("policy")}
    store = ModelStore(run / "store")
    latencies: list[float] = []
    full_round_s, full_result = float("nan"), ""
    try:
        target = f"127.0.0.1:{port}"
        with (
            Client(target, read_token(run / "tokens.json", "client"), timeout_s=120) as app,
            Client(target, read_token(run / "tokens.json", "annotator"), timeout_s=120) as people,
        ):
            deadline = time.monotonic() + 300
            while True:
                try:
                    app.model_info()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            items = iter(train)
            labelled = 0
            while labelled < args.warmup_labels + args.corrections:
                ex = next(items)
                r = app.annotate([ex.text], top_k=1)
                ann = r.annotations[0]
                ack = people.submit([feedback(ann.event_id, ann.labels[0].label, ex.label, f"b-{labelled}")])
                seq = ack.results[0].seq
                labelled += 1
                if labelled < args.warmup_labels:
                    continue
                if labelled == args.warmup_labels:
                    # The full tier's round on the warm-up labels (the baseline), then the online tier.
                    full_round_s, full_result = full_round(run)
                    print(f"full round on {labelled} labels: {full_result} in {full_round_s:.1f}s", flush=True)
                    running["online"] = start("online")
                    continue
                t0 = time.monotonic()
                while True:  # the app keeps asking; the first answer from a version trained past `seq` counts
                    v = app.annotate([ex.text], top_k=1).model_version
                    if v != "v0" and trained_past(store, v, seq):
                        latencies.append(time.monotonic() - t0)
                        break
                    if time.monotonic() - t0 > 120:
                        latencies.append(float("inf"))
                        break
                    time.sleep(0.05)
                print(f"correction {labelled - args.warmup_labels}: {latencies[-1]:.2f}s", flush=True)
    finally:
        for p in running.values():
            p.send_signal(signal.SIGTERM)
        for p in running.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    finite = [x for x in latencies if x != float("inf")]
    result = {
        "cpu": cpu_model(),
        "dtype": resolved_dtype_name("auto", "cpu"),
        "corrections": len(latencies),
        "timeouts": len(latencies) - len(finite),
        "median_s": statistics.median(latencies) if latencies else None,
        "p90_s": sorted(latencies)[int(0.9 * (len(latencies) - 1))] if latencies else None,
        "max_s": max(latencies) if latencies else None,
        "latencies_s": latencies,
        "baseline_full_round_s": full_round_s,
        "baseline_full_round_result": full_result,
        "warmup_labels": args.warmup_labels,
        "versions_published": len(store.list("annotator")) - 1,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "latencies_s"}, indent=2))
    shutil.rmtree(run, ignore_errors=True)


def full_round(run: Path) -> tuple[float, str]:
    """One full cross-fitted annotator round on the run's labels, timed in-process (the trainer's code):
    (seconds, result)."""
    from trainer.config import TrainerArgs
    from trainer.loop import read_rounds, run_trainer

    args = TrainerArgs(data_dir=run, device="cpu", once=True, models="annotator", round_min_events=1)
    args.trainer_subdir = "trainer-full"
    args.annotator.epochs = 0.0
    args.annotator.max_length = 128
    t0 = time.monotonic()
    run_trainer(args)
    rows = read_rounds(args)
    return (rows[-1]["seconds"], rows[-1]["result"]) if rows else (time.monotonic() - t0, "none")


if __name__ == "__main__":
    main()
