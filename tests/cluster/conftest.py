"""The cluster profile (reki_core/cluster.py) started for real by the tests: PostgreSQL, Redis, SeaweedFS, Spark
master/worker/Connect, Airflow with Celery workers, all under supervisord, on free loopback ports with their state
in a temporary folder. Tests marked `cluster` run only in `make test-cluster` (`-m cluster`); the smoke test runs
in `make test`."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from reki_core.airflow_api import AirflowApi
from reki_core.config import PROJECT_ROOT
from tests.conftest import SMOKE_LLM, free_port_block
from tests.integration.test_daily_dag import FAST

DAG_ID = "reki_daily_refresh"


def pytest_collection_modifyitems(config, items):
    """The heavy cluster tests need a `-m` that asks for them (`-m cluster`, `make test-cluster`): the whole suite
    (`-m "not backfill"`, or no -m) runs only the smoke test."""
    from _pytest.mark.expression import Expression

    expr = config.option.markexpr
    if expr:
        selects = Expression.compile(expr).evaluate
        if selects(lambda name, **_: name in ("cluster", "integration")) and not selects(lambda name, **_: name == "integration"):
            return
    skip = pytest.mark.skip(reason="the cluster profile's full suite runs in `make test-cluster`")
    for item in items:
        if item.get_closest_marker("cluster"):
            item.add_marker(skip)


def cluster_settings(tmp: Path) -> dict[str, str]:
    """REKI__ overrides that put every port of the profile on a free loopback block and its state under `tmp`."""
    base = free_port_block(24)
    return {
        "REKI__PATHS__STATE_DIR": str(tmp / "state"), "REKI__PATHS__LAKE_URI": str(tmp / "lake"),
        "REKI__PATHS__DATA_DIR": str(PROJECT_ROOT / ".reki" / "data"),
        "REKI__PATHS__MODELS_DIR": str(PROJECT_ROOT / ".reki" / "models"),
        "REKI__CLUSTER__POSTGRES_PORT": str(base), "REKI__CLUSTER__REDIS_PORT": str(base + 1),
        "REKI__CLUSTER__API_PORT": str(base + 2), "REKI__CLUSTER__SPARK_MASTER_PORT": str(base + 3),
        "REKI__CLUSTER__SPARK_MASTER_WEBUI_PORT": str(base + 4), "REKI__CLUSTER__SPARK_WORKER_WEBUI_PORT": str(base + 5),
        "REKI__SPARK__CONNECT_URL": f"sc://localhost:{base + 6}",
        "REKI__OBJECT_STORE__ENDPOINT_URL": f"http://127.0.0.1:{base + 10}",  # SeaweedFS takes the 9 ports after it
        "REKI__OBJECT_STORE__BUCKET": "reki-cluster-test",
    }


@dataclass
class ClusterStack:
    tmp: Path
    env: dict[str, str]

    def sh(self, command: str, timeout: float = 900, cluster_env: bool = True) -> subprocess.CompletedProcess:
        """`command` in bash with infra/env.sh (and infra/cluster/env.sh: Airflow's CLI on this profile) sourced."""
        prefix = "source infra/env.sh && " + ("source infra/cluster/env.sh && " if cluster_env else "")
        return subprocess.run(["bash", "-c", prefix + command], env=self.env, cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=timeout)

    def up(self) -> subprocess.CompletedProcess:
        return self.sh("python -m reki_core.cluster up", cluster_env=False)

    def down(self) -> subprocess.CompletedProcess:
        return self.sh("python -m reki_core.cluster down", cluster_env=False, timeout=180)

    def supervisorctl(self, *args: str) -> str:
        return self.sh("supervisorctl -c " + str(self.state / "cluster" / "supervisord.conf") + " " + " ".join(args),
                       cluster_env=False, timeout=120).stdout

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    @property
    def lake(self) -> Path:
        return self.tmp / "lake"

    @property
    def api_port(self) -> int:
        return int(self.env["REKI__CLUSTER__API_PORT"])

    def config(self):
        from reki_core.config import load_config

        return load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ=self.env)

    def api(self, user: str = "admin") -> AirflowApi:
        """A REST client signed in as `user` (FAB: admin, operator or viewer), its password from the 0600 file."""
        password_file = self.state / "secrets" / "cluster_airflow_users.json"
        from reki_core.cluster import api_url

        return AirflowApi.with_password_file(api_url(self.config()), password_file, user=user)


def cluster_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "REKI__"))}
    env.update(SMOKE_LLM)  # a plumbing run: the smoke model in-process (the REKI__ filter above dropped it)
    env.update(FAST)
    env["REKI__LLM__SHARD_SIZE"] = "100000"  # one extraction shard per day (the fault test sets its own)
    env.update(cluster_settings(tmp))
    env.update(extra)
    return env


