"""deploy/: the Kubernetes manifests, alert rules and dashboard, checked offline.

Every rendered manifest validates against the API schemas of each supported
Kubernetes release (kubernetes-validate); the Prometheus Operator's CRDs get
structural checks of our own; the alert rules pass ``promtool check rules``
and ``promtool test rules``; the gateway containers' settings are ones the
gateway accepts. Whether the metrics they name exist is tests/test_deploy_metrics.py.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import ENV_PREFIX, Settings, file_settings, load_settings
from tests.harness import REPO_ROOT

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")


def _load_renderer() -> Callable[[Path], list[dict[str, Any]]]:
    # deploy/render.py is a script beside the manifests, not part of a package.
    spec = importlib.util.spec_from_file_location("render", REPO_ROOT / "deploy" / "render.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    render: Callable[[Path], list[dict[str, Any]]] = module.render
    return render


render = _load_renderer()

KUSTOMIZE = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("shared", "sidecar")
# The Kubernetes releases the manifests are written for: native sidecars are
# GA from 1.33; the newest is the newest kubernetes-validate knows.
SUPPORTED = ("1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0")
OPERATOR_API = "monitoring.coreos.com/v1"

Document = dict[str, Any]


def rendered(overlay: str) -> list[Document]:
    return render(KUSTOMIZE / "overlays" / overlay)


def everything() -> list[tuple[str, Document]]:
    return [(overlay, doc) for overlay in OVERLAYS for doc in rendered(overlay)]


def doc_id(item: tuple[str, Document]) -> str:
    overlay, doc = item
    return f"{overlay}-{doc['kind']}-{doc['metadata']['name']}"


def pod_spec(doc: Document) -> Document:
    spec: Document = doc["spec"]["template"]["spec"]
    return spec


def gateway_containers(doc: Document) -> list[Document]:
    spec = pod_spec(doc)
    containers = spec.get("initContainers", []) + spec["containers"]
    return [c for c in containers if "chatkit-gateway" in c["image"]]


def workloads() -> list[tuple[str, Document]]:
    return [(o, d) for o, d in everything() if d["kind"] == "Deployment"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_offline_renderer_agrees_with_kubectl_kustomize(overlay: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the offline renderer is the only one")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    theirs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def canonical(docs: list[Document]) -> collections.Counter[str]:
        return collections.Counter(json.dumps(doc, sort_keys=True) for doc in docs)

    assert canonical(rendered(overlay)) == canonical(theirs)


@pytest.mark.parametrize(
    ("overlay", "kinds"),
    [
        (
            "shared",
            {
                "Deployment",
                "Service",
                "PodDisruptionBudget",
                "HorizontalPodAutoscaler",
                "NetworkPolicy",
                "ServiceMonitor",
                "PrometheusRule",
            },
        ),
        (
            "sidecar",
            {
                "Deployment",
                "PodDisruptionBudget",
                "HorizontalPodAutoscaler",
                "NetworkPolicy",
                "PodMonitor",
                "PrometheusRule",
            },
        ),
    ],
)
def test_each_layout_ships_its_operational_pieces(overlay: str, kinds: set[str]) -> None:
    assert {doc["kind"] for doc in rendered(overlay)} == kinds


# kubernetes-validate knows the built-in APIs only; the Prometheus Operator's
# resources get the structural test after this one.
@pytest.mark.parametrize("version", SUPPORTED)
@pytest.mark.parametrize(
    "item", [i for i in everything() if i[1]["apiVersion"] != OPERATOR_API], ids=doc_id
)
def test_manifests_validate_against_each_supported_kubernetes(
    item: tuple[str, Document], version: str
) -> None:
    kubernetes_validate.validate(item[1], version, strict=True)


def test_operator_resources_have_the_shape_the_operator_reads() -> None:
    # kubernetes-validate has no schema for CRDs; these are the fields the
    # Prometheus Operator needs, and the references that must resolve.
    for overlay in OVERLAYS:
        docs = rendered(overlay)
        for doc in docs:
            if doc["apiVersion"] != OPERATOR_API:
                continue
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
            if doc["kind"] == "ServiceMonitor":
                services = [d for d in docs if d["kind"] == "Service"]
                [service] = [
                    s
                    for s in services
                    if doc["spec"]["selector"]["matchLabels"].items()
                    <= s["metadata"]["labels"].items()
                ]
                ports = {p["name"] for p in service["spec"]["ports"]}
                for endpoint in doc["spec"]["endpoints"]:
                    assert endpoint["port"] in ports
                    assert endpoint["path"] == "/metrics"
            elif doc["kind"] == "PodMonitor":
                [workload] = [d for d in docs if d["kind"] == "Deployment"]
                labels = workload["spec"]["template"]["metadata"]["labels"]
                assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
                ports = {
                    p["name"] for c in gateway_containers(workload) for p in c.get("ports", [])
                }
                for endpoint in doc["spec"]["podMetricsEndpoints"]:
                    assert endpoint["port"] in ports
            else:
                assert doc["kind"] == "PrometheusRule"
                for group in doc["spec"]["groups"]:
                    for rule in group["rules"]:
                        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
                        assert rule["labels"]["severity"] in ("warning", "critical")
                        assert rule["annotations"]["summary"]


@pytest.mark.parametrize("item", workloads(), ids=doc_id)
def test_pods_take_no_service_links(item: tuple[str, Document]) -> None:
    assert pod_spec(item[1])["enableServiceLinks"] is False


@pytest.mark.parametrize("item", workloads(), ids=doc_id)
def test_gateway_containers_use_only_settings_the_gateway_accepts(
    item: tuple[str, Document],
) -> None:
    for container in gateway_containers(item[1]):
        literal: dict[str, str] = {}
        for variable in container["env"]:
            name = variable["name"]
            assert name.startswith(ENV_PREFIX), name
            setting = name.removeprefix(ENV_PREFIX).lower()
            if setting.endswith("_file"):
                assert setting.removesuffix("_file") in file_settings(), name
            else:
                assert setting in Settings.model_fields, name
            if "value" in variable and not setting.endswith("_file"):
                literal[name] = variable["value"]
        load_settings(literal)  # the literal values are valid ones


@pytest.mark.parametrize("item", workloads(), ids=doc_id)
def test_gateway_containers_are_locked_down(item: tuple[str, Document]) -> None:
    spec = pod_spec(item[1])
    assert spec["automountServiceAccountToken"] is False
    for container in gateway_containers(item[1]):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        # Secrets come from mounted files the gateway's group may read.
        env = {v["name"]: v for v in container["env"]}
        for name, variable in env.items():
            if name.endswith("_FILE"):
                assert variable["value"].startswith("/run/secrets/")
        assert spec["securityContext"]["fsGroup"] == context["runAsGroup"]
        # The drain fits in the pod's grace period.
        grace = float(env["GATEWAY_SHUTDOWN_GRACE_SECONDS"]["value"])
        assert spec["terminationGracePeriodSeconds"] > grace + 5


def test_the_sidecar_listens_on_loopback_and_the_app_uses_it() -> None:
    [workload] = [d for d in rendered("sidecar") if d["kind"] == "Deployment"]
    [gateway] = gateway_containers(workload)
    assert gateway["restartPolicy"] == "Always"  # a native sidecar
    env = {v["name"]: v.get("value") for v in gateway["env"]}
    assert env["GATEWAY_HOST"] == "127.0.0.1"
    [app] = pod_spec(workload)["containers"]
    app_env = {v["name"]: v.get("value") for v in app["env"]}
    assert app_env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{env['GATEWAY_PORT']}/v1"


def test_selectors_and_scale_targets_resolve() -> None:
    for overlay in OVERLAYS:
        docs = rendered(overlay)
        [workload] = [d for d in docs if d["kind"] == "Deployment"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        for doc in docs:
            selector = doc["spec"].get("selector")
            if doc["kind"] == "Service":
                assert selector.items() <= labels.items()
            elif doc["kind"] in ("PodDisruptionBudget", "Deployment"):
                assert selector["matchLabels"].items() <= labels.items()
            elif doc["kind"] == "NetworkPolicy":
                assert doc["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
            elif doc["kind"] == "HorizontalPodAutoscaler":
                target = doc["spec"]["scaleTargetRef"]
                assert (target["kind"], target["name"]) == (
                    "Deployment",
                    workload["metadata"]["name"],
                )


# -- the alert rules ------------------------------------------------------------------------

promtool_needed = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (scripts/install: Debian's prometheus)",
)


def rule_file(tmp_path: Path, *, annotations: bool = True) -> Path:
    [rule] = [d for d in rendered("shared") if d["kind"] == "PrometheusRule"]
    spec = rule["spec"]
    if not annotations:
        # promtool test rules compares rendered annotations exactly; what is
        # tested there is when alerts fire, not their wording.
        for group in spec["groups"]:
            for alert in group["rules"]:
                alert.pop("annotations")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@promtool_needed
def test_alert_rules_pass_promtool_check(tmp_path: Path) -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(rule_file(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


# Series that make each alert fire (or, where noted, stay quiet), fed to
# `promtool test rules`: the thresholds and `for` durations behave as written.
POD = 'namespace="chat", pod="gw-0"'
RULE_TESTS = {
    "interval": "1m",
    "input_series": [
        {"series": f"chatkit_gateway_store_up{{{POD}}}", "values": "1 0x10"},
        {"series": f"chatkit_gateway_revocations_pending{{{POD}}}", "values": "0 3x10"},
        {"series": f"chatkit_gateway_revocation_listener_up{{{POD}}}", "values": "1 0x10"},
        # 100 requests/min, 10 of them 502 (upstream errors) and 10 500s.
        {
            "series": f'chatkit_gateway_requests_total{{{POD}, kind="client", status="200"}}',
            "values": "0+80x30",
        },
        {
            "series": f'chatkit_gateway_requests_total{{{POD}, kind="client", status="502"}}',
            "values": "0+10x30",
        },
        {
            "series": f'chatkit_gateway_requests_total{{{POD}, kind="client", status="500"}}',
            "values": "0+10x30",
        },
        {
            "series": f'chatkit_gateway_upstream_errors_total{{{POD}, kind="unavailable"}}',
            "values": "0+10x30",
        },
        # Every upstream answer takes 10-30 s; every session call 2.5 s or more.
        {
            "series": f'chatkit_gateway_upstream_headers_seconds_bucket{{{POD}, le="10"}}',
            "values": "0x30",
        },
        {
            "series": f'chatkit_gateway_upstream_headers_seconds_bucket{{{POD}, le="30"}}',
            "values": "0+10x30",
        },
        {
            "series": f'chatkit_gateway_upstream_headers_seconds_bucket{{{POD}, le="+Inf"}}',
            "values": "0+10x30",
        },
        {
            "series": "chatkit_gateway_request_duration_seconds_bucket"
            f'{{{POD}, kind="session_create", status_class="2xx", le="2.5"}}',
            "values": "0x30",
        },
        {
            "series": "chatkit_gateway_request_duration_seconds_bucket"
            f'{{{POD}, kind="session_create", status_class="2xx", le="+Inf"}}',
            "values": "0+5x30",
        },
    ],
}
ALERTS_AT = {
    # alert: (quiet until, firing at)
    "ChatkitGatewayStoreUnavailable": ("1m", "3m"),
    "ChatkitGatewayRevocationsPending": ("5m", "7m"),
    "ChatkitGatewayRevocationListenerDown": ("5m", "7m"),
    "ChatkitGatewayUpstreamErrors": ("10m", "20m"),
    "ChatkitGatewayHigh5xxRatio": ("10m", "20m"),
    "ChatkitGatewayP99LatencyHigh": ("15m", "25m"),
    "ChatkitGatewaySessionLatencyHigh": ("15m", "25m"),
}


@promtool_needed
def test_each_alert_fires_on_its_condition_and_not_before_its_for(tmp_path: Path) -> None:
    cases: list[dict[str, Any]] = []
    for alert, (quiet, firing) in ALERTS_AT.items():
        cases.append({"eval_time": quiet, "alertname": alert, "exp_alerts": []})
        cases.append(
            {
                "eval_time": firing,
                "alertname": alert,
                "exp_alerts": [{"exp_labels": {"namespace": "chat", **EXTRA_LABELS[alert]}}],
            }
        )
    rules = rule_file(tmp_path, annotations=False)
    spec = {"rule_files": [str(rules)], "tests": [{**RULE_TESTS, "alert_rule_test": cases}]}
    test_file = tmp_path / "rules_test.yaml"
    test_file.write_text(yaml.safe_dump(spec))
    result = subprocess.run(
        ["promtool", "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


_PER_POD = {"pod": "gw-0"}
EXTRA_LABELS: dict[str, dict[str, str]] = {
    "ChatkitGatewayStoreUnavailable": {**_PER_POD, "severity": "critical"},
    "ChatkitGatewayRevocationsPending": {**_PER_POD, "severity": "warning"},
    "ChatkitGatewayRevocationListenerDown": {**_PER_POD, "severity": "warning"},
    "ChatkitGatewayUpstreamErrors": {"severity": "warning"},
    "ChatkitGatewayHigh5xxRatio": {"severity": "critical"},
    "ChatkitGatewayP99LatencyHigh": {"severity": "warning"},
    "ChatkitGatewaySessionLatencyHigh": {"severity": "warning"},
}
