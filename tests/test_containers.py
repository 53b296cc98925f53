"""The container files: deploy/compose.yaml checked by `docker-compose config` (Debian's
docker-compose), the Dockerfile read for its essentials, the Mosquitto start script and
the health check commands run here for real.

Honest but limited: no Docker engine runs here, so no image is built and no container
started. What runs for real: compose's own validation and interpolation, the
Mosquitto container's start script (minus its final exec) on the shipped
deploy/mosquitto.conf and deploy/mosquitto.acl, a Mosquitto started from the config it
writes, the Mosquitto health check against it, hydrod with deploy/container.toml's
checks, and the Dockerfile's HEALTHCHECK command against a live hydrod."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness import free_port, port_open, publish, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SECRETS = {"POSTGRES_PASSWORD": "pg-secret-4f1c", "HYDROD_MQTT_PASSWORD": "mqtt-secret-9a2e",
           "HYDROD_HTTP_TOKEN": "http-token-77b0"}
COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed: scripts/setup "
                                   "installs Debian's package (apt-get install docker-compose)")


def compose_config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("COMPOSE_")}
    return subprocess.run([COMPOSE, "-f", str(DEPLOY / "compose.yaml"), "config", *args],
                          env={**clean, **env}, capture_output=True, text=True, timeout=60, cwd=DEPLOY)


def parsed(yaml_text: str) -> dict:
    """YAML to dict with the YAML library docker-compose itself runs on (its interpreter)."""
    interpreter = Path(COMPOSE).read_text().splitlines()[0].removeprefix("#!").split()
    out = subprocess.run([*interpreter, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
                         input=yaml_text, capture_output=True, text=True, check=True, timeout=30)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def config() -> dict:
    result = compose_config(SECRETS)
    assert result.returncode == 0, result.stderr
    return parsed(result.stdout)


@needs_compose
def test_compose_runs_the_three_services_healthy_before_hydrod_with_named_volumes(config):
    services = config["services"]
    assert set(services) == {"mosquitto", "postgres", "hydrod"}
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
        assert service["restart"] == "unless-stopped", name
    assert services["hydrod"]["depends_on"] == {"mosquitto": {"condition": "service_healthy"},
                                                "postgres": {"condition": "service_healthy"}}
    assert "/healthz" in " ".join(services["hydrod"]["healthcheck"]["test"])
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert set(config["volumes"]) == {"postgres-data", "mosquitto-data"}
    assert "postgres-data:/var/lib/postgresql/data:rw" in services["postgres"]["volumes"]
    assert "mosquitto-data:/mosquitto/data:rw" in services["mosquitto"]["volumes"]
    # The shipped files, not copies.
    assert f"{DEPLOY}/mosquitto.conf:/hydrod/mosquitto.conf:ro" in services["mosquitto"]["volumes"]
    assert f"{DEPLOY}/mosquitto.acl:/hydrod/mosquitto.acl:ro" in services["mosquitto"]["volumes"]
    assert services["postgres"]["environment"]["POSTGRES_INITDB_ARGS"] == "--encoding=UTF8"
    assert services["hydrod"]["build"] == {"context": str(ROOT), "dockerfile": "Dockerfile"}
    # The API is published on the host's loopback only.
    assert services["hydrod"]["ports"] == ["127.0.0.1:6001:6001/tcp"]
    assert services["hydrod"]["stop_grace_period"] == "30s"


@needs_compose
def test_compose_takes_every_secret_from_the_environment(config):
    hydrod = config["services"]["hydrod"]["environment"]
    assert hydrod == {
        "HYDROD_DATABASE_DSN": f"postgresql://hydrod:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/hydro",
        "HYDROD_MQTT_PASSWORD": SECRETS["HYDROD_MQTT_PASSWORD"],
        "HYDROD_HTTP_TOKEN": SECRETS["HYDROD_HTTP_TOKEN"]}
    assert config["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    assert config["services"]["mosquitto"]["environment"] == {
        "HYDROD_MQTT_PASSWORD": SECRETS["HYDROD_MQTT_PASSWORD"]}
    # Nothing hard-coded: without a secret in the environment, compose refuses, naming it.
    with ThreadPoolExecutor(len(SECRETS)) as pool:  # ~2 s each: at once
        results = pool.map(lambda missing: (missing, compose_config(
            {k: v for k, v in SECRETS.items() if k != missing}, "-q")), SECRETS)
        for missing, result in results:
            assert result.returncode != 0 and missing in result.stderr, (missing, result.stderr)
    # And no value of a secret-looking key is a literal in the file.
    raw = parsed(compose_config({}, "--no-interpolate").stdout)
    secret_values = [value for service in raw["services"].values()
                     for key, value in service.get("environment", {}).items()
                     if re.search("PASSWORD|TOKEN|DSN|SECRET", key)]
    assert len(secret_values) == 5 and all("${" in value for value in secret_values), secret_values


DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_installs_the_wheel_and_runs_hydrod_as_a_user_with_a_health_check():
    steps = instructions()
    froms = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert [steps[i][1].split()[0] for i in froms] == ["python:3.11-slim", "python:3.11-slim"]
    final = steps[froms[-1]:]
    ops = dict((op, args) for op, args in final)  # the last of each, in the final stage
    assert "pip wheel" in " ".join(args for op, args in steps if op == "RUN")
    assert any(op == "RUN" and "pip install" in args and ".whl" in args for op, args in final)
    user = ops["USER"]
    assert user not in ("root", "0") and "useradd" in " ".join(a for o, a in final if o == "RUN")
    # USER comes before what runs the daemon.
    assert [op for op, _ in final].index("USER") < [op for op, _ in final].index("CMD")
    assert json.loads(ops["ENTRYPOINT"]) + json.loads(ops["CMD"]) == [
        "hydrod", "run", "--config", "/etc/hydrod/config.toml"]
    assert "HYDROD_CONFIG=/etc/hydrod/config.toml" in ops["ENV"]
    assert "COPY deploy/container.toml /etc/hydrod/config.toml" in DOCKERFILE
    assert "CMD" in ops["HEALTHCHECK"] and "/healthz" in ops["HEALTHCHECK"]
    # No secret baked in.
    assert not re.search(r"(?i)(PASSWORD|TOKEN|DSN)\s*=", DOCKERFILE)


def test_dockerignore_keeps_the_local_environment_and_the_tests_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "tests", ".git", "bench", "deploy/.env"} <= ignored
    # ... and nothing the build needs (pyproject's readme, migrations, the container's config).
    for needed in ("pyproject.toml", "README.md", "migrations", "config.toml", "deploy", "deploy/container.toml",
                   "actors", "cli.py"):
        assert (ROOT / needed).exists() and needed not in ignored, needed


def test_the_dockerfile_health_check_passes_on_a_working_hydrod_and_fails_on_a_stopped_one(make_daemon):
    daemon = make_daemon()
    daemon.wait_ready()
    check = json.loads(dict(instructions())["HEALTHCHECK"].split("CMD", 1)[1])
    assert check[:2] == ["python", "-c"] and "127.0.0.1:6001" in check[2]
    argv = [sys.executable, "-c", check[2].replace("127.0.0.1:6001", f"127.0.0.1:{daemon.config['http']['port']}")]
    wait_until(lambda: subprocess.run(argv, capture_output=True, timeout=10).returncode == 0, 15,
               "the health check passing")
    daemon.terminate()
    assert subprocess.run(argv, capture_output=True, timeout=10).returncode != 0


def test_the_container_config_is_valid_and_listens_on_every_interface():
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HYDROD_")},
           "HYDROD_DATABASE_DSN": "postgresql://hydrod:x@postgres:5432/hydro",
           "HYDROD_MQTT_PASSWORD": "x", "HYDROD_HTTP_TOKEN": "x"}
    result = subprocess.run([sys.executable, "-m", "hydrod", "check-config", "--config",
                             str(DEPLOY / "container.toml")], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["http"]["host"] == "0.0.0.0" and shown["mqtt"]["host"] == "mosquitto"
    assert shown["mqtt"]["username"] == "hydrod" and shown["mqtt"]["password"] != "x"


@needs_compose
def test_the_mosquitto_container_start_script_opens_the_listener_and_requires_logins(config, tmp_path):
    """The script compose runs in the Mosquitto container, here on a copy of the
    container's layout: with the shipped deploy/mosquitto.conf it must make a config
    Mosquitto starts with, one listener on every interface, logins required: else
    hydrod cannot connect (or anyone can)."""
    service = config["services"]["mosquitto"]
    script = service["command"][2].replace("$$", "$")
    body, last = script.rstrip("\n").rsplit("\n", 1)
    assert last == "exec mosquitto -c /mosquitto/config/mosquitto.conf"
    layout = {"/mosquitto/": f"{tmp_path}/mosquitto/", "/hydrod/": f"{tmp_path}/hydrod/"}
    for inside in layout.values():
        Path(inside).mkdir()
    for name in ("mosquitto.conf", "mosquitto.acl"):
        (tmp_path / "hydrod" / name).symlink_to(DEPLOY / name)
    (tmp_path / "mosquitto" / "config").mkdir()
    (tmp_path / "mosquitto" / "data").mkdir()
    for inside, here in layout.items():
        body = body.replace(inside, here)
    if os.geteuid() != 0:
        body = body.replace("chown mosquitto:mosquitto", "true")
    subprocess.run(["sh", "-ec", body], env={**os.environ, **service["environment"]}, check=True, timeout=30)

    conf = (tmp_path / "mosquitto" / "config" / "mosquitto.conf").read_text()
    assert re.findall(r"(?m)^listener .*", conf) == ["listener 1883"]
    assert re.findall(r"(?m)^allow_anonymous .*", conf) == ["allow_anonymous false"]
    # Run it here on a free port of 127.0.0.1 (1883 may be taken), as root if we are.
    port = free_port()
    conf = conf.replace("\nlistener 1883\n", f"\nlistener {port} 127.0.0.1\n")
    if os.geteuid() == 0:
        conf += "user root\n"
    (tmp_path / "run.conf").write_text(conf)
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(tmp_path / "run.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port) or broker.poll() is not None, 10, "mosquitto listening")
        assert broker.poll() is None, "mosquitto refused the config the start script wrote"
        password = service["environment"]["HYDROD_MQTT_PASSWORD"]
        publish(port, [("hydro/time/response", {"unix_ts": 1})], username="hydrod", password=password)
        with pytest.raises(RuntimeError, match="refused"):
            publish(port, [("hydro/time/response", {"unix_ts": 1})])  # anonymous
        # The compose health check, as the container runs it.
        health = " ".join(service["healthcheck"]["test"][1:]).replace("$$", "$").replace("-p 1883", f"-p {port}")
        assert subprocess.run(["sh", "-c", health], env={**os.environ, "HYDROD_MQTT_PASSWORD": password},
                              capture_output=True, timeout=20).returncode == 0
        wrong = subprocess.run(["sh", "-c", health], env={**os.environ, "HYDROD_MQTT_PASSWORD": "wrong"},
                               capture_output=True, timeout=20)
        assert wrong.returncode != 0
        # A node's login added to the file (deploy/README.md) survives the next start, which
        # rewrites hydrod's.
        passwd = tmp_path / "mosquitto" / "data" / "passwd"
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), "esp32-a1b2c3d4e5f6", "node-pw"], check=True)
        before = dict(line.split(":", 1) for line in passwd.read_text().splitlines())
        subprocess.run(["sh", "-ec", body], env={**os.environ, "HYDROD_MQTT_PASSWORD": "rotated"}, check=True,
                       timeout=30)
        after = dict(line.split(":", 1) for line in passwd.read_text().splitlines())
        assert set(after) == {"hydrod", "esp32-a1b2c3d4e5f6"}
        assert after["esp32-a1b2c3d4e5f6"] == before["esp32-a1b2c3d4e5f6"] and after["hydrod"] != before["hydrod"]
    finally:
        broker.kill()
        broker.wait(10)
