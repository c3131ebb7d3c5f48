"""reki_publish_freshness: alert on-call when the daily vectors have not been published by the deadline."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

from reki_airflow.runtime import default_args, load_pipeline_config, s3_credentials, task_setup

CFG = load_pipeline_config()

DOC = f"""
### REKI publish freshness

Hourly: reads `_LATEST.json` and alerts (Slack / e-mail / webhook, as configured in `alerts`) when
the newest published `dt` is older than the newest day whose deadline has passed (interval end +
{CFG.alerts.publish_deadline_hours} h). "Now" is this run's data interval end, never the wall clock,
so backfilled runs of this DAG judge the past correctly. Unlike a per-run deadline it also fires when
the daily DAG never ran at all.

Scheduled only for a live source (`scenario.source.kind: files`): a replayed dataset (the embedded
default) stopped in the past, so every hourly check would page. Trigger it by hand there.
"""

# Hourly against a live source; by hand only for a replay, whose newest day is years behind any "now".
SCHEDULE = CronDataIntervalTimetable("15 * * * *", timezone="UTC") if CFG.scenario.source.kind == "files" else None


@dag(
    dag_id="reki_publish_freshness",
    schedule=SCHEDULE,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(CFG, retries=2, retry_delay=dt.timedelta(minutes=1),
                              execution_timeout=dt.timedelta(minutes=10)),
    doc_md=DOC,
    tags=["reki", "monitoring"],
)
def reki_publish_freshness():
    @task(retries=0)
    def freshness_gate(**context) -> dict:
        from reki_airflow.notifiers import mark_alerted, notify_gate_failure
        from reki_core.freshness import publish_freshness

        cfg, _ = task_setup(context)
        status = publish_freshness(cfg, context["data_interval_end"], **s3_credentials())
        if status["late"]:
            notify_gate_failure(context, "publish_deadline", [{
                "expectation": "latest published dt >= expected dt", "unexpected_count": status["days_behind"] or 1,
                "observed_value": f"latest {status['latest_dt']} ({status['latest_version']}), expected {status['expected_dt']}"}])
            raise mark_alerted(ValueError(f"vectors are late: {status}"))
        return status

    freshness_gate()


reki_publish_freshness()
