"""epp's container image, built with deploy/image/build and run as a cluster runs it.

Each container runs with `--network host --read-only --tmpfs /tmp --user 65532` (the upstream
chart's EPP container: non-root, read-only root filesystem) next to simulated model servers and a
real Envoy on the host's loopback. `run_epp` starts one with the given args and env and removes
it afterwards, so a new case is one test function.

Needs a Docker daemon (.ci/docker starts one): without one these tests fail where CI is set, and
are skipped elsewhere.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.envoy import EnvoyOptions, EnvoyProcess
from epp.extproc.processor import SERVICE
from epp.stack import Stack, StackOptions, free_ports, wait_until
from tests.tls_helpers import Issuer, SecretVolume, VerifyingEnvoy, handshake

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("EPP_TEST_IMAGE", "epp:test")
BASE = "epp-base:bookworm"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SITE = "opt/epp/lib/python3.11/site-packages"
RUN_AS_THE_CLUSTER_DOES = ["--network", "host", "--read-only", "--tmpfs", "/tmp", "--user", "65532"]


def _docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command"
    r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                       timeout=30)
    return None if r.returncode == 0 else f"no Docker daemon answers: {r.stderr.strip()[-300:]}"


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])}... failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


@pytest.fixture(scope="module")
def image() -> str:
    reason = _docker_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the image tests need Docker in CI (run .ci/docker first): {reason}")
        pytest.skip(reason)
    r = subprocess.run([str(REPO / "deploy/image/build"), "--tag", IMAGE], capture_output=True, text=True,
                       timeout=900, cwd=REPO)
    assert r.returncode == 0, f"deploy/image/build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return IMAGE


@dataclass
class EppPorts:
    grpc: int
    health: int
    metrics: int
    http_pick: int
    explain: int

    @classmethod
    def free(cls) -> EppPorts:
        return cls(*free_ports(5))

    def flags(self) -> list[str]:
        return ["--grpc-port", str(self.grpc), "--grpc-health-port", str(self.health),
                "--metrics-port", str(self.metrics), "--http-pick-port", str(self.http_pick),
                "--explain-port", str(self.explain), "--bind-address", "127.0.0.1"]


@dataclass
class Container:
    name: str
    ports: EppPorts
    args: list[str] = field(default_factory=list)

    def logs(self) -> str:
        r = docker("logs", self.name, check=False)
        return (r.stdout + r.stderr)[-6000:]

    def running(self) -> bool:
        r = docker("inspect", "-f", "{{.State.Running}}", self.name, check=False)
        return r.stdout.strip() == "true"

    def wait_serving(self, timeout: float = 60) -> None:
        wait_until(lambda: not self.running() or health(self.ports.health) == "SERVING", timeout,
                   f"epp's health in {self.name}")
        assert self.running(), f"epp exited:\n{self.logs()}"


@pytest.fixture
def run_epp(image) -> Iterator[Callable[..., Container]]:
    """Runs the image as the cluster does: `run(args, env=..., volumes={host_dir: container_dir})`, the args
    after free loopback ports; volumes are mounted read-only. Each container is removed after the test."""
    started: list[Container] = []

    def run(args: list[str], *, env: dict[str, str] | None = None, ports: EppPorts | None = None,
            volumes: dict[str, str] | None = None) -> Container:
        ports = ports or EppPorts.free()
        c = Container(f"epp-test-{uuid.uuid4().hex[:10]}", ports, args)
        opts = [f"--env={k}={v}" for k, v in (env or {}).items()]
        opts += [f"--volume={host}:{inside}:ro" for host, inside in (volumes or {}).items()]
        docker("run", "--detach", "--name", c.name, *RUN_AS_THE_CLUSTER_DOES, *opts, image, *ports.flags(), *args)
        started.append(c)
        return c

    yield run
    for c in started:
        docker("rm", "--force", c.name, check=False)


@pytest.fixture(scope="module")
def pool() -> Iterator[Stack]:
    """Simulated model servers on the host's loopback: the pool the containers pick from."""
    stack = Stack(StackOptions(servers=2))
    stack.start_simulators()
    yield stack
    stack.stop()


