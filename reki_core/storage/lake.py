"""The lake: date-partitioned datasets, and small documents and stores beside them, under `lake_uri`.

A dataset `<namespace>/<name>` (e.g. `raw/interactions`) is the Apache Iceberg table `<namespace>.<name>`, partitioned
by `dt`. With `lake_of(cfg)` (`lake.tables_in_store`, the default) it is a table of the configured catalog
(`lake.catalog`: its own database) with its files in `s3a://<lake.bucket>/<warehouse_prefix>/`; a test's scratch lake
(`Lake(folder)`) has a catalog and `_tables` of its own in its folder. Python reads and writes through pyiceberg, as the
identity of its environment; Spark through the same catalog, registered on its session (`spark_catalog_conf`;
spark_jobs/common.py `table_of`), with s3a and the Spark server's identity. Writing day D replaces D's rows in one
commit, which also records that D was written (an empty day has no data file to show it): readers see the old day or
the new one, never a mix, and a re-run of D replaces exactly D.

`KEYED_DATASETS` (the per-user feature datasets) are written as changes: day D holds only the rows of the keys (users)
whose rows changed on D, every row of such a key, and `read_partition(dataset, D)` gives the state as of D: each key's
rows from the newest day <= D that wrote it, back to the newest full day (a full build writes every key). So a daily run
writes what changed, not the whole history, and readers still see the whole state of any day. `DAY_FLAGS` hold only
in rows written on the day read.

`APPEND_DATASETS` (the embedding cache) are tables without days, only appended to, one commit per append.

Documents (`write_json`: run records, gate results), the stores (knowledge, registry, shard checkpoints)
and `FOLDER_DATASETS` (the extraction failures that concurrent shards write file by file) are files under `lake_uri`
through fsspec: objects in the lake bucket (`s3://<lake.bucket>/lake`, the default), or a test's folder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reki_core.config import LakeConfig

if TYPE_CHECKING:
    from reki_core.config import Config
    from reki_core.storage.s3_access import S3Access

_PARTITION_RE = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")
# Still folders of Parquet files (see the module's docstring).
FOLDER_DATASETS = frozenset({"knowledge/failures"})
# Tables without days, only appended to (`Lake.append_rows`, one commit each): the embedding cache.
APPEND_DATASETS = frozenset({"embeddings/cache"})
# Datasets written as changes, with the column whose value groups a key's rows (see the module's docstring).
KEYED_DATASETS = {"features/user_history": "user_id", "features/knowledge_versions": "user_id",
                  "features/ctr_samples": "user_id"}
# Flags of a keyed dataset that hold only on the day their row was written (the user's window advanced in that run):
# a state row from an earlier day reads them as false, so a flag falls back without a rewrite of its user.
DAY_FLAGS = {"features/user_history": ("needs_refresh",)}
TARGET_FILE_SIZE = "write.target-file-size-bytes"  # Iceberg's: where Spark's and pyiceberg's writers roll files
DAY_PROPERTY = "reki.dt."  # + YYYY-MM-DD: a table property set in the commit that wrote that day
# The property's value: the day holds the whole dataset, or (keyed datasets) only the keys that changed.
FULL_DAY, CHANGES_DAY = "written", "changes"
# + YYYY-MM-DD: a keyed dataset's run-log totals over its state as of that day (JSON), recorded by the job that wrote the
# day (with the day's record, or after it where the totals are an aggregate of the state), so the next daily run adds its changes instead of aggregating the whole state again; any other write
# of the day removes it (the totals then no longer describe the rows).
TOTALS_PROPERTY = "reki.totals."
# + YYYY-MM-DD: a fingerprint of what the job that wrote the day computed it from (`Lake.day_inputs`): a re-run that finds
# the same fingerprint keeps the day instead of computing it again (the clusters job, whose cost no input size bounds).
INPUTS_PROPERTY = "reki.inputs."
# What describes one written day's rows: gone before those rows are replaced and with them.
DAY_RECORDS = (TOTALS_PROPERTY, INPUTS_PROPERTY)
CATALOG_DIR, WAREHOUSE_DIR = "_catalog", "_tables"


def as_date(value: str | dt.date | dt.datetime) -> dt.date:
    """A partition date from a string (YYYY-MM-DD), a date or a datetime."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


def stale_day_records(properties: dict[str, str], day: dt.date) -> list[str]:
    """The properties of `DAY_RECORDS` that describe day D's rows as written before (to remove when they are replaced)."""
    return [key for key in (prefix + as_date(day).isoformat() for prefix in DAY_RECORDS) if key in properties]


