"""The daily DAG's timetable: day-long data intervals at 00:00 UTC, one run key per day.

Airflow's `CronDataIntervalTimetable` gives a manual run at logical date D+1 the interval [D, D+1), while the
scheduled and backfill runs of day D+1 have logical date D+1 too. A day run by hand then holds the next day's run
key: a backfill with reprocess "none" skips that next day and "completed" re-runs the wrong one. Here a manual run
whose logical date is a midnight processes the day it names, the same key as that day's scheduled and backfill runs;
one triggered at any other time (the UI's "now") keeps Airflow's rule, the last complete day before it.
"""

from __future__ import annotations

from airflow.timetables.base import DataInterval
from airflow.timetables.interval import CronDataIntervalTimetable
from pendulum import DateTime


class DailyIntervals(CronDataIntervalTimetable):
    def __init__(self, cron: str = "0 0 * * *", timezone="UTC") -> None:
        super().__init__(cron, timezone)

    def infer_manual_data_interval(self, *, run_after: DateTime) -> DataInterval:
        start = self._align_to_prev(run_after)
        if start != run_after:  # not on a day boundary: the last complete day
            start = self._get_prev(start)
        return DataInterval(start=start, end=self._get_next(start))

