"""A demo run's own folder and its embedded stack: policy, reward and trainer processes on loopback.

Every run gets `<data-dir>/runs/<timestamp>/` with its own model store (the base versions hard-linked
from the main store: version files are never modified in place, so a link is as good as a copy and
costs nothing), feedback log, token file, trainer dir and one log file per process. Runs therefore
never interfere with each other or with the main store.

The children run in their own session, so a Ctrl-C in the terminal reaches only the demo, which then
stops them in order (SIGTERM: the services drain and flush the log, the trainer checkpoints; SIGKILL
after a grace period). `Stack.stop` runs from `finally`, from `atexit` and on SIGTERM; and should the
demo itself be killed outright (SIGKILL), each child gets SIGTERM from the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loopserve.auth import ensure_token_file, read_token
from loopserve.config import POLICY_SERVICE, REWARD_SERVICE
from loopserve.models.store import ModelStore
from loopserve.ports import free_ports

logger = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the demo dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG), so no service or trainer outlives a demo that could not clean up."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 30) -> str:
    """The last lines of a child's log (the processes log no user text, so it is safe to print)."""
    try:
        with path.open("rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 16384, 0))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc})"


def new_run_folder(data_dir: Path, kind: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = data_dir / "runs" / f"{stamp}-{kind}"
    n = 1
    while root.exists():
        n += 1
        root = data_dir / "runs" / f"{stamp}-{kind}-{n}"
    root.mkdir(parents=True)
    return root


def link_base_versions(main_store: Path, run_store: Path, models: list[str]) -> dict[str, str]:
    """Hard-link each model's base version (the oldest) from the main store into the run's store."""
    src_store, dst_store = ModelStore(main_store), ModelStore(run_store)
    out = {}
    for model in models:
        versions = src_store.list(model)
        if not versions:
            raise FileNotFoundError(f"no {model} in {main_store}: run `loopserve models pull` first")
        version = versions[0]
        src = src_store.path(model, version)
        dst = run_store / "models" / model / version
        dst.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():
                try:
                    os.link(f, dst / f.name)
                except OSError:  # another file system: fall back to a copy
                    shutil.copy2(f, dst / f.name)
        dst_store.set_latest(model, version)
        out[model] = version
    return out


@dataclass
class Stack:
    """The three processes of one run, with their ports and log files."""

    run: Path
    generator: bool = False
    """Serve the generator from the policy service (the generation demo)."""
    trainer_flags: list[str] = field(default_factory=list)
    policy_flags: list[str] = field(default_factory=list)
    online_trainer_flags: list[str] | None = None
    """Flags of a second trainer process (the annotator's online tier), or None for none."""
    policy_port: int = 0
    reward_port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _stopped: bool = False

    @property
    def policy_target(self) -> str:
        return f"127.0.0.1:{self.policy_port}"

    @property
    def reward_target(self) -> str:
        return f"127.0.0.1:{self.reward_port}"

    @property
    def tokens(self) -> Path:
        return self.run / "tokens.json"

    def token(self, role: str) -> str:
        return read_token(self.tokens, role)

    def start(self) -> None:
        ensure_token_file(self.tokens)
        self.policy_port, self.reward_port = free_ports(2)
        exe = [sys.executable, "-m", "loopserve"]
        common = ["--data-dir", str(self.run), "--device", "cpu", "--log-level", "INFO"]
        server = ["--host", "127.0.0.1", "--metrics-port", "-1", "--grace-s", "5", "--threads", "1"]
        argv = {
            "policy": [
                *exe,
                "policy",
                "--port",
                str(self.policy_port),
                *common,
                *server,
                "--watch-interval-s",
                "0.25",
                *([] if self.generator else ["--no-generator"]),
                *self.policy_flags,
            ],
            "reward": [*exe, "reward", "--port", str(self.reward_port), *common, *server],
            "trainer": [
                *exe,
                "train",
                *common,
                "--metrics-port",
                "-1",
                "--reward-target",
                self.reward_target,
                *self.trainer_flags,
            ],
        }
        if self.online_trainer_flags is not None:
            argv["trainer-online"] = [*exe, "train", *common, "--metrics-port", "-1", *self.online_trainer_flags]
        (self.run / "logs").mkdir(exist_ok=True)
        (self.run / "commands.json").write_text(json.dumps(argv, indent=2))
        atexit.register(self.stop)
        for name, cmd in argv.items():
            out = (self.run / "logs" / f"{name}.log").open("ab")
            # Own session: a terminal Ctrl-C reaches the demo only, which stops the children in order.
            self.procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
            )
            out.close()

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                log = self.run / "logs" / f"{name}.log"
                raise RuntimeError(f"{name} exited with code {p.returncode}; the end of {log}:\n{_tail(log)}")

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Block until both services report SERVING on grpc.health.v1; returns the seconds waited."""
        t0 = time.monotonic()
        for target, service in ((self.policy_target, POLICY_SERVICE), (self.reward_target, REWARD_SERVICE)):
            with grpc.insecure_channel(target) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                while True:
                    self.check_alive()
                    with contextlib.suppress(grpc.RpcError):
                        r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                        if r.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    if time.monotonic() - t0 > timeout_s:
                        raise TimeoutError(f"{service} at {target} not ready after {timeout_s:.0f}s")
                    time.sleep(0.25)
        return time.monotonic() - t0

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM every child (services drain and flush, the trainer checkpoints), SIGKILL stragglers."""
        if self._stopped:
            return
        self._stopped = True
        # The trainers first: they stop between steps and checkpoint; then the services drain.
        for name in ("trainer", "trainer-online", "policy", "reward"):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, p in self.procs.items():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0fs; killing it", name, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)


def interrupt_on_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM both raise KeyboardInterrupt in the demo, which unwinds through
    `finally` and stops the stack.

    SIGINT is set explicitly: Python installs its KeyboardInterrupt handler only when it starts with
    SIGINT at its default, and a process started in the background by a shell without job control (a
    script's `cmd &`, some CI runners) starts with SIGINT ignored. The demo then ran to its end on Ctrl-C
    and exited 0 (reproduced: tests/e2e/test_demo.py's Ctrl-C test under a parent that ignores SIGINT)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)