def table_identifier(dataset: str) -> tuple[str, str]:
    """`raw/interactions` -> ("raw", "interactions"); a dataset without a namespace (`prompts`) is in `main`."""
    parts = dataset.strip("/").split("/")
    if len(parts) == 1:
        return "main", parts[0]
    if len(parts) != 2:
        raise ValueError(f"dataset {dataset!r}: expected <namespace>/<name>")
    return parts[0], parts[1]


def iceberg_ready(table: pa.Table) -> pa.Table:
    """`table` with the Arrow types Iceberg lacks cast to ones it has: all-null columns (pandas' empty object
    columns) to string, unsigned to signed integers, dictionaries decoded, nanosecond timestamps to microseconds."""
    fields, columns = [], []
    for field, column in zip(table.schema, table.columns):
        kind = field.type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if pa.types.is_null(kind):
            kind = pa.string()
        elif pa.types.is_list(kind) and pa.types.is_null(kind.value_type):
            kind = pa.list_(pa.float64())  # every value missing (NaN reads as null): the lake's lists are numbers
        elif pa.types.is_unsigned_integer(kind):
            kind = pa.int64()
        elif pa.types.is_timestamp(kind) and kind.unit == "ns":
            kind = pa.timestamp("us", tz=kind.tz)
        elif pa.types.is_large_string(kind):
            kind = pa.string()
        fields.append(pa.field(field.name, kind, nullable=True))
        columns.append(column if kind == column.type else column.cast(kind, safe=False))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


class CatalogUnavailableError(RuntimeError):
    """The catalog database failed during an operation (a restart, a lost connection): the table holds its previous
    snapshot or the whole new one (a commit is one row update), and a retry of the day replaces it."""


@dataclass(frozen=True)
class TableStore:
    """The configured catalog a lake's tables live in (`lake_of` builds it from the config): the catalog database,
    the warehouse on the object store, and the identity Python writes as."""

    catalog_name: str             # lake.catalog: pyiceberg's catalog name and Spark's `spark.sql.catalog.<name>`
    # The catalog database as SQLAlchemy sees it (a SQLite file, or PostgreSQL with its login: kept out of the repr).
    catalog_uri: str = field(repr=False)
    spark_conf: dict[str, str] = field(repr=False)  # the catalog's `spark.sql.catalog.<name>*` settings (tables.py)
    warehouse: str                # s3a://bucket/prefix
    access: S3Access
    connect_timeout_s: float = 3.0
    request_timeout_s: float = 30.0


def lake_of(cfg: Config) -> Lake:
    """The configured lake (`paths.lake_uri`). With `lake.tables_in_store` (the default) its tables are those of the
    config's catalog (`lake.catalog`, its database, the warehouse on the object store), written as the environment's
    identity (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); otherwise the folder lake's own (`Lake(folder)`)."""
    uri = cfg.lake_uri
    from reki_core.storage import tables

    on_store = uri.startswith(("s3://", "s3a://"))
    if on_store and not cfg.lake.tables_in_store:
        raise ValueError(f"paths.lake_uri {uri} is on the object store: its tables are too (lake.tables_in_store)")
    # A root on the object store: documents and stores as objects, read and written as the environment's identity.
    options = tables.s3fs_options(cfg, tables.lake_access(cfg)) if on_store else None
    if not cfg.lake.tables_in_store:
        return Lake(uri)
    prefix = f"spark.sql.catalog.{cfg.lake.catalog}"
    spark_conf = {k: v for k, v in tables.catalog_settings(cfg).items() if k == prefix or k.startswith(prefix + ".")}
    return Lake(uri, TableStore(cfg.lake.catalog, tables.sqlalchemy_uri(cfg), spark_conf, tables.warehouse_uri(cfg),
                                tables.lake_access(cfg), cfg.lake.s3_connect_timeout_s, cfg.lake.s3_request_timeout_s),
                storage_options=options, target_file_mb=cfg.lake.target_file_mb)


