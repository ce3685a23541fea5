"""The stack as an operator starts it and as a crash leaves it (real processes, tiny models, bounded).

- `loopserve up` hands every flag to the processes it starts: with `--tls-cert/--tls-key`, a limit
  (`--max-text-chars 50`) and `--no-auth`, both services serve TLS only (a plaintext client fails),
  answer a caller without a token, and refuse a 60-character text with INVALID_ARGUMENT naming the
  limit; /metrics listens on the gRPC host (127.0.0.1), not every interface; SIGTERM stops it all
  (the policy service's feedback writer process included).
- kill -9 of the policy service in the middle of a SubmitStream loses no acknowledged event and
  doubles none: after a restart, re-sending the whole stream acknowledges every event (those stored
  before the kill as duplicates), and the log holds each key exactly once.
- SIGTERM of `loopserve serve --engine ray` ends every process it started (Ray's agents included).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from loopserve.auth import read_token
from loopserve.client import Client, RetryPolicy, wait_until_serving
from loopserve.config import POLICY_SERVICE, REWARD_SERVICE
from loopserve.feedback.v1 import feedback_pb2 as fb
from loopserve.feedback_log import open_feedback_log
from loopserve.ports import free_ports
from loopserve.reward.v1 import reward_pb2, reward_pb2_grpc
from tests.service.test_tls import issue, make_ca
from tests.support.waiting import kill9_and_reap, wait_until

REPO = Path(__file__).resolve().parents[2]
NO_RETRY = RetryPolicy(attempts=1)
START_S = 120.0  # a cold start imports torch and transformers on a busy 2-core machine


def _start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "loopserve", *args], cwd=REPO, stdout=out, stderr=out)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def _listening_hosts(root: psutil.Process, port: int) -> set[str]:
    hosts = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        hosts.update(c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port)
    return hosts


# ---- `loopserve up` keeps every flag's promise ---------------------------------------------------------


@pytest.mark.slow  # three processes start cold (torch, transformers): tens of seconds on 2 busy cores
def test_up_hands_tls_limits_and_no_auth_to_both_services(tiny_data_dir: Path, tmp_path: Path) -> None:
    ca, ca_key, ca_cert = make_ca("loopserve up test CA")
    server = issue(ca_key, ca_cert, "loopserve up", server=True)
    (tmp_path / "server.crt").write_bytes(server.cert)
    (tmp_path / "server.key").write_bytes(server.key)
    policy_port, reward_port, metrics_port, reward_metrics_port = free_ports(4)
    up = _start(
        *("up", "--no-trainer", "--no-generator", "--no-auth", "--data-dir", str(tiny_data_dir)),
        *("--tls-cert", str(tmp_path / "server.crt"), "--tls-key", str(tmp_path / "server.key")),
        *("--max-text-chars", "50", "--max-input-tokens", "32", "--grace-s", "2"),
        *("--policy-port", str(policy_port), "--reward-port", str(reward_port)),
        *("--metrics-port", str(metrics_port), "--reward-metrics-port", str(reward_metrics_port)),
        log=tmp_path / "up.log",
    )
    try:
        for port, service in ((policy_port, POLICY_SERVICE), (reward_port, REWARD_SERVICE)):
            wait_until_serving(f"127.0.0.1:{port}", START_S, service, root_certificates=ca.cert)
        long_text = "y" * 60
        with Client(f"127.0.0.1:{policy_port}", None, root_certificates=ca.cert, retry=NO_RETRY) as policy:
            assert policy.annotate(["short and fine"]).annotations  # TLS, and no token needed
            with pytest.raises(grpc.RpcError) as err:
                policy.annotate([long_text])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 50" in err.value.details()
        with Client(f"127.0.0.1:{reward_port}", None, root_certificates=ca.cert, retry=NO_RETRY) as reward:
            assert len(reward.score([("a prompt", "a response")]).scores) == 1
            with pytest.raises(grpc.RpcError) as err:
                reward.score([("a prompt", long_text)])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 50" in err.value.details()
        for port in (policy_port, reward_port):  # plaintext is refused: TLS really is on
            with Client(f"127.0.0.1:{port}", None, retry=NO_RETRY, timeout_s=10) as plain:
                with pytest.raises(grpc.RpcError) as err:
                    plain.model_info() if port == policy_port else plain.score([("a", "b")])
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        root = psutil.Process(up.pid)
        assert _listening_hosts(root, metrics_port) == {"127.0.0.1"}
        assert _listening_hosts(root, reward_metrics_port) == {"127.0.0.1"}
        started = root.children(recursive=True)
        # The policy service's feedback writer runs in a session of its own: SIGTERM must end it too.
        assert any("loopserve.feedback_log.commit_process" in " ".join(p.cmdline()) for p in started)
    finally:
        code = _stop(up)
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    wait_until(lambda: not any(_running(p) for p in started), 30, "every process `up` started to exit")


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- kill -9 in the middle of a SubmitStream ------------------------------------------------------------

STREAM_EVENTS = 10_000
SENT_BEFORE_KILL = 6_000
ACKED = 1_000


def _pref(key: str) -> fb.FeedbackEvent:
    return fb.FeedbackEvent(
        idempotency_key=key, preference=fb.Preference(prompt="Which is kinder?", chosen=f"yes {key}", rejected="no")
    )


def _feedback_rows(log_file: Path) -> int:
    with sqlite3.connect(f"file:{log_file}?mode=ro", uri=True, timeout=10) as conn:
        (n,) = conn.execute("SELECT count(*) FROM records WHERE type = 'feedback'").fetchone()
    return int(n)


@pytest.mark.slow  # the policy process starts cold twice
def test_kill9_during_submitstream_then_resend_loses_and_doubles_nothing(tiny_data_dir: Path, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    args = ("policy", "--data-dir", str(tiny_data_dir), "--port", str(port), "--metrics-port", "-1")
    args += ("--no-generator", "--max-input-tokens", "32", "--grace-s", "2")
    target = f"127.0.0.1:{port}"
    log_file = tiny_data_dir / "feedback.sqlite3"
    proc = _start(*args, log=tmp_path / "policy.log")
    try:
        wait_until_serving(target, START_S, POLICY_SERVICE)
        token = read_token(tiny_data_dir / "tokens.json", "annotator")
        with Client(target, token, retry=NO_RETRY) as c:
            for b in range(ACKED // 200):  # acknowledged before the crash: these must survive it
                r = c.submit([_pref(f"acked-{b}-{i}") for i in range(200)])
                assert r.accepted == 200

        killed = threading.Event()

        def stream() -> Iterator[fb.FeedbackEvent]:
            for i in range(STREAM_EVENTS):
                if i == SENT_BEFORE_KILL:
                    killed.wait(60)  # hold the stream open until the server is gone
                yield _pref(f"stream-{i}")

        outcome: list[BaseException | fb.SubmitSummary] = []

        def send() -> None:
            with Client(target, token, retry=NO_RETRY, timeout_s=120) as c:
                try:
                    outcome.append(c.submit_stream(stream()))
                except grpc.RpcError as e:
                    outcome.append(e)

        sender = threading.Thread(target=send)
        sender.start()
        # Some of the stream is durable (a chunk committed), none of it acknowledged: kill -9.
        wait_until(lambda: _feedback_rows(log_file) > ACKED, 60, "a chunk of the stream to commit")
        kill9_and_reap(proc)  # the service and its feedback writer: the log holds still from here on
        killed.set()
        sender.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], grpc.RpcError)  # nothing acknowledged
        stored_before = _feedback_rows(log_file) - ACKED
        assert 0 < stored_before <= SENT_BEFORE_KILL

        proc = _start(*args, log=tmp_path / "policy.log")
        wait_until_serving(target, START_S, POLICY_SERVICE)
        with Client(target, token, retry=NO_RETRY, timeout_s=120) as c:
            summary = c.submit_stream(_pref(f"stream-{i}") for i in range(STREAM_EVENTS))
        assert summary.received == STREAM_EVENTS and summary.rejected == 0
        assert summary.accepted == STREAM_EVENTS and summary.duplicates == stored_before
    finally:
        _stop(proc)
    with open_feedback_log(str(log_file)) as log:
        keys: list[str] = []
        after = 0
        while page := log.read(after, 1000):
            keys += [r.feedback.idempotency_key for r in page if r.feedback is not None]
            after = page[-1].seq
    assert len(keys) == len(set(keys)) == ACKED + STREAM_EVENTS  # nothing lost, nothing doubled
    assert {f"acked-{b}-{i}" for b in range(ACKED // 200) for i in range(200)} <= set(keys)


# ---- `loopserve serve --engine ray`: SIGTERM leaves nothing of Ray behind --------------------------------


@pytest.mark.slow  # a local Ray cluster starts cold (about a minute on 2 busy cores)
@pytest.mark.ray  # one Ray cluster at a time (tests/conftest.py: one_ray_cluster)
@pytest.mark.parametrize("ingress", ["proxy", "haproxy"])
def test_serve_on_ray_answers_and_stops_every_process_it_started_on_sigterm(
    tiny_data_dir: Path, tmp_path: Path, ingress: str
) -> None:
    """Both ingresses answer RewardService on --grpc-port, and `--ingress haproxy` really puts HAProxy
    there (Ray's high-throughput mode); SIGTERM then ends every process the command started."""
    ray_tmp = Path("/tmp") / f"lsr{os.getpid()}"  # short: Ray's socket paths must fit 107 characters
    grpc_port, http_port = free_ports(2)
    env = os.environ | {"RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path / "serve.log"
    with log.open("ab") as out:
        ports = ["--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "-1"]
        sizes = ["--cluster-cpus", "1", "--num-cpus", "0.5", "--threads", "1"]
        command = ["serve", "--engine", "ray", "--apps", "reward", "--data-dir", str(tiny_data_dir)]
        command += ["--ingress", ingress, "--no-auth"]
        serve = subprocess.Popen(
            [sys.executable, "-m", "loopserve", *command, *ports, *sizes],
            cwd=REPO,
            stdout=out,
            stderr=out,
            env=env,
        )
    try:
        front = "HAProxy" if ingress == "haproxy" else "gRPC proxy"
        wait_until(lambda: f"Ray Serve: {front}" in log.read_text(), START_S, "Serve to deploy the reward app")
        started = psutil.Process(serve.pid).children(recursive=True)
        assert started  # the raylet, GCS, agents, proxy, replica ...
        haproxy = [p for p in started if p.name() == "haproxy"]
        assert bool(haproxy) == (ingress == "haproxy"), [p.name() for p in started]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            pair = reward_pb2.Pair(prompt="Describe the coffee", response="Rich and smooth")
            scored = reward_pb2_grpc.RewardServiceStub(channel).Score(
                reward_pb2.ScoreRequest(pairs=[pair]), metadata=(("application", "reward"),), timeout=60
            )
        assert scored.model_version == "v0" and len(scored.scores) == 1
    finally:
        code = _stop(serve)
    assert code == 0, log.read_text()[-3000:]
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.pid for p in alive]
