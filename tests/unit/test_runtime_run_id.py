"""Version names come from the DAG run: a cleared and re-run DAG run is a new build, hence a new version."""

from __future__ import annotations

from types import SimpleNamespace

from reki_airflow.runtime import run_id


def test_run_id_is_path_safe_and_bounded():
    assert run_id({"run_id": "backfill__1997-09-26T00:00:00+00:00"}) == "backfill__1997-09-26T00-00-00-00-00"
    assert len(run_id({"run_id": "x" * 200, "dag_run": SimpleNamespace(clear_number=12)})) <= 64


def test_a_cleared_run_gets_its_clear_number():
    context = {"run_id": "backfill__1997-09-26T00:00:00+00:00"}
    first = run_id({**context, "dag_run": SimpleNamespace(clear_number=0)})
    again = run_id({**context, "dag_run": SimpleNamespace(clear_number=1)})
    assert first == "backfill__1997-09-26T00-00-00-00-00" and again == first + "-c1"


def test_the_lake_identity_comes_from_the_aws_connection_when_the_environment_has_none(monkeypatch):
    import json
    import os

    from reki_airflow.runtime import lake_identity_from_connection

    conn = {"conn_type": "aws", "login": "writer-key", "password": "writer-secret",
            "extra": {"endpoint_url": "http://seaweedfs:8333"}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stack-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stack-secret")
    lake_identity_from_connection()
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == ("stack-key", "stack-secret")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    lake_identity_from_connection()
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == ("writer-key", "writer-secret")
