"""k8s/: every manifest valid against the Kubernetes schemas (offline), and the invariants the
deployment promises: probes on served health endpoints, non-root read-only containers, secrets
only by reference, autoscaling, disruption budgets and least-privilege network policies."""

from __future__ import annotations

import copy
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fedllm.common.config import Settings, default_hospitals
from tests.ops.kustomize import build, kustomization, load_docs

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
TARGETS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}
K8S_VERSION = "1.32.0"
WORKLOADS = ("Deployment", "StatefulSet", "Job")
SECRETISH = ("SECRET", "PASSWORD", "KEY", "TOKEN", "DATABASE_URL", "USERS")


def rendered(target: str) -> list[dict[str, Any]]:
    return build(TARGETS[target])


def of_kind(docs: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in kinds]


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


@pytest.mark.parametrize("root", kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_kustomization_entry_exists(root: Path) -> None:
    k = kustomization(root)
    paths = list(k.get("resources", [])) + [p["path"] for p in k.get("patches", [])]
    paths += [f for gen in k.get("configMapGenerator", []) for f in gen.get("files", [])]
    assert paths
    for rel in paths:
        assert (root / rel).exists(), f"{root}: {rel} does not exist"
    listed = {(root / r).resolve() for r in k.get("resources", [])}
    for manifest in root.glob("*.yaml"):  # no orphan manifest silently left out of the build
        if manifest.name != "kustomization.yaml" and manifest.resolve() not in listed:
            assert manifest.resolve() in {
                (root / p["path"]).resolve() for p in k.get("patches", [])
            }, manifest


@pytest.mark.slow  # schema validation of every manifest: a second or more each
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_rendered_manifest_validates_against_the_schemas(target: str) -> None:
    docs = rendered(target)
    assert len(docs) > 30
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.slow
def test_every_source_manifest_validates_too() -> None:
    for path in (K8S / "base").glob("*.yaml"):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_docs(path):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_has_teeth() -> None:
    deployment = copy.deepcopy(of_kind(rendered("base"), "Deployment")[0])
    deployment["spec"]["replica"] = 2  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment = copy.deepcopy(of_kind(rendered("base"), "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_expected_workloads_and_their_commands_parse() -> None:
    from fedllm.cli import build_parser

    docs = rendered("base")
    deployments = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    assert deployments == {"gateway", "accountant", "router", "auditor"}
    hospitals = {}
    for sts in of_kind(docs, "StatefulSet"):
        args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:2] == ["node", "--hospital"]
        hospitals[args[2]] = sts
        assert sts["spec"]["replicas"] == 1
        assert sts["spec"]["volumeClaimTemplates"], "a node keeps its store on its own volume"
    assert set(hospitals) == {h.id for h in default_hospitals()}
    for doc in of_kind(docs, *WORKLOADS):
        c = doc["spec"]["template"]["spec"]["containers"][0]
        assert c["command"] == ["fedllm"]
        args = build_parser().parse_args(c["args"])
        assert callable(args.func)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_containers_are_non_root_read_only_and_probed(target: str) -> None:
    for doc in of_kind(rendered(target), *WORKLOADS):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        mounts_needed = {"/tmp"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, doc["metadata"]["name"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert mounts_needed <= {m["mountPath"] for m in c["volumeMounts"]}
            if doc["kind"] == "Job":
                continue
            ports = {p["name"] for p in c["ports"]}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                get = c[probe]["httpGet"]
                assert get["port"] in ports
            gateway = doc["metadata"]["name"] == "gateway"
            assert c["livenessProbe"]["httpGet"]["path"] == (
                "/v1/health" if gateway else "/healthz"
            )
            assert c["readinessProbe"]["httpGet"]["path"] == ("/v1/ready" if gateway else "/readyz")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_secrets_only_by_reference(target: str) -> None:
    docs = rendered(target)
    assert not of_kind(docs, "Secret"), "no Secret objects (and so no values) in the manifests"
    refs = set()
    for cm in of_kind(docs, "ConfigMap"):
        for key in cm.get("data", {}):
            assert not any(s in key.upper() for s in SECRETISH), key
    for doc in of_kind(docs, *WORKLOADS):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            for env in c.get("env", []):
                if any(s in env["name"] for s in SECRETISH):
                    assert "value" not in env, (doc["metadata"]["name"], env["name"])
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == "fedllm-secrets"
                    refs.add(ref["key"])
    readme = (K8S / "README.md").read_text()
    for key in refs:  # the operator is told to create every key that is referenced
        assert f"--from-literal={key}=" in readme or f"--from-file={key}=" in readme, key


def test_the_gateway_serves_the_probed_paths() -> None:
    from fedllm.services.gateway.app import create_app

    paths = {getattr(r, "path", "") for r in create_app(Settings(mode="demo")).routes}
    assert {"/v1/health", "/v1/ready", "/metrics"} <= paths


def test_the_ops_server_serves_health_readiness_and_metrics(tmp_path: Path) -> None:
    from fedllm.common.lifecycle import clear_ready, mark_ready
    from fedllm.common.metrics import start_ops_server

    settings = Settings(mode="demo", data_dir=tmp_path)
    server = start_ops_server(settings, "router", port=0, host="127.0.0.1")
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        assert get("/healthz")[0] == 200
        assert get("/readyz")[0] == 503
        mark_ready(settings, "router")
        assert get("/readyz")[0] == 200
        clear_ready(settings, "router")
        assert get("/readyz")[0] == 503
        status, body = get("/metrics")
        assert status == 200 and "fedllm_stage_requests_total" in body
        assert get("/nope")[0] == 404
    finally:
        server.shutdown()


def test_autoscaling_gateway_on_cpu_consumers_on_lag() -> None:
    from fedllm.common import topics

    docs = rendered("base")
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(docs, "HorizontalPodAutoscaler")
    }
    assert set(hpas) == {"gateway", "accountant"}
    assert hpas["gateway"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    metric = hpas["accountant"]["spec"]["metrics"][0]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "kafka_consumergroup_lag"
    assert (
        metric["external"]["metric"]["selector"]["matchLabels"]["consumergroup"]
        == "fedllm-accountant"
    )  # the faust app id (services/accountant/service.py)
    # more consumers than partitions would idle: the bound is the partition count
    assert hpas["accountant"]["spec"]["maxReplicas"] <= min(
        topics.PARTITIONS[topics.REQUESTS], topics.PARTITIONS[topics.NODE_RESULTS]
    )


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_disruption_budget_covers_a_workload(target: str) -> None:
    docs = rendered(target)
    workloads = of_kind(docs, "Deployment", "StatefulSet")
    covered = set()
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        hits = [
            w["metadata"]["name"]
            for w in workloads
            if selects(pdb["spec"]["selector"], pod_labels(w))
        ]
        assert hits, pdb["metadata"]["name"]
        covered.update(hits)
    assert covered == {w["metadata"]["name"] for w in workloads}


EXPECTED_EGRESS = {  # component -> backing services it may reach (besides DNS)
    "gateway": {"kafka", "redis"},
    "accountant": {"kafka", "postgres"},
    "router": {"kafka"},
    "auditor": {"kafka", "postgres"},
    "node": {"kafka"},
    "topics": {"kafka"},
    "migrate": {"postgres"},
}


def test_network_policies_allow_each_workload_only_what_it_needs() -> None:
    docs = rendered("base")
    policies = of_kind(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "egress" not in deny[0]["spec"] and "ingress" not in deny[0]["spec"]
    for workload in of_kind(docs, *WORKLOADS):
        labels = pod_labels(workload)
        component = labels["app.kubernetes.io/component"]
        reach: set[str] = set()
        for pol in policies:
            if pol["spec"]["podSelector"] and selects(pol["spec"]["podSelector"], labels):
                for rule in pol["spec"].get("egress", []):
                    for peer in rule["to"]:
                        if "namespaceSelector" in peer:  # only cluster DNS lives outside
                            assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
                            assert {p["port"] for p in rule["ports"]} == {53}
                            continue
                        reach.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
        assert reach == EXPECTED_EGRESS[component], (workload["metadata"]["name"], reach)


def test_prod_nodes_request_a_gpu_and_dev_does_not() -> None:
    for sts in of_kind(rendered("prod"), "StatefulSet"):
        c = sts["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert c["image"].split(":")[0].endswith("fedllm-cuda")
    for sts in of_kind(rendered("dev"), "StatefulSet"):
        assert (
            "nvidia.com/gpu"
            not in sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        )
    for dep in of_kind(rendered("dev"), "Deployment"):
        assert dep["spec"]["replicas"] == 1


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _normal(value: Any) -> Any:
    """Lists of named items compare as sets (kustomize orders merged items its own way)."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_normal(v) for v in value]
        if items and all(isinstance(i, dict) and "name" in i for i in items):
            return sorted(items, key=lambda i: str(i["name"]))
        return items
    return value


@pytest.mark.slow  # runs kubectl: about a second each
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_test_renderer_agrees_with_kubectl_kustomize(target: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(TARGETS[target])],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    theirs = {_key(d): d for d in yaml.safe_load_all(out) if d}
    ours = {_key(d): d for d in rendered(target)}
    assert theirs.keys() == ours.keys()
    for key in ours:
        assert _normal(ours[key]) == _normal(theirs[key]), key
