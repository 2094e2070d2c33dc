"""The deploy files: every YAML file parses, and the facts the fleet's shutdown, naming and scaling rely on hold.

systemd, Docker, Kubernetes, KEDA and Prometheus do not run here, so these tests read the files and check what
a careless edit would break: a stop timeout shorter than the drain, consumer names that are not per pod, a
scaler that cannot wake from zero, an alert without a severity. Where the real tool is installed
(`systemd-analyze`, `promtool`) the file is also checked by it; otherwise that test is skipped and says why.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fastworker import config
from fastworker.errors import ExitCode

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "fastworker@.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "fastworker.env.example"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "docker-compose.yml"
K8S_DEPLOYMENT = DEPLOY / "k8s" / "deployment.yaml"
KEDA = DEPLOY / "k8s" / "keda-scaledobject.yaml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"

GRACE_ENV = config.env_name("shutdown_grace_s")
DEFAULT_GRACE_S = float(next(f.default for f in config.fields() if f.name == "shutdown_grace_s"))
EXPORTED_METRICS = {
    "fastworker_messages_total", "fastworker_handler_duration_seconds", "fastworker_batch_size",
    "fastworker_stream_length", "fastworker_group_pending", "fastworker_group_lag",
    "fastworker_oldest_pending_age_seconds", "fastworker_dead_letters", "fastworker_workers_alive",
    "fastworker_worker_restarts_total",
}
# Seconds per unit, for Go durations (compose) and systemd time spans.
TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}


# ---- helpers ----------------------------------------------------------------------------------------------

def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


def load_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def k8s_object(path: Path, kind: str) -> dict[str, Any]:
    matches = [doc for doc in load_docs(path) if doc.get("kind") == kind]
    assert len(matches) == 1, f"{path.name} must hold exactly one {kind}, found {len(matches)}"
    return matches[0]


def worker_container() -> dict[str, Any]:
    containers = k8s_object(K8S_DEPLOYMENT, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_env() -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in worker_container()["env"]}


def seconds(span: str) -> float:
    """A duration as compose ("1m30s") or systemd ("45", "1min 30s") writes it, in seconds."""
    text = str(span).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), f"unreadable duration {span!r}"
    return sum(float(number) * TIME_UNITS[unit] for number, unit in parts)


def unit_entries(path: Path = UNIT) -> dict[str, list[tuple[str, str]]]:
    """The unit file as {section: [(key, value), ...]}, keeping repeated keys (systemd allows them)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current, f"unexpected line in {path.name}: {raw!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_value(section: str, key: str) -> str:
    values = [value for name, value in unit_entries()[section] if name == key]
    assert values, f"{UNIT.name} sets no {key}= in [{section}]"
    return values[-1]


def env_file_assignments() -> dict[str, str]:
    """The variables the env example actually sets (not the commented-out ones)."""
    pairs = (line.partition("=") for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, _, value in pairs}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comment lines dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending.strip())
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical]


def dockerfile_last(instruction: str) -> str:
    values = [args for name, args in dockerfile_instructions() if name == instruction]
    assert values, f"the Dockerfile has no {instruction}"
    return values[-1]


def alert_rules() -> Iterator[dict[str, Any]]:
    for group in load_docs(ALERTS)[0]["groups"]:
        yield from group["rules"]


def keda_triggers() -> list[dict[str, Any]]:
    triggers: list[dict[str, Any]] = k8s_object(KEDA, "ScaledObject")["spec"]["triggers"]
    return triggers


def lag_pairs() -> set[tuple[str, str]]:
    return {(t["metadata"]["stream"], t["metadata"]["consumerGroup"]) for t in keda_triggers()
            if "lagCount" in t["metadata"]}


# ---- every YAML file ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_deploy_yaml_file_parses_to_mappings(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no document"
    assert all(isinstance(doc, dict) for doc in docs)


# ---- Kubernetes ----------------------------------------------------------------------------------------------

def test_deployment_termination_grace_exceeds_the_drain() -> None:
    pod_spec = k8s_object(K8S_DEPLOYMENT, "Deployment")["spec"]["template"]["spec"]
    grace = float(container_env().get(GRACE_ENV, {}).get("value", DEFAULT_GRACE_S))
    assert pod_spec["terminationGracePeriodSeconds"] > grace


