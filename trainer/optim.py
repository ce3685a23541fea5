"""Optimizers for the learners, and their state as safetensors + JSON (checkpoints never use pickle).

`encoder_optimizer` gives the encoder and the freshly initialised head separate learning rates: the
pretrained encoder needs a small one (large steps destroy what it learnt in pre-training), while the
head starts far from its optimum and needs a large one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def encoder_optimizer(
    model: nn.Module, encoder_lr: float, head_lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW over `model.encoder` (lr `encoder_lr`) and `model.head` (lr `head_lr`).

    Biases and LayerNorm weights get no weight decay (BERT's recipe)."""
    groups: list[dict[str, Any]] = []
    for part, lr in (("encoder", encoder_lr), ("head", head_lr)):
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in getattr(model, part).named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW([g for g in groups if g["params"]])


def lm_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the parameters that train (all of them, or only the LoRA adapters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def save_optimizer(opt: torch.optim.Optimizer, folder: Path, name: str) -> list[Path]:
    """Write `<name>.safetensors` (every state tensor) and `<name>.json` (the rest); returns the paths."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    st_path, js_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    save_file(tensors, str(st_path))
    js_path.write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))
    return [st_path, js_path]


def load_optimizer(opt: torch.optim.Optimizer, folder: Path, name: str) -> bool:
    """Load state written by `save_optimizer` into `opt`; False (and `opt` untouched) when absent or
    when it does not fit `opt`'s parameters."""
    st_path, js_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    if not (st_path.is_file() and js_path.is_file()):
        return False
    meta = json.loads(js_path.read_text())
    tensors = load_file(str(st_path))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    for index, fields in meta["scalars"].items():
        state.setdefault(int(index), {}).update(fields)
    groups = meta["param_groups"]
    current = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        return False
    params = [p for g in opt.param_groups for p in g["params"]]
    for idx, st in state.items():
        avg = st.get("exp_avg")
        if idx >= len(params) or (avg is not None and avg.shape != params[idx].shape):
            return False
    for g, c in zip(groups, current, strict=True):
        g["lr"], g["weight_decay"] = c["lr"], c["weight_decay"]  # the config of this run wins
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError):
        return False
    return True
