"""Backfills through the real Airflow scheduler: `airflow backfill create` over 7 days, then a backfill
started through the REST API (the calls the UI makes) that reprocesses a completed date. The days run
one by one for the comparison go through the same stage functions in-process (tests/integration/
pipeline_driver.py), without the scheduler. Eight DAG runs: `make test-backfill` runs this file alone."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import time

import pandas as pd
import pytest

from reki_core.airflow_api import AirflowApi, states_of
from reki_core.config import PROJECT_ROOT
from reki_core.localstack import secrets_dir
from reki_core.storage.lake import Lake
from tests.conftest import free_port_block
from tests.integration.test_daily_dag import FAST

# Each DAG run takes minutes on a small machine: these tests wait for many of them.
pytestmark = [pytest.mark.integration, pytest.mark.backfill, pytest.mark.timeout(7200)]

D0 = dt.date(1997, 9, 22)
CLI_DAYS = [D0 + dt.timedelta(days=i) for i in range(7)]
DAG_ID = "reki_daily_refresh"


def _env(tmp, seaweed, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FAST)
    # One extraction shard per run: shard mapping and retries are covered by the daily DAG and fault tests.
    env["REKI__LLM__SHARD_SIZE"] = "100000"
    env.update({
        "REKI__PATHS__LAKE_URI": str(tmp / "lake"), "REKI__PATHS__STATE_DIR": str(tmp / "state"),
        "REKI__OBJECT_STORE__ENDPOINT_URL": seaweed.endpoint_url, "REKI__OBJECT_STORE__BUCKET": seaweed.bucket,
        "AWS_ACCESS_KEY_ID": seaweed.writer_key, "AWS_SECRET_ACCESS_KEY": seaweed.writer_secret,
        "AWS_ENDPOINT_URL": seaweed.endpoint_url,
        "AIRFLOW_HOME": str(tmp / "airflow"), "AIRFLOW__API__PORT": str(port),
        "REKI_PIDS_DIR": str(tmp / "pids"), "REKI_LOGS_DIR": str(tmp / "logs"),
    })
    for key in ("AIRFLOW_CONN_AWS_DEFAULT", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__API__BASE_URL",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"):
        env.pop(key, None)  # env.sh derives them from AIRFLOW_HOME and the port
    return env


def _sh(env, *args, timeout=600) -> subprocess.CompletedProcess:
    cmd = "source infra/env.sh && " + " ".join(args)
    return subprocess.run(["bash", "-c", cmd], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    """This suite's own object store: its newer dates would otherwise stay `latest` for the suites after it."""
    from tests.conftest import serve_seaweed

    yield from serve_seaweed(tmp_path_factory.mktemp("backfill-seaweed"))


@pytest.fixture(scope="module")
def airflow_stack(tmp_path_factory, seaweed, ml100k_dir):
    from tests.conftest import serve_spark_connect

    tmp = tmp_path_factory.mktemp("backfill")
    port = free_port_block(1)
    env = _env(tmp, seaweed, port)
    # Its own Connect server, token in the suite's state dir: infra/env.sh exports it from there.
    connect = serve_spark_connect(tmp)
    env.update(next(connect).env())
    # infra/env.sh exports the credentials kept in the state dir (as for `make airflow`): keep the test store's there.
    creds = {"writer": {"access_key": seaweed.writer_key, "secret_key": seaweed.writer_secret},
             "reader": {"access_key": seaweed.reader_key, "secret_key": seaweed.reader_secret}}
    creds_file = secrets_dir(tmp / "state") / "s3_credentials.json"
    creds_file.parent.mkdir(parents=True, exist_ok=True)
    creds_file.write_text(json.dumps(creds))
    creds_file.chmod(0o600)
    started = _sh(env, "bash infra/airflow.sh start", timeout=900)
    assert started.returncode == 0, started.stdout + started.stderr
    # The admin password: generated into the state's secrets (0600) before the api-server starts, never printed.
    password = json.loads((secrets_dir(tmp / "state") / "airflow_passwords.json").read_text())["admin"]
    assert password not in started.stdout + started.stderr
    assert "airflow_passwords.json" in started.stdout, started.stdout
    api = AirflowApi(f"http://127.0.0.1:{port}", password)
    # Backfill runs start only for an unpaused DAG (as in the UI); the replay's end_date keeps the
    # scheduler from adding a run for today's interval.
    assert api.unpause(DAG_ID)
    yield tmp, env, api
    _sh(env, "bash infra/airflow.sh stop")
    connect.close()  # stops the Connect server (the generator's finally)


