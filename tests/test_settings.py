"""The one settings model: flag > env > TOML file > default, clear errors naming the setting and
its source, `config show`, the README table kept from the model, and a real hub started from it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hub_service.collaboration import Policy
from hub_service.config import HubConfig
from hub_service.settings import HubSettings, SettingsError, load_settings
from hub_service.validation import Limits

from .conftest import WAIT, free_ports

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`kernelhub-hub ARGS` with no KERNELHUB_* of the caller's, only `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KERNELHUB_")}
    return subprocess.run(
        [sys.executable, "-m", "hub_service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


def _shown(output: str) -> dict[str, tuple[str, str]]:
    """`config show` lines as name -> (value, source)."""
    shown = {}
    for line in output.splitlines():
        if " = " in line:
            name, _, rest = line.partition(" = ")
            value, _, source = rest.partition("  # ")
            shown[name] = (value, source)
    return shown


def test_every_hub_knob_is_in_the_model_with_the_same_default() -> None:
    knobs = {f.name for f in dataclasses.fields(HubConfig)} - {"limits", "policy"}
    knobs |= {f.name for f in dataclasses.fields(Limits)} | {
        f.name for f in dataclasses.fields(Policy)
    }
    assert knobs <= set(HubSettings.model_fields)
    assert HubConfig.from_env({}) == HubConfig()


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    toml = tmp_path / "hub.toml"
    toml.write_text(
        'port = 1111\nhost = "10.0.0.1"\n[streams]\nstream_linger = "20ms"\n'
        "[collaboration]\npartner_offline_grace = 7\n"
    )
    resolved = load_settings(
        {"KERNELHUB_PORT": "2222", "KERNELHUB_HOST": "10.0.0.2", "KERNELHUB_DB": "x.db"},
        toml,
        {"port": "3333"},
    )
    settings = resolved.settings
    assert (settings.port, settings.host, settings.stream_linger) == (3333, "10.0.0.2", 0.02)
    assert settings.database_url == "sqlite:///x.db"
    assert resolved.origins["port"] == "flag --port"
    assert resolved.origins["host"] == "env KERNELHUB_HOST"
    assert resolved.origins["database_url"] == "env KERNELHUB_DB"
    assert resolved.origins["stream_linger"] == f"file {toml}"
    assert resolved.origins["max_connections"] == "default"
    config = HubConfig.from_settings(settings)
    assert config.policy.partner_offline_grace.total_seconds() == 7  # the same attribute paths
    assert config.limits == Limits()


def test_database_url_beats_db_in_the_environment() -> None:
    environ = {"KERNELHUB_DB": "x.db", "KERNELHUB_DATABASE_URL": "sqlite:///y.db"}
    assert load_settings(environ).settings.database_url == "sqlite:///y.db"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("env", "KERNELHUB_PORT='many' (env): Input should be a valid integer"),
        ("flag", "--port='many' (flag): Input should be a valid integer"),
        ("file", "port='many' (file "),
    ],
)
def test_a_bad_value_names_the_setting_and_its_source(
    tmp_path: Path, source: str, expected: str
) -> None:
    toml = tmp_path / "hub.toml"
    toml.write_text('port = "many"\n' if source == "file" else "")
    with pytest.raises(SettingsError) as error:
        load_settings(
            {"KERNELHUB_PORT": "many"} if source == "env" else {},
            toml,
            {"port": "many"} if source == "flag" else {},
        )
    assert expected in str(error.value)


def test_bounds_unknown_keys_and_bad_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"KERNELHUB_COMMIT_BATCH_SIZE='0' \(env\).*greater"):
        load_settings({"KERNELHUB_COMMIT_BATCH_SIZE": "0"})
    # A log read's bound (after_seq + it) must stay an integer every database can hold.
    with pytest.raises(SettingsError, match=r"KERNELHUB_REPLAY_SCAN_SEQS=.*less than or equal"):
        load_settings({"KERNELHUB_REPLAY_SCAN_SEQS": str(2**63)})
    with pytest.raises(SettingsError, match=r"KERNELHUB_WRITER='fork' \(env\).*'process' or"):
        load_settings({"KERNELHUB_WRITER": "fork"})
    with pytest.raises(SettingsError, match="invalid duration 'soon'"):
        load_settings(flags={"stream_linger": "soon"})
    toml = tmp_path / "hub.toml"
    toml.write_text("[server]\nprot = 1\n")
    with pytest.raises(SettingsError, match=r"file .*hub.toml: unknown setting 'prot'"):
        load_settings(config_file=toml)
    toml.write_text("port = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(config_file=toml)
    with pytest.raises(SettingsError, match="cannot read it"):
        load_settings(config_file=tmp_path / "missing.toml")


def test_config_show_prints_each_value_and_source_and_masks_the_password(tmp_path: Path) -> None:
    toml = tmp_path / "hub.toml"
    toml.write_text("[database]\ncommit_linger = 0.01\n")
    shown = _cli(
        "config",
        "show",
        "--config",
        str(toml),
        "--rate-limit",
        "7",
        env={
            "KERNELHUB_DATABASE_URL": "postgresql+psycopg://kh:s3cret@db.example/hub",
            "KERNELHUB_PORT": "4444",
        },
    )
    assert shown.returncode == 0, shown.stderr
    assert "s3cret" not in shown.stdout
    lines = _shown(shown.stdout)
    assert set(lines) == set(HubSettings.model_fields)
    assert lines["database_url"] == (
        '"postgresql+psycopg://kh:***@db.example/hub"',
        "env KERNELHUB_DATABASE_URL",
    )
    assert lines["port"] == ("4444", "env KERNELHUB_PORT")
    assert lines["commit_linger"] == ("0.01", f"file {toml}")
    assert lines["rate_limit_per_second"] == ("7.0", "flag --rate-limit-per-second")
    assert lines["host"] == ('"0.0.0.0"', "default")


def test_a_bad_value_stops_the_command_in_one_line() -> None:
    bad = _cli("config", "show", env={"KERNELHUB_MAX_CONNECTIONS": "-1"})
    assert bad.returncode == 2
    assert bad.stderr.startswith("kernelhub-hub: KERNELHUB_MAX_CONNECTIONS='-1' (env)")
    assert "Traceback" not in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_the_readme_table_is_made_from_the_model() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings_table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


async def test_a_hub_serves_on_the_port_the_flag_gives_over_env_and_file(tmp_path: Path) -> None:
    """A real `serve`: the file's port and the env's port are both overridden by the flag; the
    host comes from the file; health answers SERVING on the flag's port."""
    toml = tmp_path / "hub.toml"
    file_port, env_port, flag_port = free_ports(3)
    toml.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {file_port}\n'
        f'[database]\ndatabase_url = "sqlite:///{tmp_path / "hub.db"}"\n'
        "[streams]\ntraining_sync_interval = 0\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KERNELHUB_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub_service",
        "--log-level",
        "warning",
        "serve",
        "--config",
        str(toml),
        "--port",
        str(flag_port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**clean, "KERNELHUB_PORT": str(env_port)},
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert line.decode().strip() == f"kernelhub serving on 127.0.0.1:{flag_port}"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{flag_port}") as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=WAIT
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 60) == 0