def test_deployment_consumer_prefix_is_the_pod_name() -> None:
    prefix = container_env()[config.env_name("consumer_prefix")]
    assert prefix["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_deployment_processes_follow_the_cpu_request() -> None:
    container = worker_container()
    source = container_env()[config.env_name("processes")]["valueFrom"]["resourceFieldRef"]
    assert (source["containerName"], source["resource"]) == (container["name"], "requests.cpu")
    assert "cpu" in container["resources"]["requests"]


def test_deployment_redis_password_comes_from_a_secret() -> None:
    password = container_env()["REDIS_PASSWORD"]
    assert "value" not in password
    assert set(password["valueFrom"]["secretKeyRef"]) >= {"name", "key"}


def test_deployment_probes_and_scrape_annotation_use_the_http_port() -> None:
    container = worker_container()
    port = int(container_env()[config.env_name("http_port")]["value"])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: (probe["path"], named[probe["port"]]) for kind, probe in probes.items()} == {
        "startupProbe": ("/healthz", port), "livenessProbe": ("/healthz", port), "readinessProbe": ("/readyz", port)}
    annotations = k8s_object(K8S_DEPLOYMENT, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], int(annotations["prometheus.io/port"])) == ("true", port)


def test_deployment_runs_as_the_image_user() -> None:
    pod_security = k8s_object(K8S_DEPLOYMENT, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    image_uid = int(dockerfile_last("USER").split(":")[0])
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == image_uid


def test_deployment_leaves_the_replica_count_to_keda() -> None:
    assert "replicas" not in k8s_object(K8S_DEPLOYMENT, "Deployment")["spec"]


# ---- KEDA ----------------------------------------------------------------------------------------------------

def test_scaledobject_targets_the_deployment_container() -> None:
    target = k8s_object(KEDA, "ScaledObject")["spec"]["scaleTargetRef"]
    assert target["name"] == k8s_object(K8S_DEPLOYMENT, "Deployment")["metadata"]["name"]
    assert target["envSourceContainerName"] == worker_container()["name"]


def test_scaledobject_reads_the_deployment_connection_variables() -> None:
    env = container_env()
    for trigger in keda_triggers():
        meta = trigger["metadata"]
        assert {meta["hostFromEnv"], meta["portFromEnv"]} <= set(env), meta


def test_scaledobject_scales_every_group_on_lag_from_zero() -> None:
    spec = k8s_object(KEDA, "ScaledObject")["spec"]
    pairs = {(t["metadata"]["stream"], t["metadata"]["consumerGroup"]) for t in spec["triggers"]}
    lag_triggers = [t for t in spec["triggers"] if "lagCount" in t["metadata"]]
    assert {t["type"] for t in spec["triggers"]} == {"redis-streams"}
    assert spec["minReplicaCount"] == 0
    assert lag_pairs() == pairs
    assert all(t["metadata"]["activationLagCount"] == "0" for t in lag_triggers)


def test_scaledobject_pending_triggers_only_keep_a_pod_alive() -> None:
    # Pending entries grow with the number of pods (work in flight), so they must never drive scale-up.
    pending = [t["metadata"] for t in keda_triggers() if "pendingEntriesCount" in t["metadata"]]
    assert {(m["stream"], m["consumerGroup"]) for m in pending} == lag_pairs()
    assert all(int(m["pendingEntriesCount"]) >= 1_000_000 for m in pending)


def test_scaledobject_metadata_values_are_strings() -> None:
    # KEDA's trigger metadata is a map of strings: a YAML number there is rejected by the CRD.
    for trigger in keda_triggers():
        assert all(isinstance(value, str) for value in trigger["metadata"].values()), trigger["metadata"]


def test_scaledobject_authentication_uses_the_deployment_secret() -> None:
    auth = k8s_object(KEDA, "TriggerAuthentication")
    secret = container_env()["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    refs = {ref["parameter"]: (ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]}
    assert refs["password"] == (secret["name"], secret["key"])
    assert {t["authenticationRef"]["name"] for t in keda_triggers()} == {auth["metadata"]["name"]}


def test_scaledobject_covers_every_group_of_the_demo_app() -> None:
    demo = pytest.importorskip("fastworker.demo", reason="fastworker.demo is not importable in this checkout")
    app_pairs = {(stream, group) for group, handlers in demo.app.groups().items() for stream in handlers}
    assert lag_pairs() == app_pairs


# ---- Docker --------------------------------------------------------------------------------------------------

def test_compose_stop_grace_exceeds_the_drain() -> None:
    worker = load_docs(COMPOSE)[0]["services"]["worker"]
    grace = float(worker["environment"].get(GRACE_ENV, DEFAULT_GRACE_S))
    assert seconds(worker["stop_grace_period"]) > grace


def test_compose_redis_persists_to_a_named_volume() -> None:
    compose = load_docs(COMPOSE)[0]
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volume = next(v for v in redis["volumes"] if v.endswith(":/data")).partition(":")[0]
    assert volume in compose["volumes"]


def test_compose_worker_waits_for_a_healthy_redis() -> None:
    services = load_docs(COMPOSE)[0]["services"]
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["redis"]["healthcheck"]["test"]


def test_compose_worker_builds_from_the_repository_dockerfile() -> None:
    build = load_docs(COMPOSE)[0]["services"]["worker"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE


@pytest.mark.parametrize("instruction", ["ENTRYPOINT", "CMD"])
def test_dockerfile_runs_in_exec_form(instruction: str) -> None:
    args = json.loads(dockerfile_last(instruction))
    assert isinstance(args, list)
    assert all(isinstance(arg, str) for arg in args)


def test_dockerfile_runs_as_a_non_root_user() -> None:
    user = dockerfile_last("USER").split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_health_check_runs_fastworker_health() -> None:
    assert "fastworker health" in dockerfile_last("HEALTHCHECK")


def test_dockerfile_stops_with_sigterm() -> None:
    assert dockerfile_last("STOPSIGNAL") == "SIGTERM"


def test_dockerfile_copies_paths_that_exist() -> None:
    copies = [args.split() for name, args in dockerfile_instructions()
              if name == "COPY" and not args.startswith("--from")]
    sources = [source for parts in copies for source in parts[:-1]]
    assert sources
    assert all((REPO / source).exists() for source in sources), sources


# ---- Prometheus ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", list(alert_rules()), ids=lambda rule: rule["alert"])
def test_alert_rule_is_complete(rule: dict[str, Any]) -> None:
    assert rule["expr"].strip()
    assert re.fullmatch(r"\d+[smh]", rule["for"])
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert rule["annotations"]["summary"].strip()
    assert rule["annotations"]["description"].strip()


def test_alert_rules_use_only_exported_metrics() -> None:
    names = {name for rule in alert_rules() for name in re.findall(r"\bfastworker_[a-z_]+", rule["expr"])}
    assert names
    assert {re.sub(r"_(bucket|sum|count)$", "", name) for name in names} <= EXPORTED_METRICS


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


# ---- systemd -------------------------------------------------------------------------------------------------

def test_systemd_unit_stop_timeout_exceeds_the_drain() -> None:
    grace = float(env_file_assignments().get(GRACE_ENV, DEFAULT_GRACE_S))
    assert seconds(unit_value("Service", "TimeoutStopSec")) > grace


def test_systemd_unit_signals_only_the_supervisor_first() -> None:
    assert unit_value("Service", "KillMode") == "mixed"
    assert unit_value("Service", "KillSignal") == "SIGTERM"


def test_systemd_unit_waits_for_readiness_from_the_supervisor() -> None:
    assert unit_value("Service", "Type") == "notify"
    assert unit_value("Service", "NotifyAccess") == "main"


def test_systemd_unit_does_not_restart_on_configuration_errors() -> None:
    assert unit_value("Service", "Restart") == "on-failure"
    prevented = {int(code) for code in unit_value("Service", "RestartPreventExitStatus").split()}
    assert prevented == {ExitCode.USAGE, ExitCode.CONFIG, ExitCode.APP_IMPORT}


def test_systemd_unit_runs_the_app_from_its_env_file() -> None:
    assert unit_value("Service", "ExecStart").endswith(" run ${FASTWORKER_APP}")
    assert ("EnvironmentFile", "/etc/fastworker/%i.env") in unit_entries()["Service"]
    assert "FASTWORKER_APP" in env_file_assignments()


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    # The real ExecStart names a virtual environment that does not exist on this machine.
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text(encoding="utf-8"), flags=re.M)
    (tmp_path / UNIT.name).write_text(text, encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(tmp_path / "fastworker@ci.service")],
                            capture_output=True, text=True, timeout=60, check=False)
    # verify exits 0 on unknown keys and unparsable values: its complaints about the unit are on stderr.
    complaints = [line for line in result.stderr.splitlines() if "fastworker@" in line]
    assert complaints == []
    assert result.returncode == 0, result.stderr


def test_systemd_env_example_documents_every_setting() -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    missing = [config.env_name(f.name) for f in config.fields() if config.env_name(f.name) not in text]
    assert missing == []


def test_systemd_env_example_has_no_comment_after_a_value() -> None:
    # systemd keeps "value  # note" whole, comment included: notes must sit on their own lines.
    assignments = [line.lstrip("# ") for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
                   if re.match(r"#?\s?[A-Z][A-Z0-9_]*=", line)]
    assert assignments
    assert [line for line in assignments if "#" in line] == []