def _wait_for_runs(api: AirflowApi, days: list[dt.date], timeout_s: float) -> dict[dt.date, str]:
    return states_of(api.wait_for_days(DAG_ID, days, timeout_s))


def _scheduler_pid(tmp) -> int | None:
    """The `airflow scheduler` process under its supervisor (the pid file holds the supervisor's)."""
    import psutil

    supervisor = psutil.Process(int((tmp / "pids" / "airflow-scheduler.pid").read_text().split()[0]))
    for child in supervisor.children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "scheduler" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue  # the killed scheduler, not yet reaped by its supervisor
    return None


def test_a_scheduler_that_exits_is_restarted(airflow_stack):
    """Airflow's scheduler exits on an unhandled error in its loop; the stack brings it back and it heartbeats."""
    import signal

    tmp, _, api = airflow_stack
    first = _scheduler_pid(tmp)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline, again = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        again = _scheduler_pid(tmp)
        if again not in (None, first) and api.call("GET", "/api/v2/monitor/health")["scheduler"]["status"] == "healthy":
            break
        time.sleep(3)
    assert again not in (None, first), "the scheduler was not restarted"
    assert api.call("GET", "/api/v2/monitor/health")["scheduler"]["status"] == "healthy"


def test_cli_backfill_over_seven_days(airflow_stack):
    tmp, env, api = airflow_stack
    proc = _sh(env, f"bash infra/backfill.sh {CLI_DAYS[0]} {CLI_DAYS[-1]} --reprocess-behavior none")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    states = _wait_for_runs(api, CLI_DAYS, timeout_s=5400)
    assert all(s == "success" for s in states.values()), (states, _sh(env, f"tail -50 {tmp}/logs/airflow-scheduler.log").stdout)
    runs = api.runs(DAG_ID)
    assert {r["run_type"] for r in runs} == {"backfill"}, [(r["run_id"], r["run_type"]) for r in runs]
    lake = Lake(str(tmp / "lake"))
    for day in CLI_DAYS:
        assert lake.has_partition("vectors/augmented", day), day
        assert lake.read_json(f"_runs/dt={day}/publish.json")["success"] is True


def _outputs(lake: Lake, day: dt.date) -> dict[str, pd.DataFrame]:
    prompts = lake.read_partition("prompts", day)[["prompt_id", "prompt_hash"]].sort_values("prompt_id")
    history = lake.read_partition("features/user_history", day)[["user_id", "as_of", "n_interactions"]]
    samples = lake.read_partition("features/ctr_samples", day)[["user_id", "item_id", "ts", "label", "split"]]
    return {"prompts": prompts.reset_index(drop=True),
            "user_history": history.sort_values("user_id").reset_index(drop=True),
            "ctr_samples": samples.sort_values(["user_id", "item_id", "ts"]).reset_index(drop=True)}


def test_backfilled_days_equal_days_run_one_by_one(airflow_stack, spark, tmp_path):
    """Days D0, D0+1 run one after the other in a fresh lake give what the backfill wrote for them."""
    from tests.conftest import make_config
    from tests.integration.pipeline_driver import run_day

    tmp, env, _ = airflow_stack
    settings = {k: v for k, v in env.items() if k.startswith("REKI__") and not k.startswith(("REKI__PATHS__", "REKI__OBJECT_STORE__"))}
    cfg = make_config(tmp_path, **settings)
    for day in CLI_DAYS[:2]:
        run_day(cfg, day, spark, until="prompts")
    backfilled, sequential = Lake(str(tmp / "lake")), Lake(cfg.lake_uri)
    for day in CLI_DAYS[:2]:
        for name, frame in _outputs(backfilled, day).items():
            pd.testing.assert_frame_equal(frame, _outputs(sequential, day)[name], obj=f"{name} dt={day}")


