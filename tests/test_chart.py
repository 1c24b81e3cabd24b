"""The Helm chart in deploy/helm/agentserve, rendered and checked offline.

No helm binary and no cluster are needed: helm-python-sdk renders and lints the chart
with Helm's own library, and kubernetes-validate checks every manifest against the
Kubernetes API schemas in strict mode (an unknown or misplaced field fails). KEDA's
ScaledObject is a CRD with no schema there, so its shape is asserted by hand. The
other assertions pin what the chart promises: the roles, the probes, a hardened pod,
the schema hook, a shutdown budget that outlasts the server's, and secrets kept out of
ConfigMaps.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from agentserve.settings import Settings
from tests.test_container import LANGSMITH_VARIABLES, dockerfile_stages

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "agentserve"
RELEASE = "agent"
FULLNAME = "agent-agentserve"
# The chart's kubeVersion floor, and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
PENDING_RUNS_QUERY = "SELECT count(*) FROM agent_runs WHERE status = 'pending'"

REQUIRED_SECRET_KEYS = {"DATABASE_URL"}
OPTIONAL_SECRET_KEYS = {
    "AGENT_API_KEY",
    "AGENT_API_KEYS",
    "JWT_SECRET",
    "SESSION_SECRET",
    "WEBHOOK_SECRET",
    "OPENAI_API_KEY",
}
OPTIONAL_SECRET_KEYS |= {"LANGSMITH_API_KEY"}
SECRET_VALUES = {
    "DATABASE_URL": "postgresql://agent:pooled-pw-4d1c9e@pgbouncer:6432/agent",
    "DATABASE_DIRECT_URL": "postgresql://agent:direct-pw-9e2a7b@db:5432/agent",
    "AGENT_API_KEYS": "default=api-key-value-7f3b0c2e9a41",
    "JWT_SECRET": "jwt-secret-value-51aa03",
    "SESSION_SECRET": "session-secret-value-c0de77",
    "OPENAI_API_KEY": "sk-openai-value-0b5e12",
}
# Read by the app besides Settings: the LangSmith SDK and the OpenTelemetry setup.
OTEL_VARIABLES = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"}
# The role split's settings, which settings.py does not declare yet.
ROLE_SPLIT_VARIABLES = {"ROLE", "SETUP_SCHEMA_ON_START"}
# Read by KEDA's postgresql trigger (connectionFromEnv), not by the app.
KEDA_VARIABLES = {"DATABASE_DIRECT_URL"}

SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "worker-disabled": {"worker": {"enabled": False}},
    "ingress": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
            "tls": [{"secretName": "agent-tls", "hosts": ["agent.example.com"]}],
        }
    },
    "hpa": {"api": {"autoscaling": {"enabled": True}}, "worker": {"autoscaling": {"enabled": True}}},
    "keda": {"worker": {"keda": {"enabled": True}}},
    "existing-secret": {"existingSecret": "agent-credentials"},
    "secrets": {"secrets": SECRET_VALUES},
    "worker-disabled-hpa-ingress": {
        "worker": {"enabled": False},
        "api": {"autoscaling": {"enabled": True}},
        "ingress": {"enabled": True},
    },
    "everything": {
        "existingSecret": "agent-credentials",
        "ingress": {"enabled": True},
        "api": {"autoscaling": {"enabled": True}, "env": {"WEB_CONCURRENCY": 4}},
        "worker": {"keda": {"enabled": True}, "env": {"GRACEFUL_TIMEOUT_S": 300}},
        "serviceAccount": {"create": False, "name": "agent-runner"},
        "imagePullSecrets": [{"name": "registry"}],
    },
}

Manifest = dict[str, Any]


# ---- rendering ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm_python.Chart, values: dict[str, Any]) -> list[Manifest]:
    documents: list[Manifest] = []
    for path, text in chart.render(values, name=RELEASE).items():
        if path.endswith("NOTES.txt"):
            continue
        documents.extend(document for document in yaml.safe_load_all(text) if document)
    return documents


def notes(chart: helm_python.Chart, values: dict[str, Any]) -> str:
    return next(text for path, text in chart.render(values, name=RELEASE).items() if path.endswith("NOTES.txt"))


@pytest.fixture(scope="module", params=list(SCENARIOS), ids=list(SCENARIOS))
def scenario(request: pytest.FixtureRequest, chart: helm_python.Chart) -> tuple[dict[str, Any], list[Manifest]]:
    values = SCENARIOS[request.param]
    return values, render(chart, values)


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [manifest for manifest in manifests if manifest["kind"] == kind]


def named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [manifest for manifest in of_kind(manifests, kind) if manifest["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def component(manifest: Manifest) -> str | None:
    return manifest["metadata"]["labels"].get("app.kubernetes.io/component")


def deployments(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {str(component(deployment)): deployment for deployment in of_kind(manifests, "Deployment")}


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, dict[str, Any]]]:
    for manifest in manifests:
        if manifest["kind"] in ("Deployment", "Job"):
            yield f"{manifest['kind']}/{manifest['metadata']['name']}", manifest["spec"]["template"]["spec"]


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def configmap_data(manifests: list[Manifest]) -> dict[str, str]:
    (configmap,) = of_kind(manifests, "ConfigMap")
    data: dict[str, str] = configmap["data"]
    return data


def secret_data(secret: Manifest) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}


def serving_settings(manifests: list[Manifest], deployment: Manifest) -> dict[str, str]:
    """The plain (non-secret) env one serving container starts with: envFrom, then env."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    settings = dict(configmap_data(manifests))
    settings.update({name: entry["value"] for name, entry in container_env(container).items() if "value" in entry})
    return settings


