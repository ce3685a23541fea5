"""loopserve behind a real Label Studio server (its own virtual environment) and a real browser.

`loopserve up --ml-backend-port` runs the policy service with the real bundled annotator and the HTTP
adapter; Label Studio runs on loopback with a throwaway SQLite database. Through the official SDK a
project of Fine Food reviews is created and connected, and the checks are what a team would look at:
predictions carry the serving version and keep their event ids; annotations land in the feedback log
as accepts and corrections joined to the right events; after a swap the untouched tasks are
re-predicted by the new version. Then headless Debian Chromium drives the labeling page as a person:
the pre-annotation is shown, the other label picked, the task submitted, the correction logged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loopserve.auth import read_token
from loopserve.datasets import load_dataset, pull_finefoods
from loopserve.feedback_log import open_feedback_log
from loopserve.feedback_log.records import Decision, Feedback
from loopserve.labelstudio import protocol
from loopserve.labelstudio.labeling_config import parse_labeling_config
from loopserve.labelstudio.labelstudio_api import LabelStudioAPI, StoredTask
from loopserve.labelstudio.project import ConnectedProject, connect
from loopserve.models.store import ModelStore
from loopserve.ports import free_port
from tests.support.label_studio_server import LabelStudioServer, start_label_studio, stop, wait_healthy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N_TASKS = 40
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class Stack:
    ls: LabelStudioServer
    api: LabelStudioAPI
    data_dir: Path
    adapter_url: str
    policy_target: str
    annotator_token: str
    project: ConnectedProject
    texts: list[str]

    def tasks(self) -> list[StoredTask]:
        return list(self.api.tasks(self.project.project))

    def log(self) -> tuple[dict[str, Decision], list[Feedback]]:
        with open_feedback_log(str(self.data_dir / "feedback.sqlite3")) as log:
            recs = log.read(0, 100_000)
        decisions = {r.record.event_id: r.record for r in recs if isinstance(r.record, Decision)}
        return decisions, [r.record for r in recs if isinstance(r.record, Feedback)]


def _up_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, real_store: ModelStore) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("labelstudio")
    # Label Studio and loopserve start side by side (each takes tens of seconds on 2 cores).
    ls_proc, ls = start_label_studio(root / "label-studio")
    data_dir = root / "loopserve"
    data_dir.mkdir()
    shutil.copytree(real_store.root, data_dir / "store", copy_function=os.link)  # hard links: no copy
    adapter_port, policy_port = free_port(), free_port()
    argv = [sys.executable, "-m", "loopserve", "up", "--data-dir", str(data_dir), "--no-trainer"]
    argv += ["--policy-port", str(policy_port), "--metrics-port", "-1", "--reward-port", str(free_port())]
    argv += ["--reward-metrics-port", "-1", "--watch-interval-s", "0.5", "--device", "cpu"]
    argv += ["--ml-backend-port", str(adapter_port), "--label-studio-url", ls.url]
    env = {**os.environ, "LOOPSERVE_LABEL_STUDIO_TOKEN": ls.token}
    up_log = (root / "up.log").open("wb")
    up = subprocess.Popen(argv, stdout=up_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    adapter_url = f"http://127.0.0.1:{adapter_port}"
    try:
        wait_healthy(ls_proc, ls)
        wait_until(lambda: _up_healthy(adapter_url) or up.poll() is not None, 300, "loopserve up to serve")
        assert up.poll() is None, (root / "up.log").read_text()[-3000:]
        api = LabelStudioAPI(ls.url, ls.token)
        token = read_token(data_dir / "tokens.json", "annotator")
        train, _ = load_dataset(pull_finefoods(REPO / ".loopserve" / "data"))
        texts = [e.text for e in train[:N_TASKS]]
        t0 = time.perf_counter()
        project = connect(api, backend_url=adapter_url, token=token, labels=["great", "other"], texts=texts)
        print(f"\nconnect (create, import {N_TASKS} reviews, connect, predict all): {time.perf_counter() - t0:.1f}s")
        yield Stack(ls, api, data_dir, adapter_url, f"127.0.0.1:{policy_port}", token, project, texts)
        api.close()
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
        up_log.close()
        stop(ls_proc)


def _served(stack: Stack) -> dict[int, tuple[str, str, str, int]]:
    """task id -> (event_id, label, model_version, annotations) of its one loopserve prediction."""
    choices = parse_labeling_config(stack.api.project(stack.project.project)["label_config"])
    out = {}
    for t in stack.tasks():
        assert len(t.predictions) <= 1, f"task {t.id} has {len(t.predictions)} predictions"
        for p in t.predictions:
            ev = protocol.prediction_event(p, choices)
            assert ev is not None
            out[t.id] = (ev[0], ev[1], str(p["model_version"]), t.annotations)
    return out


def test_predictions_feedback_and_fresh_predictions_after_a_swap(stack: Stack) -> None:
    api, pid = stack.api, stack.project.project
    assert stack.project.tasks == N_TASKS and stack.project.webhook is not None
    served = _served(stack)  # `connect` ran the Data Manager's "Retrieve predictions": /setup, /predict
    assert len(served) == N_TASKS
    decisions, feedback = stack.log()
    texts = {t.id: t.data["text"] for t in stack.tasks()}
    assert feedback == []
    for task_id, (event_id, label, version, _) in served.items():
        assert version == "v0"  # the serving version, not a model title
        d = decisions[event_id]  # the prediction's event is in the log ...
        assert d.input_text == texts[task_id] and d.model_version == "v0"  # ... for this task's text
        assert d.output[0][0] == label

    # Annotations through the API, as Label Studio's editor sends them: starting from the prediction
    # (its region id kept), three keep the label, three change it; one is made from scratch.
    ids = sorted(served)
    other = {"great": "other", "other": "great"}
    expected = []
    for i, task_id in enumerate(ids[:7]):
        event_id, label, _, _ = served[task_id]
        chosen = label if i < 3 else other[label]
        region = {"id": event_id if i < 6 else "q7Xc2LmZ0a", "from_name": "label", "to_name": "text"}
        region |= {"type": "choices", "value": {"choices": [chosen]}}
        api.sdk.annotations.create(id=task_id, result=[region], project=pid)
        expected.append(("accept" if chosen == label else "correction", event_id, chosen))
    wait_until(lambda: len(stack.log()[1]) >= 7, 60, "seven feedback events in the log")
    _, feedback = stack.log()
    assert sorted((f.kind, f.event_id, f.label) for f in feedback) == sorted(expected)
    assert {f.kind for f in feedback} == {"accept", "correction"}

    # A swap: publish a new annotator version; the service swaps, the adapter re-predicts the
    # untouched tasks through Label Studio's API, annotated ones keep what their annotator judged.
    store = ModelStore(stack.data_dir / "store")
    t1 = time.perf_counter()
    store.publish_version("annotator", store.path("annotator", "v0"), parent="v0")

    def refreshed() -> bool:
        s = _served(stack)
        return all(v == ("v0" if n else "v1") for _, _, v, n in s.values()) and len(s) == N_TASKS

    wait_until(refreshed, 120, "every unannotated task re-predicted by v1")
    refresh_s = time.perf_counter() - t1
    after = _served(stack)
    decisions, _ = stack.log()
    for task_id, (event_id, _, version, n) in after.items():
        if n:
            assert event_id == served[task_id][0]  # the judged prediction stays
        else:
            assert version == "v1" and decisions[event_id].model_version == "v1"
            assert decisions[event_id].input_text == texts[task_id]
    assert api.project(pid)["model_version"] == "v1"  # what Label Studio shows and samples by
    print(f"\nswap published to {N_TASKS - 7} tasks re-predicted in Label Studio: {refresh_s:.1f}s")


def test_an_annotator_corrects_a_pre_annotation_in_the_browser(stack: Stack, tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    from playwright.sync_api import sync_playwright

    served = _served(stack)
    task_id = max(t for t, (_, _, _, n) in served.items() if n == 0)
    event_id, label, version, _ = served[task_id]
    other = "other" if label == "great" else "great"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.set_default_timeout(60_000)
            page.goto(stack.ls.url + "/user/login")
            page.fill('input[name="email"]', stack.ls.username)
            page.fill('input[name="password"]', stack.ls.password)
            page.click('button[type="submit"]')
            page.wait_for_url(lambda url: "/user/login" not in url)
            page.goto(f"{stack.ls.url}/projects/{stack.project.project}/data?task={task_id}")
            predicted, correct = page.get_by_role("checkbox", name=label), page.get_by_role("checkbox", name=other)
            predicted.wait_for()
            page.get_by_text(version, exact=True).first.wait_for()  # the prediction's tab names its version
            assert predicted.is_checked() and not correct.is_checked()  # the pre-annotation is shown
            page.wait_for_load_state("networkidle")  # the task list beside it, for the screenshot
            shot = tmp_path / "labeling-page.png"
            page.screenshot(path=str(shot))
            if os.environ.get("LOOPSERVE_UPDATE_DOCS"):  # refresh the README's screenshot only when asked
                shutil.copyfile(shot, REPO / "docs" / "labelstudio-labeling.png")
            correct.click()
            assert correct.is_checked() and not predicted.is_checked()
            page.get_by_role("button", name="Submit").click()

            def corrected() -> bool:
                return any(f.kind == "correction" and f.event_id == event_id for f in stack.log()[1])

            wait_until(corrected, 60, "the browser's correction in the feedback log")
            page.screenshot(path=str(tmp_path / "after-submit.png"))
        finally:
            browser.close()
    fb = next(f for f in stack.log()[1] if f.event_id == event_id)
    assert fb.kind == "correction" and fb.label == other and fb.annotator_id.startswith("labelstudio:")


def test_connect_command_sets_up_a_pre_annotated_project(stack: Stack, tmp_path: Path) -> None:
    """`loopserve labelstudio connect`, the README's third command, with its flags."""
    dataset = tmp_path / "reviews.jsonl"
    rows = [("Wonderful tea, I drink it daily.", "great", "train"), ("Stale and tasteless.", "other", "train")] * 3
    rows += [("Fine.", "other", "test")]
    dataset.write_text("".join(json.dumps({"text": t, "label": lb, "split": s}) + "\n" for t, lb, s in rows))
    argv = [sys.executable, "-m", "loopserve", "labelstudio", "connect", "--data-dir", str(stack.data_dir)]
    argv += ["--label-studio-url", stack.ls.url, "--backend-url", stack.adapter_url, "--dataset", str(dataset)]
    argv += ["--tasks", "4", "--title", "connect flags", "--policy-target", stack.policy_target]
    env = {**os.environ, "LOOPSERVE_LABEL_STUDIO_TOKEN": stack.ls.token}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    pid = int(out.stdout.split()[1].rstrip(":"))
    project = stack.api.project(pid)
    assert project["title"] == "connect flags" and project["sampling"] == "Uncertainty sampling"
    tasks = list(stack.api.tasks(pid))
    assert sorted(t.data["text"] for t in tasks) == sorted(t for t, _, _ in rows[:4])
    assert all(len(t.predictions) == 1 for t in tasks)  # pre-annotated by the serving version
    [ml] = [m for m in stack.api.sdk.ml.list(project=pid)]
    assert ml.url == stack.adapter_url
