"""What every REKI task needs from its Airflow context: the partition date, run id, config, credentials."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any, Callable


def partition_date(context: dict[str, Any]) -> dt.date:
    """The run's partition: its data interval start (never the wall clock)."""
    start = context.get("data_interval_start") or context.get("logical_date")
    if start is None:
        raise ValueError("the task context has neither data_interval_start nor logical_date")
    return dt.date(start.year, start.month, start.day)


def run_id(context: dict[str, Any]) -> str:
    """A short, path-safe id for this DAG run (used in version names).

    A cleared and re-run DAG run (e.g. a backfill with reprocess behaviour `completed`) keeps its
    Airflow run_id but is a new build, so it gets its clear number: versions are immutable.
    """
    raw = str(context.get("run_id") or "manual")
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in raw)[:58]
    clears = getattr(context.get("dag_run"), "clear_number", 0) or 0
    return f"{safe}-c{clears}" if clears else safe


def load_pipeline_config():
    """The pipeline config; `REKI_CONFIG` selects the file, `REKI__*` variables override keys."""
    from reki_core.config import load_config

    return load_config(os.environ.get("REKI_CONFIG"))


def default_args(cfg, *, retries: int, retry_delay: dt.timedelta, execution_timeout: dt.timedelta) -> dict[str, Any]:
    """The default_args every REKI DAG shares: owner, retries with exponential backoff, timeout, on-call alerts."""
    from reki_airflow.notifiers import failure_notifier

    return {
        "owner": "reki-data-platform",
        "retries": retries,
        "retry_delay": retry_delay,
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=10),
        "execution_timeout": execution_timeout,
        "on_failure_callback": failure_notifier(cfg),
    }


def gpu_task(cfg) -> dict[str, Any]:
    """Arguments of every task that may pick CUDA (extraction shards, encoding, training, the adaptor): the `gpu` pool
    (its size = concurrent GPU workers) and, on the cluster profile's Celery workers, the gpu queue
    (`cluster.gpu_queue`). The LocalExecutor ignores the queue."""
    return {"pool": "gpu", "queue": cfg.cluster.gpu_queue}


def task_setup(context: dict[str, Any]):
    """(config, dt) for a task, with the pipeline's secrets registered for log masking first."""
    from reki_airflow.secrets import register_secrets_for_masking

    cfg = load_pipeline_config()
    register_secrets_for_masking(cfg)
    lake_identity_from_connection()
    return cfg, partition_date(context)


def lake_identity_from_connection(conn_id: str = "aws_default") -> None:
    """The lake's tables are written as the identity in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (`lake_of`); where a
    deployment gives the task only the Airflow connection (compose, Helm), this task's process takes it from there."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return
    creds = s3_credentials(conn_id)
    if creds["access_key"] and creds["secret_key"]:
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = creds["access_key"], creds["secret_key"]


def run_gate(context: dict[str, Any], gate_name: str, gate: Callable[[], Any], cfg=None) -> Any:
    """Run a quality gate; on failure alert on-call with the failing expectations, then fail the task."""
    from reki_core.quality.gx import GateError

    try:
        return gate()
    except GateError as exc:
        from reki_airflow.notifiers import mark_alerted, notify_gate_failure

        notify_gate_failure(context, gate_name, exc.result, cfg=cfg, data_docs_url=exc.result.data_docs)
        raise mark_alerted(exc)


def s3_credentials(conn_id: str = "aws_default") -> dict[str, str | None]:
    """Writer credentials from the Airflow connection (endpoint in its extra), else the environment."""
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - no such connection: the AWS_* environment applies
        return {"endpoint_url": os.environ.get("AWS_ENDPOINT_URL"), "access_key": None, "secret_key": None}
    extra = conn.extra_dejson or {}
    return {"endpoint_url": extra.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL"),
            "access_key": conn.login, "secret_key": conn.password}
