"""Every kustomization in deploy/k8s, rendered by `kubectl kustomize`, against Kubernetes' own
schemas (kubernetes-validate, strict: unknown fields fail too), and the facts that must
agree across the rendered objects: the HPA's metrics are ones the server exports and the
adapter serves, the PDB covers the server pods, the convert Job fills the volume they read."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "cuda": K8S / "overlays" / "cuda",
    "adapter": K8S / "prometheus-adapter",
}
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl")
# The oldest Kubernetes the manifests target (autoscaling/v2 and policy/v1 are GA from 1.23).
K8S_VERSIONS = ["1.25.0", "1.33.0"]

pytestmark = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl not found: `apt-get install -y kubernetes-client` (Debian) to render and "
    "validate deploy/k8s",
)


def render(name: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_rendered_manifests_match_kubernetes_schemas(name: str, version: str) -> None:
    import kubernetes_validate

    objs = render(name)
    assert objs
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{name}: {obj['kind']}/{obj['metadata']['name']} is invalid for {version}: {e.message}"
            )


@pytest.mark.parametrize("name", ["base", "cuda"])
def test_hpa_scales_on_metrics_the_server_exports_and_the_adapter_serves(name: str) -> None:
    from gguf_serve.api.observability import _ENGINE_GAUGES, PREFIX, Metrics

    objs = render(name)
    hpa = one(objs, "HorizontalPodAutoscaler")
    dep = one(objs, "Deployment")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"]), "no CPU or memory scaling"
    assert f"{PREFIX}_queue_depth" in wanted

    exported = {f"{PREFIX}_{suffix}" for suffix, _ in _ENGINE_GAUGES.values()}
    exported |= {m.name for m in Metrics().registry.collect()}
    assert wanted <= exported, wanted - exported

    (adapter_cm,) = [o for o in render("adapter") if o["metadata"]["name"] == "prometheus-adapter-config"]
    rules = yaml.safe_load(adapter_cm["data"]["config.yaml"])["rules"]
    assert {r["name"]["as"] for r in rules} == wanted
    for r in rules:
        assert r["resources"]["overrides"]["pod"] == {"resource": "pod"}
    # Prometheus finds the pods by these annotations (deploy/k8s/prometheus-adapter/prometheus-scrape.yaml).
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"


def test_adapter_is_registered_and_may_read_what_it_needs() -> None:
    objs = render("adapter")
    api = one(objs, "APIService")
    svc = one(objs, "Service", "prometheus-adapter")
    assert api["spec"]["group"] == "custom.metrics.k8s.io"
    assert api["spec"]["service"] == {
        "name": svc["metadata"]["name"],
        "namespace": svc["metadata"]["namespace"],
    }
    # This binding only works in kube-system, where the Role lives.
    auth_reader = one(objs, "RoleBinding")
    assert auth_reader["metadata"]["namespace"] == "kube-system"
    dep = one(objs, "Deployment", "prometheus-adapter")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert any(a.startswith("--config=/etc/adapter/") for a in c["args"])
    hpa_reader = one(objs, "ClusterRoleBinding", "hpa-custom-metrics-reader")
    assert hpa_reader["subjects"][0]["name"] == "horizontal-pod-autoscaler"


@pytest.mark.parametrize("name", ["base", "cuda"])
def test_pdb_covers_the_server_pods_and_the_convert_job_fills_their_volume(name: str) -> None:
    objs = render(name)
    dep = one(objs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "maxUnavailable" in pdb["spec"] or pdb["spec"].get("minAvailable") != dep["spec"]["replicas"]

    job = one(objs, "Job")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["args"][:2] == ["gguf-serve", "convert"]
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    svc = one(objs, "Service")
    assert not svc["spec"]["selector"].items() <= job_labels.items(), "the Service must not route to the Job"
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in job["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    server_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in dep["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert set(claims.values()) == server_claims
    rw = {m["name"]: m for m in c["volumeMounts"]}
    assert not rw["models"].get("readOnly") and c["args"][-1] == rw["models"]["mountPath"]
    recipe_mount = next(m for m in c["volumeMounts"] if c["args"][2].startswith(m["mountPath"]))
    recipe_vol = next(
        v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == recipe_mount["name"]
    )
    one(objs, "ConfigMap", recipe_vol["configMap"]["name"])

    (wait,) = dep["spec"]["template"]["spec"]["initContainers"]
    assert {m["mountPath"] for m in wait["volumeMounts"]} == {"/etc/gguf-serve", "/models"}
    readiness = dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/ready"