def start_cluster(tmp: Path, **extra: str) -> ClusterStack:
    stack = ClusterStack(tmp, cluster_env(tmp, **extra))
    started = stack.up()
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-5000:]
    return stack


def cluster_tmp(name: str) -> Path:
    """A folder for one profile's state and lake, under .reki/ rather than pytest's 0700 temporary folders: as root,
    PostgreSQL runs as a system user that must reach its data folder."""
    root = PROJECT_ROOT / ".reki" / "cluster-tests"
    root.mkdir(parents=True, exist_ok=True)
    for folder in (root.parent, root):  # PostgreSQL's user passes through (umask 077 made them 0700), never lists
        folder.chmod(stat.S_IMODE(folder.stat().st_mode) | 0o011)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    path.chmod(0o711)
    return path


@pytest.fixture
def cluster_dir_factory():
    """Folders from `cluster_tmp`, removed after the test."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(cluster_tmp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ml100k_dir):
    """The profile up for the module's tests (the DAG unpaused); stopped and removed after them."""
    tmp = cluster_tmp("cluster")
    # Batches of 4 give an extraction shard several checkpoints (the worker-kill fault resumes from them).
    stack = start_cluster(tmp, REKI__LLM__ENGINE__BATCH_SIZE="4")
    try:
        api = stack.api()
        assert api.unpause(DAG_ID)
        yield stack, api
    finally:
        stack.down()
        shutil.rmtree(tmp, ignore_errors=True)


def trigger_day(api, day: dt.date) -> str:
    """A manual run of `day` (logical date D: the same run key as D's backfill run); returns its run id."""
    logical = day.isoformat()
    run = api.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                   {"logical_date": f"{logical}T00:00:00Z", "dag_run_id": f"cluster_{day}_{time.time_ns()}"})
    return run["dag_run_id"]


def wait_run(api, run_id: str, timeout_s: float = 1500) -> str:
    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline:
        state = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"]
        if state in ("success", "failed"):
            return state
        time.sleep(5)
    return state


def wait_for(predicate, timeout_s: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def task_instances(api, run_id: str) -> list[dict]:
    return api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=200")["task_instances"]


def vector_records(frame) -> list[dict]:
    """Augmented vectors as plain records in a stable order, to compare two runs' outputs."""
    records = [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()} for row in frame.to_dict("records")]
    return sorted(records, key=repr)


def task_log(api, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
    """A try's log as the UI shows it: on this profile, read by the API server from the object store."""
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}?full_content=true"
    if map_index >= 0:
        path += f"&map_index={map_index}"
    lines = []
    for line in api.call("GET", path)["content"]:
        if not isinstance(line, dict):
            lines.append(str(line))
            continue
        lines.append(str(line.get("event", line)))
        # A failure's exception comes structured beside its line.
        lines += [f"{e.get('exc_type')}: {e.get('exc_value')}" for e in line.get("error_detail") or []]
    return "\n".join(lines)


def remote_task_logs(stack: ClusterStack) -> dict[str, bytes]:
    """Every task log object under the profile's task logs folder, read with the writer identity."""
    import json

    from reki_core.cluster import task_logs_folder
    from reki_core.storage.object_store import make_s3_client

    cfg = stack.config()
    creds = json.loads((stack.state / "secrets" / "s3_credentials.json").read_text())["writer"]
    client = make_s3_client(cfg.object_store.endpoint_url, creds["access_key"], creds["secret_key"])
    bucket, _, prefix = task_logs_folder(cfg).removeprefix("s3://").partition("/")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def failed_logs(stack: ClusterStack, api, run_id: str) -> str:
    """The end of each failed task's log and the scheduler's, for an assertion message."""
    out = []
    for ti in task_instances(api, run_id):
        if ti["state"] not in ("success", "skipped"):
            out.append(f"{ti['task_id']}[{ti['map_index']}] {ti['state']} try {ti['try_number']} on {ti['hostname']}")
            if ti["try_number"]:
                try:
                    out.append(task_log(api, run_id, ti["task_id"], ti["try_number"], ti["map_index"])[-2500:])
                except Exception as exc:  # an assertion message: say why the log is missing, keep the rest
                    out.append(f"(its log: {exc})")
    logs = stack.state / "logs"
    for name in ("cluster-scheduler.log", "cluster-worker.log", "cluster-gpu-worker.log"):
        if (logs / name).is_file():
            out.append(f"--- {name}\n" + (logs / name).read_text(errors="replace")[-2500:])
    return "\n".join(out)
