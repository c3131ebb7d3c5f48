"""The Airflow plugin of the project (entry point `airflow.plugins` in pyproject.toml): the scheduler, api-server
and dag-processor can deserialize only registered custom timetables; the task-memory listener runs in every task."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from reki_airflow import task_memory
from reki_airflow.timetables import DailyIntervals


class RekiPlugin(AirflowPlugin):
    name = "reki"
    timetables = [DailyIntervals]
    listeners = [task_memory]
