"""config.toml: typed, frozen, every problem reported at once, secrets masked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from harness import make_certificates
from hydrod import settings
from hydrod.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_config_is_valid_and_points_at_local_services():
    loaded = settings.load(REPO / "config.toml", environ={})
    assert (loaded.mqtt.host, loaded.mqtt.port) == ("127.0.0.1", 1883)
    assert loaded.database.dsn.get_secret_value() == "postgresql://127.0.0.1:5432/hydro"
    assert loaded.http.port == 6001
    assert loaded.nodes.offline_after_s == 120


def test_the_shipped_config_lists_every_key_with_its_default():
    # config.toml is documentation too: it must not drift from the code.
    shipped = settings.load(REPO / "config.toml", environ={})
    assert shipped == settings.Settings()


def test_every_problem_is_reported_at_once_naming_the_key():
    with pytest.raises(ConfigError) as caught:
        settings.from_dict({"mqtt": {"hots": "x", "port": "many"}, "nodes": {"offline_after_s": -1},
                            "bogus": {}})
    message = str(caught.value)
    assert "4 problem(s)" in message
    assert "unknown key `mqtt.hots`, did you mean `mqtt.host`?" in message
    assert "`mqtt.port`" in message
    assert "`nodes.offline_after_s`" in message
    assert "unknown key `bogus`" in message


def test_settings_are_frozen():
    loaded = settings.Settings()
    with pytest.raises(ValidationError, match="frozen"):
        loaded.mqtt.port = 1  # type: ignore[misc]


def test_secrets_come_from_the_environment_and_are_masked():
    loaded = settings.from_dict({}, environ={"HYDROD_MQTT_PASSWORD": "s3cret",
                                             "HYDROD_DATABASE_DSN": "postgresql://u:pw@db/hydro",
                                             "HYDROD_HTTP_TOKEN": "tok"})
    assert loaded.mqtt.password.get_secret_value() == "s3cret"
    assert loaded.database.dsn.get_secret_value() == "postgresql://u:pw@db/hydro"
    assert loaded.http.token.get_secret_value() == "tok"
    shown = json.dumps(settings.masked(loaded))
    assert "s3cret" not in shown and "pw@db" not in shown and "tok\"" not in shown


def test_a_missing_or_broken_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        settings.load(tmp_path / "absent.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[mqtt\nhost = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        settings.load(broken, environ={})


def test_inconsistent_values_are_refused():
    with pytest.raises(ConfigError, match="pool_min"):
        settings.from_dict({"database": {"pool_min": 5, "pool_max": 2}})


def _hydrod(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hydrod", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_check_config_prints_the_settings_masked_and_exits_0(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[mqtt]\npassword = "hunter2"\n[http]\ntoken = "abc"\n')
    result = _hydrod("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["mqtt"]["password"] == "**********"
    assert "hunter2" not in result.stdout and "abc" not in result.stdout


def test_check_config_fails_with_exit_2_and_names_the_keys(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[mqtt]\nhots = "x"\n[logging]\nformat = "xml"\n')
    result = _hydrod("check-config", "--config", str(config))
    assert result.returncode == 2
    assert "did you mean `mqtt.host`" in result.stderr
    assert "`logging.format`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_malformed_dsn_is_a_config_error_that_does_not_show_the_password():
    with pytest.raises(ConfigError) as caught:
        settings.from_dict({"database": {"dsn": "postgresql://hydrod:pa%zzword@db/hydro"}})
    assert "`database.dsn`" in str(caught.value)
    assert "zzword" not in str(caught.value)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e300])
def test_a_duration_must_be_finite_and_sane(value):
    with pytest.raises(ConfigError, match="nodes.config_ack_timeout_s"):
        settings.from_dict({"nodes": {"config_ack_timeout_s": value}})


def test_a_ca_file_that_is_missing_or_not_a_file_is_a_config_error_naming_key_and_path(tmp_path):
    for path, why in [(tmp_path / "absent.pem", "not found"), (tmp_path, "is a directory")]:
        with pytest.raises(ConfigError) as caught:
            settings.from_dict({"mqtt": {"tls": True, "ca_file": str(path)}})
        assert f"`mqtt.ca_file` {path}: {why}" in str(caught.value)
    present = make_certificates(tmp_path / "certs").ca
    assert settings.from_dict({"mqtt": {"tls": True, "ca_file": str(present)}}).mqtt.ca_file == str(present)


def test_a_missing_ca_file_stops_hydrod_run_with_exit_2_before_anything_starts(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[mqtt]\ntls = true\nca_file = "{tmp_path}/absent.pem"\n')
    result = _hydrod("run", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == f"hydrod: {config}: `mqtt.ca_file` {tmp_path}/absent.pem: not found"
    assert '"actor_started"' not in result.stdout
