"""Label Studio configs and payloads, as plain functions (no server)."""

from __future__ import annotations

import pytest

from loopserve.errors import InvalidArgument
from loopserve.labelstudio import protocol
from loopserve.labelstudio.labeling_config import (
    ChoicesTask,
    UnsupportedConfig,
    parse_labeling_config,
    text_classification_config,
)

TASK = ChoicesTask("label", "text", "text", ("great", "other"))


def test_the_config_connect_writes_is_the_task_it_serves() -> None:
    assert parse_labeling_config(text_classification_config(["great", "other"])) == TASK
    custom = '<View><Text name="review" value="$body"/><Choices name="s" toName="review"><Choice value="a"/>'
    custom += '<Choice value="b"/></Choices></View>'
    assert parse_labeling_config(custom) == ChoicesTask("s", "review", "body", ("a", "b"))


@pytest.mark.parametrize(
    ("xml", "says"),
    [
        (
            '<View><Text name="t" value="$x"/><Choices name="c" toName="t" choice="multiple">'
            '<Choice value="a"/><Choice value="b"/></Choices></View>',
            "multiple",
        ),
        (
            '<View><Text name="t" value="$x"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/>'
            '</Choices><Choices name="d" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>',
            "2 <Choices>",
        ),
        (
            '<View><Image name="i" value="$img"/><Choices name="c" toName="i"><Choice value="a"/><Choice value="b"/>'
            "</Choices></View>",
            "<Text",
        ),
        (
            '<View><Text name="t" value="x"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/>'
            "</Choices></View>",
            "$<field>",
        ),
        (
            '<View><Text name="t" value="$x"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>',
            "at least two",
        ),
        ('<View><Text name="t" value="$x"/><TextArea name="c" toName="t"/></View>', "<TextArea>"),
    ],
)
def test_unsupported_configs_say_what_is_unsupported(xml: str, says: str) -> None:
    with pytest.raises(UnsupportedConfig) as e:
        parse_labeling_config(xml)
    assert says in e.value.message


def test_hostile_configs_are_refused() -> None:
    bomb = '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaa">]><View>&a;</View>'
    for xml in (bomb, "", "<View", "x" * 200_000):
        with pytest.raises(InvalidArgument):
            parse_labeling_config(xml)


def test_project_ids_in_every_shape_label_studio_sends() -> None:
    assert protocol.project_id("12.1764500000") == 12
    assert protocol.project_id(12) == protocol.project_id({"id": 12}) == 12
    for bad in ("abc", None, True, {"id": "x"}):
        with pytest.raises(InvalidArgument):
            protocol.project_id(bad)


def test_one_idempotency_key_per_annotation_revision() -> None:
    region = {
        "id": "a" * 32,
        "from_name": "label",
        "to_name": "text",
        "type": "choices",
        "value": {"choices": ["great"]},
    }
    ann = {
        "id": 5,
        "task": 9,
        "project": 2,
        "result": [region],
        "updated_at": "2026-11-30T10:00:00Z",
        "completed_by": 3,
    }
    s = protocol.submitted_label(ann, {}, TASK)
    assert (s.label, s.task_id, s.project_id, s.annotator, s.region_ids) == (
        "great",
        9,
        2,
        "labelstudio:3",
        ("a" * 32,),
    )
    again = protocol.submitted_label(dict(ann), {}, TASK)
    edited = protocol.submitted_label(ann | {"updated_at": "2026-11-30T10:01:00Z"}, {}, TASK)
    assert protocol.idempotency_key(s) == protocol.idempotency_key(again) != protocol.idempotency_key(edited)
    assert len(protocol.idempotency_key(s)) <= 256
    with pytest.raises(InvalidArgument, match="exactly one"):
        protocol.submitted_label(ann | {"result": []}, {}, TASK)
