"""The Helm chart (helm/headwater): it lints, renders valid Kubernetes 1.30 manifests for each
scenario under ci/, refuses bad values, and gives every pod the identity the quorum expects.

helm comes from scripts/check-helm, which installs it into .cache/ when it is missing.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from headwater.config import NodeConfig, load_config
from headwater.raft.quorum import parse_voters

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "headwater"
NAMESPACE = "streaming"
POD_DOMAIN = f"hw-headwater-headless.{NAMESPACE}.svc.cluster.local"
# Settings the chart sets itself; config.* may not name them.
CHART_OWNED = {
    "node_id",
    "host",
    "port",
    "advertised_host",
    "data_dir",
    "voters",
    "controller_addresses",
    "cluster_secret",
    "cluster_secret_file",
    "raft_port",
    "metrics_port",
}


def _load_check_helm() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("check_helm", str(ROOT / "scripts" / "check-helm"))
    spec = importlib.util.spec_from_loader("check_helm", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


check_helm = _load_check_helm()


@pytest.fixture(scope="module")
def helm() -> str:
    return str(check_helm.helm_path())


def render(helm: str, *args: str) -> list[dict[str, Any]]:
    result = check_helm.render(helm, *args)
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    docs: list[dict[str, Any]] = check_helm.split_manifests(result.stdout)
    return docs


def one(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_env(container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The container's environment as Kubernetes gives it: metadata.name from the downward API,
    $(VAR) references to earlier variables expanded."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, var
            env[var["name"]] = pod_name
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
    return env


def run_start_script(container: dict[str, Any], env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Run the container's start command with stand-ins for python3 (the DNS wait) and headwater,
    which prints the HEADWATER_* environment and arguments it was started with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "headwater").write_text('#!/bin/sh\nenv | grep "^HEADWATER_"\necho "ARGS=$*"\n')
    for tool in ("python3", "headwater"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    path = f"{bin_dir}:{os.environ['PATH']}"
    result = subprocess.run(
        container["command"], env={**env, "PATH": path}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


# ------------------------------------------------------------------ lint, render, validate, refuse


def test_check_helm_script_passes() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check-helm")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"scripts/check-helm failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("values", sorted(p.name for p in (CHART / "ci").glob("*-values.yaml")))
def test_each_scenario_renders_manifests_valid_for_kubernetes_1_30(helm: str, values: str) -> None:
    check_helm.ensure_kubernetes_validate()
    manifests = render(helm, "-f", str(CHART / "ci" / values))
    assert check_helm.validate(manifests, values) == []


@pytest.mark.parametrize(
    ("what", "args", "word"), check_helm.BAD_VALUES, ids=[b[0] for b in check_helm.BAD_VALUES]
)
def test_bad_values_are_refused_at_render(helm: str, what: str, args: list[str], word: str) -> None:
    result = check_helm.render(helm, *args)
    assert result.returncode != 0, f"helm template accepted {what}"
    assert word in result.stderr, f"the error for {what} does not name {word!r}:\n{result.stderr}"


def test_the_schema_offers_every_node_setting_the_chart_does_not_own() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]
    kinds = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}
    expected = {
        f.name: kinds[f.type if isinstance(f.type, str) else f.type.__name__]
        for f in dataclasses.fields(NodeConfig)
        if f.name not in CHART_OWNED
    }
    assert config["additionalProperties"] is False
    assert {name: p["type"] for name, p in config["properties"].items()} == expected


def test_every_level_of_the_schema_refuses_unknown_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    # Kubernetes objects passed through as they are (affinity terms, spread constraints, network
    # peers, valueFrom) are checked by the API server; Helm's own global is left open.
    open_ok = {"global", "nodeAffinity", "podAffinity", "podAntiAffinity", "valueFrom", "items"}

    def walk(node: dict[str, Any], where: str) -> None:
        if node.get("type") == "object" and where.rsplit(".", 1)[-1] not in open_ok:
            assert "additionalProperties" in node, f"{where} accepts unknown keys"
        for name, child in node.get("properties", {}).items():
            walk(child, f"{where}.{name}")
        if isinstance(node.get("items"), dict) and "properties" in node["items"]:
            walk(node["items"], f"{where}[]")

    walk(schema, "values")


def test_every_value_is_documented_with_param_and_in_the_readme() -> None:
    import yaml

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    text = (CHART / "values.yaml").read_text()
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"@param (\S+)", text))

    def leaves(node: Any, prefix: str) -> list[str]:
        # A map is documented as a whole when it has its own @param (resources, config, ...).
        if isinstance(node, dict) and node and prefix not in documented:
            return [leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}.{k}" if prefix else k)]
        return [prefix]

    for name in leaves(values, ""):
        assert name in documented, f"value {name} has no @param comment"
        assert f"`{name}`" in readme, f"value {name} is missing from the README's table"


# ------------------------------------------------------------------ what each pod runs


@pytest.mark.parametrize(("replicas", "voters"), [(3, 3), (1, 1), (7, 5), (4, 3)])
def test_each_pod_gets_its_node_id_the_voters_and_its_advertised_host(
    helm: str, tmp_path: Path, replicas: int, voters: int
) -> None:
    manifests = render(helm, "--set", f"replicaCount={replicas}", "--set", f"voters={voters}")
    statefulset = one(manifests, "StatefulSet")
    assert statefulset["spec"]["replicas"] == replicas
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    assert statefulset["spec"]["serviceName"] == "hw-headwater-headless"
    node_toml = tmp_path / "node.toml"
    node_toml.write_text(one(manifests, "ConfigMap")["data"]["node.toml"])
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    expected_voters = {i + 1: f"hw-headwater-{i}.{POD_DOMAIN}:9392" for i in range(voters)}
    expected_controllers = ",".join(f"hw-headwater-{i}.{POD_DOMAIN}:9192" for i in range(voters))
    for ordinal in range(replicas):
        pod = f"hw-headwater-{ordinal}"
        started = run_start_script(container, pod_env(container, pod), tmp_path)
        assert started["ARGS"] == "node --config /etc/headwater/node.toml"
        config = load_config(str(node_toml), env=started)
        assert config.node_id == ordinal + 1, pod
        assert config.advertised() == (f"{pod}.{POD_DOMAIN}", 9192)
        assert config.host == "0.0.0.0"
        assert parse_voters(config.voters) == expected_voters
        assert config.controller_addresses == expected_controllers
        assert (config.node_id in expected_voters) == (ordinal < voters)
        assert config.cluster_secret_file == "/etc/headwater/secret/cluster.secret"
        assert config.data_dir.startswith("/var/lib/headwater/")


def test_advertised_host_may_name_each_pod_outside_the_cluster(helm: str, tmp_path: Path) -> None:
    manifests = render(helm, "--set", "advertisedHost=$(POD_NAME).headwater.example.com")
    (container,) = one(manifests, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    node_toml = tmp_path / "node.toml"
    node_toml.write_text(one(manifests, "ConfigMap")["data"]["node.toml"])
    started = run_start_script(container, pod_env(container, "hw-headwater-1"), tmp_path)
    config = load_config(str(node_toml), env=started)
    assert config.advertised() == ("hw-headwater-1.headwater.example.com", 9192)
    # The quorum still goes by the pod DNS names.
    assert parse_voters(config.voters)[2] == f"hw-headwater-1.{POD_DOMAIN}:9392"


def test_no_secret_value_appears_in_any_container_args_or_env(helm: str) -> None:
    manifests = render(
        helm, "-f", str(CHART / "ci" / "metrics-values.yaml"), "--set", "extraEnv[0].name=HEADWATER_LOG_LEVEL"
    )
    secret = one(manifests, "Secret")
    value = base64.b64decode(secret["data"]["cluster.secret"]).decode()
    assert len(value) >= 32
    pods = [one(manifests, "StatefulSet")["spec"]["template"]["spec"], one(manifests, "Pod")["spec"]]
    for pod in pods:
        for container in pod["containers"]:
            exposed = json.dumps([container.get("command"), container.get("args"), container.get("env")])
            assert value not in exposed, f"the cluster secret shows in container {container['name']}"
            assert "CLUSTER_SECRET" not in exposed, "the secret must come from the file alone"
    assert value not in one(manifests, "ConfigMap", "hw-headwater")["data"]["node.toml"]
    volumes = {v["name"]: v for v in pods[0]["volumes"]}
    assert volumes["cluster-secret"]["secret"]["secretName"] == secret["metadata"]["name"]


def test_an_existing_secret_replaces_the_generated_one(helm: str) -> None:
    manifests = render(helm, "-f", str(CHART / "ci" / "existing-secret-values.yaml"))
    assert not [m for m in manifests if m["kind"] == "Secret"]
    pod = one(manifests, "StatefulSet")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "cluster-secret"]
    assert volume["secret"]["secretName"] == "headwater-secret"
    assert volume["secret"]["items"] == [{"key": "secret", "path": "secret"}]
    assert (
        'cluster_secret_file = "/etc/headwater/secret/secret"'
        in one(manifests, "ConfigMap")["data"]["node.toml"]
    )


def test_pods_run_unprivileged_with_health_probes_and_room_to_shut_down(helm: str) -> None:
    manifests = render(helm)
    pod = one(manifests, "StatefulSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["readinessProbe"]["grpc"] == {"port": 9192}
    assert container["startupProbe"]["grpc"] == {"port": 9192}
    assert container["livenessProbe"]["tcpSocket"] == {"port": "client"}
    assert pod["terminationGracePeriodSeconds"] >= 2 * 10 + 5
    assert one(manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert "preferredDuringSchedulingIgnoredDuringExecution" in pod["affinity"]["podAntiAffinity"]
    assert pod["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "ScheduleAnyway"
    assert one(manifests, "Service", "hw-headwater-headless")["spec"]["publishNotReadyAddresses"] is True


def test_metrics_scenario_keeps_raft_to_the_chart_pods_and_alerts_on_partitions(helm: str) -> None:
    manifests = render(helm, "-f", str(CHART / "ci" / "metrics-values.yaml"))
    selector = one(manifests, "StatefulSet")["spec"]["selector"]["matchLabels"]
    rules = one(manifests, "NetworkPolicy")["spec"]["ingress"]
    raft_rules = [r for r in rules if any(p["port"] == 9392 for p in r["ports"])]
    assert raft_rules == [
        {"from": [{"podSelector": {"matchLabels": selector}}], "ports": [{"port": 9392, "protocol": "TCP"}]}
    ]
    assert "metrics_port = 9404" in one(manifests, "ConfigMap", "hw-headwater")["data"]["node.toml"]
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    # The PrometheusRule carries the rule groups of files/alerts.yaml unchanged (the one copy).
    import yaml  # installed with kubernetes-validate, as check-helm does

    rule = one(manifests, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert "headwater_under_replicated_partitions" in alerts["HeadwaterUnderReplicatedPartitions"]["expr"]
    assert alerts["HeadwaterUnderReplicatedPartitions"]["for"] == "5m"
    assert "headwater_offline_partitions" in alerts["HeadwaterOfflinePartitions"]["expr"]
    # The dashboard ConfigMap: labelled for Grafana's sidecar, holding files/dashboard.json.
    dashboard = one(manifests, "ConfigMap", "hw-headwater-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Streaming"}
    shipped = json.loads((CHART / "files" / "dashboard.json").read_text())
    assert json.loads(dashboard["data"]["headwater.json"]) == shipped


def test_monitoring_resources_are_off_by_default_and_follow_metrics_enabled(helm: str) -> None:
    kinds = {(m["kind"], m["metadata"]["name"]) for m in render(helm)}
    assert ("ConfigMap", "hw-headwater-dashboard") not in kinds
    assert not {k for k, _ in kinds} & {"ServiceMonitor", "PrometheusRule"}
    everything_but_metrics = [
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.prometheusRule.enabled=true",
        "--set", "metrics.grafanaDashboard.enabled=true",
    ]  # fmt: skip
    kinds = {(m["kind"], m["metadata"]["name"]) for m in render(helm, *everything_but_metrics)}
    assert ("ConfigMap", "hw-headwater-dashboard") not in kinds
    assert not {k for k, _ in kinds} & {"ServiceMonitor", "PrometheusRule"}


# ------------------------------------------------------------------ the rendered pods, run here


def _free_port_on_all(hosts: list[str]) -> int:
    """A port free on every one of the hosts (loopback addresses)."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        free = True
        for host in hosts[1:]:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    free = False
                    break
        if free:
            return port
    raise AssertionError("no port free on every loopback address")


