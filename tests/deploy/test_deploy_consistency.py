"""deploy/ files agree with each other and with the repository: referenced files exist, ports match."""

from __future__ import annotations

import posixpath
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")


def _port(address: str) -> int:
    return urlsplit(address).port


@pytest.fixture(scope="session")
def dockerfile(deploy) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (deploy / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="session")
def compose(deploy) -> dict:
    return yaml.safe_load((deploy / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def host_config(deploy, properties) -> dict[str, str]:
    return properties(deploy / "config.properties")


@pytest.fixture(scope="session")
def kserve_docs(deploy) -> dict[str, dict]:
    docs = list(yaml.safe_load_all((deploy / "kserve" / "inferenceservice.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def _image_paths(dockerfile) -> set[str]:
    """Paths inside the image that the Dockerfile creates (COPY destinations, sed outputs)."""
    made = set()
    workdir = "/"
    for word, rest in dockerfile:
        if word == "WORKDIR":
            workdir = rest
        elif word == "COPY":
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            *sources, dest = args
            dest = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
            for src in sources:
                made.add(f"{dest.rstrip('/')}/{Path(src).name}" if dest.endswith("/") else dest)
        elif word == "RUN":
            for out in re.findall(r">\s*(\S+)", rest):
                made.add(out if out.startswith("/") else f"{workdir.rstrip('/')}/{out}")
            for d in re.findall(r"mkdir -p ([^&;]+)", rest):
                made.update(p if p.startswith("/") else f"{workdir.rstrip('/')}/{p}" for p in d.split())
    return {posixpath.normpath(p) for p in made}


def test_config_properties_is_loopback_prometheus_with_token_auth(host_config, deploy):
    for key in ADDRESS_KEYS:
        assert urlsplit(host_config[key]).hostname == "127.0.0.1", key
    assert [_port(host_config[k]) for k in ADDRESS_KEYS] == [8080, 8081, 8082]
    assert host_config["metrics_mode"] == "prometheus"
    assert (deploy.parent / host_config["metrics_config"]).is_file()
    assert (deploy.parent / host_config["model_store"]).is_dir()
    assert "disable_token_authorization" not in host_config, "token auth must stay on as shipped"
    assert "enable_model_api" not in host_config


def test_dockerfile_copy_sources_exist(dockerfile, repo):
    sources = []
    for word, rest in dockerfile:
        if word == "COPY":
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            sources.extend(args[:-1])
    assert sources, "no COPY in the Dockerfile"
    ignored = [line.strip() for line in (repo / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for source in sources:
        top = Path(source).parts[0]
        assert top not in ignored and source not in ignored, f"{source} is excluded from the build context"
    missing = [s for s in sources if not (repo / s).exists()]
    assert missing == [], f"Dockerfile copies files that are not in the repo: {missing}"


def test_dockerfile_installs_pinned_cpu_torch_before_the_project(dockerfile):
    runs = [rest for word, rest in dockerfile if word == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==" in r)
    project = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch < project
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch]
    assert "torch==2.13.0" in runs[torch]
    assert any("openjdk-17-jre-headless" in r for r in runs)
    froms = [rest for word, rest in dockerfile if word == "FROM"]
    assert froms == ["python:3.11-slim-bookworm"]
    users = [rest for word, rest in dockerfile if word == "USER"]
    assert users and users[-1] not in {"root", "0"}


def test_dockerfile_ports_healthcheck_and_command_agree(dockerfile, host_config, deploy, properties):
    expose = {int(p) for word, rest in dockerfile if word == "EXPOSE" for p in rest.split()}
    assert expose == {_port(host_config[k]) for k in ADDRESS_KEYS}
    made = _image_paths(dockerfile)
    health = [rest for word, rest in dockerfile if word == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0]
    script = re.search(r"(/\S+healthcheck\.py)", health[0]).group(1)
    assert script in made, f"HEALTHCHECK runs {script}, which the image does not contain"
    cmd = " ".join(rest for word, rest in dockerfile if word == "CMD")
    assert cmd.startswith('["guard", "serve", "--foreground"'), cmd  # attached
    ts_config = re.search(r'"--config",\s*"([^"]+)"', cmd).group(1)
    metrics = re.search(r'"--metrics-config",\s*"([^"]+)"', cmd).group(1)
    model_store = re.search(r'"--model-store",\s*"([^"]+)"', cmd).group(1)
    assert ts_config in made and model_store in made and metrics in made
    assert '"--host", "0.0.0.0"' in cmd and '"--ingress", "none"' in cmd and "--no-auth" not in cmd
    volumes = " ".join(rest for word, rest in dockerfile if word == "VOLUME")
    assert model_store in volumes
    # the sed in the Dockerfile rewrites the host config for the container
    sed = next(rest for word, rest in dockerfile if word == "RUN" and "sed" in rest)
    assert "127\\.0\\.0\\.1#0.0.0.0" in sed
    metrics_in_image = re.search(r"#metrics_config=(/\S+?)#", sed).group(1)
    assert metrics_in_image in made


def test_healthcheck_reads_the_files_the_image_has(deploy, dockerfile):
    made = _image_paths(dockerfile)
    text = (deploy / "healthcheck.py").read_text()
    config = re.search(r'"GUARD_TS_CONFIG", "([^"]+)"', text).group(1)
    key_file = re.search(r'"GUARD_TS_KEY_FILE", "([^"]+)"', text).group(1)
    assert config in made
    cmd = " ".join(rest for word, rest in dockerfile if word == "CMD")
    run_dir = re.search(r'"--run-dir",\s*"([^"]+)"', cmd).group(1)
    # guard serve runs TorchServe in its run directory, where TorchServe writes key_file.json
    assert Path(key_file).parent == Path(run_dir)


def test_compose_wiring_and_ports(compose, deploy, host_config):
    services = compose["services"]
    assert set(services) == {"torchserve", "ingress", "prometheus", "grafana"}
    ts = services["torchserve"]
    build = ts["build"]
    assert (deploy / build["context"] / build["dockerfile"]).resolve() == (deploy / "Dockerfile").resolve()
    # TorchServe publishes nothing and sits on an internal network; the ingress publishes its ports
    assert "ports" not in ts and ts["networks"] == ["backend"] and compose["networks"]["backend"]["internal"]
    assert "--no-auth" in ts["command"] and ts["command"][ts["command"].index("--ingress") + 1] == "none"
    ingress = services["ingress"]
    assert "backend" in ingress["networks"]
    env = ingress["environment"]
    mount = next(v for v in ingress["volumes"] if "guard.conf.template" in v)
    assert mount.split(":")[1] == "/etc/nginx/templates/guard.conf.template"
    template = (deploy / "nginx" / "guard.conf.template").read_text()
    assert set(re.findall(r"\$\{(GUARD_[A-Z_]+)\}", template)) <= set(env), "compose leaves a placeholder unset"
    assert env["GUARD_AUTH_REQUIRED"] == "1" and env["GUARD_INFERENCE_KEY"].startswith("${GUARD_INFERENCE_KEY:?")
    for kind in ("INFERENCE", "MANAGEMENT", "METRICS"):
        assert env[f"GUARD_UPSTREAM_{kind}"].startswith("torchserve:")
    published = {}
    for spec in ingress["ports"]:
        host_ip, host_port, container_port = spec.split(":")
        assert host_ip == "127.0.0.1", spec
        assert host_port == container_port, spec
        published[int(container_port)] = spec
    assert set(published) == {_port(host_config[k]) for k in ADDRESS_KEYS}
    for service in services.values():
        for spec in service.get("ports", []):
            assert spec.startswith("127.0.0.1:"), spec
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (deploy / source).exists(), f"compose mounts missing {source}"
    assert any(v.split(":")[1] == "/home/guard/model-store" for v in ts["volumes"])


def test_prometheus_scrapes_the_metrics_port(deploy, compose, host_config):
    prom = yaml.safe_load((deploy / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    targets = [t for sc in jobs["torchserve"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"torchserve:{_port(host_config['metrics_address'])}"]
    assert jobs["torchserve"].get("metrics_path", "/metrics") == "/metrics"
    # prometheus.yml and alerts.yml are mounted where the compose command reads them
    prom_service = compose["services"]["prometheus"]
    config_flag = next(a for a in prom_service["command"] if a.startswith("--config.file="))
    mount = next(v for v in prom_service["volumes"] if v.startswith("./prometheus:"))
    assert config_flag.split("=", 1)[1] == mount.split(":")[1] + "/prometheus.yml"


def test_grafana_provisioning_matches_compose(deploy, compose):
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"] if v.startswith(".")}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((deploy / "grafana" / "provisioning" / "dashboards" / "guard.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == path
    assert list((deploy / "grafana" / "dashboards").glob("*.json"))
    datasource = yaml.safe_load(
        (deploy / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    url = urlsplit(datasource["datasources"][0]["url"])
    assert url.hostname == "prometheus"
    assert any(p.endswith(f":{url.port}") for p in compose["services"]["prometheus"]["ports"])


def test_kserve_layout_ports_and_scrape_annotations(deploy, kserve_docs, properties, dockerfile):
    conf = properties(deploy / "kserve" / "config.properties")
    assert _port(conf["inference_address"]) == 8085
    metrics_port = _port(conf["metrics_address"])
    assert conf["metrics_mode"] == "prometheus"
    assert conf["metrics_config"] in _image_paths(dockerfile), "kserve metrics_config is not in the image"
    assert conf["model_store"] == "/mnt/models/model-store"
    runtime, isvc = kserve_docs["ServingRuntime"], kserve_docs["InferenceService"]
    container = runtime["spec"]["containers"][0]
    assert [p["containerPort"] for p in container["ports"]] == [_port(conf["inference_address"])]
    args = container["args"]
    assert "--ts-config=/mnt/models/config/config.properties" in args
    assert f"--model-store={conf['model_store']}" in args
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(metrics_port)
    annotations = isvc["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["storageUri"]


def test_audit_job_is_a_failing_gate(deploy, kserve_docs):
    job = yaml.safe_load((deploy / "k8s" / "audit-job.yaml").read_text())
    assert job["kind"] == "Job"
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    argv = container["command"] + container["args"]
    assert argv[:2] == ["guard", "audit"]
    for flag in ("--model-file", "--weights", "--out"):
        assert flag in argv and not argv[argv.index(flag) + 1].startswith("--"), flag
    runtime_image = kserve_docs["ServingRuntime"]["spec"]["containers"][0]["image"]
    assert container["image"] == runtime_image, "audit the image you serve"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for flag in ("--model-file", "--weights", "--out"):
        value = argv[argv.index(flag) + 1]
        assert any(value.startswith(m + "/") for m in mounts), f"{flag} {value} is on no volume"
