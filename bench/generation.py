"""Generation benchmark: continuous batching through gRPC beside static batching and the in-process model.

Four paths on the same real generator (SmolLM2-135M-Instruct), raw prompts, sampling at temperature 1
with a seed per request (so every path decodes the same tokens), `--tokens` new tokens each:
  continuous  the policy service with --gen-batching continuous (the default), 1/4/16/32 streaming clients;
  static      the same service with --gen-batching static (a batch runs until its longest row ends);
  inprocess   sampling.generate (the service's own decode loop) called directly on a batch of that size;
  hf          transformers' model.generate on the same batch (the raw model's own loop).
Per path and concurrency: generated tokens/s and time to first token (TTFT; in process: the prefill).

Head of line: 15 streams of 128 tokens decode; once each has its first token, a 4-token request is sent;
its latency over the long ones' is the ratio continuous batching exists to cut (static: ~1).

Writes bench/results/generation.json and generation.png (or --tag'd names), with the machine recorded.

    .venv/bin/python bench/generation.py [--tokens 64] [--device auto] [--dtype auto]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from loopserve.ports import free_ports  # noqa: E402

PROMPTS = [
    "Once upon a time, in a village by the sea,",
    "The recipe calls for three cups of flour and",
    "In the year 2031 the first city on the moon",
    "My favourite tea is a smoky lapsang souchong because",
    "The meeting was supposed to start at nine, but",
    "Dear customer, thank you for your order of",
    "The river had flooded twice that spring, and",
    "Chapter one. The detective looked at the letter and",
]


def prompt(i: int) -> str:
    """Request i's prompt, distinct for every i (a request of the same prompt as another would share its
    prefill in the service, sampling.prefill, and the paths would no longer do the same work)."""
    return f"{i}. {PROMPTS[i % len(PROMPTS)]}"


# ---- through the service -------------------------------------------------------------------------------


async def stream_once(c: AsyncClient, i: int, seed: int, tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    ttft = None
    n = 0
    async for msg in c.generate_stream(
        prompt(i), max_new_tokens=tokens, temperature=1.0, seed=seed, raw_prompt=True, timeout_s=600
    ):
        if ttft is None:
            ttft = time.perf_counter() - t0
        if msg.done:
            n = msg.num_tokens
    return {"ttft_s": ttft or 0.0, "latency_s": time.perf_counter() - t0, "tokens": n}


async def service_load(target: str, token: str, clients: int, rounds: int, tokens: int) -> dict[str, Any]:
    """`clients` streaming clients, each sending `rounds` requests back to back."""
    rows: list[dict[str, float]] = []

    async def client(c: AsyncClient, k: int) -> None:
        for r in range(rounds):
            rows.append(await stream_once(c, k, 1000 * k + r, tokens))

    async with AsyncClient(target, token, retry=RetryPolicy(attempts=1)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, k) for k in range(clients)))
        wall = time.perf_counter() - t0
    total = sum(r["tokens"] for r in rows)
    return {
        "clients": clients,
        "requests": len(rows),
        "tokens": total,
        "tokens_per_s": total / wall,
        "ttft_median_s": statistics.median(r["ttft_s"] for r in rows),
        "ttft_max_s": max(r["ttft_s"] for r in rows),
        "latency_median_s": statistics.median(r["latency_s"] for r in rows),
    }


async def head_of_line(target: str, token: str, long_n: int, long_tokens: int, short_tokens: int) -> dict[str, Any]:
    """`long_n` long streams decode; a short request is sent once each has its first token."""
    async with AsyncClient(target, token, retry=RetryPolicy(attempts=1)) as c:
        started = [asyncio.Event() for _ in range(long_n)]
        times: list[float] = []

        async def long(k: int) -> None:
            t0 = time.perf_counter()
            async for _ in c.generate_stream(
                prompt(k), max_new_tokens=long_tokens, temperature=1.0, seed=k, raw_prompt=True, timeout_s=600
            ):
                started[k].set()
            times.append(time.perf_counter() - t0)

        tasks = [asyncio.create_task(long(k)) for k in range(long_n)]
        for e in started:
            await e.wait()
        t0 = time.perf_counter()
        short = await c.generate(
            prompt(99), max_new_tokens=short_tokens, temperature=1.0, seed=99, raw_prompt=True, timeout_s=600
        )
        short_s = time.perf_counter() - t0
        await asyncio.gather(*tasks)
    long_mean = statistics.mean(times)
    return {
        "long_requests": long_n,
        "long_tokens": long_tokens,
        "short_tokens": short.completions[0].num_tokens,
        "short_latency_s": short_s,
        "long_latency_mean_s": long_mean,
        "ratio": short_s / long_mean,
    }


async def run_service(
    data: Path, batching: str, args: argparse.Namespace, levels: list[int], hol: bool
) -> dict[str, Any]:
    port, mport = free_ports(2)
    ensure_token_file(data / "tokens.json")
    flags = [
        "--gen-batching",
        batching,
        "--gen-max-batch-size",
        str(max(levels)),
        "--max-new-tokens-cap",
        str(max(args.tokens, args.long_tokens)),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    proc = start_policy(data, port, mport, flags)
    target = f"127.0.0.1:{port}"
    token = read_token(data / "tokens.json", "client")
    try:
        await asyncio.to_thread(wait_until_serving, target, 300)
        await service_load(target, token, 2, 1, 8)  # warm-up
        rows = []
        for n in levels:
            r = await service_load(target, token, n, args.rounds, args.tokens)
            rows.append(r)
            print(
                f"  {batching:10s} clients={n:3d}: {r['tokens_per_s']:8.1f} tokens/s  TTFT median "
                f"{r['ttft_median_s']:.3f} s (max {r['ttft_max_s']:.3f})",
                flush=True,
            )
        out: dict[str, Any] = {"load": rows}
        if hol:
            h = await head_of_line(target, token, args.long_n, args.long_tokens, args.short_tokens)
            out["head_of_line"] = h
            print(
                f"  {batching:10s} head of line: short {h['short_latency_s']:.2f} s, long ones "
                f"{h['long_latency_mean_s']:.2f} s: ratio {h['ratio']:.3f}",
                flush=True,
            )
        return out
    finally:
        proc.terminate()
        proc.wait(60)


# ---- in process ------------------------------------------------------------------------------------------


def in_process(folder: Path, args: argparse.Namespace, levels: list[int]) -> dict[str, list[dict[str, Any]]]:
    import torch

    from loopserve.device import configure_threads, pick_device, pick_dtype
    from loopserve.models import generator
    from policy_service import sampling
    from policy_service.types import SamplingParams

    configure_threads()
    device = pick_device(args.device)
    model = generator.load(folder, device, pick_dtype(args.dtype, device))
    tok = generator.load_tokenizer(folder)
    params = SamplingParams(max_new_tokens=args.tokens, temperature=1.0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours(b: int) -> tuple[int, float, float]:
        first: list[float] = []
        reqs = []
        for k in range(b):
            ids = tok(prompt(k), add_special_tokens=False)["input_ids"]
            req = sampling.SequenceRequest(list(ids), params, row_seed=1000 * k)
            req.on_token = lambda d: first.append(time.perf_counter()) if not first else None
            reqs.append(req)
        t0 = time.perf_counter()
        res = sampling.generate(model, tok, reqs)
        sync()
        wall = time.perf_counter() - t0
        return sum(len(r.token_ids) for r in res), wall, (first[0] - t0) if first else wall

    def hf(b: int) -> tuple[int, float, float]:
        enc = tok([prompt(k) for k in range(b)], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=args.tokens,
                pad_token_id=tok.pad_token_id,
            )
        sync()
        wall = time.perf_counter() - t0
        new = out[:, enc["input_ids"].shape[1] :]
        eos = tok.eos_token_id
        tokens = sum(int((row != eos).sum()) if eos is not None else row.numel() for row in new)
        return tokens, wall, float("nan")

    result: dict[str, list[dict[str, Any]]] = {"inprocess": [], "hf": []}
    ours(2)  # warm-up
    hf(2)
    for b in levels:
        for name, fn in (("inprocess", ours), ("hf", hf)):
            walls, toks, ttfts = [], [], []
            for _ in range(args.rounds):
                n, wall, ttft = fn(b)
                walls.append(wall)
                toks.append(n)
                ttfts.append(ttft)
            row = {
                "batch": b,
                "tokens": sum(toks),
                "tokens_per_s": sum(toks) / sum(walls),
                "ttft_s": statistics.median(ttfts),
            }
            result[name].append(row)
            print(
                f"  {name:10s} batch={b:3d}: {row['tokens_per_s']:8.1f} tokens/s  prefill {row['ttft_s']:.3f} s",
                flush=True,
            )
    return result


# ---- report ----------------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in ("continuous", "static"):
        rows = result[name]["load"]
        a.plot([r["clients"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=f"gRPC, {name}")
        b.plot([r["clients"] for r in rows], [r["ttft_median_s"] for r in rows], "o-", label=f"gRPC, {name}")
    for name, label in (("inprocess", "in-process decode loop"), ("hf", "in-process HF generate")):
        rows = result[name]
        a.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], "s--", label=label)
    b.plot(
        [r["batch"] for r in result["inprocess"]],
        [r["ttft_s"] for r in result["inprocess"]],
        "s--",
        label="in-process prefill",
    )
    for ax, title, unit in ((a, "generated tokens/s", "tokens/s"), (b, "time to first token (median)", "s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (in process: batch size)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=8)
    names = [n for n in ("continuous", "static") if "head_of_line" in result[n]]
    c.bar(names, [result[n]["head_of_line"]["ratio"] for n in names], color=["tab:blue", "tab:orange"][: len(names)])
    c.axhline(0.25, color="grey", ls=":", label="target < 0.25")
    c.set_title("4-token request sent while 15 x 128 decode:\nits latency / theirs")
    c.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"{m.get('gpu') or m['cpu']} ({m['device']}, {m['dtype']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,4,16,32", help="concurrency levels (in process: batch sizes)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request in the load runs")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client (in process: repeats)")
    ap.add_argument("--long-n", type=int, default=15)
    ap.add_argument("--long-tokens", type=int, default=128)
    ap.add_argument("--short-tokens", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--store", type=Path, default=REPO / ".loopserve" / "store", help="where the base version is")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. -cuda)")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    real = ModelStore(args.store)
    provision.pull(real, models=["generator"])
    version = real.latest("generator")
    assert version
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        store = ModelStore(data / "store")
        store.publish_version("generator", real.path("generator", version))
        provision.pull(real, models=["annotator"])  # the service serves an annotator too
        annotator = real.latest("annotator")
        assert annotator
        store.publish_version("annotator", real.path("annotator", annotator))
        print("in process:", flush=True)
        result.update(in_process(real.path("generator", version), args, levels))
        for batching in ("continuous", "static"):
            print(f"gRPC, {batching} batching:", flush=True)
            result[batching] = await run_service(data, batching, args, levels, hol=True)
    from loopserve.device import dtype_name, pick_device, pick_dtype

    device = pick_device(args.device)
    result["machine"] = machine(device=str(device), dtype=dtype_name(pick_dtype(args.dtype, device)))
    result["settings"] = {k: str(v) for k, v in vars(args).items()}
    cont = {r["clients"]: r for r in result["continuous"]["load"]}
    inproc = {r["batch"]: r for r in result["inprocess"]}
    hf = {r["batch"]: r for r in result["hf"]}
    result["summary"] = {
        "head_of_line_ratio_continuous": result["continuous"]["head_of_line"]["ratio"],
        "head_of_line_ratio_static": result["static"]["head_of_line"]["ratio"],
        "tokens_per_s_ratio_at_16_vs_inprocess": cont[16]["tokens_per_s"] / inproc[16]["tokens_per_s"]
        if 16 in cont and 16 in inproc
        else None,
        "tokens_per_s_ratio_at_16_vs_hf_generate": cont[16]["tokens_per_s"] / hf[16]["tokens_per_s"]
        if 16 in cont and 16 in hf
        else None,
        "targets": {"head_of_line_ratio": "< 0.25", "tokens_per_s_ratio_at_16": ">= 0.8"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"generation{args.tag}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"generation{args.tag}.png")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    asyncio.run(main())
