"""Verification of model folders, shared by the hot-swap (ModelSlot) and `loopserve models publish`.

A service refuses a version unless (ModelSlot runs these in order):
1. every file matches the sha256 in its manifest, none missing or unlisted (`ModelStore.verify`);
2. it loads the way the service loads it (safetensors only; every parameter present with the shape its
   config gives; the right head kind);
3. the semantic checks pass (`check_encoder`, `check_generator`, the one set the runtimes and
   `verify_folder` both run): the label set is unchanged unless the manifest declares
   `label_set_change: true`, and a smoke batch gives finite outputs;
4. its tensors have the names and shapes of the version it replaces (`compare_tensors`), unless the
   manifest declares `label_set_change` or `architecture_change`.

`verify_folder` runs 2-4 on a folder that is not in the store yet, against the store's LATEST, so that
an operator learns before publishing what every service would refuse after.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loopserve.errors import InvalidArgument, NotFoundError, VerificationError
from loopserve.models.store import ModelStore

# Manifest meta keys that declare an intended change (set by the publisher, read by the verifier).
LABEL_SET_CHANGE = "label_set_change"
ARCHITECTURE_CHANGE = "architecture_change"

SMOKE_TEXTS = ("smoke test: a short review of a product", "The tea arrived quickly and tastes great.")
SMOKE_PROMPT = "Hello"
ENCODER_MODELS = ("annotator", "reward")
KNOWN_MODELS = (*ENCODER_MODELS, "generator")


def declares(meta: Mapping[str, Any], *keys: str) -> bool:
    return any(bool(meta.get(k)) for k in keys)


# ---- tensor names and shapes, from safetensors headers (no weights read) --------------------------


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape from a .safetensors header: 8 bytes (u64 LE length) then that much JSON."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise VerificationError(f"{path.name} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise VerificationError(f"{path.name} is not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise VerificationError(f"{path.name} is not a safetensors file (bad header)") from e
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise VerificationError(f"{folder.name}: no .safetensors weights")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(read_safetensors_header(f))
    return shapes


def compare_tensors(new: Path, old: Path, *, new_name: str, old_name: str) -> None:
    """Refuse a version whose tensors are not those of the version it replaces, same shapes."""
    a, b = tensor_shapes(new), tensor_shapes(old)
    missing = sorted(set(b) - set(a))
    if missing:
        raise VerificationError(f"{new_name} lacks {len(missing)} tensors that {old_name} has, e.g. {missing[0]}")
    extra = sorted(set(a) - set(b))
    if extra:
        raise VerificationError(f"{new_name} has {len(extra)} tensors that {old_name} lacks, e.g. {extra[0]}")
    for name in sorted(a):
        if a[name] != b[name]:
            raise VerificationError(
                f"{new_name}: tensor {name} has shape {a[name]}, {old_name} has {b[name]} "
                f"(declare meta {ARCHITECTURE_CHANGE}=true for an intended change)"
            )


# ---- semantic checks ------------------------------------------------------------------------------


def check_label_set(new: list[str], old: list[str], meta: Mapping[str, Any]) -> None:
    if new != old and not declares(meta, LABEL_SET_CHANGE):
        raise VerificationError(f"label set changed from {old} to {new} without manifest meta {LABEL_SET_CHANGE}=true")


def check_finite(values: list[float], what: str) -> None:
    if not values or not all(math.isfinite(v) for v in values):
        raise VerificationError(f"smoke batch gave non-finite {what}")


def smoke_encoder(model: Any, tokenizer: Any) -> list[float]:
    """Outputs of an annotator or reward model on a small batch (pairs cross-encoded for reward)."""
    import torch

    device = next(model.parameters()).device
    if model.spec.kind == "reward":
        batch = tokenizer(list(SMOKE_TEXTS), list(reversed(SMOKE_TEXTS)), padding=True, return_tensors="pt")
    else:
        batch = tokenizer(list(SMOKE_TEXTS), padding=True, return_tensors="pt")
    kw = {"token_type_ids": batch["token_type_ids"].to(device)} if "token_type_ids" in batch else {}
    with torch.inference_mode():
        out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), **kw)
        if model.spec.kind != "reward":
            out = torch.softmax(out.float(), dim=-1)
    return [float(x) for x in out.float().flatten().cpu().tolist()]


def smoke_generator(model: Any, tokenizer: Any) -> list[float]:
    import torch

    device = next(model.parameters()).device
    ids = tokenizer(SMOKE_PROMPT, return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[:, -1, :].float()  # (1, V)
    return [float(logits.max()), float(logits.min()), float(torch.logsumexp(logits, -1))]


def check_encoder(model: Any, tokenizer: Any, old_labels: list[str] | None, meta: Mapping[str, Any]) -> None:
    """An annotator or reward version's semantic checks: the label set is the serving one's (`old_labels`,
    None: nothing serving) unless the manifest declares the change; a smoke batch gives finite outputs."""
    if old_labels is not None and model.spec.kind == "annotator":
        check_label_set(model.spec.label_names, old_labels, meta)
    check_finite(smoke_encoder(model, tokenizer), "outputs")


def check_generator(model: Any, tokenizer: Any, old_tokenizer: Any | None, meta: Mapping[str, Any]) -> None:
    """A generator version's semantic checks: a smoke prompt gives finite logits, and the vocabulary is
    the serving one's unless the manifest declares an architecture change."""
    check_finite(smoke_generator(model, tokenizer), "logits")
    if old_tokenizer is not None and not declares(meta, ARCHITECTURE_CHANGE) and len(tokenizer) != len(old_tokenizer):
        raise VerificationError(f"tokenizer vocabulary changed from {len(old_tokenizer)} to {len(tokenizer)}")


