"""A model store with the bundled models' exact shapes and tokenizers but random weights: for speed
benchmarks on a machine the real weights cannot reach.

The GPU machine lent to this project takes at most 64 MiB per call and reaches no network, and the base
versions weigh 90 MB (annotator, reward) and 517 MB (generator). Speed depends on shapes, not on the
values of the weights, so the benchmarks there run on versions built from the real configs and
tokenizers with random weights. The one difference: a random generator almost never samples its
end-of-sequence token, so every request runs to its max_new_tokens (the real model, on the raw
prompts of bench/generation.py, mostly does too). Never use these versions for a quality figure.

    # here: the configs and tokenizers of the real base versions (a few MB)
    .venv/bin/python bench/random_weight_store.py export --store .loopserve/store --to .gpu/shapes
    # there: a store of random-weight versions with those shapes
    python3 bench/random_weight_store.py build --shapes .gpu/shapes --store .loopserve/store
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loopserve.models.store import ModelStore  # noqa: E402

MODELS = ("annotator", "reward", "generator")
WEIGHTS = {"model.safetensors", "head.safetensors", "manifest.json"}


def export(store: ModelStore, dest: Path) -> None:
    for name in MODELS:
        version = store.latest(name)
        if version is None:
            raise SystemExit(f"{name}: no version in {store.root}; run `make models` first")
        out = dest / name
        out.mkdir(parents=True, exist_ok=True)
        for f in store.path(name, version).iterdir():
            if f.is_file() and f.name not in WEIGHTS:
                shutil.copy2(f, out / f.name)
        print(f"{name} {version}: {sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB of config and tokenizer")


def build(shapes: Path, store: ModelStore, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loopserve.models import encoder_heads

    torch.manual_seed(seed)
    for name in MODELS:
        if store.latest(name) is not None:
            print(f"{name}: {store.latest(name)} present")
            continue
        src = shapes / name
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / name
            if name == "generator":
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
                model.save_pretrained(folder, safe_serialization=True)
            else:
                folder.mkdir()
                model = encoder_heads.build(src)  # random encoder and head of the saved shapes
                encoder_heads.save(model, encoder_heads.load_tokenizer(src), folder)
            for f in src.iterdir():  # the real tokenizer, config and templates
                shutil.copy2(f, folder / f.name)
            manifest = store.publish_version(name, folder, meta={"base": True, "init": f"random weights, seed {seed}"})
        print(f"{name}: {manifest.version} (random weights, the real shapes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="copy the real base versions' configs and tokenizers")
    e.add_argument("--store", type=Path, default=REPO / ".loopserve" / "store")
    e.add_argument("--to", type=Path, required=True)
    b = sub.add_parser("build", help="publish random-weight versions of those shapes")
    b.add_argument("--shapes", type=Path, required=True)
    b.add_argument("--store", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "export":
        export(ModelStore(args.store), args.to)
    else:
        build(args.shapes, ModelStore(args.store), args.seed)


if __name__ == "__main__":
    main()