def render_error(chart: helm_python.Chart, values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmRenderError) as caught:
        chart.render(values, name=RELEASE)
    return str(caught.value)


def dockerfile_user() -> str:
    return dockerfile_stages((ROOT / "Dockerfile").read_text())[-1].last("USER")


# ---- lint and schemas --------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_chart_lints_without_warnings(name: str) -> None:
    report = helm_python.lint(CHART, SCENARIOS[name], strict=True)
    assert report["total_charts_linted"] == 1
    assert not report["errors"], report
    # Severity 1 is informational ("icon is recommended"); 2 is a warning, 3 an error.
    assert not [message for message in report["messages"] if message["severity"] >= 2], report


def test_every_manifest_passes_strict_schema_validation(scenario: tuple[dict[str, Any], list[Manifest]]) -> None:
    _, manifests = scenario
    for manifest in manifests:
        if manifest["kind"] == "ScaledObject":
            continue  # a CRD without a schema here; see test_keda_scales_workers_on_pending_runs
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field(chart: helm_python.Chart) -> None:
    """So that the test above cannot pass because the validator checks nothing."""
    deployment = copy.deepcopy(deployments(render(chart, {}))["api"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"httpGet": {"path": "/ready"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


def test_every_object_carries_the_standard_labels(scenario: tuple[dict[str, Any], list[Manifest]]) -> None:
    _, manifests = scenario
    for manifest in manifests:
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "agentserve", manifest["metadata"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "1.0.0"
        assert labels["helm.sh/chart"] == "agentserve-0.1.0"
    for deployment in of_kind(manifests, "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert selector["app.kubernetes.io/component"] in ("api", "worker")


# ---- roles -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "roles"),
    [
        ({}, {"api": "api", "worker": "worker"}),
        ({"worker": {"enabled": False}}, {"api": "all"}),
        ({"api": {"enabled": False}}, {"worker": "worker"}),
    ],
    ids=["split", "worker-disabled", "api-disabled"],
)
def test_role_of_each_deployment(chart: helm_python.Chart, values: dict[str, Any], roles: dict[str, str]) -> None:
    found = deployments(render(chart, values))
    assert set(found) == set(roles)
    for name, deployment in found.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container_env(container)["ROLE"]["value"] == roles[name]


def test_serving_pods_never_set_up_the_schema(scenario: tuple[dict[str, Any], list[Manifest]]) -> None:
    _, manifests = scenario
    for deployment in of_kind(manifests, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert container_env(container)["SETUP_SCHEMA_ON_START"]["value"] == "false"


def test_chart_refuses_to_run_nothing(chart: helm_python.Chart) -> None:
    assert "nothing to run" in render_error(chart, {"api": {"enabled": False}, "worker": {"enabled": False}})


def test_service_sends_port_8000_to_api_pods_only(scenario: tuple[dict[str, Any], list[Manifest]]) -> None:
    values, manifests = scenario
    service = named(manifests, "Service", FULLNAME)
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000
    selector = service["spec"]["selector"].items()
    for name, deployment in deployments(manifests).items():
        template = deployment["spec"]["template"]
        selected = selector <= template["metadata"]["labels"].items()
        assert selected == (name == "api"), f"the Service must select the api pods only, not {name}"
        if selected:
            (container,) = template["spec"]["containers"]
            ports = {entry["name"]: entry["containerPort"] for entry in container["ports"]}
            assert ports.get(port["targetPort"], port["targetPort"]) == 8000
    ingresses = of_kind(manifests, "Ingress")
    assert len(ingresses) == int(values.get("ingress", {}).get("enabled", False))
    for ingress in ingresses:
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == FULLNAME and backend["port"]["name"] == port["name"]


def test_image_defaults_to_the_chart_app_version(chart: helm_python.Chart) -> None:
    images = {spec["containers"][0]["image"] for _, spec in pod_specs(render(chart, {}))}
    assert images == {"agentserve:1.0.0"}
    values = {"image": {"repository": "registry.example.com/agentserve", "tag": "1.0.1", "pullPolicy": "Always"}}
    for _, spec in pod_specs(render(chart, values)):
        assert spec["containers"][0]["image"] == "registry.example.com/agentserve:1.0.1"
        assert spec["containers"][0]["imagePullPolicy"] == "Always"


# ---- pods --------------------------------------------------------------------------


def test_every_pod_is_hardened(scenario: tuple[dict[str, Any], list[Manifest]]) -> None:
    _, manifests = scenario
    uid, _, gid = dockerfile_user().partition(":")
    specs = list(pod_specs(manifests))
    assert specs
    for where, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == (uid, gid), f"{where}: not the image's user"
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{where}: {bound}"


def test_app_writes_only_to_emptydirs(scenario: tuple[dict[str, Any], list[Manifest]]) -> None:
    """/tmp and DATA_DIR (where the metrics live) are the only writable paths."""
    _, manifests = scenario
    for where, spec in pod_specs(manifests):
        empty_dirs = {volume["name"] for volume in spec["volumes"] if "emptyDir" in volume}
        for container in spec["containers"]:
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            data_dir = container_env(container)["DATA_DIR"]["value"]
            assert PurePosixPath(data_dir).is_absolute(), where
            assert {"/tmp", data_dir} <= set(mounts), f"{where}: {mounts}"
            assert {mounts["/tmp"], mounts[data_dir]} <= empty_dirs, where
            assert set(mounts.values()) <= empty_dirs, f"{where} mounts something other than an emptyDir"


def test_serving_pods_probe_ready_and_health_on_port_8000(scenario: tuple[dict[str, Any], list[Manifest]]) -> None:
    _, manifests = scenario
    for deployment in of_kind(manifests, "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {entry["name"]: entry["containerPort"] for entry in container["ports"]}
        probes = {kind: container[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness")}
        expected = {"startup": "/ready", "readiness": "/ready", "liveness": "/health"}
        for kind, probe in probes.items():
            port = probe["httpGet"]["port"]
            assert probe["httpGet"]["path"] == expected[kind], kind
            assert ports.get(port, port) == 8000, kind
        # /ready waits up to READY_TIMEOUT_S for PostgreSQL; a shorter probe timeout
        # would fail readiness on a database that is merely slow.
        ready_timeout = float(serving_settings(manifests, deployment)["READY_TIMEOUT_S"])
        assert probes["readiness"]["timeoutSeconds"] > ready_timeout
        assert probes["startup"]["periodSeconds"] * probes["startup"]["failureThreshold"] >= 60


def prestop_sleep_seconds(container: dict[str, Any]) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert PurePosixPath(command[0]).name == "sleep" and len(command) == 2, command
    return int(command[1])


def test_grace_period_outlasts_graceful_shutdown_and_prestop(scenario: tuple[dict[str, Any], list[Manifest]]) -> None:
    _, manifests = scenario
    for deployment in of_kind(manifests, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        graceful = int(serving_settings(manifests, deployment)["GRACEFUL_TIMEOUT_S"])
        assert spec["terminationGracePeriodSeconds"] > graceful + prestop_sleep_seconds(container), (
            f"{deployment['metadata']['name']}: the kubelet would SIGKILL runs the server is still finishing"
        )


def test_prestop_sleep_exists_in_the_image() -> None:
    """preStop runs /bin/sleep in the app's image: python slim is Debian, whose
    essential coreutils package ships it."""
    base = dockerfile_stages((ROOT / "Dockerfile").read_text())[-1].base
    assert base.startswith("python:") and base.endswith("-slim"), base


def test_grace_period_follows_the_graceful_timeout(chart: helm_python.Chart) -> None:
    found = deployments(
        render(chart, {"config": {"GRACEFUL_TIMEOUT_S": 300}, "worker": {"env": {"GRACEFUL_TIMEOUT_S": 30}}})
    )
    assert found["api"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300 + 5 + 15
    assert found["worker"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 30 + 5 + 15


@pytest.mark.parametrize(
    "values",
    [
        {"api": {"terminationGracePeriodSeconds": 125}},
        {"worker": {"terminationGracePeriodSeconds": 60}},
        {"api": {"terminationGracePeriodSeconds": 130}, "shutdown": {"preStopSleepSeconds": 10}},
        {"shutdown": {"marginSeconds": 0}},
    ],
)
def test_too_short_a_grace_period_fails_the_render(chart: helm_python.Chart, values: dict[str, Any]) -> None:
    assert "must exceed GRACEFUL_TIMEOUT_S" in render_error(chart, values)


def test_an_explicit_grace_period_above_the_floor_is_kept(chart: helm_python.Chart) -> None:
    found = deployments(render(chart, {"api": {"terminationGracePeriodSeconds": 126}}))
    assert found["api"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 126


# ---- schema setup ------------------------------------------------------------------


def hook_annotations(manifest: Manifest) -> dict[str, str]:
    annotations: dict[str, str] = manifest["metadata"].get("annotations", {})
    return {key: value for key, value in annotations.items() if key.startswith("helm.sh/hook")}


@pytest.mark.parametrize("existing_secret", ["", "agent-credentials"])
def test_schema_is_set_up_once_by_a_hook_job_over_the_direct_url(
    chart: helm_python.Chart, existing_secret: str
) -> None:
    values: dict[str, Any] = {"existingSecret": existing_secret}
    if not existing_secret:
        values["secrets"] = SECRET_VALUES
    manifests = render(chart, values)
    (job,) = of_kind(manifests, "Job")
    annotations = hook_annotations(job)
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    # A ServiceAccount the chart creates does not exist yet when a pre-install hook runs.
    assert "serviceAccountName" not in spec
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "agentserve.migrate"]
    env = container_env(container)
    reference = env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert reference["key"] == "DATABASE_DIRECT_URL" and not reference.get("optional")
    assert "envFrom" not in container, "the ConfigMap does not exist yet at pre-install"

    hook_secrets = [secret for secret in of_kind(manifests, "Secret") if hook_annotations(secret)]
    if existing_secret:
        assert reference["name"] == existing_secret
        assert not of_kind(manifests, "Secret"), "with existingSecret the chart renders no Secret"
    else:
        (hook_secret,) = hook_secrets
        assert reference["name"] == hook_secret["metadata"]["name"]
        hook = hook_annotations(hook_secret)
        assert hook["helm.sh/hook"] == annotations["helm.sh/hook"]
        assert int(hook["helm.sh/hook-weight"]) < int(annotations.get("helm.sh/hook-weight", "0"))
        assert secret_data(hook_secret) == {"DATABASE_DIRECT_URL": SECRET_VALUES["DATABASE_DIRECT_URL"]}


def test_job_runs_with_an_existing_service_account_when_the_chart_creates_none(chart: helm_python.Chart) -> None:
    (job,) = of_kind(render(chart, {"serviceAccount": {"create": False, "name": "agent-runner"}}), "Job")
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "agent-runner"


def test_migration_can_be_left_to_someone_else(chart: helm_python.Chart) -> None:
    manifests = render(chart, {"migration": {"enabled": False}})
    assert not of_kind(manifests, "Job")
    assert not [manifest for manifest in manifests if hook_annotations(manifest)]


# ---- settings and secrets ----------------------------------------------------------


def test_secrets_stay_out_of_configmaps_and_plain_env(chart: helm_python.Chart) -> None:
    manifests = render(chart, {"secrets": SECRET_VALUES})
    secret_names = set(SECRET_VALUES) | REQUIRED_SECRET_KEYS | OPTIONAL_SECRET_KEYS
    assert not secret_names & set(configmap_data(manifests)), "a secret name in the ConfigMap"
    for manifest in manifests:
        if manifest["kind"] == "Secret":
            continue
        text = yaml.safe_dump(manifest)
        for name, value in SECRET_VALUES.items():
            assert value not in text, f"{name}'s value shows in {manifest['kind']} {manifest['metadata']['name']}"
    secret = named(manifests, "Secret", FULLNAME)
    assert secret_data(secret) == SECRET_VALUES


@pytest.mark.parametrize(
    "values",
    [
        {"config": {"OPENAI_API_KEY": "sk-in-the-wrong-place"}},
        {"api": {"env": {"DATABASE_URL": "postgresql://in-the-wrong-place"}}},
        {"worker": {"env": {"JWT_SECRET": "in-the-wrong-place"}}},
    ],
)
def test_a_secret_in_plain_settings_fails_the_render(chart: helm_python.Chart, values: dict[str, Any]) -> None:
    assert "is a secret" in render_error(chart, values)


def test_settings_the_chart_sets_itself_are_refused(chart: helm_python.Chart) -> None:
    assert "set by the chart itself" in render_error(chart, {"config": {"ROLE": "worker"}})


def test_empty_secret_values_are_left_out_so_pods_fail_closed(chart: helm_python.Chart) -> None:
    """Without DATABASE_URL the app would start an embedded PostgreSQL in an emptyDir."""
    manifests = render(chart, {"secrets": {"DATABASE_URL": SECRET_VALUES["DATABASE_URL"]}})
    assert secret_data(named(manifests, "Secret", FULLNAME)) == {"DATABASE_URL": SECRET_VALUES["DATABASE_URL"]}
    assert "data" not in named(manifests, "Secret", f"{FULLNAME}-migration")


@pytest.mark.parametrize("existing_secret", ["", "agent-credentials"])
def test_serving_pods_read_secrets_by_reference(chart: helm_python.Chart, existing_secret: str) -> None:
    manifests = render(chart, {"existingSecret": existing_secret})
    for deployment in of_kind(manifests, "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        references = {
            name: entry["valueFrom"]["secretKeyRef"]
            for name, entry in container_env(container).items()
            if "secretKeyRef" in entry.get("valueFrom", {})
        }
        assert set(references) == REQUIRED_SECRET_KEYS | OPTIONAL_SECRET_KEYS
        for name, reference in references.items():
            assert reference["name"] == (existing_secret or FULLNAME) and reference["key"] == name
            assert bool(reference.get("optional")) == (name in OPTIONAL_SECRET_KEYS), name
    if existing_secret:
        assert not of_kind(manifests, "Secret")


def test_every_variable_set_is_one_something_reads(scenario: tuple[dict[str, Any], list[Manifest]]) -> None:
    """A misspelt name (WEB_CONCURENCY) would be silently ignored by the app."""
    _, manifests = scenario
    known = set(Settings.model_fields) | LANGSMITH_VARIABLES | OTEL_VARIABLES | ROLE_SPLIT_VARIABLES | KEDA_VARIABLES
    names = set(configmap_data(manifests))
    for _, spec in pod_specs(manifests):
        for container in spec["containers"]:
            names |= set(container_env(container))
    assert not names - known, f"variables nothing reads: {sorted(names - known)}"


def test_rendered_settings_are_accepted_by_the_app(
    scenario: tuple[dict[str, Any], list[Manifest]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every serving pod's environment, with its secrets filled in, passes Settings'
    validation, production's included."""
    _, manifests = scenario
    for deployment in of_kind(manifests, "Deployment"):
        for name in Settings.model_fields:
            monkeypatch.delenv(name, raising=False)
        for name, value in {**serving_settings(manifests, deployment), **SECRET_VALUES}.items():
            monkeypatch.setenv(name, value)
        settings = Settings(_env_file=None)
        assert settings.ENVIRONMENT == "production"
        assert not settings.embedded_database
        assert settings.DATA_DIR.is_absolute()
        assert settings.HOST == "0.0.0.0" and settings.PORT == 8000


def test_whole_numbers_stay_integers_in_env(chart: helm_python.Chart) -> None:
    """Helm reads numbers in values as floats; 2147483647 must not become 2.147483647e+09."""
    data = configmap_data(render(chart, {"config": {"DB_PREPARE_THRESHOLD": 2147483647, "DB_CHECK_AFTER_IDLE_S": 2.5}}))
    assert data["DB_PREPARE_THRESHOLD"] == "2147483647"
    assert data["DB_CHECK_AFTER_IDLE_S"] == "2.5"


def test_notes_say_the_chart_brings_no_database(chart: helm_python.Chart) -> None:
    empty = notes(chart, {})
    assert "CloudNativePG" in empty and "runs no database" in empty
    assert "secrets.DATABASE_URL is empty" in empty and "secrets.DATABASE_DIRECT_URL is empty" in empty
    assert "WARNING" not in notes(chart, {"secrets": SECRET_VALUES})


# ---- scaling and disruption --------------------------------------------------------


def test_hpa_scales_each_role_on_cpu(chart: helm_python.Chart) -> None:
    manifests = render(chart, SCENARIOS["hpa"])
    found = deployments(manifests)
    hpas = {str(component(hpa)): hpa for hpa in of_kind(manifests, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"api", "worker"}
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": found[name]["metadata"]["name"],
        }
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"]["type"] == "Utilization"
        assert "replicas" not in found[name]["spec"], "a fixed replica count would fight the HPA on every upgrade"
    assert all("replicas" in deployment["spec"] for deployment in deployments(render(chart, {})).values())


def test_keda_scales_workers_on_pending_runs(chart: helm_python.Chart) -> None:
    manifests = render(chart, SCENARIOS["keda"])
    (scaled,) = of_kind(manifests, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["metadata"]["name"] == f"{FULLNAME}-worker" and component(scaled) == "worker"
    spec = scaled["spec"]
    worker = deployments(manifests)["worker"]
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0 and spec["pollingInterval"] > 0
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "postgresql"
    metadata = trigger["metadata"]
    assert metadata["query"] == PENDING_RUNS_QUERY
    assert all(isinstance(value, str) for value in metadata.values()), "KEDA trigger metadata values are strings"
    assert float(metadata["targetQueryValue"]) > 0
    # The connection string comes from a secret env var of the scaled container.
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert spec["scaleTargetRef"]["envSourceContainerName"] == container["name"]
    reference = container_env(container)[metadata["connectionFromEnv"]]["valueFrom"]["secretKeyRef"]
    assert reference["key"] == "DATABASE_DIRECT_URL" and reference["name"] == FULLNAME
    assert "replicas" not in worker["spec"]
    assert not of_kind(manifests, "HorizontalPodAutoscaler"), "KEDA creates the worker's HPA itself"
    assert "connectionFromEnv" not in str(deployments(manifests)["api"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"worker": {"keda": {"enabled": True}, "autoscaling": {"enabled": True}}}, "cannot both be enabled"),
        ({"worker": {"keda": {"enabled": True, "targetQueryValue": "0"}}}, "positive number"),
        ({"worker": {"enabled": False, "keda": {"enabled": True}}}, "needs worker.enabled"),
    ],
    ids=["keda-and-hpa", "zero-target", "no-worker"],
)
def test_inconsistent_scaling_fails_the_render(chart: helm_python.Chart, values: dict[str, Any], message: str) -> None:
    assert message in render_error(chart, values)


def test_each_role_has_a_disruption_budget_that_allows_drains(scenario: tuple[dict[str, Any], list[Manifest]]) -> None:
    _, manifests = scenario
    budgets = {str(component(pdb)): pdb for pdb in of_kind(manifests, "PodDisruptionBudget")}
    found = deployments(manifests)
    assert set(budgets) == set(found)
    for name, pdb in budgets.items():
        # minAvailable: 1 with a single replica would block every node drain.
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": found[name]["spec"]["selector"]}
