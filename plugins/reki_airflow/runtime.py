"""What every REKI task needs from its Airflow context: the partition date, the run id, the config."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any


def partition_date(context: dict[str, Any]) -> dt.date:
    """The run's partition: its data interval start (never the wall clock)."""
    start = context.get("data_interval_start") or context.get("logical_date")
    if start is None:
        raise ValueError("the task context has neither data_interval_start nor logical_date")
    return dt.date(start.year, start.month, start.day)


def run_id(context: dict[str, Any]) -> str:
    """A short, path-safe id for this DAG run (used in version names)."""
    raw = str(context.get("run_id") or "manual")
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in raw)[:64]


def load_pipeline_config():
    """The pipeline config; `REKI_CONFIG` selects the file, `REKI__*` variables override keys."""
    from reki_core.config import load_config

    return load_config(os.environ.get("REKI_CONFIG"))
