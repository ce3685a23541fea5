"""Demonstrations (a prompt and the response a person wrote for it) as feedback-log records.

The generator's supervised fine-tuning learns from two sources: the corrected text of an `Edit` of a
served generation, and demonstrations written outside the system (a labelling vendor's file, a
curated set), brought in with `loopserve log import --demonstrations FILE`. Each line of FILE is a
JSON object {"prompt": "...", "response": "..."}; it becomes a generation `Decision` whose `model` is
"demonstration" (a person wrote it, no model served it), so it travels through the log, its export
and its import like every other record, and the trainer's consumer turns it into an SFT example.

The event id is a hash of the prompt and the response: importing the same file twice stores nothing
twice (the log skips decisions whose event id it holds).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator

from loopserve.errors import InvalidArgument
from loopserve.feedback_log.records import Decision
from loopserve.feedback_log.validation import validate_decision

DEMONSTRATION_MODEL = "demonstration"
"""The `model` of a decision a person wrote rather than a model served."""


def demonstration_decision(prompt: str, response: str, task: str = "chat") -> Decision:
    """A demonstration as a generation decision (propensity log 1 = 0: it was not sampled)."""
    digest = hashlib.blake2b(f"{prompt}\x00{response}".encode(), digest_size=12).hexdigest()
    return Decision(
        event_id=f"demo-{digest}",
        task=task,
        kind="generation",
        input_text=prompt,
        output=response,
        propensity=0.0,
        propensity_kind="logprob",
        model=DEMONSTRATION_MODEL,
        model_version="human",
    )


def read_demonstrations(lines: Iterable[str], task: str = "chat") -> Iterator[Decision]:
    """Decisions from {"prompt", "response"} JSON lines; a bad line raises InvalidArgument naming the
    line, never quoting its text."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise InvalidArgument(f"line {lineno}: not JSON") from None
        if not isinstance(obj, dict):
            raise InvalidArgument(f"line {lineno}: expected an object with prompt and response")
        prompt, response = obj.get("prompt"), obj.get("response")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidArgument(f"line {lineno}: prompt must be a non-empty string")
        if not isinstance(response, str) or not response.strip():
            raise InvalidArgument(f"line {lineno}: response must be a non-empty string")
        decision = demonstration_decision(prompt, response, task)
        try:
            validate_decision(decision)
        except InvalidArgument as err:
            raise InvalidArgument(f"line {lineno}: {err.message}") from None
        yield decision


def as_export_lines(decisions: Iterable[Decision]) -> Iterator[str]:
    """The records in the line format of `log export` / `log import`."""
    for d in decisions:
        yield json.dumps({"type": "decision", "record": d.to_dict()}) + "\n"
