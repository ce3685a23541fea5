"""Annotate through Ray Serve beside the embedded grpc.aio server: same model, same load, one run.

Paths on the same real annotator (MiniLM + head), one ~64-token review per request, at 1, 8, 32 and
64 concurrent clients (the load generator and helpers of bench/serving.py, imported, unchanged):
  embedded    `loopserve policy` (grpc.aio + DynamicBatcher), its own process, batch <= 64, wait 4 ms;
  ray_haproxy policy_service.ray_app on a local Ray cluster (one replica, the same PolicyFrontend and
              DynamicBatcher, batch <= 64, wait 4 ms, the same torch threads), behind HAProxy (Ray's
              high-throughput mode, the default ingress of `loopserve serve --engine ray`);
  ray         the same, through Ray's Python gRPC proxy (`--ingress proxy`);
  ray_serve_batch(_haproxy)  the same deployment with `batching: serve` (Ray's @serve.batch behind the
              Batcher protocol instead of the DynamicBatcher).
Writes bench/results/serving_ray.json: items/s, p50, p99, mean batch and serving CPU per request per
path and client count, and the ratios to embedded.

    .venv/bin/python bench/serving_ray.py [--seconds 8] [--replicas 1] [--ray-batching loopserve,serve]
        [--ray-ingress haproxy,proxy]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving  # bench/serving.py: its load generator and helpers
from common import machine

from loopserve.auth import ensure_token_file, read_token
from loopserve.cli.serve import build_apps, deploy, start_serve, stop_serve
from loopserve.device import cores_available
from loopserve.models import provision
from loopserve.models.store import ModelStore
from loopserve.ports import free_ports

RUN_KEYS = {
    ("loopserve", "proxy"): "ray",
    ("serve", "proxy"): "ray_serve_batch",
    ("loopserve", "haproxy"): "ray_haproxy",
    ("serve", "haproxy"): "ray_serve_batch_haproxy",
}


def run_ray(data: Path, args: argparse.Namespace, levels: list[int], batching: str, ingress: str) -> list[dict]:
    grpc_port, mport, http_port = free_ports(3)
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
        "batching": batching,
        "num_cpus": 1,  # what the replica reserves; its torch threads are set below
        # torch threads: the embedded server's (all cores, split between replicas), or --ray-threads
        "threads": args.ray_threads or max(1, cores_available() // args.replicas),
    }
    try:
        start_serve(
            grpc_port=grpc_port,
            http_port=http_port,
            num_cpus=cores_available(),
            temp_dir=Path(tempfile.mkdtemp(prefix="ray", dir=data)),
            log_to_driver=False,
            ingress=ingress,
        )
        deploy(build_apps(["policy"], {"policy": policy_args}))
        # One application on the proxy: no `application` metadata needed, so serving.load runs as is.
        token = read_token(data / "tokens.json", "client")
        return asyncio.run(serving.measure_levels(f"127.0.0.1:{grpc_port}", token, mport, args.seconds, levels, "ray"))
    finally:
        stop_serve()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--replicas", type=int, default=1, help="Ray replicas (torch threads split between them)")
    ap.add_argument(
        "--ray-threads",
        type=int,
        default=0,
        help="torch threads per Ray replica; 0: as many as the embedded server uses (cores / replicas)",
    )
    ap.add_argument("--ray-batching", default="loopserve,serve", help="Ray paths: loopserve and/or serve batching")
    ap.add_argument(
        "--ray-ingress",
        default="haproxy,proxy",
        help="haproxy (Ray's high-throughput mode: HAProxy in front of the replica's own gRPC server) and/or proxy "
        "(Ray's Python gRPC proxy)",
    )
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
        ray_runs: dict[str, list[dict]] = {}
        for ingress in args.ray_ingress.split(","):  # start_serve sets or clears Ray's env for each
            for batching in args.ray_batching.split(","):
                print(f"ray ({batching} batching): {args.replicas} replica(s), ingress {ingress}:", flush=True)
                started = time.perf_counter()
                ray_runs[RUN_KEYS[batching, ingress]] = run_ray(data, args, levels, batching, ingress)
                print(f"  (Ray start, deploy, measure and shutdown: {time.perf_counter() - started:.0f}s)")
    by = {r["clients"]: r for r in embedded}
    best_e = max(r["items_per_s"] for r in embedded)
    comparisons: dict[str, dict] = {}
    for batching, rows in ray_runs.items():
        comparisons[batching] = {
            "per_clients": [
                {
                    "clients": r["clients"],
                    "throughput_ratio_ray_vs_embedded": r["items_per_s"] / by[r["clients"]]["items_per_s"],
                    "mean_batch_ratio_ray_vs_embedded": r["mean_batch"] / by[r["clients"]]["mean_batch"],
                    "p50_ms_added_by_ray": r["p50_ms"] - by[r["clients"]]["p50_ms"],
                    "p99_ms_added_by_ray": r["p99_ms"] - by[r["clients"]]["p99_ms"],
                    "serving_cpu_ms_per_request_added_by_ray": r["serving_cpu_ms_per_request"]
                    - by[r["clients"]]["serving_cpu_ms_per_request"],
                }
                for r in rows
            ],
            "peak_throughput_ratio_ray_vs_embedded": max(r["items_per_s"] for r in rows) / best_e,
        }
    result = {
        "machine": machine(dtype=args.dtype),
        "seconds_per_point": args.seconds,
        "ray_replicas": args.replicas,
        "ray_threads": args.ray_threads or max(1, cores_available() // args.replicas),
        "embedded": embedded,
        **ray_runs,
        "comparison": comparisons,
        "load_average_at_end": os.getloadavg(),
        "note": "2 shared CPU cores: the Ray proxy, replica and load generator compete for them; +-30% noise",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving_ray.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(comparisons, indent=1))


if __name__ == "__main__":
    main()
