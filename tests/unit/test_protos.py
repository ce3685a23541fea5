"""The committed stubs are exactly what `make protos` generates from protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    written = _gen_module().generate(tmp_path)
    assert written, "no stubs generated"
    drift = []
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = REPO / rel
        if not committed.is_file() or committed.read_bytes() != path.read_bytes():
            drift.append(str(rel))
    assert not drift, f"stubs drifted from protos/ (run `make protos`): {drift}"


def test_full_service_names() -> None:
    from loopserve.admin.v1 import admin_pb2
    from loopserve.feedback.v1 import feedback_pb2
    from loopserve.policy.v1 import policy_pb2
    from loopserve.reward.v1 import reward_pb2

    names = {
        s.full_name
        for m in (policy_pb2, reward_pb2, feedback_pb2, admin_pb2)
        for s in m.DESCRIPTOR.services_by_name.values()
    }
    assert names == {
        "loopserve.policy.v1.PolicyService",
        "loopserve.reward.v1.RewardService",
        "loopserve.feedback.v1.FeedbackService",
        "loopserve.admin.v1.ModelAdmin",
    }
