"""Where the embedded profile's secrets may show: the consumer's shell holds the reader identity alone, the Airflow
admin password lives in a 0600 file, and a local service's log and files are its owner's alone."""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
import time

from click.testing import CliRunner

from reki_core.cli import main
from reki_core.localstack import (CONNECT_TOKEN_ENV, LocalService, ensure_airflow_passwords, ensure_connect_token,
                                  ensure_credentials, secrets_dir)


def _exports(output: str) -> tuple[dict[str, str], list[str]]:
    exported, unset = {}, []
    for line in output.splitlines():
        word, rest = line.split(" ", 1)
        if word == "export":
            key, value = rest.split("=", 1)
            exported[key] = shlex.split(value)[0]
        else:
            unset.append(rest)
    return exported, unset


def _run_env(tmp_path, role: str) -> str:
    env = {"REKI__PATHS__STATE_DIR": str(tmp_path / "state"), "REKI__PATHS__LAKE_URI": str(tmp_path / "lake")}
    result = CliRunner().invoke(main, ["env", "--role", role], env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_readers_shell_holds_the_reader_identity_alone(tmp_path):
    state = tmp_path / "state"
    exported, unset = _exports(_run_env(tmp_path, "reader"))
    creds = ensure_credentials(state)
    assert exported["AWS_ACCESS_KEY_ID"] == creds["reader"].access_key
    assert exported["AWS_SECRET_ACCESS_KEY"] == creds["reader"].secret_key
    assert json.loads(exported["AIRFLOW_CONN_AWS_DEFAULT"])["password"] == creds["reader"].secret_key
    writer_only = [creds["writer"].secret_key, ensure_connect_token(state)]
    assert not any(secret in value for secret in writer_only for value in exported.values())
    # Evaluated after infra/env.sh (which exports the writer's), these lines take the writer's token away.
    assert {CONNECT_TOKEN_ENV, "AIRFLOW_CONN_SPARK_CONNECT_DEFAULT"} <= set(unset)


def test_the_writers_shell_names_the_admin_password_file_without_the_password(tmp_path):
    exported, unset = _exports(_run_env(tmp_path, "writer"))
    path = secrets_dir(tmp_path / "state") / "airflow_passwords.json"
    assert exported["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == str(path) and unset == []
    password = json.loads(path.read_text())["admin"]
    assert len(password) >= 20 and not any(password in value for value in exported.values())
    assert exported[CONNECT_TOKEN_ENV] == ensure_connect_token(tmp_path / "state")


def test_ui_passwords_are_generated_once_private_and_extended_per_user(tmp_path):
    path = ensure_airflow_passwords(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = json.loads(path.read_text())
    assert list(first) == ["admin"]
    ensure_airflow_passwords(tmp_path, ("admin", "viewer"))
    second = json.loads(path.read_text())
    assert second["admin"] == first["admin"] and second["viewer"] and second["viewer"] != first["admin"]


class _Writer(LocalService):
    name = "writer-probe"


def test_a_local_service_writes_owner_only_files_and_log(tmp_path):
    service = _Writer(tmp_path, "127.0.0.1", 1)
    old = os.umask(0o022)  # the caller's umask must not matter
    try:
        proc = service._spawn(["sh", "-c", f"echo started; echo data > {tmp_path / 'written'}"])
        assert proc.wait(timeout=30) == 0
    finally:
        os.umask(old)
    assert service.log_file.read_text().strip() == "started"
    for path in (service.log_file, tmp_path / "written"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(service.log_file.parent.stat().st_mode) == 0o700


def test_the_security_checks_find_what_they_look_for(tmp_path):
    """The detectors the integration suites run (tests/security_checks.py), on known cases."""
    import socket

    import psutil

    from tests.security_checks import (generated_secrets, listening_beyond_loopback, open_to_others, secrets_held,
                                       secrets_in_files)

    state = tmp_path / "state"
    ensure_credentials(state)
    token = ensure_connect_token(state)
    secrets = generated_secrets(state)
    assert secrets["spark_connect.json.token"] == token and "s3_credentials.json.writer.secret_key" in secrets
    assert not any(name.endswith("access_key") for name in secrets)  # key ids are names, not secrets
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    (logs / "clean.log").write_text("nothing here")
    (logs / "leak.log").write_text(f"token={token}")
    for path in logs.iterdir():
        path.chmod(0o600)
    assert secrets_in_files([logs], secrets) == [f"{logs / 'leak.log'}: spark_connect.json.token"]
    assert secrets_in_files([logs], secrets, skip=[logs / "leak.log"]) == []
    assert open_to_others([logs]) == []
    (logs / "clean.log").chmod(0o644)
    logs.chmod(0o755)
    assert sorted(open_to_others([logs])) == [f"{logs} 0o755", f"{logs / 'clean.log'} 0o644"]
    with socket.socket() as anywhere, socket.socket() as loopback:
        anywhere.bind(("0.0.0.0", 0))
        anywhere.listen()
        loopback.bind(("127.0.0.1", 0))
        loopback.listen()
        found = listening_beyond_loopback([psutil.Process()])
        assert found == [f"{os.getpid()} ({psutil.Process().name()}) 0.0.0.0:{anywhere.getsockname()[1]}"]
    import subprocess

    def started(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, psutil.Process]:
        """A child once it has exec'd `argv`: until then /proc shows the forked test process's argv and environment."""
        proc = subprocess.Popen(argv, env=env)
        shown, deadline = psutil.Process(proc.pid), time.monotonic() + 10
        while shown.cmdline() != argv and time.monotonic() < deadline:
            time.sleep(0.02)
        return proc, shown

    holder, held = started(["sleep", "30"], {"PATH": os.environ["PATH"], "PROBE": token})
    # Python keeps its argv for its whole life (`sh -c "sleep 30"` may exec sleep, dropping its arguments mid-test).
    shower, shows = started([sys.executable, "-c", "import time; time.sleep(30)", token], {"PATH": os.environ["PATH"]})
    try:
        assert secrets_held(held, secrets) == ({"spark_connect.json.token"}, set())
        assert secrets_held(shows, secrets) == (set(), {"spark_connect.json.token"})
    finally:
        for proc in (holder, shower):
            proc.kill()
            proc.wait()
