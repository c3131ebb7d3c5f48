"""Publish freshness: is the newest published version as recent as the schedule promises?

A daily interval [D, D+1) must be published by D+1 + `alerts.publish_deadline_hours`. The check reads
`_LATEST.json` (a read-only identity is enough); it also catches a DAG that never ran, which a
per-run deadline cannot.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from reki_core.config import Config
from reki_core.storage.publish import read_latest
from reki_core.storage.s3_access import ObjectStore, resolve_s3_access


def expected_published_date(now: dt.datetime, deadline_hours: float) -> dt.date:
    """The newest dt whose publish deadline has passed at `now`."""
    return (now - dt.timedelta(hours=deadline_hours)).date() - dt.timedelta(days=1)


def publish_freshness(cfg: Config, now: dt.datetime, store: ObjectStore | None = None, **credentials: Any) -> dict[str, Any]:
    store = store or ObjectStore(resolve_s3_access(cfg, **credentials))
    expected = expected_published_date(now, cfg.alerts.publish_deadline_hours)
    latest, _ = read_latest(store, cfg.scenario.name)
    latest_dt = dt.date.fromisoformat(latest["dt"]) if latest else None
    return {
        "checked_at": now.isoformat(),
        "expected_dt": expected.isoformat(),
        "latest_dt": latest_dt.isoformat() if latest_dt else None,
        "latest_version": latest["version"] if latest else None,
        "late": latest_dt is None or latest_dt < expected,
        "days_behind": (expected - latest_dt).days if latest_dt else None,
    }