def health(port: int, service: str = "") -> str:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as e:
        return e.code().name


def pick_through_envoy(envoy: EnvoyProcess, pool: Stack) -> str:
    """A completion through Envoy; the endpoint epp picked, which answered it."""
    r = httpx.post(f"{envoy.url}/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2},
                   timeout=15)
    assert r.status_code == 200, (r.status_code, r.text, envoy.logs())
    assert r.json()["choices"]
    picked = r.headers["x-epp-endpoint"]  # --explain-headers, copied onto the response by the shipped config
    assert picked in pool.endpoints
    return picked


def metric_total(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


# --- the image itself ---------------------------------------------------------------------------

def _files(image_name: str) -> dict[str, tarfile.TarInfo]:
    """Every path in the image's filesystem, from `docker export` of a container never started."""
    cid = docker("create", image_name).stdout.strip()
    try:
        out = subprocess.run(["docker", "export", cid], capture_output=True, check=True, timeout=120).stdout
    finally:
        docker("rm", cid, check=False)
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        return {m.name.rstrip("/"): m for m in tar.getmembers()}


def test_image_adds_epp_and_nothing_of_the_checkout(image) -> None:
    files, base = _files(image), _files(BASE)
    added = sorted(set(files) - set(base))
    # All the image adds to its base is one venv: epp and its dependencies, installed from wheels.
    assert f"{SITE}/epp/server.py" in files
    assert [p for p in added if p not in ("opt", "opt/epp") and not p.startswith("opt/epp/")] == []
    installed = {re.sub(r"-[^-]+\.dist-info$", "", Path(p).name).lower().replace("_", "-")
                 for p in added if p.startswith(SITE) and p.endswith(".dist-info")}
    wheels = {w.name.split("-")[0].lower().replace("_", "-") for w in (REPO / "build/image/wheels").glob("*.whl")}
    assert installed == wheels - {"pip"}
    # Not the tests, the benchmarks or their results, the wheels, or pip.
    assert not [p for p in added if re.search(r"\.whl$|/bin/pip|^" + SITE + r"/(tests|bench|pip)(/|$)", p)]
    assert not [p for p in added if p.startswith(f"{SITE}/epp/") and re.search(r"/(tests|bench|results)/", p)]
    # The base is slim: no documentation, manuals or apt lists.
    for d in ("usr/share/doc", "usr/share/man", "usr/share/info", "var/lib/apt/lists", "var/cache/apt/archives"):
        assert not [p for p, m in files.items() if p.startswith(d + "/") and m.isfile()], d
    size_mb = int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout) / 1e6
    assert size_mb < 300, size_mb


def test_image_config_runs_as_upstreams_container(image) -> None:
    cfg = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", image).stdout)
    assert cfg["User"] == "65532:65532"
    assert set(cfg["ExposedPorts"]) == {"9002/tcp", "9003/tcp", "9004/tcp", "9090/tcp"}
    assert cfg["Entrypoint"] == ["/opt/epp/bin/epp"]
    assert not cfg.get("Cmd")  # the Pod's args are all flags, as upstream's chart gives them
    assert "PYTHONDONTWRITEBYTECODE=1" in cfg["Env"]


def test_a_bad_flag_stops_the_container_with_the_reason(image) -> None:
    r = docker("run", "--rm", *RUN_AS_THE_CLUSTER_DOES, image, "--no-such-flag", check=False)
    assert r.returncode != 0
    assert "--no-such-flag" in r.stderr


# --- running it --------------------------------------------------------------------------------

