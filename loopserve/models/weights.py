"""Reading weights: safetensors only, every tensor checked finite, the bytes checked once.

A NaN or infinite value in any tensor refuses the whole version, even in a row the smoke batch never
touches (one word-embedding row is enough to poison every text that uses its token). The check is one
reduction a tensor: a finite sum proves every element finite (NaN and inf propagate through a sum);
only a sum that is not finite (a real NaN / inf, or an overflow) pays for the element-wise check.

A published version's file is read through the store's `VersionReader`: streamed into a buffer of our
own and hashed in that same pass, and the tensors are views of that buffer (no copy, no second read).
The safetensors library parses only from a file (its mmap would hand the loader whatever the file holds
*then*, not the bytes that were hashed) or from `bytes` (a copy of every tensor), so the format
(https://github.com/huggingface/safetensors#format) is parsed here with the library's own checks:
a bounded JSON header, known dtypes, and tensors that tile the data area exactly, in order, with no
gap, overlap or byte left over. No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import torch

from loopserve.errors import VerificationError
from loopserve.models.store import VersionReader, file_buffer

MAX_HEADER_BYTES = 100 << 20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


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


def parse_safetensors(buf: bytearray | mmap.mmap, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buf`, as views of it (CPU, writable, no copy)."""

    def bad(why: str) -> VerificationError:
        return VerificationError(f"{where} is not a readable safetensors file ({why})")

    if len(buf) < 8:
        raise bad("too short")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > MAX_HEADER_BYTES or 8 + n > len(buf):
        raise bad(f"header of {n} bytes")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except (ValueError, UnicodeDecodeError):
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    base = 8 + n
    entries = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {str(name)[:80]!r}: bad dtype, shape or offsets") from None
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {str(name)[:80]!r}: its offsets do not fit its shape")
        entries.append((begin, end, name, dtype, shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    pos = 0
    for begin, end, name, *_ in entries:
        if begin != pos:
            raise bad(f"tensor {str(name)[:80]!r}: a gap or an overlap before it")
        pos = end
    if base + pos != len(buf):
        raise bad(f"{len(buf) - base - pos} bytes after the last tensor")
    out: dict[str, torch.Tensor] = {}
    for begin, end, name, dtype, shape in entries:
        if end == begin:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=base + begin)
        if (base + begin) % dtype.itemsize:
            t = t.clone()  # keep every tensor aligned to its element size
        out[name] = t.reshape(shape)
    return out


def read_tensors(path: Path, reader: VersionReader | None = None) -> dict[str, torch.Tensor]:
    """`path` (a .safetensors file) -> its tensors on the CPU, every one checked finite.

    With `reader` (a published version), the file is checked against its manifest digest in the one
    pass that reads it; without (a folder not published yet), it is only read. VerificationError
    names the file and the reason when it is missing, garbled, or holds a non-finite value."""
    where = f"{path.parent.name}/{path.name}"
    if reader is not None:
        buf = reader.read(path.relative_to(reader.folder).as_posix())
    else:
        try:
            with path.open("rb", buffering=0) as f:
                size = path.stat().st_size
                buf = file_buffer(size)
                view = memoryview(buf)
                n = 0
                while n < size and (got := f.readinto(view[n:])):
                    n += got
                view.release()
                if n < size:
                    raise VerificationError(f"{where} shrank while it was read")
        except FileNotFoundError:
            raise VerificationError(f"{where} is missing") from None
        except OSError as exc:
            raise VerificationError(f"{where} cannot be read ({type(exc).__name__})") from None
    state = parse_safetensors(buf, where)
    bad = first_non_finite(state)
    if bad is not None:
        raise VerificationError(f"{where}: tensor {bad} holds NaN or infinite values")
    return state
