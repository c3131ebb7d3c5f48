"""The DAG's Spark tasks: clients of the warm Spark Connect server. No task starts a JVM of its own.

Each task try opens its own Connect session (a new id every try), runs its jobs
(`spark_jobs.common.run_jobs`) and releases the session, so a failed or killed try leaves no temp views or
cached frames for the next. The server's URL and token come from the Airflow connection (Spark Connect type,
`spark.connect_conn_id`); killing the task from the UI interrupts its Spark operations.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from airflow.sdk import BaseOperator


class SparkConnectJobs(BaseOperator):
    """Run the feature jobs `spark_jobs.<name>` (in order) for the run's `dt` on one Connect session."""

    ui_color = "#fdf1d9"

    def __init__(self, *, jobs: Sequence[str], conn_id: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.jobs = list(jobs)
        self.conn_id = conn_id
        self._session = None
        self._tag: str | None = None

    def execute(self, context) -> dict:
        from airflow.providers.apache.spark.hooks.spark_connect import SparkConnectHook

        from reki_airflow.runtime import task_setup
        from reki_core.spark import connect_client, task_session_id
        from reki_core.storage.lake import lake_of
        from spark_jobs.common import jobs_named, run_jobs

        cfg, day = task_setup(context)
        ti = context["ti"]
        url = SparkConnectHook(self.conn_id).get_connection_url()
        session_id = task_session_id()  # a new one for every try
        self._tag = f"reki-{ti.task_id}-{day.isoformat()}-try{ti.try_number}"  # what on_kill interrupts
        self.log.info("Spark Connect session %s (tag %s, try %s) for %s", session_id, self._tag, ti.try_number, ", ".join(self.jobs))
        with connect_client(cfg, url, session_id, self._tag) as spark:
            self._session = spark
            try:
                return run_jobs(spark, jobs_named(self.jobs), cfg, lake_of(cfg), day)
            finally:
                self._session = None

    def on_kill(self) -> None:
        """Airflow calls this when the task is killed (from the UI, a timeout): stop its Spark operations now,
        rather than leave them running on the shared server."""
        session, tag = self._session, self._tag
        if session is None or tag is None:
            return
        try:
            interrupted = session.interruptTag(tag)
            self.log.warning("interrupted %d Spark Connect operation(s) tagged %s", len(interrupted), tag)
        except Exception as exc:  # the server may already be gone: nothing left running there
            self.log.warning("could not interrupt the Spark Connect operations tagged %s: %s", tag, exc)


@contextmanager
def task_connect_session(context, conn_id: str) -> Iterator[Any]:
    """A Connect session of its own for a Python task that reads a little through Spark (the raw gate's summaries of
    the landed snapshots), released at the end; its operations are tagged as SparkConnectJobs' are."""
    from airflow.providers.apache.spark.hooks.spark_connect import SparkConnectHook

    from reki_airflow.runtime import task_setup
    from reki_core.spark import connect_client, task_session_id

    cfg, day = task_setup(context)
    ti = context["ti"]
    url = SparkConnectHook(conn_id).get_connection_url()
    with connect_client(cfg, url, task_session_id(), f"reki-{ti.task_id}-{day.isoformat()}-try{ti.try_number}") as spark:
        yield spark
