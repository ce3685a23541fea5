"""Hot-swap benchmark: how soon a published version answers, and latency and errors meanwhile.

For the annotator (MiniLM + head) and the generator (SmolLM2-135M), each in turn, for each way of
publishing, measured in the same run:
  - `one-step`: the version's files are written and LATEST replaced at once (`--stage-wait-s 0`); the
    service then reads, checks and builds it while the old version answers;
  - `two-phase` (loopserve/models/staging.py, the trainer's default): the files are written, the
    service stages the version (loads and verifies it beside the serving one), the publisher waits for
    that, then replaces LATEST and the service switches in one step;
and for each watch: `push` (the store watch wakes on file-system events, polling every
--watch-interval-s as the fallback) and, when asked for, `poll` (events off, the path before issue 14):
  1. the policy service runs in its own process; N closed-loop gRPC clients (grpc.aio, no retries)
     call it from this process;
  2. cycles of: a window without swaps, a window of the same length with a new version published
     every few seconds, and a cool-down that is not counted (so a swap's tail does not fall in the
     next window without swaps). Interleaving the windows keeps the other load on a shared machine
     from favouring one side;
  3. per publish: LATEST replaced -> the first response that names the new version (the issue's
     "publish -> first answer"), the publish call's own seconds (writing 90 MB / 538 MB, and in two
     phases the wait for the service to stage it), call start -> first response, the time to the
     switch (from the service's log line) and the service's load (read-and-check in one pass, build,
     checks) whether it happened before LATEST moved (staged) or after;
  4. per kind of window: p50 / p90 / p99 latency, requests per second, errors by status code.
New versions are real full versions (weights perturbed slightly, every file written anew by the
publish, so the service reads and checks all of it; consecutive versions differ).

Then the operator's command: `loopserve models publish` of a full annotator version (its own process,
as an operator runs it), alternately with `--stage-wait-s 0` and the default two phases, while the
push-watching service answers --publish-clients callers: the command's seconds and LATEST -> the
first answer on the new version.

Writes bench/results/hotswap.json (CPU model recorded) and hotswap.png (latency over time, publishes
marked), and the service logs beside them.

    .venv/bin/python bench/hotswap.py [--models annotator,generator] [--publish one-step,two-phase]
        [--watches push,poll] [--cycles 2]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from loopserve.auth import read_token  # noqa: E402
from loopserve.client import AsyncClient, RetryPolicy  # noqa: E402
from loopserve.models import provision  # noqa: E402
from loopserve.models.staging import publish_staged  # noqa: E402
from loopserve.models.store import MANIFEST, ModelStore  # noqa: E402
from loopserve.ports import free_port  # noqa: E402

WORDS = (
    "coffee tea flavor taste bought package price great love bitter sweet fresh stale amazon order box "
    "delicious product favorite smell texture value recommend again never always chocolate snack dog"
).split()
SWAP_LINE = re.compile(r"^(\S+ \S+) INFO loopserve.models.slot: swapped (\w+) to (v\d+) in ([\d.]+)s \((.*)\)$", re.M)
STAGE_LINE = re.compile(
    r"^(\S+ \S+) INFO loopserve.models.slot: staged (\w+) (v\d+) beside v\d+ in ([\d.]+)s \((.*)\)$", re.M
)
LOAD_COST = re.compile(r"read and checked ([\d.]+) MB, reused (\d+) files, load ([\d.]+)s, checks ([\d.]+)s")
TARGETS = {  # issue 14: medians, push watch
    "annotator_publish_to_new_s": 0.25,
    "generator_publish_to_new_s": 0.5,
    "operator_latest_to_new_s": 0.25,
    "p99_ratio_max": 1.5,
    "errors": 0,
}


def review(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(35, 60))) + "."


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---- versions --------------------------------------------------------------------------------------


def perturbed(src: Path, dest: Path, model: str, k: int) -> Path:
    """A copy of `src` whose weights differ slightly (k-th variant), so each version is new."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(MANIFEST))
    weights = dest / "model.safetensors"
    state = load_file(str(weights))
    name = "head.bias" if model == "annotator" else "model.norm.weight"
    state[name] = state[name] + torch.full_like(state[name], 1e-3 * (k + 1))
    save_file(state, str(weights), metadata={"format": "pt"})
    return dest


