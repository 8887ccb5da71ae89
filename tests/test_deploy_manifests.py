"""Every deployment manifest parses, and the facts that must agree across them do."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gguf_serve.api.security import OPEN_PATHS
from gguf_serve.settings import Settings, load_settings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROFILE = DEPLOY / "profile.toml"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
PROFILE_CMD = ["gguf-serve", "serve", "--profile", "/etc/gguf-serve/profile.toml", "--host", "0.0.0.0"]


def profile_port() -> int:
    return load_settings(str(PROFILE)).port


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects(directory: Path) -> dict[str, dict[str, Any]]:
    """One object per kind; ConfigMaps by name (the profile's and the convert recipe's)."""
    out = {}
    for p in sorted(directory.glob("*.yaml")):
        for doc in load_yaml_docs(p):
            if "kind" in doc and doc["kind"] != "Kustomization":
                key = doc["metadata"]["name"] if doc["kind"] == "ConfigMap" else doc["kind"]
                out[key] = doc
    return out


def final_stage(dockerfile: Path) -> list[str]:
    lines = _logical_lines(dockerfile)
    starts = [i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")]
    assert len(starts) >= 2, f"{dockerfile.name} is not multi-stage"
    return lines[starts[-1] :]


def builder_stage(dockerfile: Path) -> list[str]:
    lines = _logical_lines(dockerfile)
    starts = [i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")]
    return lines[starts[0] : starts[-1]]


def _logical_lines(dockerfile: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def instr(lines: list[str], name: str) -> list[str]:
    return [ln[len(name) + 1 :].strip() for ln in lines if ln.upper().startswith(name + " ")]


def test_every_manifest_parses() -> None:
    yamls = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    assert len(yamls) >= 10
    for p in yamls:
        assert load_yaml_docs(p), f"{p} is empty"
    for p in DEPLOY.rglob("*.json"):
        json.loads(p.read_text())
    for p in DEPLOY.rglob("*.toml"):
        tomllib.loads(p.read_text())


def test_profile_port_is_the_default_and_8000() -> None:
    assert profile_port() == 8000 == Settings.model_fields["port"].default


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_non_root_and_agrees_with_profile(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    users = instr(stage, "USER")
    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, (
        "USER must be a numeric non-root uid (runAsNonRoot checks numbers)"
    )
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert instr(stage, "EXPOSE") == [str(profile_port())]
    health = " ".join(instr(stage, "HEALTHCHECK"))
    assert f"127.0.0.1:{profile_port()}/health" in health
    assert json.loads(instr(stage, "CMD")[-1]) == PROFILE_CMD
    assert any("/etc/gguf-serve/profile.toml" in c for c in instr(stage, "COPY"))
    assert "/models" in " ".join(instr(stage, "VOLUME"))
    # llama.cpp is built in the builder stage only, by the script that owns the build flags
    # (pinned version, no llava, no AMX), portable: every CPU variant, chosen at run time.
    builds = [r for r in instr(builder_stage(dockerfile), "RUN") if "llama_wheel.py build" in r]
    assert len(builds) == 1 and "--portable" in builds[0], builds
    assert "build-essential" not in " ".join(stage)


def test_cpu_dockerfile_base_images() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", text)
    cuda = (DEPLOY / "Dockerfile.cuda").read_text()
    assert re.search(r"FROM nvidia/cuda:\S+-devel-\S+ AS builder", cuda)
    assert re.search(r"FROM nvidia/cuda:\S+-runtime-\S+ AS runtime", cuda)
    build = next(r for r in instr(builder_stage(DEPLOY / "Dockerfile.cuda"), "RUN") if "llama_wheel.py" in r)
    assert "--gpu cuda" in build and "--cuda-arch" in build


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "models", "*.gguf"):
        assert entry in ignored
    # what the Dockerfiles COPY must not be ignored
    for needed in ("pyproject.toml", "README.md", "gguf_serve", "deploy", "scripts", "profiles"):
        assert needed not in ignored


def test_images_copy_what_the_wheel_links_to() -> None:
    # gguf_serve/profiles is a link to ../profiles: an image without profiles/ ships a dangling link.
    assert (ROOT / "gguf_serve" / "profiles").resolve() == (ROOT / "profiles").resolve()
    for dockerfile in DOCKERFILES:
        copies = instr(builder_stage(dockerfile), "COPY")
        assert "profiles ./profiles" in copies, f"{dockerfile.name} does not copy profiles/"


def test_probes_are_open_routes() -> None:
    # Probes carry no API key: whatever they call must be open in the security middleware.
    assert {"/health", "/ready"} <= OPEN_PATHS


def test_k8s_deployment_probes_ports_and_user() -> None:
    objs = k8s_objects(K8S / "base")
    dep = objs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    port = profile_port()
    assert c["ports"][0]["containerPort"] == port
    named = c["ports"][0]["name"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in (named, port)
    assert c["args"] == PROFILE_CMD
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]

    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True
    dockerfile_uid = int(instr(final_stage(DEPLOY / "Dockerfile"), "USER")[-1].split(":")[0])
    assert sc["runAsUser"] == dockerfile_uid
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False

    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True
    assert mounts["profile"]["mountPath"] == "/etc/gguf-serve"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        volumes["models"]["persistentVolumeClaim"]["claimName"]
        == objs["PersistentVolumeClaim"]["metadata"]["name"]
    )
    assert volumes["profile"]["configMap"]["name"] in objs
    # the grace period covers the server's own shutdown grace
    assert pod["terminationGracePeriodSeconds"] > Settings.model_fields["shutdown_grace_s"].default

    svc = objs["Service"]
    assert svc["spec"]["ports"][0]["port"] == port
    assert svc["spec"]["ports"][0]["targetPort"] in (named, port)
    tmpl_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(tmpl_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert all(tmpl_labels.get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items())

    hpa = objs["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    # Queueing, not CPU (tests/test_k8s_schemas.py checks the names against /metrics).
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods", "Pods"]


def test_convert_job_recipe_is_the_main_recipe_for_the_profile_files() -> None:
    objs = k8s_objects(K8S / "base")
    recipe = tomllib.loads(objs["gguf-serve-convert-recipe"]["data"]["recipe.toml"])["model"]
    main = {m["name"]: m for m in tomllib.loads((ROOT / "convert" / "qwen3-rag.toml").read_text())["model"]}
    for entry in recipe:
        assert entry == main[entry["name"]], f"{entry['name']} differs from convert/qwen3-rag.toml"
    built = {f"/models/{m['name']}/{m['name']}-{q}.gguf" for m in recipe for q in m["quant"]}
    profile = load_settings(str(PROFILE))
    assert {m.file for m in profile.models} <= built, "the Job does not build every file the profile serves"
    (job_c,) = objs["Job"]["spec"]["template"]["spec"]["containers"]
    assert job_c["args"][:2] == ["gguf-serve", "convert"] and "/models" in job_c["args"]


@pytest.mark.parametrize(
    "kdir",
    [K8S / "base", K8S / "overlays" / "cuda", K8S / "prometheus-adapter"],
    ids=["base", "cuda", "adapter"],
)
def test_kustomization_lists_resources_that_exist(kdir: Path) -> None:
    (k,) = load_yaml_docs(kdir / "kustomization.yaml")
    # bases / patchesStrategicMerge: the spelling Debian's kubectl (kustomize v2) reads too.
    listed = [*k.get("resources", []), *k.get("bases", []), *k.get("patchesStrategicMerge", [])]
    assert listed and "labels" not in k and "patches" not in k
    for r in listed:
        assert (kdir / r).exists(), f"{kdir / r} is listed but missing"
    if kdir.name != "cuda":
        on_disk = {p.name for p in kdir.glob("*.yaml")} - {"kustomization.yaml"}
        assert on_disk == set(k["resources"]), "a manifest is not listed in the kustomization"


def _configmap_profile(path: Path) -> str:
    (cm,) = load_yaml_docs(path)
    assert cm["kind"] == "ConfigMap"
    text: str = cm["data"]["profile.toml"]
    return text


@pytest.mark.parametrize(
    "path",
    [K8S / "base" / "configmap.yaml", K8S / "overlays" / "cuda" / "profile-patch.yaml"],
    ids=["base", "cuda"],
)
def test_configmap_profile_loads_with_settings(path: Path, tmp_path: Path) -> None:
    f = tmp_path / "profile.toml"
    f.write_text(_configmap_profile(path))
    s = load_settings(str(f))
    assert s.port == 8000
    assert s.host == "0.0.0.0"
    names = {m.id: m for m in s.models}
    assert {
        "qwen3-4b-instruct",
        "qwen3-embedding-0.6b",
        "qwen3-embedding-0.6b-query",
        "qwen3-reranker-0.6b",
    } <= set(names)
    assert all(m.file.startswith("/models/") for m in s.models)
    if "cuda" in path.parts:
        assert names["qwen3-4b-instruct"].n_gpu_layers == -1


def test_configmap_profile_equals_deploy_profile() -> None:
    assert _configmap_profile(K8S / "base" / "configmap.yaml") == PROFILE.read_text()


def test_cuda_overlay_requests_a_gpu() -> None:
    (patch,) = load_yaml_docs(K8S / "overlays" / "cuda" / "gpu-patch.yaml")
    (c,) = patch["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    (k,) = load_yaml_docs(K8S / "overlays" / "cuda" / "kustomization.yaml")
    assert k["images"][0]["newTag"] == "cuda"


def test_compose_server_and_monitoring() -> None:
    (compose,) = load_yaml_docs(DEPLOY / "docker-compose.yml")
    srv = compose["services"]["gguf-serve"]
    port = profile_port()
    assert any(p.endswith(f":{port}") for p in srv["ports"])
    assert srv["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / srv["build"]["context"] / srv["build"]["dockerfile"]).is_file()
    assert any(v.endswith(":/models:ro") for v in srv["volumes"])
    assert f"127.0.0.1:{port}/health" in " ".join(srv["healthcheck"]["test"])
    uid = srv["user"].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert srv["read_only"] is True
    for name in ("prometheus", "grafana"):
        assert compose["services"][name]["profiles"] == ["monitoring"]
    for svc in compose["services"].values():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), f"compose mounts {src}, which does not exist"

    (prom,) = load_yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"gguf-serve:{port}"]
    # Prometheus sends no key: the profile must make /metrics public (or the job must carry one).
    assert load_settings(str(PROFILE)).metrics_public or "authorization" in job


def test_grafana_dashboard_uses_exported_metrics() -> None:
    from gguf_serve.api.observability import Metrics

    m = Metrics()
    m.bind_stats(lambda: {"m": {"queue_depth": 0, "busy_slots": 0, "slots": 1, "kv_used_cells": 0,
                                "kv_total_cells": 1, "loaded": 1}})  # fmt: skip
    m.observe_request("/r", "m", 200, 0.1)
    m.observe_ttft("m", 0.1)
    m.add_tokens("m", 1, 1)
    exported = set(re.findall(r"^([a-z_]+?)(?:_bucket|_count|_sum)?(?:\{| )", m.exposition().decode(), re.M))
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "gguf-serve.json").read_text())
    used = set()
    for panel in dash["panels"]:
        for t in panel["targets"]:
            used |= set(re.findall(r"\b((?:gguf_serve|process)_[a-z_]+?)(?:_bucket)?\b[{\[]", t["expr"]))
    assert used, "no metric found in the dashboard"
    assert used <= exported, f"dashboard queries metrics that are not exported: {used - exported}"
    (prov,) = load_yaml_docs(DEPLOY / "grafana" / "provisioning" / "dashboards" / "gguf-serve.yml")
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's ini dialect: keys repeat (Environment=), so every key maps to its values in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"option outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_is_hardened() -> None:
    unit = parse_unit((DEPLOY / "systemd" / "gguf-serve.service").read_text())
    svc = {k: v[-1] for k, v in unit["Service"].items()}
    assert svc.get("DynamicUser") == "yes" or svc.get("User") not in (None, "root")
    assert svc["ProtectSystem"] in ("strict", "full")
    assert svc["Restart"] in ("on-failure", "always")
    assert svc["EnvironmentFile"].lstrip("-").startswith("/etc/gguf-serve/")
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["KillSignal"] == "SIGTERM"
    assert int(svc["TimeoutStopSec"]) > Settings.model_fields["shutdown_grace_s"].default
    exec_start = svc["ExecStart"].split()
    assert exec_start[0].endswith("/gguf-serve") and exec_start[1] == "serve"
    assert "--profile" in exec_start
    assert len(unit["Service"]["Environment"]) >= 2
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