def test_serves_a_static_pool_over_tls_read_only_and_non_root(run_epp, pool) -> None:
    # Defaults as upstream: TLS on the ext_proc port with a self-signed certificate made at start;
    # the shipped Envoy bootstrap speaks TLS (ALPN h2) to it without verifying it.
    c = run_epp(["--endpoints", ",".join(pool.endpoints), "--explain-headers"])
    c.wait_serving()
    # What the upstream chart's readiness and liveness probes (and Envoy's health check) ask for.
    for service in ("inference-extension", SERVICE, "liveness"):
        assert health(c.ports.health, service) == "SERVING", service
    assert handshake(c.ports.grpc)[1] == "h2"
    lp, admin = free_ports(2)
    with EnvoyProcess(EnvoyOptions(lp, c.ports.grpc, admin)) as envoy:
        envoy.wait_ready(30)
        pick_through_envoy(envoy, pool)
    # /metrics answers (no Kubernetes API, so no auth), and counted the request.
    assert metric_total(c.ports.metrics, "inference_objective_request_total") >= 1
    assert c.running(), c.logs()


def test_serves_a_mounted_certificate_to_a_verifying_envoy(run_epp, pool, tmp_path) -> None:
    # A TLS Secret mounted read-only, as the kubelet does; files 0644, owned by root, read by uid 65532.
    ca = Issuer("cluster CA")
    SecretVolume(tmp_path / "certs").write(ca.leaf())
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    c = run_epp(["--endpoints", ",".join(pool.endpoints), "--explain-headers", "--cert-path", "/etc/epp/certs",
                 "--enable-cert-reload"], volumes={str(tmp_path / "certs"): "/etc/epp/certs"})
    c.wait_serving()
    lp, admin = free_ports(2)
    with VerifyingEnvoy(EnvoyOptions(lp, c.ports.grpc, admin), str(tmp_path / "ca.crt")) as envoy:
        envoy.wait_ready(30)
        pick_through_envoy(envoy, pool)
    assert c.running(), c.logs()


def test_serves_plaintext_when_asked(run_epp, pool) -> None:
    c = run_epp(["--endpoints", ",".join(pool.endpoints), "--explain-headers", "--secure-serving=false"])
    c.wait_serving()
    lp, admin = free_ports(2)
    with EnvoyProcess(EnvoyOptions(lp, c.ports.grpc, admin, extproc_tls=False)) as envoy:
        envoy.wait_ready(30)
        pick_through_envoy(envoy, pool)
    assert c.running(), c.logs()


# --- in a cluster: the upstream chart's args and probes, and our chart's, against the stand-in API ---

# What GIE v1.5's inferencepool chart renders for its EPP container (release `llama` in `prod`, the
# defaults): flags only, the container's image provides the binary. Ports are left at their defaults
# by upstream's chart; here the test's free ports come first (`run_epp`).
UPSTREAM_CHART_ARGS = ["--pool-name", "llama", "--pool-namespace", "prod", "--pool-group",
                       "inference.networking.k8s.io", "--zap-encoder", "json",
                       "--config-file", "/config/default-plugins.yaml", "--tracing=false"]
UPSTREAM_PROBE_SERVICE = "inference-extension"  # the chart's liveness and readiness probes, on 9003


def _readable(path: Path) -> Path:
    """World-readable, as a kubelet's projected volumes are for a non-root container."""
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return path


