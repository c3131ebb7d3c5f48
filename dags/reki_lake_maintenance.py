"""reki_lake_maintenance: compact, expire and clean the lake's Iceberg tables on a schedule."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

from reki_airflow.runtime import default_args, load_pipeline_config, task_setup

CFG = load_pipeline_config()
POLICY = CFG.lake.maintenance

DOC = f"""
### REKI lake maintenance

For every table of the lake's Iceberg catalogs (`{CFG.lake.catalog}` and the stages' own; reki_core/storage/maintenance.py),
on the warm Spark Connect server:
0. a per-user dataset whose state spans more than {POLICY.max_change_days} days of changes gets its newest day rewritten
   as one full day (the same state, read from one day);
1. small files of a partition (from {POLICY.min_input_files} on) are compacted toward {CFG.lake.target_file_mb} MB;
2. snapshots older than {POLICY.snapshot_retention_days} days expire (the newest {POLICY.retain_last} stay), with the
   files only they referenced;
3. files no snapshot references and older than {POLICY.orphan_age_hours} h (failed writes) are removed.

Retention comes from `lake.maintenance` in the config. Times are this run's data interval end, not the wall clock.
"""


@dag(
    dag_id="reki_lake_maintenance",
    schedule=CronDataIntervalTimetable(POLICY.schedule, timezone="UTC"),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,  # maintenance of today's tables; a missed night is caught up by the next
    max_active_runs=1,
    default_args=default_args(CFG, retries=2, retry_delay=dt.timedelta(minutes=2),
                              execution_timeout=dt.timedelta(hours=2)),
    doc_md=DOC,
    tags=["reki", "lake"],
)
def reki_lake_maintenance():
    @task
    def maintain_tables(**context) -> dict:
        from airflow.providers.apache.spark.hooks.spark_connect import SparkConnectHook

        from reki_core.storage.maintenance import maintain_lake_via_connect

        cfg, _ = task_setup(context)
        url = SparkConnectHook(cfg.spark.connect_conn_id).get_connection_url()
        summary = maintain_lake_via_connect(cfg, url, context["data_interval_end"], log=print)
        return {key: value for key, value in summary.items() if key != "tables"}  # the per-table detail is in the log

    maintain_tables()


reki_lake_maintenance()
