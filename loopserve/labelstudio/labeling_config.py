"""Which Label Studio labeling configs loopserve can serve, read from the project's XML.

Supported: one `<Choices>` (single choice) over one `<Text>`: text classification, the annotation task
the policy service serves. Everything else (spans with `<Labels>`, several `<Choices>`, multiple
choice, images, ...) is refused with a message naming what is unsupported, so `/setup` fails loudly
in Label Studio's UI instead of pre-annotating nothing.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from loopserve.errors import InvalidArgument

MAX_CONFIG_CHARS = 100_000

# Control tags that make a config more than text classification (Label Studio's tag names).
_OTHER_CONTROLS = (
    "Labels",
    "HyperTextLabels",
    "ParagraphLabels",
    "RectangleLabels",
    "PolygonLabels",
    "KeyPointLabels",
    "BrushLabels",
    "TextArea",
    "Rating",
    "Taxonomy",
    "Number",
    "DateTime",
    "Ranker",
    "Pairwise",
    "Relations",
)


class UnsupportedConfig(InvalidArgument):
    """The labeling config is valid Label Studio XML but not an annotation task loopserve serves."""


@dataclass(frozen=True)
class ChoicesTask:
    """A `<Choices name=from_name toName=to_name>` over `<Text name=to_name value="$data_key">`."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]


def parse_labeling_config(xml: str) -> ChoicesTask:
    if not isinstance(xml, str) or not xml.strip():
        raise InvalidArgument("the labeling config is empty")
    if len(xml) > MAX_CONFIG_CHARS:
        raise InvalidArgument(f"the labeling config is {len(xml)} characters long; the limit is {MAX_CONFIG_CHARS}")
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise InvalidArgument("the labeling config declares a DTD or entities; Label Studio configs need neither")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise InvalidArgument(f"the labeling config is not well-formed XML ({e})") from None
    others = sorted({el.tag for el in root.iter() if el.tag in _OTHER_CONTROLS})
    if others:
        raise UnsupportedConfig(
            f"loopserve serves text classification (one <Choices> over one <Text>); this config also has "
            f"{', '.join('<' + t + '>' for t in others)}"
        )
    choices = [el for el in root.iter("Choices")]
    if len(choices) != 1:
        raise UnsupportedConfig(
            f"loopserve serves text classification: exactly one <Choices> over a <Text>; this config has "
            f"{len(choices)} <Choices>"
        )
    control = choices[0]
    if control.get("choice", "single") != "single":
        raise UnsupportedConfig('multiple-choice <Choices> (choice="multiple") is not supported: use choice="single"')
    from_name, to_name = control.get("name", ""), control.get("toName", "")
    if not from_name or not to_name or "," in to_name:
        raise UnsupportedConfig("<Choices> needs a name and one toName")
    texts = {el.get("name"): el for el in root.iter("Text")}
    if to_name not in texts:
        raise UnsupportedConfig(f"<Choices toName={to_name!r}> must point at a <Text name={to_name!r}>")
    value = texts[to_name].get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise UnsupportedConfig(f'<Text name={to_name!r}> needs value="$<field>" naming the task data field')
    labels = tuple(el.get("value") or el.get("alias") or "" for el in control.iter("Choice"))
    if len(labels) < 2 or not all(labels) or len(set(labels)) != len(labels):
        raise UnsupportedConfig("<Choices> needs at least two <Choice value=...> with distinct values")
    return ChoicesTask(from_name=from_name, to_name=to_name, data_key=value[1:], labels=labels)


def text_classification_config(labels: list[str], data_key: str = "text") -> str:
    """The labeling config `connect` creates: a review and one single choice among `labels`."""
    choices = "\n".join(f'    <Choice value="{_attr(label)}"/>' for label in labels)
    return (
        "<View>\n"
        f'  <Text name="text" value="${data_key}"/>\n'
        '  <Choices name="label" toName="text" choice="single" showInLine="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def _attr(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