def prepare_store(data: Path, model: str) -> list[Path]:
    """v0 of what the service loads, from the real store, and two variant folders of `model` that
    publishes alternate (so consecutive versions differ)."""
    real = ModelStore(REPO / ".loopserve" / "store")
    provision.pull(real, models=["annotator", "generator"])
    store = ModelStore(data / "store")
    for name in ("annotator",) if model == "annotator" else ("annotator", "generator"):
        if store.latest(name) is None:
            store.publish_version(name, real.path(name, real.latest(name) or "v0"))
    base = store.path(model, store.latest(model) or "v0")
    return [perturbed(base, data / f"variant-{model}-{k}", model, k) for k in range(2)]


def publish(store: ModelStore, model: str, src: Path, parent: str, mode: str, wait_s: float) -> dict[str, Any]:
    """One publish as a trainer makes it; returns the version, when LATEST moved (monotonic and wall
    clock) and how long the call took."""
    t0 = time.monotonic()
    if mode == "one-step":
        version, waited = store.publish_version(model, src, parent=parent).version, None
    else:
        manifest, staging = publish_staged(store, model, src, stage_wait_s=wait_s, parent=parent)
        version, waited = manifest.version, None if staging is None else staging.waited_s
    t1, wall = time.monotonic(), time.time()
    return {"version": version, "call_start": t0, "latest_at": t1, "latest_wall": wall, "stage_wait_s": waited}


# ---- the service -----------------------------------------------------------------------------------


def start_service(
    data: Path, port: int, model: str, watch_s: float, log: Path, events: bool, device: tuple[str, str]
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "loopserve", "policy", "--data-dir", str(data), "--port", str(port),
        "--metrics-port", "-1", "--log-level", "INFO", "--watch-interval-s", str(watch_s),
        "--generator" if model == "generator" else "--no-generator",
        "--watch-events" if events else "--no-watch-events",
        "--device", device[0], "--dtype", device[1],
    ]  # fmt: skip
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("wb"))


@dataclass
class Call:
    start: float
    end: float
    version: str
    code: str  # "OK" or the status code name


class Load:
    def __init__(self, target: str, token: str, model: str, clients: int, max_new_tokens: int) -> None:
        self.target, self.token, self.model = target, token, model
        self.clients, self.max_new_tokens = clients, max_new_tokens
        self.calls: list[Call] = []
        self.stop = asyncio.Event()

    async def _one(self, c: AsyncClient, k: int) -> None:
        rng = random.Random(k)
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                if self.model == "annotator":
                    r = await c.annotate([review(rng)], timeout_s=60)
                else:
                    topic = rng.choice(WORDS)
                    r = await c.generate(
                        f"Write one sentence about {topic}.", max_new_tokens=self.max_new_tokens,
                        temperature=0.7, seed=rng.randrange(1 << 30), timeout_s=60,
                    )  # fmt: skip
                self.calls.append(Call(t0, time.monotonic(), r.model_version, "OK"))
            except Exception as e:  # counted, never retried: an error during a swap must show
                code = e.code().name if hasattr(e, "code") else type(e).__name__
                self.calls.append(Call(t0, time.monotonic(), "", code))

    async def run(self) -> None:
        async with AsyncClient(self.target, self.token, retry=RetryPolicy(attempts=1)) as c:
            await asyncio.gather(*(self._one(c, k) for k in range(self.clients)))


