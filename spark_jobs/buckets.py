"""User-bucketed feature partitions, rewritten copy-on-write.

The per-user datasets (`features/user_history`, `features/knowledge_versions`, `features/ctr_samples`)
hold one Parquet file per user bucket, `pmod(xxhash64(user_id), n_buckets)`, plus `_buckets.json`: each
bucket's file and its counts. A daily run recomputes only the buckets that hold a user whose rows can
change and hard-links every other bucket's file from the previous partition, so the untouched bulk is
neither read nor rewritten: a day costs what changed, not the whole history. Rows are ordered by bucket,
then by the dataset's sort key, in a full build and in a daily run alike.

Readers see an ordinary Parquet folder (Spark and pyarrow skip `_`-prefixed files).
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from reki_core.storage.lake import Lake

MANIFEST = "_buckets.json"
BUCKET = "bucket"
_SPARK_DIR = re.compile(rf"^{BUCKET}=(\d+)$")


def bucket_expr(user_id, n_buckets: int):
    """The bucket of a user: the same in every run and on every day (xxhash64 with Spark's fixed seed)."""
    return F.pmod(F.xxhash64(user_id), F.lit(n_buckets)).cast("int")


def with_buckets(df: DataFrame, n_buckets: int) -> DataFrame:
    """`df` with its `bucket` column, hash-partitioned by it (all of a user's rows in one task)."""
    return df.withColumn(BUCKET, bucket_expr(F.col("user_id"), n_buckets)).repartition(BUCKET)


def read_manifest(lake: Lake, dataset: str, day: dt.date) -> dict | None:
    """The partition's bucket manifest, or None (no partition, or one written before buckets)."""
    return lake.read_json(f"{dataset}/dt={day.isoformat()}/{MANIFEST}")


def is_bucketed(lake: Lake, dataset: str, day: dt.date, n_buckets: int) -> bool:
    manifest = read_manifest(lake, dataset, day)
    return manifest is not None and manifest["n_buckets"] == n_buckets


def bucket_files(lake: Lake, dataset: str, day: dt.date, buckets: Iterable[int] | None = None) -> dict[int, list[str]]:
    """Local paths of the files of `buckets` (all when None); empty buckets have none."""
    return _bucket_files(lake, dataset, day, _manifest(lake, dataset, day), buckets)


def read_buckets(spark: SparkSession, lake: Lake, dataset: str, day: dt.date,
                 buckets: Iterable[int] | None = None) -> DataFrame:
    """The rows of `buckets` (all when None): only their files are opened. The schema comes from the
    manifest, so Spark runs no job to infer it from the files."""
    manifest = _manifest(lake, dataset, day)
    schema = T.StructType.fromJson(json.loads(manifest["schema"]))
    paths = [p for files in _bucket_files(lake, dataset, day, manifest, buckets).values() for p in files]
    if paths:
        return spark.read.schema(schema).parquet(*paths)
    return spark.createDataFrame([], schema)  # none of those buckets has rows


def _manifest(lake: Lake, dataset: str, day: dt.date) -> dict:
    manifest = read_manifest(lake, dataset, day)
    if manifest is None:
        raise FileNotFoundError(f"{lake.describe(dataset, day)}: no {MANIFEST}")
    return manifest


def _bucket_files(lake: Lake, dataset: str, day: dt.date, manifest: dict,
                  buckets: Iterable[int] | None) -> dict[int, list[str]]:
    wanted = None if buckets is None else set(buckets)
    folder = lake.local_path(f"{dataset}/dt={day.isoformat()}")
    return {int(b): [str(folder / f) for f in entry["files"]] for b, entry in manifest["buckets"].items()
            if wanted is None or int(b) in wanted}


def grown_buckets(lake: Lake, dataset: str, before: dt.date, after: dt.date, count: str = "rows") -> set[int]:
    """Buckets whose `count` (rows, or a count of the manifest) differs between two partitions of `dataset`.

    For data that only grows (interactions, window versions), a changed total is the sign of a changed bucket.
    """
    old, new = read_manifest(lake, dataset, before)["buckets"], read_manifest(lake, dataset, after)["buckets"]

    def value(entry: dict | None) -> int:
        return 0 if entry is None else entry["rows"] if count == "rows" else entry["counts"].get(count, 0)

    return {int(b) for b in set(old) | set(new) if value(old.get(b)) != value(new.get(b))}


def write_bucketed(
    data: DataFrame,
    lake: Lake,
    dataset: str,
    day: dt.date,
    n_buckets: int,
    sort_by: list[str],
    summarise: Callable[[pa.Table], dict[str, int]] | None = None,
    summary_columns: list[str] | None = None,
    carry_from: dt.date | None = None,
    rewritten: set[int] | None = None,
) -> dict[str, int]:
    """Replace `dataset/dt=day` with `data`, a DataFrame with the `bucket` column (as from `with_buckets`).

    With `carry_from`, `data` holds only the `rewritten` buckets; every other bucket's file is hard-linked
    from that partition. `summarise(pyarrow_table)` gives each new file's counts (read back from
    `summary_columns`); the returned totals add them up over all buckets, carried ones included.
    """
    schema = T.StructType([f for f in data.schema.fields if f.name != BUCKET]).json()

    def write_new(staging) -> dict[str, dict]:
        if rewritten is not None and not rewritten:  # a day that rewrites no bucket only links files: Spark runs nothing
            return {}
        return _write_new_buckets(data, dataset, staging, sort_by, summarise, summary_columns, rewritten)

    return _publish(write_new, schema, lake, dataset, day, n_buckets, sort_by, carry_from, rewritten)


def _publish(write_new, schema, lake, dataset, day, n_buckets, sort_by, carry_from, rewritten) -> dict[str, int]:
    """Stage the new buckets (`write_new(staging)`), link the carried ones, write the manifest, swap it in."""
    if (carry_from is None) != (rewritten is None):
        raise ValueError("carry_from and rewritten go together")
    staging = lake.local_path(f"{dataset}/_staging-{uuid.uuid4().hex}")
    try:
        staging.mkdir(parents=True)
        buckets = write_new(staging)
        if carry_from is not None:
            previous = read_manifest(lake, dataset, carry_from)
            folder = lake.local_path(f"{dataset}/dt={carry_from.isoformat()}")
            for bucket, entry in previous["buckets"].items():
                if int(bucket) in rewritten:
                    continue
                for name in entry["files"]:
                    _link_or_copy(folder / name, staging / name)
                buckets[bucket] = entry
        manifest = {"n_buckets": n_buckets, "sort_by": sort_by, "schema": schema,
                    "buckets": dict(sorted(buckets.items(), key=lambda kv: int(kv[0])))}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written left beside the partitions
        raise
    lake._swap_in(str(staging), lake.partition_path(dataset, day))  # readers never see a half-written partition
    return totals(manifest)


def _write_new_buckets(df, dataset, staging, sort_by, summarise, summary_columns, rewritten) -> dict[str, dict]:
    """Spark writes `df` one folder per bucket; each bucket's files move into `staging`, counted."""
    spark_out = staging / "_spark"
    df.sortWithinPartitions(BUCKET, *sort_by).write.partitionBy(BUCKET).parquet(str(spark_out))
    write_id = uuid.uuid4().hex[:8]
    buckets: dict[str, dict] = {}
    for sub in sorted(spark_out.iterdir()):
        m = _SPARK_DIR.match(sub.name)
        if not m:
            continue
        bucket = int(m.group(1))
        if rewritten is not None and bucket not in rewritten:
            raise ValueError(f"{dataset}: rows of bucket {bucket}, which this run does not rewrite")
        names = []
        for i, part in enumerate(sorted(p for p in sub.iterdir() if p.suffix == ".parquet")):
            names.append(f"part-b{bucket:05d}-{i}-{write_id}.parquet")
            part.rename(staging / names[-1])
        buckets[str(bucket)] = _bucket_entry(staging, names, summarise, summary_columns)
    shutil.rmtree(spark_out)
    return buckets


def _bucket_entry(staging, names: list[str], summarise, summary_columns) -> dict:
    """A bucket's manifest entry: its files, rows and counts (read back from the files just written)."""
    rows = sum(pq.ParquetFile(staging / n).metadata.num_rows for n in names)
    counts = summarise(pa.concat_tables(pq.read_table(staging / n, columns=summary_columns) for n in names)) \
        if summarise else {}
    return {"files": names, "rows": rows, "counts": counts}


def totals(manifest: dict) -> dict[str, int]:
    """Rows and every count summed over the buckets."""
    out = {"rows": 0}
    for entry in manifest["buckets"].values():
        out["rows"] += entry["rows"]
        for key, value in entry["counts"].items():
            out[key] = out.get(key, 0) + value
    return out


def _link_or_copy(src, dst) -> None:
    """A hard link shares the immutable file at no cost; a copy where links are not possible."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(src, dst)
