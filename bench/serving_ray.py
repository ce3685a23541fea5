"""Annotate through Ray Serve's gRPC proxy beside the embedded grpc.aio server: same model, same load.

Two paths on the same real annotator (MiniLM + head), one ~64-token review per request, at 1, 8, 32
and 64 concurrent clients (the load generator and helpers of bench/serving.py, imported, unchanged):
  embedded  `loopserve policy` (grpc.aio + DynamicBatcher), its own process, batch <= 64, wait 4 ms;
  ray       policy_service.ray_app on a local Ray cluster (one replica, @serve.batch <= 64, wait 4 ms,
            the same torch threads), called through Ray's gRPC proxy.
Writes bench/results/serving_ray.json: items/s, p50 and p99 per path and client count, and the
ratios ray / embedded.

    .venv/bin/python bench/serving_ray.py [--seconds 8] [--replicas 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving  # bench/serving.py: its load generator and helpers

from loopserve.auth import ensure_token_file, read_token
from loopserve.device import cores_available
from loopserve.model_store import ModelStore
from loopserve.models import provision
from loopserve.ray_serve import build_apps, deploy, start_serve, stop_serve


async def measure(target: str, token: str, mport: int, seconds: float, levels: list[int], name: str) -> list[dict]:
    """serving.run_service's measuring loop, for a service someone else started."""
    await serving.wait_ready(target, token)
    out = []
    for n in levels:
        await serving.load(target, token, n, min(2.0, seconds / 4))  # warm-up at this level
        s0, c0 = serving.batch_histogram(mport)
        r = await serving.load(target, token, n, seconds)
        s1, c1 = serving.batch_histogram(mport)
        r["mean_batch"] = (s1 - s0) / max(1.0, c1 - c0)
        out.append(r)
        print(
            f"  {name} clients={n:3d}: {r['items_per_s']:7.1f} items/s  p50 {r['p50_ms']:.1f} ms  "
            f"p99 {r['p99_ms']:.1f} ms  mean batch {r['mean_batch']:.1f}  errors {r['errors']}",
            flush=True,
        )
    return out


def run_ray(data: Path, args: argparse.Namespace, levels: list[int]) -> list[dict]:
    grpc_port, mport = serving.free_port(), serving.free_port()
    policy_args = {
        "data_dir": str(data),
        "generator": False,
        "max_batch_size": 64,
        "max_wait_ms": 4,
        "max_queue": 4096,
        "dtype": args.dtype,
        "log_level": "WARNING",
        "watch_interval_s": 60,
        "log_url": str(data / "feedback-ray.sqlite3"),  # decisions logged, as the embedded server does
        "metrics_port": mport,  # replica k on this node: mport + 10 k
        "num_replicas": args.replicas,
        "num_cpus": 1,  # what the replica reserves; its torch threads are set below
        "threads": max(1, cores_available() // args.replicas),
    }
    try:
        start_serve(
            grpc_port=grpc_port,
            http_port=serving.free_port(),
            num_cpus=cores_available(),
            temp_dir=Path(tempfile.mkdtemp(prefix="ray", dir=data)),
            log_to_driver=False,
        )
        deploy(build_apps(["policy"], {"policy": policy_args}))
        # One application on the proxy: no `application` metadata needed, so serving.load runs as is.
        token = read_token(data / "tokens.json", "client")
        return asyncio.run(measure(f"127.0.0.1:{grpc_port}", token, mport, args.seconds, levels, "ray"))
    finally:
        stop_serve()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--replicas", type=int, default=1, help="Ray replicas (torch threads split between them)")
    ap.add_argument("--out", type=Path, default=serving.REPO / "bench" / "results")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    levels = [int(x) for x in args.clients.split(",")]
    print(f"load average before: {os.getloadavg()}", flush=True)
    real = ModelStore(serving.REPO / ".loopserve" / "store")
    provision.pull(real, models=["annotator"])
    with tempfile.TemporaryDirectory(prefix="lsray") as tmp:
        data = Path(tmp)
        v = real.latest("annotator")
        assert v
        ModelStore(data / "store").publish_version("annotator", real.path("annotator", v))
        (data / "store" / "models" / "generator").mkdir(parents=True)
        # serving.run_service reads the client token right after starting the server, before the
        # server has written its token file: write it first (both paths then share it).
        ensure_token_file(data / "tokens.json")
        print("embedded: loopserve policy (grpc.aio, dynamic batching):", flush=True)
        embedded = asyncio.run(serving.run_service(data, 64, args.dtype, args.seconds, levels))
        print(f"ray: policy_service.ray_app, {args.replicas} replica(s), through Ray's gRPC proxy:", flush=True)
        started = time.perf_counter()
        ray_rows = run_ray(data, args, levels)
        print(f"  (Ray start, deploy, measure and shutdown: {time.perf_counter() - started:.0f}s)")
    by = {r["clients"]: r for r in embedded}
    comparison = []
    for r in ray_rows:
        e = by[r["clients"]]
        comparison.append(
            {
                "clients": r["clients"],
                "throughput_ratio_ray_vs_embedded": r["items_per_s"] / e["items_per_s"],
                "p50_ms_added_by_ray": r["p50_ms"] - e["p50_ms"],
                "p99_ms_added_by_ray": r["p99_ms"] - e["p99_ms"],
            }
        )
    best_e = max(r["items_per_s"] for r in embedded)
    best_r = max(r["items_per_s"] for r in ray_rows)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "dtype": args.dtype},
        "seconds_per_point": args.seconds,
        "ray_replicas": args.replicas,
        "embedded": embedded,
        "ray": ray_rows,
        "comparison": comparison,
        "peak_throughput_ratio_ray_vs_embedded": best_r / best_e,
        "load_average_at_end": os.getloadavg(),
        "note": "2 shared CPU cores: the Ray proxy, replica and load generator compete for them; +-30% noise",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving_ray.json").write_text(json.dumps(result, indent=2))
    summary = {k: result[k] for k in ("peak_throughput_ratio_ray_vs_embedded", "comparison")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
