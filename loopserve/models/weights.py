"""Reading weights: safetensors only, and every tensor checked finite while it is read.

A NaN or infinite value in any tensor refuses the whole version, even in a row the smoke batch never
touches (one word-embedding row is enough to poison every text that uses its token). The check is one
reduction a tensor: a finite sum proves every element finite (NaN and inf propagate through a sum);
only a sum that is not finite (a real NaN / inf, or an overflow) pays for the element-wise check.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loopserve.errors import VerificationError


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if bool(torch.isfinite(tensor.sum())):
            continue
        if not bool(torch.isfinite(tensor).all()):
            return name
    return None


def load_checked(path: Path) -> dict[str, torch.Tensor]:
    """`path` (a .safetensors file) -> its tensors on the CPU; VerificationError naming the file and the
    reason when it cannot be read or holds a non-finite value."""
    where = f"{path.parent.name}/{path.name}"
    try:
        state = load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise VerificationError(f"{where} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise VerificationError(f"{where} is not a readable safetensors file ({reason})") from None
    bad = first_non_finite(state)
    if bad is not None:
        raise VerificationError(f"{where}: tensor {bad} holds NaN or infinite values")
    return state
