"""In-process swap cost: wall and CPU seconds of `ModelSlot.load_version`, no serving load.

Three kinds of new version, each swapped in --reps times on the real bundled models:
  - annotator, full: every file a new copy (new inodes), so all 90 MB are read and checked;
  - annotator, head only: the online tier's shape (`save_head` + `shared_files`): the encoder weights
    hard-linked to the serving version's, so the serving encoder is reused and only the head is read;
  - generator, full: 538 MB read and checked.
CPU seconds are the process's (every thread), so a swap that hashes on one thread beside loading on
another counts both. Writes bench/results/swap_load.json with the CPU model.

    .venv/bin/python bench/swap_load.py [--reps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import cpu_model  # noqa: E402
from loopserve.models import encoder_heads, provision  # noqa: E402
from loopserve.models.slot import ModelSlot  # noqa: E402
from loopserve.models.store import ModelStore  # noqa: E402
from policy_service.runtime import PolicyRuntime, RuntimeOptions  # noqa: E402


def timed_swaps(slot: ModelSlot[Any], versions: list[str]) -> dict[str, Any]:
    wall, cpu = [], []
    for v in versions:
        t0, c0 = time.perf_counter(), time.process_time()
        slot.load_version(v)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "wall_s": [round(x, 4) for x in wall],
        "cpu_s": [round(x, 4) for x in cpu],
        "wall_median_s": round(statistics.median(wall), 4),
        "cpu_median_s": round(statistics.median(cpu), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the other core serves)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    real = ModelStore(REPO / ".loopserve" / "store")
    provision.pull(real, models=["annotator", "generator"])
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="swap-load-") as tmp:
        store = ModelStore(Path(tmp) / "store")
        for name in ("annotator", "generator"):
            store.publish_version(name, real.path(name, real.latest(name) or "v0"))
        runtime = PolicyRuntime(store, RuntimeOptions(torch.device("cpu"), torch.float32))
        runtime.load()
        for name in ("annotator", "generator"):
            base = store.path(name, "v0")
            full = [store.publish_version(name, base, parent="v0", set_latest=False).version for _ in range(args.reps)]
            print(f"[{name}, full] {len(full)} swaps", flush=True)
            results[f"{name}_full"] = timed_swaps(runtime.slots()[name], full)
        slot = runtime.annotator
        heads = []
        for k in range(args.reps):
            serving = slot.current
            head = torch.nn.Linear(serving.model.model.head.in_features, serving.model.model.head.out_features)
            folder = store.path("annotator", serving.version)
            src = Path(tmp) / f"head-{k}"
            shared = encoder_heads.save_head(head, encoder_heads.HeadSpec.read(folder), src, folder)
            v = store.publish_version("annotator", src, parent=serving.version, shared_files=shared).version
            heads.append(v)
            shutil.rmtree(src)
            results.setdefault("annotator_head_only", {"wall_s": [], "cpu_s": []})
            one = timed_swaps(slot, [v])
            results["annotator_head_only"]["wall_s"] += one["wall_s"]
            results["annotator_head_only"]["cpu_s"] += one["cpu_s"]
            assert slot.current.model.model.encoder is serving.model.model.encoder
        h = results["annotator_head_only"]
        h["wall_median_s"] = round(statistics.median(h["wall_s"]), 4)
        h["cpu_median_s"] = round(statistics.median(h["cpu_s"]), 4)
        for s in runtime.slots().values():
            s.close()
    doc = {
        "machine": {"cpu_model": cpu_model(), "platform": platform.platform(), "torch_threads": args.threads},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "swap_load.json").write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: (v["wall_median_s"], v["cpu_median_s"]) for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
