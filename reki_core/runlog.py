"""Per-run records: every step writes its counts, timings and gate results to `_runs/dt=D/<step>.json`.

The run summary (`reki summary`) and the run report read these; nothing else keeps run state.
"""

from __future__ import annotations

import datetime as dt
import time
from contextlib import contextmanager
from typing import Any, Iterator

from reki_core.storage.lake import Lake, as_date


def record_step(lake: Lake, day: str | dt.date, step: str, payload: dict[str, Any]) -> str:
    record = {"step": step, "dt": as_date(day).isoformat(), "recorded_at": dt.datetime.now(dt.UTC).isoformat()}
    record.update(payload)
    return lake.write_json(f"_runs/dt={as_date(day).isoformat()}/{step}.json", record)


def read_steps(lake: Lake, day: str | dt.date) -> list[dict[str, Any]]:
    folder = f"{lake.root}/_runs/dt={as_date(day).isoformat()}"
    if not lake.fs.exists(folder):
        return []
    steps = [lake.read_json(p[len(lake.root) + 1:]) for p in lake.fs.ls(folder, detail=False) if p.endswith(".json")]
    return sorted(steps, key=lambda s: s.get("started_at") or s.get("recorded_at", ""))


@contextmanager
def timed_step(lake: Lake, day: str | dt.date, step: str) -> Iterator[dict[str, Any]]:
    """Time a step; the caller fills the yielded dict with counts. Failures are recorded too, then re-raised."""
    payload: dict[str, Any] = {"started_at": dt.datetime.now(dt.UTC).isoformat()}
    start = time.perf_counter()
    try:
        yield payload
        payload.setdefault("success", True)
    except Exception as exc:
        payload.update({"success": False, "error": f"{type(exc).__name__}: {exc}"})
        payload["seconds"] = round(time.perf_counter() - start, 3)
        try:
            record_step(lake, day, step, payload)
        except OSError as record_exc:  # e.g. a full disk: the step's own error must surface, not the record's
            exc.add_note(f"(the failure of step '{step}' could not be recorded in the run log: {record_exc})")
        raise
    payload["seconds"] = round(time.perf_counter() - start, 3)
    record_step(lake, day, step, payload)


def read_step(lake: Lake, day: str | dt.date, step: str) -> dict[str, Any] | None:
    """The record of one step of day D (None when it has none)."""
    return lake.read_json(f"_runs/dt={as_date(day).isoformat()}/{step}.json")