@pytest.fixture
def in_cluster(tmp_path):
    """The stand-in API server (tests/kubeapi.py) with epp's RBAC, two model-server pods on the host's
    loopback (127.0.10.1 and .2, one port), and what a pod gets from the kubelet: a service-account
    directory and the KUBERNETES_SERVICE_* env."""
    from tests.kube_cluster import NS, Cluster
    from tests.kubeapi import KubeApi

    port = free_ports(1)[0]
    sims = [subprocess.Popen([sys.executable, "-m", "epp.simulator", "--host", f"127.0.10.{i}", "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in (1, 2)]
    try:
        for i in (1, 2):
            wait_until(lambda i=i: _http_ok(f"http://127.0.10.{i}:{port}/health"), 30, f"simulator {i}")
        with KubeApi() as api:
            cluster = Cluster(api, tmp_path)
            sa = tmp_path / "serviceaccount"
            env = api.service_account_dir(sa, cluster.epp_token, NS)
            cluster.pod("vllm-a", "127.0.10.1")
            cluster.pod("vllm-b", "127.0.10.2")
            cluster.objective("batch", -1)
            yield cluster, port, env, _readable(sa)
    finally:
        for p in sims:
            p.terminate()
            p.wait(10)


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def _route_and_scrape(c: Container, cluster, model_port: int, probe_port: int, probe_service: str) -> None:
    wait_until(lambda: not c.running() or health(probe_port, probe_service) == "SERVING", 60,
               f"the readiness probe ({probe_service} on {probe_port})")
    assert c.running(), c.logs()
    assert health(probe_port, "liveness") == "SERVING"
    # Envoy with the shipped bootstrap: TLS to epp, ALPN h2, the pick from the API's pods.
    lp, admin = free_ports(2)
    with EnvoyProcess(EnvoyOptions(lp, c.ports.grpc, admin)) as envoy:
        envoy.wait_ready(30)
        served = set()
        for i in range(4):
            r = httpx.post(f"{envoy.url}/v1/completions", timeout=15,
                           json={"model": MODEL, "prompt": f"request {i} " * 30, "max_tokens": 2})
            assert r.status_code == 200, (r.status_code, r.text, c.logs())
            served.add(r.headers["x-epp-endpoint"])
        assert served <= {f"127.0.10.1:{model_port}", f"127.0.10.2:{model_port}"}
    # /metrics is behind TokenReview + SubjectAccessReview, as upstream's default: the GKE guide's reader.
    url = f"http://127.0.0.1:{c.ports.metrics}/metrics"
    assert httpx.get(url, timeout=5).status_code == 401
    reader = cluster.metrics_reader()
    ok = httpx.get(url, headers={"authorization": f"Bearer {reader}"}, timeout=5)
    assert ok.status_code == 200
    assert "inference_objective_request_total" in ok.text


def test_the_upstream_charts_args_and_probes_give_a_ready_pod_that_routes_over_tls(run_epp, in_cluster,
                                                                                  tmp_path) -> None:
    from epp.scheduling.picker_config import DEFAULT_CONFIG

    cluster, model_port, env, sa = in_cluster
    cluster.pool("llama", port=model_port)
    config = tmp_path / "config"
    config.mkdir()
    (config / "default-plugins.yaml").write_text(DEFAULT_CONFIG)
    c = run_epp([*UPSTREAM_CHART_ARGS, "--explain-headers"], env=env,
                volumes={str(sa): "/var/run/secrets/kubernetes.io/serviceaccount", str(_readable(config)): "/config"})
    _route_and_scrape(c, cluster, model_port, c.ports.health, UPSTREAM_PROBE_SERVICE)


def test_our_charts_deployment_gives_a_ready_pod_that_routes_over_tls(run_epp, in_cluster, tmp_path) -> None:
    from tests.chart_helpers import args, epp_container, one, render

    cluster, model_port, env, sa = in_cluster
    ports = EppPorts.free()
    docs = render({
        "inferencePool": {"modelServers": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": model_port}]},
        "inferenceExtension": {"extProcPort": ports.grpc, "grpcHealthPort": ports.health,
                               "metricsPort": ports.metrics},
    }, name="llama", namespace="prod")
    cluster.api.apply(one(docs, "InferencePool"))  # the chart's own InferencePool, into the API
    container = epp_container(docs)
    config = tmp_path / "config"
    config.mkdir()
    for key, text in one(docs, "ConfigMap")["data"].items():
        (config / key).write_text(text)
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["mountPath"] != "/tmp")
    probe = container["readinessProbe"]["grpc"]
    assert container["livenessProbe"]["grpc"] == probe
    c = run_epp([*args(docs), "--explain-headers"], env=env, ports=ports,
                volumes={str(sa): "/var/run/secrets/kubernetes.io/serviceaccount", str(_readable(config)): mount})
    _route_and_scrape(c, cluster, model_port, probe["port"], probe["service"])
