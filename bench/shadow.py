"""What shadow mode costs the serving throughput.

The policy service (its own process, the real MiniLM annotator, no generator) under `--clients`
concurrent Annotate callers, one ~64-token review per request. Windows alternate, in the same process:
shadow off (the baseline, measured in the same run) and a shadow candidate (a perturbed copy of the
annotator) answering a copy of every call, started and stopped by the admin RPCs between windows. Each
`--fractions` value gets its own process (`--shadow-fraction` is a process flag). Per window: served
items/s, latency p50 / p99, and what the shadow answered and dropped. Writes bench/results/shadow.json.

    .venv/bin/python bench/shadow.py [--window-s 6] [--cycles 2] [--fractions 1.0,0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine, start_policy  # noqa: E402
from loopserve.auth import ensure_token_file, read_token  # noqa: E402
from loopserve.client import AsyncClient, RetryPolicy, wait_until_serving  # noqa: E402
from loopserve.models import provision  # noqa: E402
from loopserve.models.store import ModelStore  # noqa: E402
from loopserve.ports import free_port  # noqa: E402

WORDS = (
    "coffee tea flavor taste bought package price great love bitter sweet fresh stale amazon order box "
    "delicious product favorite smell texture value recommend again never always chocolate snack dog"
).split()


def review(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(35, 60))) + "."


def prepare(data: Path) -> None:
    """The real annotator as v0 and a copy with its head moved as v1 (LATEST stays v0)."""
    import torch
    from safetensors.torch import load_file, save_file

    real = ModelStore(REPO / ".loopserve" / "store")
    provision.pull(real, models=["annotator"])
    v = real.latest("annotator")
    assert v is not None
    store = ModelStore(data / "store")
    src = data / "v0"
    shutil.copytree(real.path("annotator", v), src, ignore=shutil.ignore_patterns("manifest.json"))
    store.publish_version("annotator", src)
    dst = data / "v1"
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    state = load_file(str(weights))
    state["head.bias"] = state["head.bias"] + torch.tensor([0.5, 0.0])  # a candidate that differs a little
    save_file(state, str(weights), metadata={"format": "pt"})
    store.publish_version("annotator", dst, set_latest=False)


async def window(target: str, token: str, clients: int, seconds: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds

    async def one(c: AsyncClient) -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                await c.annotate([review(rng)])
            except Exception:  # counted: the figure that must stay 0
                errors += 1
                continue
            latencies.append(time.monotonic() - t0)

    conns = [AsyncClient(target, token, retry=RetryPolicy(attempts=1), timeout_s=30) for _ in range(clients)]
    t0 = time.monotonic()
    try:
        await asyncio.gather(*(one(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    elapsed = time.monotonic() - t0
    lat = sorted(latencies)
    return {
        "items_per_s": len(lat) / elapsed,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "requests": len(lat),
        "errors": errors,
    }


async def bench_fraction(data: Path, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    proc = start_policy(
        data,
        port,
        -1,
        [
            "--no-generator",
            "--shadow-fraction",
            str(fraction),
            "--max-batch-size",
            "32",
            "--threads",
            str(args.threads),
        ],
    )
    target = f"127.0.0.1:{port}"
    tokens = data / "tokens.json"
    try:
        await asyncio.to_thread(wait_until_serving, target, 300)
        client, admin = read_token(tokens, "client"), read_token(tokens, "admin")
        await window(target, client, args.clients, args.warmup_s, 0)  # warm-up, not recorded
        rows = []
        async with AsyncClient(target, admin, retry=RetryPolicy(attempts=1)) as a:
            for cycle in range(args.cycles):
                for shadow in (False, True):
                    if shadow:
                        await a.start_shadow("annotator", "v1")
                    row = await window(target, client, args.clients, args.window_s, 100 * cycle + shadow)
                    if shadow:
                        st = await a.stop_shadow("annotator")
                        row.update(
                            shadow_items=st.items,
                            shadow_pending=st.pending,
                            shadow_dropped=st.dropped,
                            agreement=st.agreement,
                        )
                    rows.append({"cycle": cycle, "shadow": shadow, **row})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    off = [r["items_per_s"] for r in rows if not r["shadow"]]
    on = [r["items_per_s"] for r in rows if r["shadow"]]
    return {
        "shadow_fraction": fraction,
        "windows": rows,
        "off_items_per_s": statistics.mean(off),
        "shadow_items_per_s": statistics.mean(on),
        "throughput_ratio": statistics.mean(on) / statistics.mean(off),
        # Each shadow window over the baseline window just before it: drift on a shared machine cancels.
        "paired_ratio_median": statistics.median(b / a for a, b in zip(off, on, strict=True)),
        "paired_ratios": [b / a for a, b in zip(off, on, strict=True)],
        "failed_requests": sum(r["errors"] for r in rows),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--window-s", type=float, default=6.0)
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--cycles", type=int, default=2, help="(shadow off, shadow on) window pairs per fraction")
    ap.add_argument("--fractions", default="1.0,0.25")
    ap.add_argument("--threads", type=int, default=0, help="the service's torch threads (0: all cores)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "shadow.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        prepare(data)
        ensure_token_file(data / "tokens.json")  # the service reads it; the clients take their tokens from it
        results = [await bench_fraction(data, float(f), args) for f in args.fractions.split(",")]
    out = {"machine": machine(), "clients": args.clients, "window_s": args.window_s, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for r in results:
        print(
            f"shadow fraction {r['shadow_fraction']}: {r['off_items_per_s']:.1f} items/s off, "
            f"{r['shadow_items_per_s']:.1f} with the shadow (x{r['throughput_ratio']:.2f}; "
            f"median paired x{r['paired_ratio_median']:.2f}), "
            f"{r['failed_requests']} failed requests"
        )


if __name__ == "__main__":
    asyncio.run(main())
