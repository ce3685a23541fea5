"""Annotate serving benchmark: throughput and latency through gRPC beside the in-process limit.

Three paths on the same real annotator (MiniLM + head), one item per request, ~64-token reviews:
  grpc       the policy service with the dynamic batcher, at 1, 8, 32 and 64 concurrent clients;
  naive      the same service with --max-batch-size 1 (no batching), same client counts;
  inprocess  PolicyRuntime.annotate_batch called directly at the batch sizes the batcher formed.
The service runs in its own process; the load generator (grpc.aio clients) in this one, as an app
would. Writes bench/results/serving.json and serving.png.

    .venv/bin/python bench/serving.py [--seconds 8] [--dtype float32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine, start_policy  # noqa: E402
from loopserve.auth import ensure_token_file, read_token  # noqa: E402
from loopserve.client import AsyncClient, RetryPolicy, wait_until_serving  # noqa: E402
from loopserve.models import provision  # noqa: E402
from loopserve.models.store import ModelStore  # noqa: E402
from loopserve.ports import free_ports  # noqa: E402

WORDS = (
    "coffee tea flavor taste bought package price great love bitter sweet fresh stale amazon order box "
    "delicious product favorite smell texture value recommend again never always chocolate snack dog"
).split()


def review(rng: random.Random) -> str:
    n = rng.randint(35, 60)  # ~64 tokens with punctuation and word pieces
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def start_service(
    data_dir: Path, port: int, mport: int, batch: int = 64, dtype: str = "float32", extra: Sequence[str] = ()
) -> subprocess.Popen:
    """The annotation-only policy service with the batcher's limits under test."""
    flags = ["--no-generator", "--max-batch-size", str(batch), "--max-wait-ms", "4", "--max-queue", "4096"]
    return start_policy(data_dir, port, mport, [*flags, "--dtype", dtype, *extra])


async def wait_ready(target: str, token: str, timeout: float = 120) -> None:
    """SERVING on grpc.health.v1 (no polling), then one warm-up call."""
    await asyncio.to_thread(wait_until_serving, target, timeout)
    async with AsyncClient(target, token, retry=RetryPolicy(attempts=1)) as c:
        await c.annotate(["warm up"], timeout_s=30)


def batch_histogram(mport: int) -> tuple[float, float]:
    """(sum, count) of loopserve_batch_size for the annotate batcher."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    s = re.search(r'loopserve_batch_size_sum\{model="annotate"\} ([0-9.e+]+)', text)
    c = re.search(r'loopserve_batch_size_count\{model="annotate"\} ([0-9.e+]+)', text)
    return (float(s.group(1)) if s else 0.0, float(c.group(1)) if c else 0.0)


async def load(target: str, token: str, clients: int, seconds: float) -> dict:
    rng = random.Random(clients)
    texts = [review(rng) for _ in range(512)]
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def one(c: AsyncClient, k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                await c.annotate([texts[i % len(texts)]], timeout_s=30)
                lat.append(time.perf_counter() - t)
            except Exception:
                errors += 1
            i += clients

    async with AsyncClient(target, token, retry=RetryPolicy(attempts=1)) as c:
        start = time.perf_counter()
        await asyncio.gather(*(one(c, k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    lat.sort()
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": errors,
        "items_per_s": len(lat) / elapsed,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
    }


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of the whole machine, of this process): user + nice + system (Ray runs its workers
    niced, so their time counts as nice)."""
    import psutil

    m, me = psutil.cpu_times(), psutil.Process().cpu_times()
    return m.user + m.nice + m.system, me.user + me.system


async def measure_levels(
    target: str, token: str, mport: int, seconds: float, levels: list[int], name: str
) -> list[dict]:
    """Load `target` at each client count (after a warm-up), with the mean batch the service's own
    metrics report, and the CPU the serving side spent per request: every process but this load
    generator (the server; with Ray, its proxy and replica too)."""
    await wait_ready(target, token)
    out = []
    for n in levels:
        await load(target, token, n, min(2.0, seconds / 4))  # warm-up at this level
        s0, c0 = batch_histogram(mport)
        all0, me0 = _cpu_seconds()
        r = await load(target, token, n, seconds)
        all1, me1 = _cpu_seconds()
        s1, c1 = batch_histogram(mport)
        r["mean_batch"] = (s1 - s0) / max(1.0, c1 - c0)
        serving_cpu = (all1 - all0) - (me1 - me0)
        r["serving_cpu_ms_per_request"] = 1000 * serving_cpu / max(1, r["requests"])
        # this process: the load generator (and, for Ray, the driver that started the cluster)
        r["bench_process_cpu_ms_per_request"] = 1000 * (me1 - me0) / max(1, r["requests"])
        out.append(r)
        print(
            f"  {name} clients={n:3d}: {r['items_per_s']:7.1f} items/s  p50 {r['p50_ms']:.1f} ms  "
            f"p99 {r['p99_ms']:.1f} ms  mean batch {r['mean_batch']:.1f}  "
            f"CPU ms/request: serving {r['serving_cpu_ms_per_request']:.1f}, "
            f"this process {r['bench_process_cpu_ms_per_request']:.1f}  errors {r['errors']}",
            flush=True,
        )
    return out


