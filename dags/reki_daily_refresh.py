"""reki_daily_refresh: land the day's interactions, gate them, and refresh knowledge and vectors."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

from reki_airflow.runtime import load_pipeline_config, partition_date

DOC = """
### REKI daily refresh

One run per day (`dt` = the data interval's start, UTC). Steps:

1. **land**: validate the day's deliveries in `incoming/` and write `raw/*/dt=<dt>/`
   (on an empty lake: all history up to `dt`). Bad input fails with the file, column and rule.
2. **raw_gate**: Great Expectations suites on the landed partitions.

Every task is idempotent for its `dt`: re-running a date rewrites that date's outputs.
Backfills: `airflow backfill create --dag-id reki_daily_refresh --from-date A --to-date B`.
"""

default_args = {
    "owner": "reki-data-platform",
    "retries": 2,
    "retry_delay": dt.timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": dt.timedelta(minutes=10),
    "execution_timeout": dt.timedelta(hours=2),
}


@dag(
    dag_id="reki_daily_refresh",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=dt.datetime(1997, 9, 20, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    doc_md=DOC,
    tags=["reki", "daily", "knowledge"],
)
def reki_daily_refresh():
    @task
    def land(**context) -> dict:
        from reki_core.landing import land as land_day

        return land_day(load_pipeline_config(), partition_date(context))

    @task
    def raw_gate(landed: dict, **context) -> dict:
        from reki_core.landing import run_raw_gate

        return run_raw_gate(load_pipeline_config(), partition_date(context))

    raw_gate(land())


reki_daily_refresh()
