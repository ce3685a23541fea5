"""Training examples: what the log consumer turns feedback records into, one type per use.

Each example remembers the `seq` of the log record it came from, so a checkpoint can be audited
(every seq at most once) and so held-out membership can be decided from content alone (`heldout`).

Serialised as plain JSON objects (`to_dict` / `example_from_dict`): the checkpoint holds them as JSON
lines, never pickle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class LabelExample:
    """A human-verified label for an item: from an accept (the served label was right) or a correction."""

    text: str
    label: str
    event_id: str
    seq: int
    source: str = "accept"
    """"accept" | "correction"."""


@dataclass(frozen=True, slots=True)
class BanditExample:
    """A rejected label: bandit feedback with reward 0 for action `label` on context `text`."""

    text: str
    label: str
    propensity: float
    """Probability the serving policy gave `label` (the logging policy's pi_0(a|x))."""
    event_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """`chosen` is preferred over `rejected` as an answer to `prompt`."""

    prompt: str
    chosen: str
    rejected: str
    seq: int
    source: str = "events"
    """"events" (two served generations) | "texts" (carried by the event) | "edit" (edited over served)."""


@dataclass(frozen=True, slots=True)
class RatingExample:
    """A rating of a served generation, normalised to [0, 1]: (value - min) / (max - min)."""

    prompt: str
    response: str
    target: float
    seq: int


@dataclass(frozen=True, slots=True)
class PointwiseExample:
    """Accept (1.0) or reject (0.0) of a served generation."""

    prompt: str
    response: str
    target: float
    seq: int


@dataclass(frozen=True, slots=True)
class Demonstration:
    """A response a person wrote for `prompt`: the generator's supervised fine-tuning target."""

    prompt: str
    response: str
    seq: int
    source: str = "edit"
    """"edit" (the corrected text of a served generation) | "import" (a demonstration record brought in
    with `loopserve log import --demonstrations`)."""


@dataclass(frozen=True, slots=True)
class LabelOutcome:
    """A served label with its logged propensity and the feedback on it: one row of the log that
    off-policy evaluation (trainer/ope.py) weighs candidates on."""

    text: str
    label: str
    """The label served (the decision's top label)."""
    propensity: float
    """pi_0(label | text): the probability with which the serving policy chose it."""
    reward: float
    """1 accepted (or corrected to the same label), 0 rejected or corrected to another label."""
    event_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class LoggedCompletion:
    """A completion the generator served, with the version that served it and its logged propensity
    (sequence log-probability under the request's sampling distribution): off-policy evaluation of a
    generator candidate weighs these."""

    prompt: str
    response: str
    version: str
    logprob: float
    seq: int


Example = (
    LabelExample
    | BanditExample
    | PreferencePair
    | RatingExample
    | PointwiseExample
    | Demonstration
    | LabelOutcome
    | LoggedCompletion
)

_TYPES: dict[str, type[Any]] = {
    "label": LabelExample,
    "bandit": BanditExample,
    "pair": PreferencePair,
    "rating": RatingExample,
    "pointwise": PointwiseExample,
    "demonstration": Demonstration,
    "outcome": LabelOutcome,
    "completion": LoggedCompletion,
}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def example_to_dict(ex: Example) -> dict[str, Any]:
    return {"type": _NAMES[type(ex)], **asdict(ex)}


def example_from_dict(d: Mapping[str, Any]) -> Example:
    fields = {k: v for k, v in d.items() if k != "type"}
    return _TYPES[d["type"]](**fields)


def heldout(key: str, fraction: float) -> bool:
    """Stable train / held-out split by content: the same text always lands on the same side, across
    restarts and however often it was served (so no item is trained on and evaluated on)."""
    if fraction <= 0.0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction
