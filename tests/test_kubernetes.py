"""The Kubernetes manifests (``deploy/kubernetes/``) and the ``Containerfile`` cannot drift.

- Every manifest is a valid object of pinned Kubernetes versions, in strict
  mode (an unknown or misspelt field fails): ``kubernetes-validate`` ships the
  schemas, so nothing is downloaded.
- The container's command line (the image's ``ENTRYPOINT`` with its ``CMD``,
  or with the Deployment's ``args``) is parsed by twistd's and twinfer's real
  option parsers, and :func:`twinfer.tap.makeService` builds from it exactly
  the ports the manifests name, on the port numbers they give.
- Probe paths resolve to the health resources of the real metrics site, and
  the prometheus-adapter rule behind the autoscaler reads metric families the
  collector really exports (a page rendered by ``generate_latest``).
- The termination grace period covers the whole drain.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import numpy as np
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.scripts import twistd
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest
from twisted.web.wsgi import WSGIResource

import twinfer
from scheduling_support import HandRunner, tiny_engine, tiny_signature
from support import config_from
from twinfer import tap
from twinfer.dataplane import DataPlane
from twinfer.ops.control import Controller
from twinfer.ops.lifecycle import ServingService
from twinfer.ops.metrics import HealthResource, make_registry
from twinfer.scheduling import Dispatcher, JobQueue, ModelEntry, Worker
from twistd_process import TWISTD_TINY_CONFIG

ROOT = Path(__file__).parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "Containerfile"
#: The oldest Kubernetes minor version the manifests are for, and the newest
#: whose schemas the pinned kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.31", "1.37")
#: Documents that are not Kubernetes API objects: kustomize's own file and a
#: custom resource of the Prometheus operator (checked field by field below).
NOT_KUBERNETES_API = {
    "kustomize.config.k8s.io/v1beta1/Kustomization",
    "monitoring.coreos.com/v1/PodMonitor",
}
#: Port options of ``twistd twinfer`` that a pod does not expose, and why.
UNEXPOSED_PORT_OPTIONS = {
    "debug-port": "the debug console stays on loopback; kubectl port-forward reaches it",
    "agent-port": "HAProxy's agent check; Kubernetes balances on /readyz instead",
}
#: Which health resource each probe must use: liveness must not depend on
#: readiness (a drained device would get the pod restarted).
PROBES = {"startupProbe": False, "livenessProbe": False, "readinessProbe": True}


# -- reading the files ---------------------------------------------------------


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every YAML document under deploy/kubernetes, with its file's relative path."""
    found = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text("utf-8")):
            if document:
                found.append((str(path.relative_to(MANIFESTS)), document))
    return found


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    """The one manifest of this kind (and name)."""
    [document] = [
        d
        for _, d in manifests()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return document


def pod_template() -> dict[str, Any]:
    return the("Deployment")["spec"]["template"]


def container() -> dict[str, Any]:
    """The pod's only container (twinfer)."""
    [only] = pod_template()["spec"]["containers"]
    return only


def container_ports() -> dict[str, int]:
    """The container's ports, by name."""
    return {port["name"]: port["containerPort"] for port in container()["ports"]}


def instructions() -> list[tuple[str, str]]:
    """The Containerfile's (INSTRUCTION, arguments), continuation lines joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in CONTAINERFILE.read_text("utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue  # comments and blank lines may sit inside a continuation too
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, arguments = (pending + text).partition(" ")
        found.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Containerfile ends inside a continuation"
    return found


def instruction(keyword: str) -> str:
    """The arguments of the Containerfile's one ``keyword`` instruction."""
    [arguments] = [a for k, a in instructions() if k == keyword]
    return arguments


def exec_form(keyword: str) -> list[str]:
    """ENTRYPOINT or CMD, which must be in exec (JSON) form: in shell form
    ``/bin/sh`` would be PID 1 and twistd would never see SIGTERM, nor drain."""
    argv = json.loads(instruction(keyword))
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def option_names(args: list[str]) -> set[str]:
    """The long options given in ``args`` (all written ``--name=value`` or ``--flag``)."""
    assert all(arg.startswith("--") for arg in args), args
    return {arg[2:].partition("=")[0] for arg in args}


def endpoint_port(description: str) -> tuple[int, str | None]:
    """The port number and ``interface=`` (if any) of a ``tcp:`` endpoint description."""
    kind, *parts = description.split(":")
    assert kind in ("tcp", "tcp6"), f"{description}: not a TCP endpoint"
    keywords = dict(part.split("=", 1) for part in parts if "=" in part)
    positional = [part for part in parts if "=" not in part]
    assert len(positional) + ("port" in keywords) == 1, description
    return int(keywords.get("port") or positional[0]), keywords.get("interface")


def build_service(args: list[str], directory: Path) -> tap.TwinferService:
    """What ``twistd twinfer ARGS`` builds, serving the builtin ``tiny`` model
    instead of the default models (quicker to compile; the ports are the same)."""
    config = directory / "twinfer.toml"
    config.write_text(TWISTD_TINY_CONFIG)
    options = tap.Options()
    options.parseOptions([*args, f"--config={config}"])
    return tap.makeService(options)


def listening_ports(top: tap.TwinferService) -> dict[str, str]:
    """The endpoint description of each port ``top`` listens on, by port name."""
    return {str(s.name): s.description for s in top.listening_services()}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> tap.TwinferService:
    """What the Deployment's container runs (the image's ENTRYPOINT with its args)."""
    return build_service(container()["args"], tmp_path_factory.mktemp("deployed"))


# -- the manifests are Kubernetes objects ------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_the_pinned_kubernetes_versions(version: str) -> None:
    validated = set()
    for path, document in manifests():
        kind = f"{document['apiVersion']}/{document['kind']}"
        if kind in NOT_KUBERNETES_API:
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            location = ".".join(str(p) for p in e.path)
            pytest.fail(f"{path}: {kind} {location}: {e.message} (Kubernetes {version})")
        validated.add(kind)
    assert validated == {
        "apps/v1/Deployment",
        "v1/Service",
        "policy/v1/PodDisruptionBudget",
        "autoscaling/v2/HorizontalPodAutoscaler",
        "v1/ConfigMap",
    }


def test_the_validation_rejects_a_misspelt_field() -> None:
    deployment = copy.deepcopy(the("Deployment"))
    spec = deployment["spec"]["template"]["spec"]
    spec["terminationGracePeriod"] = spec.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomize_applies_every_manifest_but_the_monitoring_ones() -> None:
    kustomization = the("Kustomization")
    top_level = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(top_level)
    [image] = kustomization["images"]
    assert container()["image"] == f"{image['name']}:{image['newTag']}"
    assert image["newTag"] == twinfer.__version__


# -- the command line and the ports -------------------------------------------


def test_the_image_command_is_accepted_by_twistd_and_twinfer() -> None:
    entrypoint = exec_form("ENTRYPOINT")
    assert entrypoint[0] == "twistd"
    for args in (exec_form("CMD"), container()["args"]):
        options = twistd.ServerOptions()
        options.parseOptions([*entrypoint[1:], *args])
        assert options.subCommand == "twinfer"
        assert isinstance(options.subOptions, tap.Options)
        assert options["nodaemon"]  # stays PID 1, logs to stdout
        assert options["pidfile"] == ""  # writes no pid file on a read-only root


def test_the_deployment_names_each_port_the_server_opens(deployed: tap.TwinferService) -> None:
    listening = listening_ports(deployed)
    assert set(listening) == set(container_ports())
    for name, description in listening.items():
        port, interface = endpoint_port(description)
        assert port == container_ports()[name], name
        # Reachable from the kubelet and the Services, not on loopback only.
        assert interface in (None, "0.0.0.0", "::"), description


def test_the_image_opens_the_ports_it_exposes(tmp_path: Path) -> None:
    listening = listening_ports(build_service(exec_form("CMD"), tmp_path))
    exposed = {int(port) for port in instruction("EXPOSE").split()}
    assert {endpoint_port(d)[0] for d in listening.values()} == exposed
    assert set(container_ports().values()) == exposed
    assert set(listening) == set(container_ports())


def test_every_port_option_is_given_but_the_unexposed_ones() -> None:
    """A new port option (a gRPC port...) fails here until the manifests name it."""
    port_options = {
        parameter[0]
        for parameter in tap.Options.optParameters
        if parameter[0] == "port" or parameter[0].endswith("-port")
    }
    for args in (container()["args"], exec_form("CMD")):
        assert option_names(args) & port_options == port_options - set(UNEXPOSED_PORT_OPTIONS)


def test_the_probes_use_the_health_resources_of_the_metrics_site(
    deployed: tap.TwinferService,
) -> None:
    [metrics] = [s for s in deployed.listening_services() if s.name == "metrics"]
    site = metrics.factory
    assert isinstance(site, Site)

    def resource(path: str) -> Any:
        return site.getResourceFor(DummyRequest(path.lstrip("/").encode().split(b"/")))

    for probe, ready in PROBES.items():
        get = container()[probe]["httpGet"]
        assert get["port"] in ("metrics", container_ports()["metrics"]), probe
        health = resource(get["path"])
        assert isinstance(health, HealthResource), f"{probe}: {get['path']} is not served"
        assert health.ready is ready, f"{probe} on {get['path']}"

    # /metrics is prometheus_client's WSGI application.
    annotations = pod_template()["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == container_ports()["metrics"]
    assert isinstance(resource(annotations["prometheus.io/path"]), WSGIResource)
    [endpoint] = the("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert isinstance(resource(endpoint["path"]), WSGIResource)


def test_the_grace_period_covers_the_whole_drain() -> None:
    options = tap.Options()
    options.parseOptions(container()["args"])
    # The drain's parts after --drain-timeout, as tap.makeService leaves them.
    defaults = inspect.signature(ServingService).parameters
    after_drain = defaults["linger"].default + defaults["close_timeout"].default
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod_template()["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(pre_stop[1]) + options["drain-timeout"] + after_drain


# -- the pods, their Services, budget and autoscaler --------------------------


def selects_the_pods(selector: dict[str, str]) -> bool:
    labels = pod_template()["metadata"]["labels"]
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_each_service_selects_the_pods_and_targets_named_ports() -> None:
    services = [d for _, d in manifests() if d["kind"] == "Service"]
    for service in services:
        assert selects_the_pods(service["spec"]["selector"]), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert container_ports()[port["targetPort"]] == port["port"]
    [headless] = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert {p["targetPort"] for p in headless["spec"]["ports"]} == set(container_ports())
    # One Service for each front end (Prometheus scrapes the pods themselves).
    fronts = [s for s in services if s is not headless]
    assert all(len(s["spec"]["ports"]) == 1 for s in fronts)
    assert {s["spec"]["ports"][0]["targetPort"] for s in fronts} == set(container_ports()) - {
        "metrics"
    }


def test_the_budget_and_the_autoscaler_act_on_these_pods() -> None:
    deployment, budget, autoscaler = (
        the("Deployment"),
        the("PodDisruptionBudget"),
        the("HorizontalPodAutoscaler"),
    )
    assert selects_the_pods(deployment["spec"]["selector"]["matchLabels"])
    assert selects_the_pods(budget["spec"]["selector"]["matchLabels"])
    assert selects_the_pods(the("PodMonitor")["spec"]["selector"]["matchLabels"])
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == (deployment["apiVersion"], "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    low, high = autoscaler["spec"]["minReplicas"], autoscaler["spec"]["maxReplicas"]
    assert low <= deployment["spec"]["replicas"] <= high
    # A voluntary disruption always leaves a pod serving.
    assert budget["spec"]["maxUnavailable"] < low


def test_the_pod_runs_as_the_image_user_with_a_read_only_root() -> None:
    user, _, group = instruction("USER").partition(":")
    pod_security = pod_template()["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert (pod_security["runAsUser"], pod_security["runAsGroup"]) == (int(user), int(group))
    assert int(user) != 0
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    resources = container()["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory"}, kind


def test_the_image_is_built_from_a_slim_python_with_pip_install() -> None:
    base = instruction("FROM")
    assert base.startswith("python:") and "slim" in base
    assert any(k == "RUN" and "pip install ." in a for k, a in instructions())


def test_the_ignore_files_agree_and_keep_what_the_image_copies() -> None:
    docker = (ROOT / ".dockerignore").read_text("utf-8")
    assert (ROOT / ".containerignore").read_text("utf-8") == docker
    patterns = [line for line in docker.splitlines() if line and not line.startswith("#")]
    copied = [
        source
        for keyword, arguments in instructions()
        if keyword == "COPY"
        for source in arguments.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, p) for p in patterns), source


# -- the autoscaler's metric ----------------------------------------------------


def adapter_rules() -> list[dict[str, Any]]:
    config = yaml.safe_load(the("ConfigMap", "adapter-config")["data"]["config.yaml"])
    return config["rules"]


def exported_samples() -> Iterator[tuple[str, str, dict[str, str]]]:
    """(family type, sample name, labels) of the page Prometheus scrapes, after
    one request ran on a real ``tiny`` engine (a worker whose thread is run by hand)."""
    clock, runner = Clock(), HandRunner()
    queue = JobQueue("tiny", size=4)
    worker = Worker("cpu#0", "cpu", {"tiny": tiny_engine()}, [queue], clock=clock, runner=runner)
    entry = ModelEntry("tiny", tiny_signature(), ("cpu",), (queue,))
    dispatcher = Dispatcher({"tiny": entry}, [worker], clock=clock)
    dispatcher.start()
    try:
        plane = DataPlane(dispatcher, tasks=None)
        controller = Controller(config_from(TWISTD_TINY_CONFIG), plane, clock)
        answered = plane.infer(
            plane.open_session("binary"), 1, "tiny", {"x": np.ones((1, 4), np.float32)}
        )
        while runner.handed:
            runner.run_next()
        assert answered.called
        page = generate_latest(make_registry(controller)).decode()
    finally:
        dispatcher.stop()
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            yield family.type, sample.name, sample.labels


def test_the_autoscaler_scales_on_the_metric_the_adapter_rule_defines() -> None:
    defined = {rule["name"]["as"] for rule in adapter_rules()}
    metrics = the("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metrics
    for metric in metrics:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] in defined
        assert metric["pods"]["target"]["type"] == "AverageValue"


def test_the_adapter_rule_reads_counters_the_collector_exports() -> None:
    samples = {name: (kind, labels) for kind, name, labels in exported_samples()}
    for rule in adapter_rules():
        # Per pod: the adapter fills in the pod's label matchers and grouping.
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert "<<.GroupBy>>" in rule["metricsQuery"]
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        series = re.findall(r"\btwinfer_\w+", rule["seriesQuery"])
        assert len(series) == 1 and re.fullmatch(rule["name"]["matches"], series[0])
        read = set(re.findall(r"\btwinfer_\w+", rule["metricsQuery"]))
        assert read == {"twinfer_queue_seconds_sum", "twinfer_compute_seconds_sum"}
        for name in read | set(series):
            assert name in samples, f"{name} is not exported"
            kind, labels = samples[name]
            # rate() needs a series that only grows: a counter or a histogram's sum.
            assert kind in ("counter", "histogram"), name
            assert name.endswith(("_total", "_sum")), name
            # The namespace and pod labels come from the scrape, not from twinfer.
            assert not set(labels) & {"namespace", "pod"}, name