async def wait_ready(target: str, token: str, model: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with AsyncClient(target, token, retry=RetryPolicy(attempts=1)) as c:
                await (c.annotate(["warm up"]) if model == "annotator" else c.generate("Hi", max_new_tokens=2))
                return
        except Exception:
            await asyncio.sleep(0.5)
    raise TimeoutError("the service did not come up")


def window_stats(calls: list[Call], windows: list[tuple[float, float]]) -> dict[str, Any]:
    """Latency of the calls that started inside any of `windows`."""
    inside = [c for c in calls if any(t0 <= c.start < t1 for t0, t1 in windows)]
    seconds = sum(t1 - t0 for t0, t1 in windows)
    ok = [c.end - c.start for c in inside if c.code == "OK"]
    errors: dict[str, int] = {}
    for c in inside:
        if c.code != "OK":
            errors[c.code] = errors.get(c.code, 0) + 1
    return {
        "seconds": seconds,
        "windows": len(windows),
        "requests": len(inside),
        "requests_per_s": len(ok) / seconds,
        "p50_ms": 1000 * (pct(ok, 0.50) or 0),
        "p90_ms": 1000 * (pct(ok, 0.90) or 0),
        "p99_ms": 1000 * (pct(ok, 0.99) or 0),
        "max_ms": 1000 * max(ok, default=0),
        "errors": sum(errors.values()),
        "errors_by_code": errors,
    }


@dataclass
class Plan:
    """Cycles of: a window without swaps, a window with a publish every `every` seconds, then a
    cool-down (not counted) so that a swap's tail never lands in the next window without swaps.
    Interleaving the windows keeps a change in the machine's other load from biasing one side."""

    cycles: int
    window_s: float
    every_s: float
    cooldown_s: float

    @property
    def per_window(self) -> int:
        return max(1, int((self.window_s - 0.5 - self.cooldown_s / 2) // self.every_s) + 1)


def plan_for(model: str, args: argparse.Namespace) -> Plan:
    if model == "annotator":
        return Plan(args.cycles, args.window_s, args.annotator_swap_every_s, cooldown_s=2.0)
    return Plan(args.cycles, args.generator_window_s, args.generator_swap_every_s, cooldown_s=8.0)


async def bench_model(
    model: str, args: argparse.Namespace, out: Path, watch: str, mode: str, dtype: str
) -> dict[str, Any]:
    """`watch`: "push" (file-system events, polling every --watch-interval-s as the fallback) or
    "poll" (events off: the swap waits for the next poll, as before); `mode`: one-step or two-phase;
    `dtype`: the service's --dtype."""
    plan = plan_for(model, args)
    clients = args.clients if model == "annotator" else args.generator_clients
    with tempfile.TemporaryDirectory(prefix=f"hotswap-{model}-") as tmp:
        data = Path(tmp)
        print(f"[{model}, {watch}, {mode}] preparing", flush=True)
        variants = prepare_store(data, model)
        store = ModelStore(data / "store")
        port = free_port()
        log = out / f"hotswap-{model}-{watch}-{mode}{dtype_suffix(args, dtype)}-service{args.tag}.log"
        proc = start_service(
            data, port, model, args.watch_interval_s, log, events=watch == "push", device=(args.device, dtype)
        )
        target = f"127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while not (data / "tokens.json").exists():
                assert time.monotonic() < deadline and proc.poll() is None, "the service did not start"
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.2)
            token = read_token(data / "tokens.json", "client")
            await wait_ready(target, token, model)
            load = Load(target, token, model, clients, args.max_new_tokens)
            runner = asyncio.create_task(load.run())
            await asyncio.sleep(args.warmup_s)
            load_before = os.getloadavg()[0]
            steady_windows: list[tuple[float, float]] = []
            swap_windows: list[tuple[float, float]] = []
            publishes: list[dict[str, Any]] = []
            parent = "v0"
            print(
                f"[{model}] {plan.cycles} cycles: {plan.window_s:.0f}s without swaps, {plan.window_s:.0f}s with "
                f"a publish every {plan.every_s:.0f}s, {plan.cooldown_s:.0f}s cool-down",
                flush=True,
            )
            for _ in range(plan.cycles):
                t = time.monotonic()
                await asyncio.sleep(plan.window_s)
                steady_windows.append((t, time.monotonic()))
                w0 = time.monotonic()
                for i in range(plan.per_window):
                    await asyncio.sleep(max(0.0, w0 + 0.5 + i * plan.every_s - time.monotonic()))
                    src = variants[len(publishes) % 2]
                    p = await asyncio.to_thread(publish, store, model, src, parent, mode, args.stage_wait_s)
                    publishes.append(p)
                    parent = p["version"]
                await asyncio.sleep(max(0.0, w0 + plan.window_s - time.monotonic()))
                swap_windows.append((w0, time.monotonic()))
                await asyncio.sleep(plan.cooldown_s)
            load.stop.set()
            await runner
        finally:
            proc.terminate()
            proc.wait(60)
    steady0, swap1 = steady_windows[0][0], swap_windows[-1][1]
    calls = load.calls
    swaps = []
    for p in publishes:
        v, t = p["version"], p["latest_at"]
        first = min((c.end for c in calls if c.version == v), default=None)
        later = [q["version"] for q in publishes if q["latest_at"] > t]
        last_old = max(
            (c.end for c in calls if c.code == "OK" and c.version != v and c.version not in later and c.end > t),
            default=None,
        )
        swaps.append(
            {
                "version": v,
                "publish_to_first_response_s": None if first is None else first - t,  # LATEST moved -> first
                "call_to_first_response_s": None if first is None else first - p["call_start"],
                "publish_call_s": round(t - p["call_start"], 3),
                "stage_wait_s": p["stage_wait_s"],
                "publish_to_last_old_response_s": None if last_old is None else last_old - t,
            }
        )
    published_at = {p["version"]: p["latest_wall"] for p in publishes}
    text = log.read_text()
    costs = {m[3]: (m[5], float(m[4])) for m in STAGE_LINE.finditer(text) if m[2] == model}
    service_swaps = []
    for m in SWAP_LINE.finditer(text):
        if m[2] != model or m[3] not in published_at:
            continue
        switched = dt.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the log's local time
        staged = "staged before LATEST moved" in m[5]
        cost = LOAD_COST.search(costs[m[3]][0] if staged and m[3] in costs else m[5])
        service_swaps.append(
            {
                "version": m[3],
                "publish_to_switch_s": round(switched - published_at[m[3]], 3),
                "swap_s": float(m[4]),
                "staged": staged,
                "stage_s": costs[m[3]][1] if staged and m[3] in costs else None,
                **(
                    {}
                    if cost is None
                    else {
                        "read_and_checked_mb": float(cost[1]),
                        "reused_files": int(cost[2]),
                        "load_s": float(cost[3]),
                        "checks_s": float(cost[4]),
                    }
                ),
            }
        )
    versions = [p["version"] for p in publishes]
    to_new = [s["publish_to_first_response_s"] for s in swaps if s["publish_to_first_response_s"] is not None]
    steady = window_stats(calls, steady_windows)
    swapping = window_stats(calls, swap_windows)
    served = {c.version for c in calls if c.code == "OK"}
    result = {
        "model": model,
        "watch": watch,
        "publish": mode,
        "dtype": dtype,
        "dtype_resolved": resolved_dtype(args.device, dtype),
        "clients": clients,
        "request": "annotate, 1 review of 35-60 words"
        if model == "annotator"
        else f"generate, max_new_tokens={args.max_new_tokens}, temperature 0.7",
        "watch_interval_s": args.watch_interval_s,
        "swap_every_s": plan.every_s,
        "plan": {"cycles": plan.cycles, "window_s": plan.window_s, "cooldown_s": plan.cooldown_s},
        "steady": steady,
        "swapping": swapping,
        "p99_ratio_swapping_vs_steady": swapping["p99_ms"] / steady["p99_ms"] if steady["p99_ms"] else None,
        "p50_ratio_swapping_vs_steady": swapping["p50_ms"] / steady["p50_ms"] if steady["p50_ms"] else None,
        "swaps": swaps,
        "loadavg_1min_before_and_after": [load_before, os.getloadavg()[0]],
        "publish_to_first_response_s": {
            "median": pct(to_new, 0.5),
            "max": max(to_new, default=None),
            "n": len(to_new),
        },
        "publish_call_s_median": pct([s["publish_call_s"] for s in swaps], 0.5),
        "call_to_first_response_s_median": pct(
            [s["call_to_first_response_s"] for s in swaps if s["call_to_first_response_s"] is not None], 0.5
        ),
        "service_swap_seconds": service_swaps,
        "versions_published": versions,
        "every_response_names_a_published_version": served <= {"v0", *versions},
        "errors_total": sum(1 for c in calls if c.code != "OK"),
        "timeline": {
            "start": steady0,
            "steady_windows": steady_windows,
            "swap_windows": swap_windows,
            "publishes": [p["latest_at"] for p in publishes],
        },
        "_calls": [(c.start, c.end, c.version, c.code) for c in calls if steady0 - 1 <= c.start < swap1],
    }
    print(
        f"[{model}, {watch}, {mode}] steady p50 {steady['p50_ms']:.0f} ms p99 {steady['p99_ms']:.0f} ms | swapping p50 "
        f"{swapping['p50_ms']:.0f} ms p99 {swapping['p99_ms']:.0f} ms | publish->new median "
        f"{result['publish_to_first_response_s']['median']} max {result['publish_to_first_response_s']['max']} "
        f"| publish call median {result['publish_call_s_median']} s "
        f"| errors {result['errors_total']}",
        flush=True,
    )
    return result


def resolved_dtype(device: str, dtype: str) -> str:
    """What the service's `--device` / `--dtype` resolve to on this machine (the service runs here too)."""
    from loopserve.device import dtype_name, pick_device, pick_dtype

    return dtype_name(pick_dtype(dtype, pick_device(device)))


def dtype_suffix(args: argparse.Namespace, dtype: str) -> str:
    """Names of results and logs carry the dtype only when the run compares several."""
    return f"-{dtype}" if len(args.dtypes) > 1 else ""


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(13, 4.3 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        tl = r["timeline"]
        t0 = tl["start"]
        ok = [c for c in r["_calls"] if c[3] == "OK"]
        bad = [c for c in r["_calls"] if c[3] != "OK"]
        ax.scatter([c[1] - t0 for c in ok], [1000 * (c[1] - c[0]) for c in ok], s=4, alpha=0.5, label="response")
        if bad:
            ax.scatter([c[1] - t0 for c in bad], [1000 * (c[1] - c[0]) for c in bad], s=14, c="red", label="error")
        for i, (a, b) in enumerate(tl["steady_windows"]):
            ax.axvspan(a - t0, b - t0, color="0.92", zorder=0, label="window without swaps" if i == 0 else None)
            ax.hlines(
                r["steady"]["p99_ms"], a - t0, b - t0, colors="k", lw=1, label="p99, no swaps" if i == 0 else None
            )
        for i, (a, b) in enumerate(tl["swap_windows"]):
            ax.axvspan(
                a - t0, b - t0, color="tab:orange", alpha=0.06, zorder=0, label="window with swaps" if i == 0 else None
            )
            ax.hlines(
                r["swapping"]["p99_ms"], a - t0, b - t0, colors="tab:red", lw=1, label="p99, swaps" if i == 0 else None
            )
        for i, t in enumerate(tl["publishes"]):
            ax.axvline(t - t0, c="tab:orange", ls="--", lw=1, label="LATEST moved" if i == 0 else None)
            first = r["swaps"][i]["publish_to_first_response_s"]
            if first is not None:
                ax.axvline(
                    t - t0 + first, c="tab:green", ls=":", lw=1, label="first response on it" if i == 0 else None
                )
        ax.set_yscale("log")
        ax.set_xlabel("seconds")
        ax.set_ylabel("latency (ms)")
        to_new = r["publish_to_first_response_s"]["median"]
        ax.set_title(
            f"{r['model']} ({r['publish']}, {r['watch']}, {r['dtype_resolved']}): {r['clients']} clients; "
            f"p50/p99 {r['steady']['p50_ms']:.0f}/{r['steady']['p99_ms']:.0f} ms "
            f"without swaps, {r['swapping']['p50_ms']:.0f}/{r['swapping']['p99_ms']:.0f} ms with a publish every "
            f"{r['swap_every_s']:.0f}s; publish->first response on it, median {to_new or float('nan'):.2f}s; "
            f"errors {r['errors_total']}",
            fontsize=9,
        )
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7, ncol=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def bench_operator_publish(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """`loopserve models publish` of a full annotator version (90 MB), run as the operator runs it, while
    the service (push watch) answers --publish-clients callers: the command's seconds (a new process:
    imports, the load-and-smoke check before publishing, copy with hashing, fsync), and LATEST
    replaced -> the first answer that names the new version."""
    with tempfile.TemporaryDirectory(prefix="hotswap-publish-") as tmp:
        data = Path(tmp)
        for v in prepare_store(data, "annotator"):
            shutil.rmtree(v)
        store = ModelStore(data / "store")
        base = store.path("annotator", "v0")
        port = free_port()
        proc = start_service(
            data,
            port,
            "annotator",
            args.watch_interval_s,
            out / f"hotswap-publish-service{args.tag}.log",
            events=True,
            device=(args.device, args.dtypes[0]),
        )
        target = f"127.0.0.1:{port}"
        runs: list[dict[str, Any]] = []
        try:
            deadline = time.monotonic() + 60
            while not (data / "tokens.json").exists():
                assert time.monotonic() < deadline and proc.poll() is None, "the service did not start"
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.2)
            token = read_token(data / "tokens.json", "client")
            await wait_ready(target, token, "annotator")
            load = Load(target, token, "annotator", args.publish_clients, args.max_new_tokens)
            runner = asyncio.create_task(load.run())
            await asyncio.sleep(args.warmup_s)
            for k in range(args.publishes):
                src = perturbed(base, data / f"operator-{k}", "annotator", 10 + k)
                mode = ("one-step", "two-phase")[k % 2]
                wait = ["--stage-wait-s", "0"] if mode == "one-step" else []
                t0 = time.monotonic()
                cmd = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "loopserve", "models", "publish", "--model", "annotator",
                    "--from", str(src), "--data-dir", str(data), "--log-level", "WARNING", *wait,
                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )  # fmt: skip
                _, stderr = await cmd.communicate()
                seconds = time.monotonic() - t0
                assert cmd.returncode == 0, stderr.decode()[-500:]
                version = store.latest("annotator") or ""
                wall_to_mono = time.time() - time.monotonic()
                latest_at = (store.model_folder("annotator") / "LATEST").stat().st_mtime - wall_to_mono
                deadline = time.monotonic() + 30
                first = None
                while first is None and time.monotonic() < deadline:
                    first = min((c.end for c in load.calls if c.version == version), default=None)
                    await asyncio.sleep(0.01)
                runs.append(
                    {
                        "publish": mode,
                        "version": version,
                        "publish_command_s": round(seconds, 3),
                        "latest_to_first_response_s": None if first is None else round(first - latest_at, 3),
                    }
                )
                print(f"[models publish] {runs[-1]}", flush=True)
                await asyncio.sleep(2.0)
            load.stop.set()
            await runner
        finally:
            proc.terminate()
            proc.wait(60)
    out_doc: dict[str, Any] = {"clients": args.publish_clients, "runs": runs}
    for mode in ("one-step", "two-phase"):
        mine = [r for r in runs if r["publish"] == mode]
        to_new = [r["latest_to_first_response_s"] for r in mine if r["latest_to_first_response_s"] is not None]
        secs = [r["publish_command_s"] for r in mine]
        out_doc[mode] = {
            "publish_command_s": {"median": pct(secs, 0.5), "max": max(secs, default=None)},
            "latest_to_first_response_s": {"median": pct(to_new, 0.5), "max": max(to_new, default=None)},
        }
    out_doc["errors_total"] = sum(1 for c in load.calls if c.code != "OK")
    return out_doc


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="annotator,generator")
    ap.add_argument("--publish", default="one-step,two-phase", help="how versions are published (module doc)")
    ap.add_argument("--stage-wait-s", type=float, default=30.0, help="two-phase: the publisher's wait bound")
    ap.add_argument("--watches", default="push", help="push (file events + polling) and/or poll (events off)")
    ap.add_argument("--clients", type=int, default=16, help="annotator clients")
    ap.add_argument("--generator-clients", type=int, default=8)
    ap.add_argument("--cycles", type=int, default=2, help="(window without swaps, window with swaps) pairs")
    ap.add_argument("--window-s", type=float, default=10.0, help="annotator window length")
    ap.add_argument("--generator-window-s", type=float, default=16.0)
    ap.add_argument("--warmup-s", type=float, default=5.0)
    ap.add_argument("--annotator-swap-every-s", type=float, default=3.0)
    ap.add_argument("--generator-swap-every-s", type=float, default=6.0)
    ap.add_argument("--watch-interval-s", type=float, default=0.25, help="the poll interval (both watches)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--publishes", type=int, default=4, help="`loopserve models publish` runs, alternating (0: skip)")
    ap.add_argument("--publish-clients", type=int, default=8)
    ap.add_argument("--device", default="auto", help="the service's --device")
    ap.add_argument(
        "--dtype",
        default="auto",
        help="the service's --dtype; several, comma-separated (auto,float32), run every scenario at each in this "
        "run (the operator's publish at the first)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. -cuda)")
    args = ap.parse_args()
    args.dtypes = args.dtype.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models.split(","):
        for watch in args.watches.split(","):
            for mode in args.publish.split(","):
                for dtype in args.dtypes:
                    results.append(await bench_model(model, args, args.out, watch, mode, dtype))
    operator = await bench_operator_publish(args, args.out) if args.publishes > 0 else None
    summary: dict[str, Any] = {
        f"{r['model']}_{r['watch']}_{r['publish']}{dtype_suffix(args, r['dtype'])}": {
            "dtype": r["dtype_resolved"],
            "publish_to_first_response_s": r["publish_to_first_response_s"],
            "publish_call_s_median": r["publish_call_s_median"],
            "call_to_first_response_s_median": r["call_to_first_response_s_median"],
            "steady_p50_ms": r["steady"]["p50_ms"],
            "steady_p99_ms": r["steady"]["p99_ms"],
            "swapping_p50_ms": r["swapping"]["p50_ms"],
            "swapping_p99_ms": r["swapping"]["p99_ms"],
            "p99_ratio": r["p99_ratio_swapping_vs_steady"],
            "errors": r["errors_total"],
            "service_swap_s_median": pct([s["swap_s"] for s in r["service_swap_seconds"]], 0.5),
            "publish_to_switch_s_median": pct([s["publish_to_switch_s"] for s in r["service_swap_seconds"]], 0.5),
        }
        for r in results
    }
    if operator is not None:
        summary["operator_models_publish"] = {k: v for k, v in operator.items() if k != "runs"}
    doc = {
        "machine": machine(loadavg_at_end=os.getloadavg(), device=args.device, dtype=args.dtype),
        "targets": TARGETS,
        "summary": summary,
        "results": [{k: v for k, v in r.items() if k != "_calls"} for r in results],
        "operator_models_publish": operator,
    }
    (args.out / f"hotswap{args.tag}.json").write_text(json.dumps(doc, indent=2))
    plot(results, args.out / f"hotswap{args.tag}.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
