"""The annotator and the reward model: a sentence encoder (all-MiniLM-L6-v2) with a small head.

Both follow Sentence-BERT (Reimers & Gurevych, 2019): mean-pool the token states over the attention
mask and L2-normalise, so the pooled vector is the sentence embedding the encoder was trained to give.

- `AnnotatorModel`: logits = head(embedding) / temperature, one logit per label. Version 0 sets each
  label's head row to the embedding of its description (zero-shot: cosine similarity to the label
  description, scaled), so it labels better than chance before any feedback.
- `RewardModel`: r = head(embedding of the (prompt, response) pair, cross-encoded as one sequence).

On disk (a model-store version folder): the encoder's `config.json` and tokenizer files,
`model.safetensors` holding every parameter (`encoder.*`, `head.*`), and `head.json` describing the
head (kind, labels, temperature). Loading builds the modules from config and copies the safetensors
tensors in, checking that every parameter is present with the right shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from loopserve.errors import VerificationError
from loopserve.models.store import Manifest, VersionReader
from loopserve.models.weights import read_tensors

HEAD_FILE = "head.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HEAD_WEIGHTS_FILE = "head.safetensors"
"""A head-only update (the annotator's online tier): `head.*` tensors that replace those in WEIGHTS_FILE,
which the version shares (hard-linked) with its parent."""


@dataclass(frozen=True)
class LabelSpec:
    name: str
    description: str


@dataclass
class HeadSpec:
    """What head.json holds."""

    kind: str  # "annotator" | "reward"
    labels: list[LabelSpec] = field(default_factory=list)
    # Softmax temperature fitted on held-out human labels, so scores are calibrated probabilities.
    temperature: float = 1.0
    task: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "task": self.task,
                "labels": [{"name": lb.name, "description": lb.description} for lb in self.labels],
                "temperature": self.temperature,
            },
            indent=2,
        )

    @classmethod
    def read(cls, folder: Path) -> HeadSpec:
        d = json.loads((folder / HEAD_FILE).read_text())
        return cls(
            kind=d["kind"],
            task=d.get("task", ""),
            labels=[LabelSpec(x["name"], x.get("description", "")) for x in d.get("labels", [])],
            temperature=float(d.get("temperature", 1.0)),
        )

    @property
    def label_names(self) -> list[str]:
        return [lb.name for lb in self.labels]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C), (B, T) -> (B, C): average of the unmasked token states, L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    summed = (hidden * m).sum(dim=1)  # (B, C)
    counts = m.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return F.normalize(summed / counts, dim=-1)


class EncoderWithHead(nn.Module):
    encoder: Any  # a transformers encoder (BertModel): has .config and .save_pretrained
    spec: HeadSpec

    def __init__(self, encoder: Any, out_features: int) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        self.head = nn.Linear(hidden, out_features)
        self.encoder_head: tuple[torch.Tensor, torch.Tensor] | None = None
        """(W, b) saved with the encoder's weights, where this model's head replaced it (a head-only
        version's head.safetensors); None where the head is the encoder's own (`encoder_head()`)."""

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return mean_pool(out.last_hidden_state, attention_mask)  # (B, C)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        # Run the head in fp32 whatever the encoder's dtype: logits feed softmax and losses.
        return self.head(self.embed(input_ids, attention_mask, **kw).float())  # (B, out)


class AnnotatorModel(EncoderWithHead):
    def __init__(self, encoder: nn.Module, spec: HeadSpec) -> None:
        super().__init__(encoder, len(spec.labels))
        self.spec = spec
        self.head.float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.logits_of(self.embed(input_ids, attention_mask, **kw))  # (B, L)

    def logits_of(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, C) embeddings -> (B, L) served logits: the head in fp32, divided by the temperature."""
        return self.head(emb.float()) / self.spec.temperature


class RewardModel(EncoderWithHead):
    def __init__(self, encoder: nn.Module, spec: HeadSpec) -> None:
        super().__init__(encoder, 1)
        self.spec = spec
        self.head.float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        return super().forward(input_ids, attention_mask, **kw).squeeze(-1)  # (B,)


def build(folder: Path, spec: HeadSpec | None = None) -> EncoderWithHead:
    """Modules from config alone (no weights): the shapes every saved version must match."""
    spec = spec or HeadSpec.read(folder)
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(folder), attn_implementation="sdpa")
    if spec.kind == "annotator":
        return AnnotatorModel(encoder, spec)
    if spec.kind == "reward":
        return RewardModel(encoder, spec)
    raise VerificationError(f"unknown head kind {spec.kind!r} in {HEAD_FILE}")


def load(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    reader: VersionReader | None = None,
    serving: tuple[EncoderWithHead, Manifest] | None = None,
) -> EncoderWithHead:
    """Load a version folder through safetensors, refusing missing, extra or mis-shaped tensors.

    `reader`: a published version's files, checked against its manifest as they are read.
    `serving`: the model being served and its manifest. When this version shares its config and
    encoder weights with it (the same files, hard-linked: a head-only update published with
    `shared_files`), the serving encoder module is reused as it is and only the head is read, so such
    a version loads in milliseconds."""
    folder = Path(folder)
    if reader is not None and serving is not None:
        reused = _load_head_only(folder, reader, *serving)
        if reused is not None:
            return reused
    with no_init_weights():  # every parameter is overwritten below: skip the random init
        model = build(folder)
    state = read_tensors(folder / WEIGHTS_FILE, reader)
    own_head = None
    if (folder / HEAD_WEIGHTS_FILE).is_file():
        head = read_tensors(folder / HEAD_WEIGHTS_FILE, reader)
        if set(head) != {k for k in state if k.startswith("head.")}:
            raise VerificationError(f"{folder.name}: {HEAD_WEIGHTS_FILE} must hold exactly the head.* tensors")
        own_head = (state["head.weight"].float().clone(), state["head.bias"].float().clone())
        state.update(head)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    # Buffers such as position_ids are rebuilt from config; only parameters are required.
    param_names = {n for n, _ in model.named_parameters()}
    missing = [m for m in missing if m in param_names]
    if missing:
        raise VerificationError(f"{folder.name}: {len(missing)} parameters missing, e.g. {missing[0]}")
    if unexpected:
        raise VerificationError(f"{folder.name}: {len(unexpected)} unexpected tensors, e.g. {unexpected[0]}")
    _check_shapes(folder, state, expected)
    # assign: the parameters become the tensors just read (views of the checked buffer), no copy.
    model.load_state_dict(state, strict=False, assign=True)
    model.encoder.to(dtype=dtype)
    for p in model.head.parameters():  # the fp32 head must not keep the whole file's buffer alive
        p.data = p.data.clone()  # once a bf16 encoder no longer uses it (a few KB copied)
    model.to(device)
    model.eval()
    if own_head is not None:
        if own_head[0].shape != model.head.weight.shape or own_head[1].shape != model.head.bias.shape:
            raise VerificationError(f"{folder.name}: the head in {WEIGHTS_FILE} does not fit head.json")
        model.encoder_head = own_head
    return model


def encoder_head(model: EncoderWithHead) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) fp32 on the CPU: the head the encoder's weights were saved with (the zero-shot head of a
    base version, the trained head of a fine-tune), whatever head `model` now serves. The online tier's
    fits start from it (trainer.head_fit's prior): a head-only version's own head was fitted on the very
    labels those fits hold out, and a prior that saw a fold's labels makes the fold's answers in-sample."""
    if model.encoder_head is not None:
        return model.encoder_head
    return model.head.weight.detach().float().cpu().clone(), model.head.bias.detach().float().cpu().clone()


def _check_shapes(folder: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise VerificationError(
                f"{folder.name}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
        if tensor.dtype != expected[name].dtype:
            state[name] = tensor.to(expected[name].dtype)


def _load_head_only(
    folder: Path, reader: VersionReader, old: EncoderWithHead, old_manifest: Manifest
) -> EncoderWithHead | None:
    """The serving encoder with this version's head, or None when the encoder cannot be reused."""
    files = reader.manifest.files
    if HEAD_WEIGHTS_FILE in files:
        head_source = "file"
    elif HEAD_WEIGHTS_FILE not in old_manifest.files:
        head_source = "serving"  # same model.safetensors, head included: the serving head is this one
    else:
        return None
    spec = HeadSpec.read(folder)
    if spec.kind != old.spec.kind or files.get(CONFIG_FILE) != old_manifest.files.get(CONFIG_FILE):
        return None  # (config.json is small: check_rest hashes it)
    if not reader.shared([WEIGHTS_FILE], old_manifest):
        return None
    model = AnnotatorModel(old.encoder, spec) if spec.kind == "annotator" else RewardModel(old.encoder, spec)
    expected = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    if head_source == "file":
        head = read_tensors(folder / HEAD_WEIGHTS_FILE, reader)
        if set(head) != set(expected):
            raise VerificationError(f"{folder.name}: {HEAD_WEIGHTS_FILE} must hold exactly the head.* tensors")
    else:
        head = {f"head.{k}": v.detach().clone() for k, v in old.head.state_dict().items()}
    _check_shapes(folder, head, expected)
    model.head.load_state_dict({k.removeprefix("head."): v for k, v in head.items()})
    model.head.to(next(old.head.parameters()).device)
    return model.eval()


def save(model: EncoderWithHead, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> None:
    """Write a complete version folder (config, tokenizer, head.json, model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.encoder.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec: HeadSpec = model.spec  # type: ignore[assignment]
    (folder / HEAD_FILE).write_text(spec.to_json())
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def save_head(head: nn.Linear, spec: HeadSpec, folder: str | Path, like: str | Path) -> list[str]:
    """Write a head-only version into `folder`: head.json and the head's tensors. Returns the files to
    share with `like` unchanged (hard-linked by `publish_version`): the encoder weights, config and
    tokenizer, so a service serving `like` reuses its encoder and tokenizer without reading them."""
    folder, like = Path(folder), Path(like)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / HEAD_FILE).write_text(spec.to_json())
    tensors = {f"head.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(folder / HEAD_WEIGHTS_FILE), metadata={"format": "pt"})
    return sorted(
        f.name for f in like.iterdir() if f.is_file() and f.name not in (HEAD_WEIGHTS_FILE, HEAD_FILE, "manifest.json")
    )


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(folder))