def test_rest_api_backfill_reprocesses_a_date_without_changes_and_latest_stays_newest(airflow_stack, seaweed):
    """A backfill created through the REST API re-runs a completed date: nothing is asked of the LLM again,
    the outputs are the same, a new version of that date is published, and `latest` stays at the newest date."""
    from reki_core.storage.publish import read_latest
    from reki_core.storage.s3_access import ObjectStore, resolve_s3_access
    from tests.conftest import make_config

    tmp, env, api = airflow_stack
    day = CLI_DAYS[3]
    lake = Lake(str(tmp / "lake"))
    before = _outputs(lake, day)
    version_before = lake.read_json(f"_runs/dt={day}/publish.json")["version"]
    api.wait_backfills_completed(DAG_ID)
    created = api.call("POST", "/api/v2/backfills", {
        "dag_id": DAG_ID, "from_date": f"{day}T00:00:00Z", "to_date": f"{day}T00:00:00Z",
        "max_active_runs": 1, "reprocess_behavior": "completed", "run_backwards": False})
    assert created["dag_id"] == DAG_ID
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline and not api.call("GET", f"/api/v2/backfills/{created['id']}").get("completed_at"):
        time.sleep(10)
    assert _wait_for_runs(api, [day], timeout_s=60)[day] == "success"
    assert lake.read_json(f"_runs/dt={day}/llm_plan.json")["n_pending"] == 0
    for name, frame in _outputs(lake, day).items():
        pd.testing.assert_frame_equal(frame, before[name], obj=f"{name} dt={day}")
    assert lake.read_json(f"_runs/dt={day}/publish.json")["version"] != version_before
    cfg = make_config(tmp, REKI__OBJECT_STORE__ENDPOINT_URL=seaweed.endpoint_url,
                      REKI__OBJECT_STORE__BUCKET=seaweed.bucket)
    latest, _ = read_latest(ObjectStore(resolve_s3_access(cfg, access_key=seaweed.reader_key,
                                                          secret_key=seaweed.reader_secret)), cfg.scenario.name)
    assert latest["dt"] == CLI_DAYS[-1].isoformat()


def test_no_secret_in_logs_or_generated_files_which_are_private_and_nothing_listens_beyond_loopback(airflow_stack):
    """After the DAG runs above, as an attacker with a shell on the machine would look: the embedded stack's logs,
    Airflow home (its SQLite database, task logs), state and lake hold no generated secret and are their owner's
    alone; no process of the stack (the Airflow components and their children, the Connect server) listens on
    anything but loopback, and Airflow's log servers do not run at all."""
    from tests.security_checks import (generated_secrets, listening_beyond_loopback, listening_ports, open_to_others,
                                       secrets_in_files, with_children)

    tmp, env, api = airflow_stack
    state = tmp / "state"
    password_file = secrets_dir(state) / "airflow_passwords.json"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secrets_dir(state).stat().st_mode) == 0o700
    assert not (tmp / "airflow" / "simple_auth_manager_passwords.json.generated").exists()
    secrets = generated_secrets(state)
    assert {"airflow_passwords.json.admin", "spark_connect.json.token", "s3_credentials.json.writer.secret_key"} <= set(secrets)
    roots = [tmp / "logs", tmp / "airflow", tmp / "pids", state, tmp / "lake"]
    assert secrets_in_files(roots, secrets, skip=[secrets_dir(state)]) == []
    assert open_to_others(roots) == []

    supervisors = [int((tmp / "pids" / f"airflow-{c}.pid").read_text().split()[0])
                   for c in ("api-server", "scheduler", "dag-processor", "triggerer")]
    connect = int((state / "pids" / "spark-connect.pid").read_text().split()[0])
    procs = with_children([*supervisors, connect])
    assert len(procs) >= 6, [p.pid for p in procs]
    assert listening_beyond_loopback(procs) == []
    ports = listening_ports(procs)
    assert int(env["AIRFLOW__API__PORT"]) in ports
    assert not ports & {8793, 8794}, f"a log server listens: {sorted(ports)}"
