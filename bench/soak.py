"""Soak: the policy service at a fraction of its saturation for minutes, with some abuse mixed in;
does its memory grow, does anything fail that should not? (Not CI: a benchmark, minutes long.)

1. Saturation, measured in this run: closed-loop Annotate (one ~64-token review a call) from
   `--clients` concurrent clients for `--saturation-seconds` (bench/serving.py's load loop).
2. Soak: open-loop Annotate at `--fraction` of that rate for `--minutes`. Beside the traffic, each
   second: a feedback accept on a served event_id, a malformed body, an unauthenticated call and a
   100 KB item id (the abuse must get its own status and fail nobody else).
3. Every 5 s: the service's RSS (psutil) and the calls finished so far, by status code.

Writes bench/results/soak.json and soak.png (RSS and throughput over time). The CPU model is recorded.

    .venv/bin/python bench/soak.py [--minutes 10] [--fraction 0.7]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import platform
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psutil
from grpc import aio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import cpu_model  # noqa: E402
from bench.serving import load, review, start_service, wait_ready  # noqa: E402
from loopserve.auth import ensure_token_file, read_token  # noqa: E402
from loopserve.client import AsyncClient, RetryPolicy  # noqa: E402
from loopserve.config import FEEDBACK_SERVICE, POLICY_SERVICE  # noqa: E402
from loopserve.feedback.v1 import feedback_pb2 as fb  # noqa: E402
from loopserve.models import provision  # noqa: E402
from loopserve.models.store import ModelStore  # noqa: E402
from loopserve.ports import free_ports  # noqa: E402

NO_RETRY = RetryPolicy(attempts=1)
# What each abusive call must get; anything else is counted as an unexpected status.
ABUSE_EXPECTED = {
    "malformed": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "oversize_id": grpc.StatusCode.INVALID_ARGUMENT,
}


async def soak(target: str, tokens: dict[str, str], pid: int, rate: float, seconds: float) -> dict:
    rng = random.Random(7)
    texts = [review(rng) for _ in range(512)]
    codes: collections.Counter[str] = collections.Counter()
    abuse: collections.Counter[str] = collections.Counter()
    unexpected: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    event_ids: collections.deque[str] = collections.deque(maxlen=1000)
    samples: list[dict] = []
    proc = psutil.Process(pid)
    inflight: set[asyncio.Task[None]] = set()
    start = time.perf_counter()

    async def annotate(c: AsyncClient, i: int) -> None:
        t = time.perf_counter()
        try:
            r = await c.annotate([texts[i % len(texts)]], timeout_s=30)
            latencies.append(time.perf_counter() - t)
            event_ids.append(r.annotations[0].event_id)
            codes["OK"] += 1
        except aio.AioRpcError as e:
            codes[e.code().name] += 1

    async def abuse_round(c: AsyncClient, annotator: AsyncClient, ch: aio.Channel, k: int) -> None:
        if event_ids:
            ev = fb.FeedbackEvent(idempotency_key=f"soak-{k}", accept=fb.LabelAccept(event_id=event_ids[-1]))
            try:
                r = await annotator.submit([ev], timeout_s=30)
                abuse["feedback_ok" if r.accepted == 1 else "feedback_rejected"] += 1
            except aio.AioRpcError as e:
                unexpected[f"feedback:{e.code().name}"] += 1
        calls = {
            "malformed": ch.unary_unary(f"/{POLICY_SERVICE}/Annotate")(
                b"\xff" * 8, metadata=(("authorization", f"Bearer {tokens['client']}"),), timeout=30
            ),
            "unauthenticated": ch.unary_unary(f"/{FEEDBACK_SERVICE}/Submit")(b"\xff" * 8, timeout=30),
            "oversize_id": c.annotate([(uuid.uuid4().hex + "x" * 100_000, "fine")], timeout_s=30),
        }
        for name, call in calls.items():
            try:
                await call
                unexpected[f"{name}:OK"] += 1
            except aio.AioRpcError as e:
                ok = e.code() == ABUSE_EXPECTED[name]
                abuse[name] += int(ok)
                unexpected[f"{name}:{e.code().name}"] += int(not ok)

    async with (
        AsyncClient(target, tokens["client"], retry=NO_RETRY) as c,
        AsyncClient(target, tokens["annotator"], retry=NO_RETRY) as annotator,
        aio.insecure_channel(target) as ch,
    ):
        i = 0
        next_sample = 0.0
        next_abuse = 1.0
        while (now := time.perf_counter() - start) < seconds:
            due = int(now * rate)
            while i < due:  # open loop: the schedule does not wait for answers
                task = asyncio.create_task(annotate(c, i))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                i += 1
            if now >= next_abuse:
                await abuse_round(c, annotator, ch, int(now))
                next_abuse += 1.0
            if now >= next_sample:
                samples.append(
                    {"t": round(now, 1), "rss_mb": proc.memory_info().rss / 2**20, "ok": codes["OK"], "sent": i}
                )
                next_sample += 5.0
            await asyncio.sleep(0.002)
        await asyncio.gather(*inflight, return_exceptions=True)
    elapsed = time.perf_counter() - start
    samples.append({"t": round(elapsed, 1), "rss_mb": proc.memory_info().rss / 2**20, "ok": codes["OK"], "sent": i})
    latencies.sort()
    # Growth after warm-up: RSS at the end against RSS after the first fifth of the run.
    warm = next((s for s in samples if s["t"] >= seconds / 5), samples[0])
    return {
        "seconds": elapsed,
        "target_rate": rate,
        "achieved_ok_per_s": codes["OK"] / elapsed,
        "codes": dict(codes),
        "abuse_as_expected": dict(abuse),
        "unexpected": {k: v for k, v in unexpected.items() if v},
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
        "rss_mb_after_warmup": warm["rss_mb"],
        "rss_mb_end": samples[-1]["rss_mb"],
        "rss_growth_mb": samples[-1]["rss_mb"] - warm["rss_mb"],
        "samples": samples,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["soak"]["samples"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([x["t"] for x in s], [x["rss_mb"] for x in s], marker=".")
    a.set_xlabel("s")
    a.set_ylabel("service RSS (MiB)")
    a.set_title("Memory during the soak")
    rates = [
        (s[k]["t"], (s[k]["ok"] - s[k - 1]["ok"]) / max(1e-9, s[k]["t"] - s[k - 1]["t"])) for k in range(1, len(s))
    ]
    b.plot([t for t, _ in rates], [r for _, r in rates], marker=".", label="answered/s")
    b.axhline(result["soak"]["target_rate"], ls="--", c="gray", label="offered/s")
    b.set_xlabel("s")
    b.set_ylabel("Annotate calls/s")
    b.legend()
    b.set_title(f"Throughput at {result['fraction']:.0%} of saturation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fraction", type=float, default=0.7)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--saturation-seconds", type=float, default=10.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    real = ModelStore(REPO / ".loopserve" / "store")
    provision.pull(real, models=["annotator"])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        v = real.latest("annotator")
        assert v
        ModelStore(data / "store").publish_version("annotator", real.path("annotator", v))
        (data / "store" / "models" / "generator").mkdir(parents=True)
        ensure_token_file(data / "tokens.json")
        tokens = {r: read_token(data / "tokens.json", r) for r in ("client", "annotator")}
        port, mport = free_ports(2)
        proc = start_service(data, port, mport, 64, args.dtype)
        target = f"127.0.0.1:{port}"
        try:
            await wait_ready(target, tokens["client"])
            sat = await load(target, tokens["client"], args.clients, args.saturation_seconds)
            rate = args.fraction * sat["items_per_s"]
            print(f"saturation {sat['items_per_s']:.1f} calls/s; soaking at {rate:.1f}/s for {args.minutes} min")
            result = {
                "machine": {"cpu": cpu_model(), "platform": platform.platform(), "cpus": psutil.cpu_count()},
                "load_average_at_start": list(psutil.getloadavg()),
                "saturation": sat,
                "fraction": args.fraction,
                "soak": await soak(target, tokens, proc.pid, rate, 60 * args.minutes),
            }
        finally:
            proc.terminate()
            proc.wait(60)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "soak.png")
    print(json.dumps({k: v for k, v in result["soak"].items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
