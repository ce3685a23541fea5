"""The Ray Serve path end to end: a local Ray cluster (2 CPUs, no dashboard, its session files under
the test's tmp), the policy application with two replicas and the reward application behind Ray's gRPC
proxy, called with the generated stubs as an app would. A version published to the store reaches
both replicas (each replica's own /metrics says so) while requests keep succeeding; every served item
is a decision in the feedback log, and FeedbackService takes feedback on it through the same proxy;
everything Ray started is gone afterwards.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loopserve.admin.v1 import admin_pb2, admin_pb2_grpc
from loopserve.cli.serve import build_apps, deploy, start_serve, stop_serve
from loopserve.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from loopserve.feedback_log import open_feedback_log
from loopserve.models.store import ModelStore
from loopserve.policy.v1 import policy_pb2, policy_pb2_grpc
from loopserve.ports import free_port, free_ports
from loopserve.reward.v1 import reward_pb2, reward_pb2_grpc
from loopserve.serving.ray import METRICS_PORT_STRIDE
from tests.support import tiny_models
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(300)]

CLIENT_TOKEN = "client-token-for-the-ray-test-0001"
ANNOTATOR_TOKEN = "annotator-token-for-the-ray-test-1"
ADMIN_TOKEN = "admin-token-for-the-ray-test-00002"
TOKENS = {CLIENT_TOKEN: "client", ANNOTATOR_TOKEN: "annotator", ADMIN_TOKEN: "admin"}
POLICY = (("application", "policy"), ("authorization", f"Bearer {CLIENT_TOKEN}"))
FEEDBACK = (("application", "policy"), ("authorization", f"Bearer {ANNOTATOR_TOKEN}"))
REWARD = (("application", "reward"), ("authorization", f"Bearer {CLIENT_TOKEN}"))
REWARD_ADMIN = (("application", "reward"), ("authorization", f"Bearer {ADMIN_TOKEN}"))
POLICY_ADMIN = (("application", "policy"), ("authorization", f"Bearer {ADMIN_TOKEN}"))
REVIEWS = ["Great coffee, will buy again.", "Stale and bitter, the box arrived crushed."]


def annotator_version(metrics_port: int) -> float | None:
    """`loopserve_model_version{model="annotator"}` as one replica exports it (None: not reachable)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith('loopserve_model_version{model="annotator"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_for_replicas(ports: list[int], version: float, timeout_s: float, what: str, ray_tmp: Path) -> None:
    """Wait until every replica's /metrics reports annotator `version`; on a timeout, say what each port
    answered and what Serve logged about replica ports, crashes and restarts (a CI run once timed out here with
    nothing else to go on)."""
    try:
        wait_until(lambda: all(annotator_version(p) == version for p in ports), timeout_s, what, interval_s=0.2)
    except AssertionError as timed_out:
        seen = {p: annotator_version(p) for p in ports}
        clues = ("metrics", "Traceback", "unhealthy", "died", "failed")  # a replica's port, crash or restart
        logged = [
            f"{log.name}: {line.strip()[:300]}"
            for log in sorted(ray_tmp.glob("session_*/logs/serve/*.log"))
            for line in log.read_text(errors="replace").splitlines()
            if any(clue in line for clue in clues)
        ]
        raise AssertionError(f"{timed_out}; annotator version by port: {seen}; replica logs: {logged[-20:]}") from None


def ray_processes(session_root: Path, spawned_before: set[int]) -> list[str]:
    """Processes of this test's Ray cluster: our new descendants, and anything naming its temp dir."""
    found = {}
    for p in psutil.Process().children(recursive=True):
        if p.pid not in spawned_before:
            found[p.pid] = p
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(session_root) in " ".join(p.info["cmdline"] or ()):
                found[p.pid] = p
        except psutil.Error:
            continue
    alive = []
    for pid, p in found.items():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            continue
    return alive


class Load:
    """Annotate calls from a few threads until stopped: every outcome and version, in order."""

    def __init__(self, stub: policy_pb2_grpc.PolicyServiceStub, threads: int = 3) -> None:
        self.stub = stub
        self.versions: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        request = policy_pb2.AnnotateRequest(items=[policy_pb2.Item(id=str(i), text=t) for i, t in enumerate(REVIEWS)])
        while not self._stop.is_set():
            try:
                r = self.stub.Annotate(request, metadata=POLICY, timeout=30)
                with self._lock:
                    self.versions.append(r.model_version)
            except grpc.RpcError as e:
                with self._lock:
                    self.errors.append(f"{e.code().name}: {e.details()}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def test_policy_and_reward_on_ray_serve(
    tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind the default ingress (HAProxy); tests/e2e/test_process_abuse.py answers through both."""
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray_tmp = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths must fit 107 characters
    token_file = tiny_data_dir / "tokens.json"
    token_file.write_text(json.dumps(TOKENS))
    os.chmod(token_file, 0o600)
    grpc_port = free_port()
    # replica k serves /metrics on metrics_base + METRICS_PORT_STRIDE * k: both ports free, not only the base
    (metrics_base,) = free_ports(1, stride=METRICS_PORT_STRIDE, count=2)
    log_url = str(tiny_data_dir / "feedback.sqlite3")  # replicas on one machine may share SQLite
    common = {
        "data_dir": str(tiny_data_dir),
        "token_file": str(token_file),
        "threads": 1,
        "log_level": "WARNING",
    }
    args = {
        # two policy replicas reserving half a CPU each; the reward app takes the third half
        "policy": common
        | {
            "num_replicas": 2,
            "num_cpus": 0.5,
            "generator": False,
            "watch_interval_s": 0.2,
            "metrics_port": metrics_base,
            "max_wait_ms": 2,
            "log_url": log_url,
            "dtype": "bfloat16",  # each replica serves in what its app's config says (ModelInfo.dtype below)
        },
        # the reward app batches with Ray's @serve.batch behind the Batcher protocol (ServeBatcher), the
        # policy app with the embedded batchers (the default): both paths answer through the proxy
        "reward": common
        | {"num_replicas": 1, "num_cpus": 0.5, "metrics_port": -1, "batching": "serve", "dtype": "float32"},
    }
    replica_ports = [metrics_base, metrics_base + METRICS_PORT_STRIDE]
    served = 0  # items answered, each of which must become a decision in the log
    spawned_before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        http_port = free_port()
        start_serve(grpc_port=grpc_port, http_port=http_port, num_cpus=2, temp_dir=ray_tmp, log_to_driver=False)
        deploy(build_apps(["policy", "reward"], args))
        # Ray's HTTP proxy routes /policy to the app too: it says there is no HTTP API, not 500.
        post = urllib.request.Request(f"http://127.0.0.1:{http_port}/policy", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(post, timeout=30)
        assert http.value.code == 404 and "gRPC" in http.value.read().decode()
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            policy = policy_pb2_grpc.PolicyServiceStub(channel)
            reward = reward_pb2_grpc.RewardServiceStub(channel)

            # Annotate through Ray's gRPC ingress, with the generated client and the same protos.
            items = [policy_pb2.Item(id=f"r{i}", text=t) for i, t in enumerate(REVIEWS)]
            r = policy.Annotate(policy_pb2.AnnotateRequest(items=items), metadata=POLICY, timeout=60)
            assert r.model_version == "v0"
            assert [a.item_id for a in r.annotations] == ["r0", "r1"]
            assert all(len(a.event_id) == 32 for a in r.annotations)
            assert {lb.label for lb in r.annotations[0].labels} == {"great", "other"}
            served += len(r.annotations)
            info = policy.GetModelInfo(policy_pb2.GetModelInfoRequest(), metadata=POLICY, timeout=30)
            assert (info.task, info.annotator_version, info.dtype) == ("sentiment", "v0", "bfloat16")
            reward_info = reward.GetModelInfo(reward_pb2.GetModelInfoRequest(), metadata=REWARD, timeout=30)
            assert (reward_info.model_version, reward_info.dtype) == ("v0", "float32")

            # Domain errors and auth come back as the same status codes as from the embedded server.
            with pytest.raises(grpc.RpcError) as bad:
                policy.Annotate(policy_pb2.AnnotateRequest(items=[]), metadata=POLICY, timeout=30)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "items is empty" in bad.value.details()
            with pytest.raises(grpc.RpcError) as anon:
                policy.Annotate(policy_pb2.AnnotateRequest(items=items), metadata=POLICY[:1], timeout=30)
            assert anon.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as no_gen:  # a streaming method fails the same way
                list(policy.GenerateStream(policy_pb2.GenerateRequest(prompt="Hi"), metadata=POLICY, timeout=30))
            assert no_gen.value.code() == grpc.StatusCode.FAILED_PRECONDITION

            # FeedbackService on the policy application: feedback on a served event_id is stored.
            feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
            accept = feedback_pb2.LabelAccept(event_id=r.annotations[0].event_id)
            event = feedback_pb2.FeedbackEvent(idempotency_key="ray-test-accept-0", accept=accept)
            ack = feedback.Submit(feedback_pb2.SubmitRequest(events=[event]), metadata=FEEDBACK, timeout=60)
            assert (ack.accepted, ack.rejected) == (1, 0)

            # The second application on the same proxy, chosen by the `application` metadata.
            pair = reward_pb2.Pair(prompt="Describe the coffee", response="Rich and smooth")
            s = reward.Score(reward_pb2.ScoreRequest(pairs=[pair, pair]), metadata=REWARD, timeout=60)
            assert s.model_version == "v0" and len(s.scores) == 2 and s.scores[0] == pytest.approx(s.scores[1])
            normalised = reward_pb2.ScoreRequest(pairs=[pair], scale=reward_pb2.REWARD_SCALE_NORMALISED, clip=2.0)
            n = reward.Score(normalised, metadata=REWARD, timeout=60)  # the same Frontend math as grpc.aio's
            expected = max(-2.0, min(2.0, (s.scores[0] - n.reference_mean) / n.reference_std))
            assert (n.scale, n.clip) == (reward_pb2.REWARD_SCALE_NORMALISED, 2.0)
            assert n.scores[0] == pytest.approx(expected, abs=1e-4)

            # grpc.health.v1 through the proxy, answered by the deployments (no token, as embedded).
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            for app in ("policy", "reward"):
                check = health.Check(health_pb2.HealthCheckRequest(), metadata=(("application", app),), timeout=30)
                assert check.status == serving
            watch = health.Watch(health_pb2.HealthCheckRequest(), metadata=(("application", "policy"),), timeout=30)
            assert next(iter(watch)).status == serving
            watch.cancel()

            # ModelAdmin through the proxy, with the admin role. The reward app has one replica: a
            # change reaches all of it. The policy app has two: a change is refused, reading is not.
            admin = admin_pb2_grpc.ModelAdminStub(channel)
            listed = admin.ListVersions(admin_pb2.ListVersionsRequest(), metadata=REWARD_ADMIN, timeout=30)
            assert listed.serving_version == "v0" and [v.version for v in listed.versions] == ["v0"]
            pinned = admin.Pin(admin_pb2.PinRequest(version="v0"), metadata=REWARD_ADMIN, timeout=30)
            assert (pinned.model, pinned.pinned_version) == ("reward", "v0")
            unpinned = admin.Unpin(admin_pb2.UnpinRequest(), metadata=REWARD_ADMIN, timeout=30)
            assert unpinned.pinned_version == ""
            # A staged version (LATEST stays on v0, so the store watch leaves it alone) is pushed in by
            # LoadVersion and taken back out by Rollback, both through the proxy; Score follows each.
            staged = tiny_models.tiny_reward(tmp_path_factory.mktemp("reward-v1") / "reward", seed=1)
            ModelStore(tiny_data_dir / "store").publish_version("reward", staged, parent="v0", set_latest=False)
            loaded = admin.LoadVersion(admin_pb2.LoadVersionRequest(version="v1"), metadata=REWARD_ADMIN, timeout=60)
            assert (loaded.model, loaded.model_version, loaded.previous_version) == ("reward", "v1", "v0")
            one = reward_pb2.ScoreRequest(pairs=[pair])
            assert reward.Score(one, metadata=REWARD, timeout=60).model_version == "v1"
            back = admin.Rollback(admin_pb2.RollbackRequest(), metadata=REWARD_ADMIN, timeout=60)
            assert (back.model_version, back.previous_version) == ("v0", "v1")
            assert reward.Score(one, metadata=REWARD, timeout=60).model_version == "v0"
            with pytest.raises(grpc.RpcError) as unknown:
                admin.LoadVersion(admin_pb2.LoadVersionRequest(version="v9"), metadata=REWARD_ADMIN, timeout=30)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as not_admin:
                admin.ListVersions(admin_pb2.ListVersionsRequest(), metadata=REWARD, timeout=30)
            assert not_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED
            listed = admin.ListVersions(
                admin_pb2.ListVersionsRequest(model="annotator"), metadata=POLICY_ADMIN, timeout=30
            )
            assert listed.serving_version == "v0"
            with pytest.raises(grpc.RpcError) as two_replicas:
                admin.Pin(admin_pb2.PinRequest(model="annotator", version="v0"), metadata=POLICY_ADMIN, timeout=30)
            assert two_replicas.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "several replicas" in two_replicas.value.details()

            # Each policy replica exports loopserve's metrics on its own port.
            wait_for_replicas(replica_ports, 0.0, 60, "both replicas' /metrics", ray_tmp)

            # Publish v1 while requests keep coming: both replicas swap, no request fails.
            with Load(policy) as load:
                wait_until(lambda: len(load.versions) >= 10, 60, "traffic before the swap", interval_s=0.2)
                src = tiny_models.tiny_annotator(tmp_path_factory.mktemp("v1") / "annotator", seed=1)
                ModelStore(tiny_data_dir / "store").publish_version("annotator", src)
                wait_for_replicas(replica_ports, 1.0, 90, "v1 on both replicas", ray_tmp)
                swapped_at = len(load.versions)
                wait_until(lambda: len(load.versions) >= swapped_at + 10, 60, "traffic after the swap", interval_s=0.2)
            assert load.errors == []
            assert load.versions[0] == "v0" and set(load.versions) == {"v0", "v1"}
            assert set(load.versions[swapped_at + 3 :]) == {"v1"}  # (3 threads may have been in flight)
            r = policy.Annotate(policy_pb2.AnnotateRequest(items=items), metadata=POLICY, timeout=30)
            assert r.model_version == "v1"
            served += len(r.annotations) + len(REVIEWS) * len(load.versions)
    finally:
        stop_serve()

    with open_feedback_log(log_url) as log:  # the replicas flushed their decision writers on shutdown
        stats = log.stats()
    assert stats.decisions == served and stats.feedback_by_kind == {"accept": 1}
    assert set(stats.decisions_by_model_version["annotator"]) == {"v0", "v1"}

    wait_until(lambda: not ray_processes(ray_tmp, spawned_before), 60, "Ray's processes to exit", interval_s=0.5)
