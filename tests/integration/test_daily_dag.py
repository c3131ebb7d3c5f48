"""The daily DAG through real Airflow (`airflow dags test`) against a real lake and SeaweedFS."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest

from reki_core.config import PROJECT_ROOT
from reki_core.runlog import read_steps
from reki_core.storage.lake import Lake
from tests.conftest import make_config

pytestmark = pytest.mark.integration

DT = dt.date(1997, 10, 5)  # early in ML-100K: a small initial load keeps the test quick


def run_dag(env: dict[str, str], day: dt.date) -> subprocess.CompletedProcess:
    logical = (day + dt.timedelta(days=1)).isoformat()  # the run at D+1 covers the interval [D, D+1)
    return subprocess.run([str(PROJECT_ROOT / ".venv/bin/airflow"), "dags", "test", "reki_daily_refresh", logical],
                          env=env, capture_output=True, text=True, timeout=1500, cwd=PROJECT_ROOT)


@pytest.fixture(scope="module")
def dag_env(tmp_path_factory, seaweed, ml100k_dir):
    tmp = tmp_path_factory.mktemp("daily")
    env = dict(os.environ)
    env.update({
        "REKI__PATHS__LAKE_URI": str(tmp / "lake"),
        "REKI__PATHS__STATE_DIR": str(tmp / "state"),
        "REKI__OBJECT_STORE__ENDPOINT_URL": seaweed.endpoint_url,
        "REKI__OBJECT_STORE__BUCKET": seaweed.bucket,
        "AWS_ACCESS_KEY_ID": seaweed.writer_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.writer_secret,
        "AWS_ENDPOINT_URL": seaweed.endpoint_url,
    })
    env.pop("AIRFLOW_CONN_AWS_DEFAULT", None)
    return tmp, env


def test_daily_dag_runs_through_airflow(dag_env):
    tmp, env = dag_env
    proc = run_dag(env, DT)
    assert proc.returncode == 0 and "state=success" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-4000:]
    cfg = make_config(tmp)
    lake = Lake(str(tmp / "lake"))
    assert lake.partitions("raw/interactions")[-1] == DT
    steps = {s["step"]: s for s in read_steps(lake, DT)}
    assert steps["land"]["initial_load"] is True and steps["land"]["rows"] > 1000
    assert steps["raw_gate"]["success"] is True
    assert cfg.lake_uri == str(tmp / "lake")


def test_wrong_s3_key_is_refused_clearly(seaweed):
    from botocore.exceptions import ClientError

    from reki_core.storage.object_store import make_s3_client

    client = make_s3_client(seaweed.endpoint_url, seaweed.writer_key, "not-the-secret")
    with pytest.raises(ClientError) as err:
        client.list_objects_v2(Bucket=seaweed.bucket)
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    anonymous = subprocess.run([sys.executable, "-c", (
        "import urllib.request,sys\n"
        f"try: urllib.request.urlopen('{seaweed.endpoint_url}/{seaweed.bucket}/'); print('open')\n"
        "except Exception as e: print(getattr(e, 'code', e))")], capture_output=True, text=True)
    assert anonymous.stdout.strip() in {"403", "401"}