async def run_service(
    data_dir: Path, batch: int, dtype: str, seconds: float, levels: list[int], device: str = "cpu"
) -> list[dict]:
    port, mport = free_ports(2)
    ensure_token_file(data_dir / "tokens.json")  # before the service starts: we read it at once
    proc = start_service(data_dir, port, mport, batch, dtype, extra=("--device", device))
    token = read_token(data_dir / "tokens.json", "client")
    try:
        return await measure_levels(f"127.0.0.1:{port}", token, mport, seconds, levels, f"batch<={batch:3d}")
    finally:
        proc.terminate()
        proc.wait(30)


def inprocess(store_root: Path, dtype: str, batch_sizes: list[int], seconds: float, device: str = "cpu") -> list[dict]:
    from loopserve.device import configure_threads, pick_device, pick_dtype
    from policy_service.runtime import PolicyRuntime, RuntimeOptions
    from policy_service.types import AnnotateCall

    configure_threads()
    rt = PolicyRuntime(
        ModelStore(store_root),
        RuntimeOptions(device=pick_device(device), dtype=pick_dtype(dtype, pick_device(device)), generator=False),
    )
    rt.load()
    h = rt.annotator.current
    rng = random.Random(0)
    out = []
    for b in batch_sizes:
        calls = [AnnotateCall("sentiment", ("x",), (review(rng),), 0) for _ in range(b)]
        rt.annotate_batch(h, calls)
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            calls = [AnnotateCall("sentiment", ("x",), (review(rng),), 0) for _ in range(b)]
            rt.annotate_batch(h, calls)
            n += b
        ips = n / (time.perf_counter() - start)
        out.append({"batch": b, "items_per_s": ips})
        print(f"  in-process batch {b:3d}: {ips:7.1f} items/s", flush=True)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("grpc", "naive"):
        xs = [r["clients"] for r in result[name]]
        a.plot(xs, [r["items_per_s"] for r in result[name]], marker="o", label=f"{name} (gRPC)")
        b.plot(xs, [r["p99_ms"] for r in result[name]], marker="o", label=f"{name} p99")
    a.axhline(result["inprocess_limit_items_per_s"], ls="--", c="gray", label="in-process limit")
    a.set_xscale("log", base=2)
    b.set_xscale("log", base=2)
    a.set_xlabel("concurrent clients")
    b.set_xlabel("concurrent clients")
    a.set_ylabel("items/s")
    b.set_ylabel("ms")
    a.legend()
    b.legend()
    a.set_title("Annotate throughput")
    b.set_title("Annotate p99 latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the service's and the in-process runtime's)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. -cuda)")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    real = ModelStore(REPO / ".loopserve" / "store")
    provision.pull(real, models=["annotator"])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        v = real.latest("annotator")
        assert v
        ModelStore(data / "store").publish_version("annotator", real.path("annotator", v))
        (data / "store" / "models" / "generator").mkdir(parents=True)
        print("grpc with dynamic batching:")
        grpc_rows = await run_service(data, 64, args.dtype, args.seconds, levels, args.device)
        # In-process right after the gRPC runs (before the naive ones), so that drift in a shared
        # machine's load hits the two sides of the ratio as little as it can.
        sizes = sorted({max(1, round(r["mean_batch"])) for r in grpc_rows})
        print("in-process at the batch sizes the batcher formed:")
        inproc = inprocess(data / "store", args.dtype, sizes, args.seconds / 2, args.device)
        print("naive: grpc at batch size 1:")
        naive_rows = await run_service(data, 1, args.dtype, args.seconds, levels, args.device)
    limit = max(r["items_per_s"] for r in inproc)
    best = max(grpc_rows, key=lambda r: r["items_per_s"])
    by_clients = {r["clients"]: r for r in grpc_rows}
    naive_by = {r["clients"]: r for r in naive_rows}
    result = {
        "machine": machine(dtype=args.dtype, device=args.device),
        "load_average_at_end": list(os.getloadavg()),
        "seconds_per_point": args.seconds,
        "grpc": grpc_rows,
        "naive": naive_rows,
        "inprocess": inproc,
        "inprocess_limit_items_per_s": limit,
        "saturation_ratio_grpc_vs_inprocess": best["items_per_s"] / limit,
        "speedup_vs_naive_at_32": (
            by_clients[32]["items_per_s"] / naive_by[32]["items_per_s"] if 32 in by_clients and 32 in naive_by else None
        ),
        "targets": {"saturation_ratio": 0.9, "speedup_vs_naive_at_32": 4.0},
    }
    # The issue's own measure: against in-process at the batch size the batcher formed at saturation
    # (the limit above, the best batch size in process, is the stricter one).
    formed = {r["batch"]: r["items_per_s"] for r in inproc}
    at_formed = formed[max(1, round(best["mean_batch"]))]
    result["saturation_ratio_vs_inprocess_at_batch_formed"] = best["items_per_s"] / at_formed
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"serving{args.tag}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"serving{args.tag}.png")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "inprocess_limit_items_per_s",
                    "saturation_ratio_grpc_vs_inprocess",
                    "saturation_ratio_vs_inprocess_at_batch_formed",
                    "speedup_vs_naive_at_32",
                )
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
