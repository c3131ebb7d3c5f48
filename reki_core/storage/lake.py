"""The lake: date-partitioned Parquet datasets under `lake_uri` (a folder here, s3:// in production).

Layout: `<lake>/<dataset>/dt=YYYY-MM-DD/part-*.parquet` (partition column not stored in files, so
Spark's partition discovery reads the same folders). Writes replace a whole partition atomically:
readers see the old partition or the new one, never a mix.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

_PARTITION_RE = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")


def as_date(value: str | dt.date | dt.datetime) -> dt.date:
    """A partition date from a string (YYYY-MM-DD), a date or a datetime."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


class Lake:
    """Date-partitioned datasets under one root URI."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    # ------------------------------------------------------------ paths
    def dataset_path(self, dataset: str) -> str:
        return f"{self.root}/{dataset}"

    def partition_path(self, dataset: str, day: str | dt.date) -> str:
        return f"{self.dataset_path(dataset)}/dt={as_date(day).isoformat()}"

    def uri_of(self, path: str) -> str:
        """The URI (with protocol) of a path inside this lake, for logs and manifests."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return path if protocol == "file" else f"{protocol}://{path}"

    # ------------------------------------------------------------ listing
    def partitions(self, dataset: str) -> list[dt.date]:
        """Dates that have a complete partition, oldest first."""
        base = self.dataset_path(dataset)
        if not self.fs.exists(base):
            return []
        days = []
        for entry in self.fs.ls(base, detail=False):
            m = _PARTITION_RE.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m:
                days.append(dt.date.fromisoformat(m.group(1)))
        return sorted(days)

    def has_partition(self, dataset: str, day: str | dt.date) -> bool:
        return self.fs.exists(self.partition_path(dataset, day))

    def latest_partition(self, dataset: str, upto: str | dt.date | None = None) -> dt.date | None:
        days = self.partitions(dataset)
        if upto is not None:
            days = [d for d in days if d <= as_date(upto)]
        return days[-1] if days else None

    # ------------------------------------------------------------ read / write
    def write_partition(self, df: pd.DataFrame | pa.Table, dataset: str, day: str | dt.date) -> str:
        """Replace one partition with `df` (atomic on a local folder: write aside, then swap)."""
        table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
        final = self.partition_path(dataset, day)
        staging = f"{self.dataset_path(dataset)}/_staging-{uuid.uuid4().hex}"
        self.fs.makedirs(staging, exist_ok=True)
        try:
            with self.fs.open(f"{staging}/part-00000.parquet", "wb") as fh:
                pq.write_table(table, fh)
        except BaseException:
            self.fs.rm(staging, recursive=True)  # a failed write (e.g. a full disk) must not leave its half file holding space
            raise
        self._swap_in(staging, final)
        return final

    def _swap_in(self, staging: str, final: str) -> None:
        old = None
        if self.fs.exists(final):
            old = f"{final.rsplit('/', 1)[0]}/_old-{uuid.uuid4().hex}"
            self.fs.mv(final, old, recursive=True)
        try:
            self.fs.mv(staging, final, recursive=True)
        except BaseException:
            if old:
                self.fs.mv(old, final, recursive=True)  # the previous partition stays where readers look
            if self.fs.exists(staging):
                self.fs.rm(staging, recursive=True)
            raise
        if old:
            self.fs.rm(old, recursive=True)

    def read_partition(self, dataset: str, day: str | dt.date, columns: list[str] | None = None) -> pd.DataFrame:
        path = self.partition_path(dataset, day)
        if not self.fs.exists(path):
            raise FileNotFoundError(f"lake partition missing: {self.uri_of(path)}")
        return self._read_dir(path, columns)

    def read_range(
        self, dataset: str, upto: str | dt.date, since: str | dt.date | None = None, columns: list[str] | None = None
    ) -> pd.DataFrame:
        """All partitions with since <= dt <= upto, with a `dt` column added."""
        frames = []
        for day in self.partitions(dataset):
            if day > as_date(upto) or (since is not None and day < as_date(since)):
                continue
            part = self._read_dir(self.partition_path(dataset, day), columns)
            part["dt"] = day
            frames.append(part)
        if not frames:
            return pd.DataFrame(columns=(columns or []) + ["dt"])
        return pd.concat(frames, ignore_index=True)

    def _read_dir(self, path: str, columns: list[str] | None) -> pd.DataFrame:
        files = sorted(f for f in self.fs.ls(path, detail=False) if f.endswith(".parquet"))
        tables = []
        for f in files:
            with self.fs.open(f, "rb") as fh:
                tables.append(pq.read_table(fh, columns=columns))
        if not tables:
            return pd.DataFrame(columns=columns or [])
        return pa.concat_tables(tables).to_pandas()

    # ------------------------------------------------------------ small JSON documents (gate results, metrics)
    def write_json(self, relpath: str, payload: Any) -> str:
        path = f"{self.root}/{relpath}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open(tmp, "w") as fh:
                json.dump(payload, fh, indent=2, sort_keys=True, default=str)
        except BaseException:
            self.fs.rm(tmp)  # no half-written document left behind (e.g. on a full disk)
            raise
        self.fs.mv(tmp, path)
        return path

    def read_json(self, relpath: str, default: Any = None) -> Any:
        path = f"{self.root}/{relpath}"
        if not self.fs.exists(path):
            return default
        with self.fs.open(path, "r") as fh:
            return json.load(fh)

    def local_path(self, relpath: str = "") -> Path:
        """The local folder of this lake (Spark jobs read it directly); fails for remote lakes."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if protocol != "file":
            raise ValueError(f"lake {self.uri} is not a local folder")
        return Path(self.root) / relpath
