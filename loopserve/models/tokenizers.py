"""Tokenizers of served versions."""

from __future__ import annotations

import copy
from typing import TypeVar

T = TypeVar("T")


def unshared(tokenizer: T) -> T:
    """A copy of the serving version's `tokenizer`, for a new version built from the same tokenizer files.

    Not the object itself. A fast tokenizer keeps its truncation and padding settings in its Rust backend
    and changes them on every call that asks for others. A loader checking the new version (a padded smoke
    batch, the reward model's reference set) and the serving thread (truncation to the window) sharing one
    object hand each other batches encoded with the other's settings: a swap refused at random ("Unable to
    create tensor", seen in CI) or a request encoded wrongly. The copy costs the loader thread about what
    reading the files again would (35 ms for MiniLM's, 90 ms for SmolLM2's on a 2-core EPYC), and nothing on
    the request path."""
    return copy.deepcopy(tokenizer)