def _serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def test_the_rendered_pod_commands_form_a_cluster(helm: str, tmp_path: Path) -> None:
    """Three pods as the chart renders them, run as local processes: each pod DNS name becomes a
    loopback address, each volume a folder. They form the quorum, serve, and carry a record."""
    import signal
    import time

    from headwater import Admin, Consumer, ConsumerRecord, NewTopic, Producer, TopicPartition

    replicas = 3
    hosts = [f"127.0.0.{10 + i}" for i in range(replicas)]
    client_port = _free_port_on_all(hosts)
    raft_port = _free_port_on_all(hosts)
    manifests = render(
        helm, "--set", f"replicaCount={replicas}", "--set", f"ports.client={client_port}",
        "--set", f"ports.raft={raft_port}",
    )  # fmt: skip
    statefulset = one(manifests, "StatefulSet")
    pod_spec = statefulset["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    names = {f"hw-headwater-{i}.{POD_DOMAIN}": hosts[i] for i in range(replicas)}
    secret = one(manifests, "Secret")
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    for key, value in secret["data"].items():
        (secret_dir / key).write_bytes(base64.b64decode(value))
        (secret_dir / key).chmod(0o600)

    def localize(text: str, mounts: dict[str, str]) -> str:
        for name, host in names.items():
            text = text.replace(name, host)
        # One pass, longest path first: a folder put in place of one path must not be rewritten again.
        pattern = "|".join(re.escape(path) for path in sorted(mounts, key=len, reverse=True))
        return re.sub(pattern, lambda m: mounts[m[0]], text)

    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for i in range(replicas):
            pod_dir = tmp_path / f"pod-{i}"
            pod_dir.mkdir()
            mounts: dict[str, str] = {}
            for mount in container["volumeMounts"]:
                if mount["name"] == "config":
                    mounts[mount["mountPath"]] = str(pod_dir / mount["subPath"])
                elif mount["name"] == "cluster-secret":
                    mounts[mount["mountPath"]] = str(secret_dir)
                else:
                    (pod_dir / mount["name"]).mkdir()
                    mounts[mount["mountPath"]] = str(pod_dir / mount["name"])
            node_toml = one(manifests, "ConfigMap")["data"]["node.toml"]
            (pod_dir / "node.toml").write_text(localize(node_toml, mounts))
            env = {k: localize(v, mounts) for k, v in pod_env(container, f"hw-headwater-{i}").items()}
            # The pod listens on 0.0.0.0 with a port of its own; here the three share the ports.
            env["HEADWATER_HOST"] = hosts[i]
            env["PATH"] = os.environ["PATH"]
            command = [localize(part, mounts) for part in container["command"]]
            logs.append(pod_dir / "node.log")
            with open(logs[-1], "wb") as log:
                processes.append(
                    subprocess.Popen(
                        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        addresses = [f"{host}:{client_port}" for host in hosts]
        deadline = time.monotonic() + 90
        while not all(_serving(a) for a in addresses):
            dead = [i for i, p in enumerate(processes) if p.poll() is not None]
            assert not dead, f"pod {dead[0]} exited:\n{logs[dead[0]].read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the pods did not all serve within 90 s"
            time.sleep(0.2)

        admin = Admin(addresses)
        try:
            admin.create_topics([NewTopic("orders", partitions=1, replication_factor=3)])
        finally:
            admin.close()
        with Producer(addresses) as producer:
            metadata = producer.send("orders", value=b"order-1", key=b"alice").result(timeout=30)
        assert metadata.offset == 0
        with Consumer(addresses, auto_offset_reset="earliest") as consumer:
            consumer.assign([TopicPartition("orders", 0)])
            records: list[ConsumerRecord] = []
            deadline = time.monotonic() + 30
            while not records and time.monotonic() < deadline:
                records = consumer.poll(timeout_s=1.0)
        assert [(r.key, r.value) for r in records] == [(b"alice", b"order-1")]

        # The helm test pod's script, against the same nodes (bootstrap: the client Service there).
        (test_container,) = one(manifests, "Pod")["spec"]["containers"]
        test_env = {"HEADWATER_BOOTSTRAP": ",".join(addresses), "PATH": os.environ["PATH"]}
        helm_test = subprocess.run(
            test_container["command"], env=test_env, capture_output=True, text=True, timeout=120
        )
        assert helm_test.returncode == 0, (
            f"the helm test script failed:\n{helm_test.stdout}{helm_test.stderr}"
        )
        assert "consumed: one three two" in helm_test.stdout
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