# ---- a folder before it is published --------------------------------------------------------------


def _load_encoder(model_name: str, folder: Path) -> tuple[Any, Any]:
    from loopserve.models import encoder_heads

    model = encoder_heads.load(folder)
    kind = encoder_heads.HeadSpec.read(folder).kind
    if kind != model_name:
        raise VerificationError(f"{folder.name} holds a {kind!r} head, not a {model_name!r} model")
    return model, encoder_heads.load_tokenizer(folder)


def verify_folder(model: str, src: str | Path, store: ModelStore, *, meta: Mapping[str, Any] | None = None) -> str:
    """Load `src` as a service would load a new version of `model`, run its smoke batch, and compare
    it with the store's LATEST (tensors, label set, vocabulary). Raises VerificationError with the
    reason; returns a one-line summary of what was checked."""
    src = Path(src)
    meta = dict(meta or {})
    if model not in KNOWN_MODELS:
        raise InvalidArgument(f"no verifier for model {model!r}; known: {', '.join(KNOWN_MODELS)}")
    if not src.is_dir():
        raise NotFoundError(f"no such folder: {src}")
    for f in src.rglob("*"):
        if f.is_file() and f.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}:
            raise VerificationError(f"{f.name}: weights load only through safetensors, never pickle")
    latest = store.latest(model)
    old = store.path(model, latest) if latest else None
    if model in ENCODER_MODELS:
        from loopserve.models import encoder_heads

        net, tok = _load_encoder(model, src)
        old_labels = encoder_heads.HeadSpec.read(old).label_names if old is not None else None
        check_encoder(net, tok, old_labels, meta)
    else:
        from loopserve.models import generator

        net = generator.load(src)
        tok = generator.load_tokenizer(src)
        check_generator(net, tok, generator.load_tokenizer(old) if old is not None else None, meta)
    if old is not None and not declares(meta, LABEL_SET_CHANGE, ARCHITECTURE_CHANGE):
        compare_tensors(src, old, new_name=src.name, old_name=f"{model} {latest}")
    against = f" against {model} {latest}" if latest else ""
    return f"{src} loads as a {model}, gives finite smoke outputs, and matches{against}"