class Lake:
    """Date-partitioned datasets under one root URI; their tables' files in the lake folder, or in `store`."""

    def __init__(self, uri: str, store: TableStore | None = None, storage_options: dict | None = None,
                 target_file_mb: int = LakeConfig().target_file_mb):
        self.uri = uri.replace("s3a://", "s3://", 1).rstrip("/")  # the same bucket and key to Python's S3 client
        # Properties of every table this lake creates, from Spark or pyiceberg (lake.target_file_mb says why).
        self.table_properties = {TARGET_FILE_SIZE: str(target_file_mb * 1024 * 1024)}
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.store = store
        self._catalog = None

    # ------------------------------------------------------------ tables
    @property
    def catalog_name(self) -> str:
        """The catalog's name: the configured one, or for a folder lake a name of its own, the same in every process
        (a Spark session caches catalogs by name)."""
        if self.store is not None:
            return self.store.catalog_name
        import hashlib

        return "lake_" + hashlib.sha256(self.uri.encode()).hexdigest()[:12]

    def _catalog_file(self) -> Path:
        return self._folder(CATALOG_DIR) / "iceberg.sqlite"

    def _warehouse(self) -> str:
        return self.store.warehouse if self.store is not None else self._folder(WAREHOUSE_DIR).as_uri()

    @property
    def catalog(self):
        """pyiceberg's SQL catalog of this lake's tables (a folder lake's is created with the folder on first use)."""
        if self._catalog is None:
            from pyiceberg.catalog.sql import SqlCatalog

            if self.store is not None:
                from reki_core.storage.tables import pyiceberg_properties

                store = self.store
                # pool_pre_ping: a pooled connection that a database restart closed is replaced, not used and failed.
                self._catalog = SqlCatalog(self.catalog_name, uri=store.catalog_uri, warehouse=self._warehouse(),
                                           pool_pre_ping="true", **pyiceberg_properties(
                                               store.access, store.connect_timeout_s, store.request_timeout_s))
            else:
                self._catalog_file().parent.mkdir(parents=True, exist_ok=True)
                self._catalog = SqlCatalog(self.catalog_name, uri=f"sqlite:///{self._catalog_file()}",
                                           warehouse=self._warehouse())
        return self._catalog

    def spark_catalog_conf(self) -> dict[str, str]:
        """The settings that register this lake's catalog on a Spark session (runtime settings: the warm Connect
        server serves every lake); the same database and warehouse as `catalog`."""
        if self.store is not None:  # the config's catalog, which sessions also start with (s3a, the login)
            return self.store.spark_conf
        self.catalog  # noqa: B018 - pyiceberg creates the database first, in the schema both sides read
        prefix = f"spark.sql.catalog.{self.catalog_name}"
        return {prefix: "org.apache.iceberg.spark.SparkCatalog",
                f"{prefix}.catalog-impl": "org.apache.iceberg.jdbc.JdbcCatalog",
                f"{prefix}.uri": f"jdbc:sqlite:{self._catalog_file()}",
                f"{prefix}.jdbc.schema-version": "V1",
                # Every read loads the table's current metadata: pyiceberg and other sessions commit too.
                f"{prefix}.cache-enabled": "false",
                f"{prefix}.warehouse": self._warehouse()}

    def is_table(self, dataset: str) -> bool:
        return dataset not in FOLDER_DATASETS

    def table_name(self, dataset: str) -> str:
        namespace, name = table_identifier(dataset)
        return f"{namespace}.{name}"

    def load_table(self, dataset: str):
        """The dataset's Iceberg table, or None before its first write."""
        from pyiceberg.exceptions import NoSuchTableError

        try:
            with self._store_errors("loading", dataset):
                return self.catalog.load_table(self.table_name(dataset))
        except NoSuchTableError:
            return None

    @contextlib.contextmanager
    def _store_errors(self, operation: str, dataset: str, day: dt.date | None = None):
        """The store's failures (a wrong identity, a dead store) named with the bucket and the identity; the catalog
        database's (a restart, a lost connection) named with the database, as a `CatalogUnavailableError`."""
        from sqlalchemy.exc import DBAPIError

        try:
            yield
        except OSError as exc:
            if self.store is None or isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOSPC:
                raise
            from reki_core.storage.tables import table_store_error

            raise table_store_error(exc, f"{operation} {self.describe(dataset, day)}", self.store.access) from exc
        except DBAPIError as exc:
            if self.store is None or "disk is full" in str(exc):  # a full disk: ENOSPC, below
                raise
            from sqlalchemy.engine import make_url

            where = make_url(self.store.catalog_uri).render_as_string(hide_password=True)
            reason = str(exc.orig or exc).strip().splitlines()[0]
            raise CatalogUnavailableError(
                f"{operation} {self.describe(dataset, day)}: the catalog database {where} failed ({reason}); the table "
                "holds its last snapshot or this whole write, never a part: retry when the database is back (a re-run "
                "of the day replaces it)") from exc

    def _table_days(self, dataset: str, table=None) -> list[dt.date]:
        """The days written, from the table's properties (`table` when the caller already loaded it)."""
        return sorted(self.day_kinds(dataset, table))

    def day_kinds(self, dataset: str, table=None) -> dict[dt.date, str]:
        """Each day written, with what it holds (`FULL_DAY` or `CHANGES_DAY`)."""
        table = table or self.load_table(dataset)
        if table is None:
            return {}
        return {dt.date.fromisoformat(key.removeprefix(DAY_PROPERTY)): value for key, value in table.properties.items()
                if key.startswith(DAY_PROPERTY)}

    def state_totals(self, dataset: str, day: str | dt.date) -> dict | None:
        """The totals recorded with day D of a keyed dataset (`TOTALS_PROPERTY`), or None when that write recorded none."""
        table = self.load_table(dataset)
        recorded = None if table is None else table.properties.get(f"{TOTALS_PROPERTY}{as_date(day).isoformat()}")
        return json.loads(recorded) if recorded else None

    def day_inputs(self, dataset: str, day: str | dt.date) -> str | None:
        """The fingerprint of the inputs day D was computed from (`INPUTS_PROPERTY`), or None when its write recorded none."""
        table = self.load_table(dataset)
        return None if table is None else table.properties.get(f"{INPUTS_PROPERTY}{as_date(day).isoformat()}")

    def column_names(self, dataset: str) -> list[str]:
        """The columns of a table dataset (none before its first write), `dt` aside."""
        table = self.load_table(dataset)
        return [] if table is None else [name for name in table.schema().column_names if name != "dt"]

    def day_kind(self, dataset: str, changes_only: bool) -> str:
        """What a write of one day records (`FULL_DAY`, or `CHANGES_DAY` for a keyed dataset's changes): both engines'
        writers ask here, so they refuse the same writes."""
        if changes_only and self.key_of(dataset) is None:
            raise ValueError(f"{dataset}: only a keyed dataset ({sorted(KEYED_DATASETS)}) is written as changes")
        return CHANGES_DAY if changes_only else FULL_DAY

    def key_of(self, dataset: str) -> str | None:
        """The key column of a dataset written as changes (`KEYED_DATASETS`), else None."""
        return KEYED_DATASETS.get(dataset)

    def state_days(self, dataset: str, day: str | dt.date, table=None) -> list[dt.date]:
        """The days a keyed dataset's state as of `day` is made of: the newest full day <= `day` (or the first day) up
        to `day`, oldest first; each key's rows come from the newest of them that wrote the key."""
        kinds = {d: k for d, k in self.day_kinds(dataset, table).items() if d <= as_date(day)}
        days = sorted(kinds)
        full = [d for d in days if kinds[d] == FULL_DAY]
        return [d for d in days if not full or d >= full[-1]]

    def _write_table_day(self, table: pa.Table, dataset: str, day: dt.date, kind: str = FULL_DAY) -> str:
        return self.write_batches(table.to_batches(), table.schema, dataset, day, kind == CHANGES_DAY)

    def write_batches(self, batches: Iterable[pa.RecordBatch | pa.Table], schema: pa.Schema, dataset: str,
                      day: str | dt.date, changes_only: bool = False) -> str:
        """Replace day D of a table dataset with `batches` (each of `schema`), in one commit: each batch is written as
        it comes, so a writer holds one batch, never the day; no batch at all writes an empty day."""
        from pyiceberg.catalog import Catalog
        from pyiceberg.expressions import EqualTo
        from pyiceberg.io.pyarrow import _dataframe_to_data_files
        from pyiceberg.partitioning import PartitionField, PartitionSpec
        from pyiceberg.schema import assign_fresh_schema_ids
        from pyiceberg.transforms import IdentityTransform

        day, kind = as_date(day), self.day_kind(dataset, changes_only)
        existing = self.load_table(dataset)

        def ready(data: pa.Table) -> pa.Table:
            data = data.drop_columns(["dt"]) if "dt" in data.column_names else data
            if existing is not None:
                data = self._aligned(data, existing, dataset)  # before iceberg_ready: the table's types win
            data = iceberg_ready(data)
            return data.append_column(pa.field("dt", pa.date32()), pa.array([day] * data.num_rows, pa.date32()))

        empty = ready(schema.empty_table())
        if existing is None:
            namespace, _ = table_identifier(dataset)
            self.catalog.create_namespace_if_not_exists(namespace)
            fresh = assign_fresh_schema_ids(Catalog._convert_schema_if_needed(empty.schema))
            spec = PartitionSpec(PartitionField(source_id=fresh.find_field("dt").field_id, field_id=1000,
                                                transform=IdentityTransform(), name="dt"))
            with self._store_errors("creating", dataset):
                existing = self.catalog.create_table_if_not_exists(self.table_name(dataset), schema=fresh,
                                                                   partition_spec=spec, properties=self.table_properties)
        try:
            with self._store_errors("writing", dataset, day), warnings.catch_warnings(), existing.transaction() as tx:
                warnings.filterwarnings("ignore", "Delete operation did not match any records")  # a first write of D
                with tx.update_schema() as update:  # a new column joins; a dropped one reads as null
                    update.union_by_name(empty.schema)
                tx.delete(EqualTo("dt", day.isoformat()))
                # One snapshot adds every batch's files, in order: a reader gets the rows in the order written.
                with tx.update_snapshot().fast_append() as append:
                    for batch in batches:
                        if batch.num_rows:
                            data = ready(pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch)
                            # A name of its own per batch: pyiceberg numbers a call's files from 0.
                            for data_file in _dataframe_to_data_files(table_metadata=tx.table_metadata, df=data,
                                                                      io=existing.io, write_uuid=uuid.uuid4()):
                                append.append_data_file(data_file)
                tx.set_properties({f"{DAY_PROPERTY}{day.isoformat()}": kind})
                stale = stale_day_records(existing.properties, day)  # they described the replaced rows
                if stale:
                    tx.remove_properties(*stale)
        except Exception as exc:
            if "disk is full" in str(exc):  # SQLite's word for it: the same OSError as a data file's full disk
                raise OSError(errno.ENOSPC, f"No space left on device: committing {self.describe(dataset, day)} "
                                            f"(the previous version stays)") from exc
            raise
        return f"{existing.location()}/data/dt={day.isoformat()}"

    def append_rows(self, data: pa.Table, dataset: str, snapshot_properties: dict[str, str] | None = None) -> None:
        """Append `data` to an `APPEND_DATASETS` table (created, unpartitioned, on the first append) in one commit:
        readers see all of its rows or none. `snapshot_properties` go into the commit's snapshot summary."""
        if dataset not in APPEND_DATASETS:
            raise ValueError(f"{dataset}: only {sorted(APPEND_DATASETS)} are appended to")
        data = iceberg_ready(data)
        existing = self.load_table(dataset)
        if existing is None:
            self.catalog.create_namespace_if_not_exists(table_identifier(dataset)[0])
            with self._store_errors("creating", dataset):
                existing = self.catalog.create_table_if_not_exists(self.table_name(dataset), schema=data.schema,
                                                                   properties=self.table_properties)
        data = self._aligned(data, existing, dataset)
        with self._store_errors("appending to", dataset):
            existing.append(data, snapshot_properties=dict(snapshot_properties or {}))

    def read_batches(self, dataset: str, day: str | dt.date, columns: list[str], batch_rows: int,
                     where: dict[str, Any] | None = None) -> Iterator[pa.RecordBatch]:
        """Day D of a table dataset as `read_partition` gives it (a keyed dataset's state as of D), `columns` only and
        only the rows whose columns equal `where`'s values (or one of them, for a set), in record batches of at most `batch_rows` rows read one data
        file at a time: a reader holds a batch, never the day. The rows come in the table's file order, the same on
        every read of the same snapshot."""
        day = as_date(day)
        table = self._table_with_day(dataset, day)
        key = self.key_of(dataset)
        days = self.state_days(dataset, day, table) if key else [day]
        wanted = list(dict.fromkeys(columns))
        written_later: set = set()  # keys a newer day of the state wrote: their rows of older days are not the state
        for read_day in reversed(days):
            stale = pa.array(list(written_later), table.schema().as_arrow().field(key).type) if written_later else None
            for batch in self._scan_batches(dataset, table, read_day, list(dict.fromkeys([*wanted, key or wanted[0]])),
                                            batch_rows, where):
                if stale is not None:
                    batch = batch.filter(pc.invert(pc.is_in(batch.column(key), stale)))
                if read_day != day:
                    for flag in set(DAY_FLAGS.get(dataset, ())) & set(wanted):  # an earlier day's flag has fallen back
                        batch = batch.set_column(batch.schema.get_field_index(flag), flag,
                                                 pa.array([False] * batch.num_rows, pa.bool_()))
                if batch.num_rows:
                    yield batch.select(wanted)
            if len(days) > 1:  # every key the day wrote, whatever `where` kept of its rows
                for batch in self._scan_batches(dataset, table, read_day, [key], batch_rows, None):
                    written_later.update(batch.column(key).to_pylist())

    def read_day_batches(self, dataset: str, day: str | dt.date, columns: list[str],
                         batch_rows: int) -> Iterator[pa.RecordBatch]:
        """The rows written on day D as stored (a keyed dataset's changes of that day), `columns` only, in record
        batches of at most `batch_rows` rows: `read_day_rows` for a reader that holds a batch, never the day."""
        day = as_date(day)
        table = self._table_with_day(dataset, day)
        wanted = list(dict.fromkeys(columns))
        for batch in self._scan_batches(dataset, table, day, wanted, batch_rows, None):
            if batch.num_rows:
                yield batch.select(wanted)

    def _table_with_day(self, dataset: str, day: dt.date):
        """The dataset's table, loaded once (its properties say whether day D was written, then it is scanned);
        FileNotFoundError where day D was not written."""
        table = self.load_table(dataset)
        if table is None or day not in self.day_kinds(dataset, table):
            raise FileNotFoundError(f"lake partition missing: {self.describe(dataset, day)}")
        return table

    def _scan_batches(self, dataset: str, table, day: dt.date, columns: list[str], batch_rows: int,
                      where: dict[str, str] | None) -> Iterator[pa.RecordBatch]:
        """The rows of day D as stored, `columns` only, in batches of `batch_rows` rows (the last fewer)."""
        from pyiceberg.expressions import AlwaysFalse, And, EqualTo, In
        from pyiceberg.io.pyarrow import ArrowScan, _read_all_delete_files, schema_to_pyarrow

        row_filter = EqualTo("dt", day.isoformat())
        for name, value in (where or {}).items():
            if isinstance(value, (set, frozenset, list, tuple)):  # one of these values (pruned by the files' stats)
                row_filter = And(row_filter, In(name, sorted(value)) if value else AlwaysFalse())
            else:
                row_filter = And(row_filter, EqualTo(name, value))
        scan = table.scan(row_filter=row_filter, selected_fields=tuple(columns))
        schema = schema_to_pyarrow(scan.projection(), include_field_ids=False)
        reader = ArrowScan(table.metadata, table.io, scan.projection(), scan.row_filter)
        with self._store_errors("reading", dataset, day):
            # File by file, each lazily: pyiceberg's to_arrow_batch_reader reads every file whole, all at once.
            files = (batch for task in scan.plan_files() for batch in reader._record_batches_from_scan_tasks_and_deletes(
                [task], _read_all_delete_files(table.io, [task])))
            yield from _rebatched(files, schema, batch_rows)

    def _read_table(self, dataset: str, row_filter, columns: list[str] | None, with_dt: bool,
                    table=None) -> pd.DataFrame:
        table = table or self.load_table(dataset)
        if table is None:
            return pd.DataFrame(columns=(columns or []) + (["dt"] if with_dt else []))
        wanted = ("*",) if columns is None else tuple(dict.fromkeys([*columns, *(["dt"] if with_dt else [])]))
        with self._store_errors("reading", dataset):
            data = table.scan(row_filter=row_filter, selected_fields=wanted).to_arrow()
        if not with_dt and "dt" in data.column_names:
            data = data.drop_columns(["dt"])
        return data.to_pandas()

    def delete_partition(self, dataset: str, day: str | dt.date) -> None:
        """Remove day D of `dataset` (its rows and its record), if written."""
        day = as_date(day)
        if not self.is_table(dataset):
            if self.fs.exists(self.partition_path(dataset, day)):
                self.fs.rm(self.partition_path(dataset, day), recursive=True)
            return
        from pyiceberg.expressions import EqualTo

        table = self.load_table(dataset)
        if table is None or f"{DAY_PROPERTY}{day.isoformat()}" not in table.properties:
            return
        with table.transaction() as tx:
            tx.delete(EqualTo("dt", day.isoformat()))
            recorded = f"{DAY_PROPERTY}{day.isoformat()}"
            tx.remove_properties(recorded, *stale_day_records(table.properties, day))

    def drop_namespace(self, namespace: str) -> None:
        """Every dataset under `namespace/`, tables and folders, gone with its files (a benchmark's reset)."""
        from pyiceberg.exceptions import NoSuchNamespaceError

        try:
            identifiers = self.catalog.list_tables(namespace)
        except NoSuchNamespaceError:
            identifiers = []
        for identifier in identifiers:
            location = self.catalog.load_table(identifier).location()
            self.catalog.purge_table(identifier)  # with the data and metadata files it references, wherever they are
            fs, path = fsspec.core.url_to_fs(location)
            if self.store is None and fs.exists(path):
                fs.rm(path, recursive=True)  # and a local folder's leftovers (files of failed writes)
        if self.fs.exists(self.dataset_path(namespace)):
            self.fs.rm(self.dataset_path(namespace), recursive=True)

    def describe(self, dataset: str, day: str | dt.date | None = None) -> str:
        """How messages name a dataset (and a day of it): `raw/items/dt=D (table raw.items of <lake>)`."""
        if not self.is_table(dataset):
            return self.uri_of(self.dataset_path(dataset) if day is None else self.partition_path(dataset, day))
        where = dataset if day is None else f"{dataset}/dt={as_date(day).isoformat()}"
        if self.store is not None:
            return f"{where} (table {self.catalog_name}.{self.table_name(dataset)}, files in {self.store.warehouse})"
        return f"{where} (table {self.table_name(dataset)} of {self.uri})"

    def _aligned(self, data: pa.Table, table, dataset: str) -> pa.Table:
        """`data` with each column the table already has cast to the table's type (a day's frame may carry an int
        column as float, say, when it had a gap): a type the values do not fit fails, naming the column."""
        current = table.schema().as_arrow()
        for index, name in enumerate(data.column_names):
            if name not in current.names:
                continue
            want = current.field(name).type
            if data.schema.field(name).type != want:
                try:
                    data = data.set_column(index, pa.field(name, want), data.column(name).cast(want))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise ValueError(f"{self.describe(dataset)}: column {name!r} is {data.schema.field(name).type}, "
                                     f"the table holds {want}: {exc}") from exc
        return data

    def any_metadata_file(self) -> str | None:
        """Where one of this lake's tables keeps its current metadata (the catalog's own row: no read of the store), or
        None before the first table: a file every identity of the lake may read (`check_server_reaches_store`)."""
        from pyiceberg.catalog.sql import IcebergTables
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        with Session(self.catalog.engine) as session:
            return session.scalar(select(IcebergTables.metadata_location).where(
                IcebergTables.catalog_name == self.catalog_name, IcebergTables.metadata_location.is_not(None)).limit(1))

    def table_datasets(self) -> list[str]:
        """Every dataset of this lake that is a table (`namespace/name`; `main` tables by their bare name)."""
        names = []
        for (namespace,) in self.catalog.list_namespaces():
            for _, name in self.catalog.list_tables(namespace):
                names.append(name if namespace == "main" else f"{namespace}/{name}")
        return sorted(names)

    def copy_tables_to(self, dest: Lake, skip: frozenset[str] = frozenset()) -> list[str]:
        """Copy every table's days (up to now) into `dest`, day by day through the tables' API (a benchmark's copy of
        the configured lake, wherever its files are); datasets in `skip` and their namespaces' are left out."""
        copied = []
        for dataset in self.table_datasets():
            if dataset in skip or dataset.split("/")[0] in skip:
                continue
            for day, kind in sorted(self.day_kinds(dataset).items()):
                dest.write_partition(self.read_day_rows(dataset, day), dataset, day, changes_only=kind == CHANGES_DAY)
            copied.append(dataset)
        return copied

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
        if self.is_table(dataset):
            return self._table_days(dataset)
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
        if self.is_table(dataset):
            return as_date(day) in self._table_days(dataset)
        return self.fs.exists(self.partition_path(dataset, day))

    def latest_partition(self, dataset: str, upto: str | dt.date | None = None) -> dt.date | None:
        days = self.partitions(dataset)
        if upto is not None:
            days = [d for d in days if d <= as_date(upto)]
        return days[-1] if days else None

    # ------------------------------------------------------------ read / write
    def write_partition(self, df: pd.DataFrame | pa.Table, dataset: str, day: str | dt.date,
                        changes_only: bool = False) -> str:
        """Replace one partition with `df` (atomic on a local folder: write aside, then swap). For a keyed dataset,
        `changes_only` says `df` holds only the keys that changed on `day` (else it is the whole state)."""
        table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
        kind = self.day_kind(dataset, changes_only)
        if self.is_table(dataset):
            return self._write_table_day(table, dataset, as_date(day), kind)
        final = self.partition_path(dataset, day)
        staging = f"{self.dataset_path(dataset)}/_staging-{uuid.uuid4().hex}"
        self.fs.makedirs(staging, exist_ok=True)
        try:
            with self.fs.open(f"{staging}/part-00000.parquet", "wb") as fh:
                pq.write_table(table, fh)
        except BaseException:
            self.fs.rm(staging, recursive=True)  # a failed write (e.g. a full disk) must not leave its half file holding space
            raise
        self.replace_folder(staging, final)
        return final

    def replace_folder(self, staging: str, final: str) -> None:
        """Put the files written under `staging` in place of `final`'s. On a local disk a rename, so readers see the
        old folder or the new one; on the object store (no rename, and no folder to copy) file by file after the old
        files are gone: a reader that needs all or nothing keeps a pointer written last (the registry's
        `_CURRENT.json`)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if protocol != "file":
            files = self.fs.find(staging)
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            for path in files:
                self.fs.copy(path, final + path[len(staging):])
            self.fs.rm(staging, recursive=True)
            return
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
        """Day D of `dataset`; for a keyed dataset, its state as of D (each key's rows from the newest day that wrote
        the key)."""
        if self.is_table(dataset):
            from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, LessThanOrEqual

            table = self.load_table(dataset)  # once: its properties say whether the day exists, then it is scanned
            if as_date(day) not in self._table_days(dataset, table):
                raise FileNotFoundError(f"lake partition missing: {self.describe(dataset, day)}")
            key = self.key_of(dataset)
            days = self.state_days(dataset, day, table) if key else [as_date(day)]
            if len(days) == 1:
                return self._read_table(dataset, EqualTo("dt", days[0].isoformat()), columns, with_dt=False,
                                        table=table)
            within = And(GreaterThanOrEqual("dt", days[0].isoformat()), LessThanOrEqual("dt", days[-1].isoformat()))
            rows = self._read_table(dataset, within, None if columns is None else [key, *columns], with_dt=True,
                                    table=table)
            state = rows.loc[rows["dt"] == rows.groupby(key)["dt"].transform("max")].copy()
            for flag in set(DAY_FLAGS.get(dataset, ())) & set(state.columns):  # an earlier day's flag has fallen back
                state[flag] = state[flag].astype(bool) & (state["dt"] == as_date(day))
            state = state.drop(columns=["dt"]).sort_values(key, kind="stable", ignore_index=True)
            return state if columns is None else state[list(dict.fromkeys(columns))]
        path = self.partition_path(dataset, day)
        if not self.fs.exists(path):
            raise FileNotFoundError(f"lake partition missing: {self.uri_of(path)}")
        return self._read_dir(path, columns)

    def read_day_rows(self, dataset: str, day: str | dt.date, columns: list[str] | None = None) -> pd.DataFrame:
        """The rows written on day D as they are stored (for a keyed dataset, only that day's changes)."""
        from pyiceberg.expressions import EqualTo

        table = self.load_table(dataset)  # once: its properties say whether the day exists, then it is scanned
        if as_date(day) not in self.day_kinds(dataset, table):
            raise FileNotFoundError(f"lake partition missing: {self.describe(dataset, day)}")
        return self._read_table(dataset, EqualTo("dt", as_date(day).isoformat()), columns, with_dt=False, table=table)

    def read_range(
        self, dataset: str, upto: str | dt.date, since: str | dt.date | None = None, columns: list[str] | None = None
    ) -> pd.DataFrame:
        """All partitions with since <= dt <= upto, with a `dt` column added."""
        if self.key_of(dataset):
            raise ValueError(f"{dataset} is written as changes: read_partition gives its state as of a day")
        if self.is_table(dataset):
            from pyiceberg.expressions import And, GreaterThanOrEqual, LessThanOrEqual

            row_filter = LessThanOrEqual("dt", as_date(upto).isoformat())
            if since is not None:
                row_filter = And(row_filter, GreaterThanOrEqual("dt", as_date(since).isoformat()))
            frame = self._read_table(dataset, row_filter, columns, with_dt=True)
            return frame.sort_values("dt", kind="stable", ignore_index=True)  # oldest day first, as folders read
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

    def _folder(self, relpath: str) -> Path:
        """A folder lake's own catalog or warehouse (`Lake(folder)`: a test's scratch lake, a benchmark arm)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if protocol != "file":
            raise ValueError(f"lake {self.uri} is on the object store: its tables are in the configured catalog "
                             "(lake.tables_in_store), not a catalog of its own")
        return Path(self.root) / relpath


def _rebatched(batches: Iterable[pa.RecordBatch], schema: pa.Schema, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """`batches` (of any sizes) regrouped into batches of exactly `batch_rows` rows, the last one fewer."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        pending.append(batch.cast(schema))
        rows += batch.num_rows
        while rows >= batch_rows:
            joined = pa.Table.from_batches(pending, schema)
            yield joined.slice(0, batch_rows).combine_chunks().to_batches()[0]
            rest = joined.slice(batch_rows)
            pending, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield pa.Table.from_batches(pending, schema).combine_chunks().to_batches()[0]
