"""PID files of the local stack (SeaweedFS, Airflow's components): after a reboot a recorded PID may belong to
another process, which must never be taken for ours or signalled."""

import os
import subprocess
import threading
import time

from reki_core.config import PROJECT_ROOT
from reki_core.localstack import SeaweedFS, process_start


def _server(tmp_path) -> SeaweedFS:
    server = SeaweedFS(tmp_path, "http://127.0.0.1:8333", "reki-vectors")
    server.pid_file.parent.mkdir(parents=True)
    return server


def test_seaweedfs_pid_is_ours_only_while_it_names_the_process_started(tmp_path):
    server = _server(tmp_path)
    me = os.getpid()
    server.pid_file.write_text(f"{me} {process_start(me)}")
    assert server.pid() == me
    server.pid_file.write_text(f"{me} 1")  # this number, but a process that started at another time
    assert server.pid() is None
    server.stop()  # must not signal this test's own process group
    assert not server.pid_file.exists()
    server.pid_file.write_text(str(me))  # written before start times were recorded
    assert server.pid() == me


def _airflow_sh(pids, command: str) -> str:
    env = {**os.environ, "REKI_PIDS_DIR": str(pids), "REKI_LOGS_DIR": str(pids)}
    result = subprocess.run(["bash", str(PROJECT_ROOT / "infra/airflow.sh"), command], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_airflow_sh_signals_only_the_group_it_started(tmp_path):
    stranger = subprocess.Popen(["sleep", "120"], start_new_session=True)  # another process's group leader
    # Reaped as soon as it dies, as its real parent would: a zombie still answers `kill -0`.
    reaper = threading.Thread(target=stranger.wait, daemon=True)
    reaper.start()
    try:
        pid_file = tmp_path / "airflow-scheduler.pid"
        pid_file.write_text(f"{stranger.pid} 1\n")
        assert "scheduler: stopped" in _airflow_sh(tmp_path, "status")
        _airflow_sh(tmp_path, "stop")
        time.sleep(0.5)
        assert stranger.poll() is None, "airflow.sh stop killed a process it did not start"
        assert not pid_file.exists()

        pid_file.write_text(f"{stranger.pid} {process_start(stranger.pid)}\n")  # as `start` records it
        assert "scheduler: running" in _airflow_sh(tmp_path, "status")
        assert "airflow scheduler stopped" in _airflow_sh(tmp_path, "stop")
        reaper.join(timeout=20)
        assert stranger.returncode is not None
    finally:
        stranger.kill()
        stranger.wait()
