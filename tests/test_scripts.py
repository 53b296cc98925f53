"""scripts/run and scripts/setup.

setup runs on a host where Mosquitto already runs, as apt's post-install leaves
it. That "system" broker is a private Mosquitto started the way the distribution
starts it (`mosquitto -d -c .../mosquitto.conf` with a pid_file), on a free port;
HYDROD_SETUP_MOSQUITTO_ETC and HYDROD_SETUP_MQTT_PORT point setup at it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from harness import Subscriber, free_port, port_open, publish, wait_until

ROOT = Path(__file__).resolve().parents[1]
QUEUED = 1500  # above Mosquitto's default max_queued_messages (1000)


def start_system_broker(etc: Path, state: Path, port: int) -> int:
    etc.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    lines = [f"pid_file {state}/mosquitto.pid", "persistence true", f"persistence_location {state}/",
             f"log_dest file {state}/mosquitto.log", f"listener {port} 127.0.0.1", "allow_anonymous true"]
    if os.geteuid() == 0:
        lines.append("user root")  # else it drops to `mosquitto`, who cannot write tmp_path
    if not (etc / "mosquitto.conf").exists():
        (etc / "mosquitto.conf").write_text("\n".join(lines) + "\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    subprocess.run([binary, "-d", "-c", str(etc / "mosquitto.conf")], check=True, timeout=10)
    wait_until(lambda: port_open(port) and (state / "mosquitto.pid").exists(), what="the system Mosquitto")
    return int((state / "mosquitto.pid").read_text())


def stop_system_broker(state: Path, port: int) -> None:
    try:
        os.kill(int((state / "mosquitto.pid").read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        return
    wait_until(lambda: not port_open(port), what="the system Mosquitto stopped")


def setup(etc: Path, port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HYDROD_SETUP_NO_APT": "1", "HYDROD_SETUP_MOSQUITTO_ETC": str(etc),
           "HYDROD_SETUP_MQTT_PORT": str(port)}
    return subprocess.run([str(ROOT / "scripts" / "setup")], env=env, capture_output=True, text=True,
                          timeout=120)


def queued_for_an_offline_session(port: int) -> int:
    """Publish QUEUED messages while a persistent session is away; count what it gets back."""
    session = {"client_id": "setup-test-session", "clean_start": False, "session_expiry": 600}
    with Subscriber(port, "queue/#", **session):
        pass
    publish(port, [("queue/sample", str(i)) for i in range(QUEUED)], timeout=30)
    with Subscriber(port, "queue/#", **session) as back:
        try:
            back.wait_for(QUEUED, timeout=10)
        except AssertionError:
            pass  # fewer arrived: the count below says how many
        return len(back.messages)


@pytest.fixture
def system_broker(tmp_path):
    etc, state, port = tmp_path / "etc", tmp_path / "state", free_port()
    start_system_broker(etc, state, port)
    yield etc, state, port
    stop_system_broker(state, port)


def test_setup_gives_an_already_running_mosquitto_the_at_least_once_settings(system_broker):
    etc, state, port = system_broker
    first = setup(etc, port)
    assert first.returncode == 0, first.stdout + first.stderr
    installed = etc / "conf.d" / "hydrod.conf"
    assert installed.read_bytes() == (ROOT / "deploy" / "mosquitto.conf").read_bytes()
    assert f"include_dir {etc}/conf.d" in (etc / "mosquitto.conf").read_text().splitlines()
    assert "restarting Mosquitto" in first.stdout
    # In effect: the queue no longer stops at Mosquitto's default 1,000.
    assert queued_for_an_offline_session(port) == QUEUED

    again = setup(etc, port)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "installing deploy/mosquitto.conf" not in again.stdout
    assert "restarting Mosquitto" not in again.stdout

    # The file is changed locally: the next setup puts it back.
    installed.write_text("max_queued_messages 10\n")
    third = setup(etc, port)
    assert "installing deploy/mosquitto.conf" in third.stdout
    assert installed.read_bytes() == (ROOT / "deploy" / "mosquitto.conf").read_bytes()


def test_a_mosquitto_whose_own_config_opens_the_port_still_starts_with_hydrods_file(system_broker):
    etc, state, port = system_broker
    assert setup(etc, port).returncode == 0
    stop_system_broker(state, port)
    # A restart reads the whole config: hydrod's file must not open the port a second time.
    start_system_broker(etc, state, port)
    assert port_open(port)


@pytest.mark.parametrize("how", ["--config", "HYDROD_CONFIG"])
def test_scripts_run_uses_the_config_it_is_given_from_where_it_is_run(make_daemon, how):
    # The daemon's directory holds its config.toml; the checkout's own config.toml
    # points at another broker, database and HTTP port.
    run = str(ROOT / "scripts" / "run")
    if how == "--config":
        daemon = make_daemon(command=[run, "--config", "config.toml"])
    else:
        daemon = make_daemon(command=[run], env={"HYDROD_CONFIG": "config.toml"})
    daemon.wait_ready()
    status, _body = daemon.http("GET", "/healthz")
    assert status == 200
    assert daemon.terminate() == 0
