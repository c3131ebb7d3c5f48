"""Faults of the Spark Connect server the feature tasks are clients of: down when a task starts, killed mid-task.
Each fails the task with a message naming the server's URL and how to start it, leaves the lake's partitions
whole, and the retry succeeds once the server is back, writing what an undisturbed run writes.

The client runs as the DAG's task runs it (`connect_client` + `run_jobs`, through the jobs' main with
--remote), in a process of its own: the pytest process keeps a classic session for the reference run.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time

import pytest
from pyspark.testing import assertDataFrameEqual

from reki_core.config import PROJECT_ROOT
from reki_core.datasets import synthetic
from reki_core.localstack import SparkConnectServer, ensure_connect_token, free_port_block
from reki_core.runlog import read_steps
from reki_core.storage.lake import Lake
from spark_jobs.common import jobs_named, read_partition, run_jobs
from spark_jobs.features import FEATURE_JOBS
from tests.conftest import ConnectServer, copy_lake, make_config, serve_spark_connect

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture
def lake_world(tmp_path):
    """A synthetic lake big enough that the feature jobs take a while."""
    cfg = make_config(tmp_path, scenario="books", REKI__SPARK__SHUFFLE_PARTITIONS="2")
    data = synthetic.generate(30_000, n_users=800, n_items=600, days=20, seed=3, start=dt.date(2024, 3, 1))
    days = synthetic.write_raw_lake(Lake(cfg.lake_uri), data.interactions, data.users, data.items)
    return cfg, days[-1]


@pytest.fixture
def world(lake_world, tmp_path):
    """The lake, and a Connect server of this test's own."""
    server = serve_spark_connect(tmp_path)
    yield *lake_world, next(server)
    server.close()


def _features(cfg, day, connect, **popen) -> subprocess.Popen:
    env = {**os.environ, **connect.env(), "REKI__PATHS__LAKE_URI": cfg.lake_uri,
           "REKI__PATHS__STATE_DIR": str(cfg.state_dir), "REKI__SCENARIO": "books", "REKI__SPARK__SHUFFLE_PARTITIONS": "2"}
    return subprocess.Popen([sys.executable, "-m", "spark_jobs.features", "--dt", day.isoformat(), "--remote", connect.url],
                            env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def test_server_down_when_the_task_starts_fails_at_once_naming_the_url(lake_world, tmp_path):
    cfg, day = lake_world
    # A server that is not there: its URL and token, and nothing listening on its port.
    url = f"sc://localhost:{free_port_block(1)}"
    down = SparkConnectServer(make_config(tmp_path, REKI__SPARK__CONNECT_URL=url))
    connect = ConnectServer(url, ensure_connect_token(tmp_path / "state"), down)
    started = time.monotonic()
    code, out = _finish(_features(cfg, day, connect), timeout=120)
    assert code != 0 and time.monotonic() - started < 60
    assert f"the Spark Connect server {connect.url} is not reachable" in out and "reki stack up" in out, out[-3000:]
    assert connect.token not in out  # the URL is named, never its token
    assert not Lake(cfg.lake_uri).has_partition("features/items", day)


def test_server_killed_mid_task_fails_clearly_and_the_retry_succeeds(world, spark, tmp_path):
    cfg, day, connect = world
    lake = Lake(cfg.lake_uri)
    reference = tmp_path / "reference"
    copy_lake(cfg.lake_uri, reference / "lake")
    proc = _features(cfg, day, connect)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill the server once `items` is done, while `user_history` runs
        if any(s["step"] == "features_items" and s.get("success") for s in read_steps(lake, day)):
            break
        assert proc.poll() is None, _finish(proc)[1][-3000:]
        time.sleep(0.2)
    else:
        pytest.fail("features_items did not finish in 5 minutes")
    connect.server.stop(timeout_s=0)  # SIGTERM then SIGKILL of the whole group: the JVM dies mid-job
    code, out = _finish(proc, timeout=300)
    assert code != 0, out[-3000:]
    assert f"lost the Spark Connect server mid-way: the Spark Connect server {connect.url} is not reachable" in out, out[-3000:]
    assert connect.token not in out
    failed = {s["step"]: s for s in read_steps(lake, day)}
    assert failed["features_items"]["success"] and failed["features_user_history"]["success"] is False
    assert not lake.has_partition("features/user_history", day)  # nothing half-written became a partition

    connect.server.start()  # the server comes back (same port, same token): the task's retry succeeds
    code, out = _finish(_features(cfg, day, connect))
    assert code == 0, out[-3000:]
    steps = {s["step"]: s for s in read_steps(lake, day)}
    assert all(steps[f"features_{job}"]["success"] for job in FEATURE_JOBS), steps
    ref_cfg = make_config(reference, scenario="books", REKI__SPARK__SHUFFLE_PARTITIONS="2")
    run_jobs(spark, jobs_named(FEATURE_JOBS), ref_cfg, Lake(ref_cfg.lake_uri), day)
    for dataset in ("features/items", "features/user_history", "features/knowledge_versions", "features/ctr_samples"):
        assertDataFrameEqual(read_partition(spark, lake, dataset, day),
                             read_partition(spark, Lake(ref_cfg.lake_uri), dataset, day), checkRowOrder=False)
