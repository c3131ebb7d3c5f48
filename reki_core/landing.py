"""Landing: validate the day's deliveries from `incoming/` and write `raw/` partitions; the raw gate.

The work runs in Spark: `spark_jobs/landing.py` (the DAG's Spark Connect task `land`) reads the delivered Parquet files
through s3a, checks them and writes the `raw/` tables; this module holds what its callers share (the errors, the
tables' names) and the two entry points for callers outside the DAG (`land`, `run_raw_gate`).

On an empty lake the first run lands all history up to its date (one partition per day); later
runs land their own day, and every day since the last landed one that is missing (a scheduler
that was down, with catchup off, skips days: their deliveries land with the next run instead of
never). A first load counts as done once its snapshots landed, so a first load that failed
part-way is redone whole by the retry. Re-running a date overwrites that date only. Bad input
stops the run with an error naming the file, column and rule; under `quality.raw_bad_rows_policy:
quarantine`, bad rows go to `raw/_rejected/dt=D/` with their reason and the rest lands, unless they
exceed `quality.raw_max_rejected_share` of the day's rows.

The raw gate runs the interactions suite on the landed day (the day's increment, at most
`max_rows_per_day` rows, in pandas) and the users and items suites on the landed snapshots as Spark DataFrames
(`spark_jobs/landing.py` `snapshot_gate`): no snapshot is read into Python.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reki_core.config import Config
from reki_core.datasets import schema
from reki_core.storage.lake import as_date, lake_of

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

RAW = {"interactions": "raw/interactions", "users": "raw/users", "items": "raw/items"}
REJECTED = "raw/_rejected"
SCHEMAS = {"interactions": schema.INTERACTIONS, "users": schema.USERS, "items": schema.ITEMS}


@dataclass
class Problem:
    file: str
    column: str | None
    rule: str
    detail: str

    def __str__(self) -> str:
        col = f"column '{self.column}'" if self.column else "table"
        return f"{self.file}: {col}: rule '{self.rule}': {self.detail}"


class LandingError(ValueError):
    """Bad input; `problems` names each file, column and rule."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"landing rejected the input ({len(problems)} problem(s)):\n{shown}{more}")


@contextmanager
def _session(cfg: Config, spark: "SparkSession | None", app: str) -> Iterator["SparkSession"]:
    """`spark`, else the active session, else a classic session of its own (stopped after)."""
    if spark is not None:
        yield spark
        return
    from pyspark.sql import SparkSession

    from reki_core.spark import get_spark

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    own = get_spark(cfg, app)
    try:
        yield own
    finally:
        own.stop()


def land(cfg: Config, day: str | dt.date, spark: "SparkSession | None" = None) -> dict:
    """Land the deliveries for `day` (all history up to it on an empty lake) with the Spark job
    `spark_jobs/landing.py` (the DAG runs it as the Spark Connect task `land`), for callers outside the DAG: on
    `spark`, else the active session, else a classic session of its own. Records step `land`; returns its payload."""
    from spark_jobs.common import jobs_named, run_jobs

    with _session(cfg, spark, "reki-landing") as session:
        [payload] = run_jobs(session, jobs_named(["landing"]), cfg, lake_of(cfg), as_date(day)).values()
    return payload


def run_raw_gate(cfg: Config, day: str | dt.date, spark: "SparkSession | None" = None) -> dict:
    """The raw gate: the interactions suite on the landed day, the users and items suites on the landed snapshots as
    Spark DataFrames (on `spark`, as `land` finds one); raises GateError on failure."""
    from reki_core.quality import raw as raw_suites
    from reki_core.quality.data_docs import keep_validations
    from reki_core.quality.gx import raise_if_any_failed, run_suite
    from reki_core.runlog import timed_step
    from spark_jobs.landing import snapshot_gate

    day = as_date(day)
    lake = lake_of(cfg)
    with timed_step(lake, day, "raw_gate") as record, _session(cfg, spark, "reki-raw-gate") as session:
        inter = lake.read_partition(RAW["interactions"], day)  # the day's increment: at most max_rows_per_day rows
        results = [
            run_suite("raw", f"{RAW['interactions']}/dt={day}", inter,
                      raw_suites.interactions_expectations(day, cfg.scenario.source.max_rows_per_day)),
            snapshot_gate(session, lake, "users", day),
            snapshot_gate(session, lake, "items", day),
        ]
        record["gates"] = [r.summary() for r in results]
        record["data_docs"] = keep_validations(lake, day, "raw_gate", results)
        record["success"] = all(r.success for r in results)
        record["no_new_data"] = len(inter) == 0
        record["rows"] = len(inter)
        raise_if_any_failed(results, f"raw gate failed for dt={day.isoformat()}")
    return record
