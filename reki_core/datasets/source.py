"""Upstream deliveries into `incoming/`: what the landing reads.

In production an upstream system drops one Parquet file per day into
`incoming/{interactions,users,items}/dt=D/` (`source.kind: files`). The embedded default replays
a dataset instead: MovieLens-100K's real timestamps give real daily deliveries, and the user and
item snapshots hold the entities seen up to that day (the catalogue grows as in production).
A delivery that is already there is never overwritten, so a re-run reads the same input.
"""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from reki_core.config import Config
from reki_core.datasets.schema import day_bounds
from reki_core.storage.lake import Lake

INCOMING = {"interactions": "incoming/interactions", "users": "incoming/users", "items": "incoming/items"}


@functools.lru_cache(maxsize=2)
def _replay_frames(kind: str, data_dir: str, start: dt.date, end: dt.date,
                   seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    if kind == "movielens_100k":
        from reki_core.datasets import movielens

        return movielens.load(movielens.obtain(Path(data_dir)))
    if kind == "synthetic":
        from reki_core.datasets import synthetic

        return synthetic.generate_for_replay(start, end, seed=seed)
    raise ValueError(f"source kind {kind!r} has no replay")


def delivery_files(lake: Lake, what: str, day: dt.date) -> list[str]:
    folder = lake.partition_path(INCOMING[what], day)
    if not lake.fs.exists(folder):
        return []
    return sorted(f for f in lake.fs.ls(folder, detail=False) if not f.rsplit("/", 1)[-1].startswith((".", "_")))


def write_delivery(lake: Lake, what: str, day: dt.date, df: pd.DataFrame) -> None:
    folder = lake.partition_path(INCOMING[what], day)
    lake.fs.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/_{what}.parquet.tmp"
    with lake.fs.open(tmp, "wb") as fh:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), fh)
    lake.fs.mv(tmp, f"{folder}/{what}.parquet")


def replay_delivery(cfg: Config, lake: Lake, days: list[dt.date], snapshot_day: dt.date) -> int:
    """Write the replayed deliveries not there yet (interactions of `days`, entity snapshots of
    `snapshot_day`); returns how many files were written."""
    kind = cfg.scenario.source.kind
    if kind == "files":
        return 0
    source = cfg.scenario.source
    inter, users, items = _replay_frames(kind, str(cfg.data_dir), source.start_date, source.end_date)
    written = 0
    for day in days:
        start, end = day_bounds(day)
        if not delivery_files(lake, "interactions", day):
            day_rows = inter[(inter["ts"] >= start) & (inter["ts"] < end)]
            write_delivery(lake, "interactions", day, day_rows)
            written += 1
    seen = inter[inter["ts"] < day_bounds(snapshot_day)[1]]
    if not delivery_files(lake, "users", snapshot_day):
        write_delivery(lake, "users", snapshot_day, users[users["user_id"].isin(seen["user_id"])])
        written += 1
    if not delivery_files(lake, "items", snapshot_day):
        write_delivery(lake, "items", snapshot_day, items[items["item_id"].isin(seen["item_id"])])
        written += 1
    return written
