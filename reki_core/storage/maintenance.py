"""Maintenance of the lake's Iceberg tables: compact small files, expire old snapshots, remove orphan files.

Daily increments leave a table with a snapshot and a few small files per commit; readers then open ever more
manifests and files, and the store keeps every version's bytes. Each table gets, in this order:
1. `rewrite_data_files`: the small files of each partition merged toward `lake.target_file_mb` (a new snapshot; the
   old files stay readable by older snapshots until they expire), which the table's own property is first set to, so
   tables created before the setting write files of that size too;
2. `expire_snapshots`: snapshots older than `snapshot_retention_days` dropped (the newest `retain_last` always
   kept), with the files only they referenced, so time travel reaches back exactly the retention;
3. `remove_orphan_files`: files under the table's location that no snapshot references (left by failed or killed
   writes) and older than `orphan_age_hours`, so an in-flight write's new files are never taken for orphans.

Before them, `consolidate_states`: each keyed dataset (`KEYED_DATASETS`, written as a chain of change days) whose
state spans more than `max_change_days` days of changes gets its newest day rewritten as a full day (spark_jobs/common.py
`consolidate_state`), so the daily runs' state scans stop growing with the days since the last full build.

Iceberg's own Spark procedures do the work (`CALL <catalog>.system.*`), on any session that has the lake's catalogs
(the object store's `lake.catalog` and the stages' own, `maintained_catalogs`): the maintenance DAG's Spark Connect
client (dags/reki_lake_maintenance.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TYPE_CHECKING

from reki_core.config import LakeConfig

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from reki_core.config import Config, LakeMaintenanceConfig
    from reki_core.storage.lake import Lake


def lake_table_names(spark: SparkSession, catalog: str) -> list[str]:
    """Every table of the catalog as `namespace.table`, sorted (one level of namespaces, as the lake uses)."""
    names = []
    for ns_row in spark.sql(f"SHOW NAMESPACES IN {catalog}").collect():
        namespace = ns_row[0]
        for row in spark.sql(f"SHOW TABLES IN {catalog}.{namespace}").collect():
            names.append(f"{namespace}.{row['tableName']}")
    return sorted(names)


def _sql_timestamp(moment: dt.datetime) -> str:
    """A timestamp literal with its offset: the same instant whatever the session's time zone."""
    return f"TIMESTAMP '{moment.astimezone(dt.UTC).strftime('%Y-%m-%d %H:%M:%S')}+00:00'"


def _one_row(spark: SparkSession, statement: str) -> dict:
    rows = spark.sql(statement).collect()
    return rows[0].asDict() if rows else {}


def maintain_table(spark: SparkSession, catalog: str, table: str, policy: LakeMaintenanceConfig,
                   now: dt.datetime, target_file_mb: int = LakeConfig().target_file_mb) -> dict:
    """Compact, expire and clean one table (`namespace.table`); what each step did, as Iceberg reports it."""
    from reki_core.storage.lake import TARGET_FILE_SIZE

    target_bytes = target_file_mb * 1024 * 1024
    # A table created before the setting gets it; an unchanged value commits nothing (test_lake_tables checks).
    spark.sql(f"ALTER TABLE {catalog}.{table} SET TBLPROPERTIES ('{TARGET_FILE_SIZE}' = '{target_bytes}')")
    compacted = _one_row(spark, (
        f"CALL {catalog}.system.rewrite_data_files(table => '{table}', options => map("
        f"'min-input-files', '{policy.min_input_files}', 'target-file-size-bytes', '{target_bytes}'))"))
    expired = _one_row(spark, (
        f"CALL {catalog}.system.expire_snapshots(table => '{table}', "
        f"older_than => {_sql_timestamp(now - dt.timedelta(days=policy.snapshot_retention_days))}, "
        f"retain_last => {policy.retain_last})"))
    orphans = spark.sql(
        f"CALL {catalog}.system.remove_orphan_files(table => '{table}', "
        f"older_than => {_sql_timestamp(now - dt.timedelta(hours=policy.orphan_age_hours))})").collect()
    return {
        "table": table,
        "rewritten_data_files": int(compacted.get("rewritten_data_files_count", 0)),
        "added_data_files": int(compacted.get("added_data_files_count", 0)),
        "expired_snapshots_files": {key: int(value) for key, value in expired.items()},
        "removed_orphan_files": sorted(row["orphan_file_location"] for row in orphans),
    }


def maintained_catalogs(spark: SparkSession, cfg: Config) -> list[str]:
    """The catalogs maintained: `lake.catalog`, which holds the stages' tables with `lake.tables_in_store`, and
    otherwise also the folder lake's own catalog (registered on this session first, as the feature jobs do)."""
    from reki_core.storage.lake import lake_of

    lake = lake_of(cfg)
    for key, value in lake.spark_catalog_conf().items():
        spark.conf.set(key, value)
    return list(dict.fromkeys([cfg.lake.catalog, lake.catalog_name]))  # one, when the stages' tables are in the store


def consolidate_states(spark: SparkSession, lake: Lake, max_change_days: int) -> list[dict]:
    """`consolidate_state` on every keyed dataset of `lake`: what was rewritten (nothing where the chain is short)."""
    from reki_core.storage.lake import KEYED_DATASETS
    from spark_jobs.common import consolidate_state

    done = [consolidate_state(spark, lake, dataset, max_change_days) for dataset in KEYED_DATASETS]
    return [result for result in done if result is not None]


def maintain_lake(spark: SparkSession, cfg: Config, now: dt.datetime,
                  on_table: Callable[[dict], None] | None = None) -> list[dict]:
    """`consolidate_states`, then `maintain_table` on every table of the maintained catalogs, in name order; `on_table`
    sees each table's result (a consolidated dataset's under `consolidated`)."""
    from reki_core.storage.lake import lake_of

    lake = lake_of(cfg)
    consolidated = {lake.table_name(result["dataset"]): result
                    for result in consolidate_states(spark, lake, cfg.lake.maintenance.max_change_days)}
    results = []
    for catalog in maintained_catalogs(spark, cfg):
        for table in lake_table_names(spark, catalog):
            result = {"catalog": catalog,
                      **maintain_table(spark, catalog, table, cfg.lake.maintenance, now, cfg.lake.target_file_mb),
                      "consolidated": consolidated.get(table)}
            if on_table:
                on_table(result)
            results.append(result)
    return results


def maintain_lake_via_connect(cfg: Config, url: str, now: dt.datetime, log: Callable[[str], None] = print) -> dict:
    """`maintain_lake` as a client of the warm Spark Connect server at `url` (a session of its own, released at the
    end): the maintenance DAG's task. Returns the tables' results and totals."""
    from reki_core.spark import connect_client, task_session_id

    def report(result: dict) -> None:
        log(f"{result['catalog']}.{result['table']}: compacted {result['rewritten_data_files']} files into {result['added_data_files']}, "
            f"expired {result['expired_snapshots_files']}, removed {len(result['removed_orphan_files'])} orphan files")

    with connect_client(cfg, url, task_session_id(), tag="reki-lake-maintenance") as spark:
        tables = maintain_lake(spark, cfg, now, on_table=report)
    return {
        "tables": tables,
        "consolidated": [t["consolidated"] for t in tables if t.get("consolidated")],
        "rewritten_data_files": sum(t["rewritten_data_files"] for t in tables),
        "removed_orphan_files": sum(len(t["removed_orphan_files"]) for t in tables),
    }
