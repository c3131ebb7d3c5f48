"""Landing in Spark: the deliveries of `incoming/{interactions,users,items}/dt=D/` checked and written to `raw/`.

What lands, and when (the first load, missed days, re-runs, the bad-row policy): reki_core/landing.py. This job
reads the delivered Parquet files from the lake (s3a:// on the object store, a folder in the tests), each distinct
file once (a file whose bytes equal an earlier one's of the same day is a re-delivery: counted, not read), all of
them in one scan, and checks each file's schema (its columns and their types, naming the file and column: a file
that needs its own look is read alone, `read_at_once`), computes every row rule of the interactions as a
column (`raw_rules.interactions_row_rules`: a bad row's reasons, for the error or the quarantine; of a repeated row the
first copy is kept), and lets Great Expectations decide on the per-day counts of each rule (a small summary frame;
why not GX on the rows themselves: docs/design.md "Landing in Spark"). The days of one run are read, checked and written
together (one Iceberg commit for the interactions of all of them); at the first day with bad input, the days before
it are written and the job stops with a `LandingError`. Nothing of the day's size is collected to the driver: only
counts and at most three sample rows per file and rule. The users and items snapshots are checked by their
suites (reki_core/quality/raw.py) on the Spark DataFrames themselves.

The replayed source (reki_core/datasets/source.py `replay_delivery`, the stand-in for an upstream system) writes the
day's deliveries first, on the driver.

Writes `raw/interactions` (the days landed), `raw/_rejected` (quarantined rows with `_source_file` and `_reason`),
`raw/users` and `raw/items` (the snapshots of the run's date). Its run-log step is `land`.
"""

from __future__ import annotations

import datetime as dt
import functools
import sys
from dataclasses import dataclass, field
from urllib.parse import unquote

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from reki_core.datasets import schema
from reki_core.landing import RAW, REJECTED, SCHEMAS, LandingError, Problem
from reki_core.quality import raw as raw_rules
from spark_jobs.common import cache, releases_cache, store_refused, write_days, write_partition
from spark_jobs.knowledge import spark_path

STEP = "land"
INTEGRAL = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
# The landed tables' types (the pandas landing's: ids and text as strings, rating and years int, ts long).
LANDED_TYPES = {
    "interactions": {"user_id": "string", "item_id": "string", "rating": "int", "ts": "bigint"},
    "users": {"user_id": "string", "age": "int", "gender": "string", "occupation": "string", "zip_code": "string"},
    "items": {"item_id": "string", "title": "string", "year": "int", "genres": "array<string>"},
}
ORDER = {"interactions": ["ts", "user_id", "item_id"], "users": ["user_id"], "items": ["item_id"]}
SAMPLES = 3  # sample rows per file and rule in a problem's message


@dataclass
class Delivery:
    """The files delivered for one (dataset, day): each distinct content once, in name order."""

    what: str
    day: dt.date
    folder: str
    files: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # the same bytes as an earlier file of the day
    sizes: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- reading the deliveries


def _path_key(path: str) -> str:
    """One spelling of a file's path for the lake's listing and Spark's (`file:/x`, `s3a://bucket/key`)."""
    if "://" in path or path.startswith("file:"):
        path = unquote(path.split(":", 1)[1])
    return "/" + path.lstrip("/")


def deliveries(spark, lake, what: str, days: list[dt.date]) -> list[Delivery]:
    """The deliveries of `days` (in order, up to and with the first day that has none), their files hashed in Spark
    (binaryFile, sha256): the same bytes delivered twice are read once."""
    from reki_core.datasets.source import INCOMING, delivery_files

    found = []
    for day in days:
        found.append(Delivery(what, day, lake.partition_path(INCOMING[what], day), delivery_files(lake, what, day)))
        if not found[-1].files:
            break
    paths = [p for d in found for p in d.files]
    if not paths:
        return found
    listed = {_path_key(p): p for p in paths}
    digests = {}
    for row in (spark.read.format("binaryFile").load([spark_path(lake, p) for p in paths])
                .select("path", "length", F.sha2("content", 256).alias("sha256")).collect()):
        digests[listed[_path_key(row["path"])]] = (row["sha256"], int(row["length"]))
    for delivery in found:
        seen, files = set(), []
        for path in delivery.files:
            # Spark's file scans skip empty files: one Spark did not read is (or was a moment ago) empty.
            digest, size = digests.get(path) or (f"unread:{path}", lake.fs.size(path))
            if digest in seen:
                delivery.duplicates.append(path)  # idempotent, not new data
                continue
            seen.add(digest)
            files.append(path)
            delivery.sizes[path] = size
        delivery.files = files
    return found


def _type_ok(data_type: T.DataType, logical: str) -> bool:
    if logical == "string":  # integer ids are accepted and landed as strings
        return isinstance(data_type, (T.StringType, *INTEGRAL))
    if logical == "integer":
        return isinstance(data_type, INTEGRAL)
    if logical == "list":
        return isinstance(data_type, T.ArrayType)
    raise ValueError(logical)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def read_delivery(spark, lake, path: str, size: int, what: str) -> DataFrame:
    """One delivered file, schema-checked (raises LandingError naming the file and each column): its columns with
    integer ids as text (before any rule: 1 and "1" are one id), `_source_file` and `_row` (its row index)."""
    expected = SCHEMAS[what]
    if size == 0:
        raise LandingError([Problem(path, None, "readable", "empty file (0 bytes)")])
    try:
        frame = spark.read.parquet(spark_path(lake, path))
        fields = {f.name: f.dataType for f in frame.schema.fields}
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same input problem
        if store_refused(exc):  # the store's refusal, not the input's fault
            raise
        raise LandingError([Problem(path, None, "readable", f"not readable as Parquet: {_first_line(exc)}")]) from None
    problems = [Problem(path, c, "schema", "required column is missing") for c in expected if c not in fields]
    problems += [Problem(path, c, "schema", "unexpected column (upstream schema change?)")
                 for c in fields if c not in expected]
    problems += [Problem(path, c, "type", f"expected {logical}, found {fields[c].simpleString()}")
                 for c, logical in expected.items() if c in fields and not _type_ok(fields[c], logical)]
    if problems:
        raise LandingError(problems)
    return frame.select(*_landing_columns(expected), F.lit(path).alias("_source_file"),
                        F.col("_metadata.row_index").alias("_row"))


def union(frames: list[DataFrame]) -> DataFrame:
    return functools.reduce(DataFrame.unionByName, frames)


def _landing_columns(expected: dict[str, str]) -> list[Column]:
    """The expected columns as landing reads them: integer ids as text (1 and "1" are one id)."""
    return [F.col(c).cast("string").alias(c) if logical == "string" else F.col(c) for c, logical in expected.items()]


def read_at_once(spark, lake, delivered: list[Delivery]) -> DataFrame | None:
    """Every interactions file of `delivered` in one scan, with the columns `read_delivery` and `land_interactions`
    give each file (`_source_file`, `_row`, `_day`, `_file_pos`, `_lo`, `_hi`); None where some file needs the
    file-by-file read to be named: an empty file, an unreadable one, schemas that do not merge into exactly the
    expected columns and types, or a path that Spark's URI-encoded `_metadata.file_path` may not give back.
    Why: a plan per file costs a footer read and a task per file; ML-100K's first load is 193 days."""
    expected = SCHEMAS["interactions"]
    files = [(d, pos, path) for d in delivered for pos, path in enumerate(d.files)]
    if not files or any(d.sizes[path] == 0 or "%" in path or "+" in path for d, _, path in files):
        return None
    try:
        frame = spark.read.option("mergeSchema", "true").parquet(*[spark_path(lake, p) for _, _, p in files])
        fields = {f.name: f.dataType for f in frame.schema.fields}
    except Exception as exc:  # noqa: BLE001 - the file-by-file read names the file that is the problem
        if store_refused(exc):  # the store's refusal, not the input's fault
            raise
        return None
    if set(fields) != set(expected) or not all(_type_ok(fields[c], logical) for c, logical in expected.items()):
        return None
    bounds = {d.day: schema.day_bounds(d.day) for d in delivered}
    named = spark.createDataFrame(
        [(_path_key(path), path, d.day, pos, bounds[d.day][0], bounds[d.day][1] - 1) for d, pos, path in files],
        "_key string, _source_file string, _day date, _file_pos int, _lo bigint, _hi bigint")
    # `_path_key` in Spark: the scheme and leading slashes become one slash, %XX decoded (no listed path has % or +).
    key = F.url_decode(F.regexp_replace(F.col("_metadata.file_path"), r"^[A-Za-z][A-Za-z0-9+.-]*:/*", "/"))
    rows = frame.select(*_landing_columns(expected), key.alias("_key"), F.col("_metadata.row_index").alias("_row"))
    return rows.join(F.broadcast(named), "_key", "left").select(
        *expected, "_source_file", "_row", "_day", "_file_pos", "_lo", "_hi")


def every_file_whole(spark, lake, checked: DataFrame, delivered: list[Delivery]) -> bool:
    """Whether the scan of `read_at_once` saw each file with every expected column: a file that lacks a column
    merges as nulls there, so a file with a column that is null in every row, a row of no listed file, or a file
    without rows whose own schema is wrong sends the landing back to the file-by-file read, which names the file."""
    expected = SCHEMAS["interactions"]
    seen = set()
    for row in checked.groupBy("_source_file").agg(*[F.count(c).alias(c) for c in expected]).collect():
        if row["_source_file"] is None or any(row[c] == 0 for c in expected):
            return False
        seen.add(row["_source_file"])
    for d in delivered:
        for path in d.files:
            if path not in seen:  # no rows: only its own footer tells whether it has the expected columns
                try:
                    read_delivery(spark, lake, path, d.sizes[path], "interactions").schema
                except LandingError:
                    return False
    return True


# ---------------------------------------------------------------- the rules as columns


def violated(rule: raw_rules.Rule, low: Column | None = None, high: Column | None = None) -> Column:
    """True where a row breaks `rule` (`not_null`, `in_range`; `unique` is `interaction_checks`')."""
    value = F.col(rule.column)
    low = F.lit(rule.min_value) if low is None else low
    high = F.lit(rule.max_value) if high is None else high
    if rule.rule == "not_null":
        return value.isNull()
    if rule.rule == "in_range":
        return F.coalesce((value < low) | (value > high), F.lit(False))
    raise ValueError(f"rule {rule.rule} is not a row rule")


def interaction_checks(rows: DataFrame) -> DataFrame:
    """`rows` (a day's files: `_day`, `_file_pos`, `_row`, `_lo`, `_hi` the day's ts bounds) with `_v<i>` true where
    the row breaks rule i of `interactions_row_rules` and `_reason` ("" for a good row). Of a repeated
    (user_id, item_id, ts), the first copy (in file and row order) is kept; the others break `unique`."""
    rules = raw_rules.interactions_row_rules(dt.date(1970, 1, 1))  # the rules alone: ts's bounds are the row's day's
    checks = []
    for rule in rules:
        if rule.rule == "unique":
            keys = rule.column.split(",")
            copy = F.row_number().over(Window.partitionBy("_day", *keys).orderBy("_file_pos", "_row"))
            checks.append((copy > 1) & ~functools.reduce(Column.__and__, [F.col(k).isNull() for k in keys]))
        elif rule.column == "ts" and rule.rule == "in_range":
            checks.append(violated(rule, F.col("_lo"), F.col("_hi")))
        else:
            checks.append(violated(rule))
    flagged = rows.select("*", *[check.alias(f"_v{i}") for i, check in enumerate(checks)])
    reason = F.concat_ws(";", *[F.when(F.col(f"_v{i}"), F.lit(f"{r.column}:{r.rule}")) for i, r in enumerate(rules)])
    return flagged.withColumn("_reason", reason)


# ---------------------------------------------------------------- interactions


@dataclass
class DayCheck:
    rows: int = 0
    rejected: int = 0
    counts: dict[int, int] = field(default_factory=dict)  # rule index -> offending rows
    problems: list[Problem] = field(default_factory=list)


def _day_checks(checked: DataFrame, days: list[dt.date]) -> dict[dt.date, DayCheck]:
    """Per day: rows, rejected rows, each rule's offending rows and its problems (per file, with samples)."""
    rules = raw_rules.interactions_row_rules(dt.date(1970, 1, 1))
    result = {d: DayCheck() for d in days}
    for row in checked.groupBy("_day").agg(F.count(F.lit(1)).alias("n"),
                                           F.count(F.when(F.col("_reason") != "", 1)).alias("bad")).collect():
        result[row["_day"]].rows, result[row["_day"]].rejected = int(row["n"]), int(row["bad"])
    broken = F.filter(F.array(*[F.when(F.col(f"_v{i}"), F.lit(i)) for i in range(len(rules))]), lambda i: i.isNotNull())
    bad = checked.where(F.col("_reason") != "").select(
        "_day", "_source_file", "_row", "user_id", "item_id", "rating", "ts", F.explode(broken).alias("_rule"))
    group = Window.partitionBy("_day", "_source_file", "_rule")
    sampled = (bad.withColumn("_n", F.count(F.lit(1)).over(group))
               .withColumn("_rank", F.row_number().over(group.orderBy("_row"))).where(F.col("_rank") <= SAMPLES)
               .orderBy("_day", "_rule", "_source_file", "_rank").collect())
    by_file: dict[tuple, list] = {}
    for row in sampled:
        by_file.setdefault((row["_day"], int(row["_rule"]), row["_source_file"]), []).append(row)
    for (day, index, path), rows in by_file.items():
        rule = raw_rules.interactions_row_rules(day)[index]
        n = int(rows[0]["_n"])
        result[day].counts[index] = result[day].counts.get(index, 0) + n
        if rule.rule == "unique":
            sample = [{k: r[k] for k in rule.column.split(",")} for r in rows[:2]]
        else:
            sample = [r[rule.column] for r in rows]
        result[day].problems.append(Problem(path, rule.column, rule.rule + rule.bound, f"{n} row(s), e.g. {sample}"))
    return result


def _gx_bad_days(checks: dict[dt.date, DayCheck], days: list[dt.date]) -> set[dt.date]:
    """The days GX finds a rule broken on, from the per-day counts of each rule (one row per day)."""
    import pandas as pd

    from reki_core.quality.gx import run_suite

    if not days:
        return set()
    rules = raw_rules.interactions_row_rules(days[0])
    summary = pd.DataFrame({r.summary_column: [checks[d].counts.get(i, 0) for d in days] for i, r in enumerate(rules)})
    result = run_suite("raw_rows", "interactions", summary, raw_rules.summary_expectations(rules), complete=True)
    return {days[i] for o in result.outcomes if not o.success for i in o.unexpected_index}


def land_interactions(spark, cfg, lake, days: list[dt.date]) -> dict[str, dict]:
    """Land the interactions of `days`; at the first day with bad input (policy `fail`, or more rejected rows than
    `raw_max_rejected_share`), a missing delivery or an unreadable file, the days before it land and LandingError is
    raised. Returns each landed day's record."""
    found = deliveries(spark, lake, "interactions", days)
    stop: LandingError | None = None
    delivered = []
    for delivery in found:
        if not delivery.files and not delivery.duplicates:
            stop = LandingError([Problem(delivery.folder, None, "delivered",
                                         "no delivery for this day (expected at least one Parquet file)")])
            break
        delivered.append(delivery)

    checked, checked_days = None, [d.day for d in delivered]
    at_once = read_at_once(spark, lake, delivered)
    if at_once is not None:
        checked = cache(interaction_checks(at_once))
        if not every_file_whole(spark, lake, checked, delivered):
            checked.unpersist()
            checked = None
    if checked is None:  # file by file: the first bad file stops the run, naming it
        frames, checked_days = [], []
        for delivery in delivered:
            try:
                read = [read_delivery(spark, lake, p, delivery.sizes[p], "interactions") for p in delivery.files]
            except LandingError as exc:
                stop = exc
                break
            low, high = schema.day_bounds(delivery.day)
            frames += [f.select("*", F.lit(delivery.day).alias("_day"), F.lit(pos).alias("_file_pos"),
                                F.lit(low).alias("_lo"), F.lit(high - 1).alias("_hi")) for pos, f in enumerate(read)]
            checked_days.append(delivery.day)
        checked = cache(interaction_checks(union(frames))) if frames else None

    records: dict[str, dict] = {}
    landed: list[dt.date] = []
    if checked is not None:
        checks = _day_checks(checked, checked_days)
        bad_days = _gx_bad_days(checks, checked_days)
        share = cfg.quality.raw_max_rejected_share
        for delivery in found[:len(checked_days)]:
            check = checks[delivery.day]
            if delivery.day in bad_days and cfg.quality.raw_bad_rows_policy == "fail":
                stop = LandingError(check.problems)
                break
            if check.rejected > share * check.rows:
                stop = LandingError([Problem(", ".join(delivery.files), None, "max_rejected_share",
                                             f"{check.rejected} of {check.rows} rows rejected, more than the {share:.0%} "
                                             "quarantine allows (an upstream format change?)"), *check.problems])
                break
            landed.append(delivery.day)
            records[delivery.day.isoformat()] = {
                "rows": check.rows - check.rejected, "rejected": check.rejected, "files": delivery.files,
                "duplicate_deliveries": delivery.duplicates, "problems": [str(p) for p in check.problems]}
    if landed:
        within = checked.where(F.col("_day").isin(landed))
        quarantined = [d for d in landed if records[d.isoformat()]["rejected"]]
        if quarantined:
            rejected = within.where(F.col("_reason") != "").orderBy("_day", "_file_pos", "_row").select(
                "user_id", "item_id", "rating", "ts", "_source_file", "_reason", F.col("_day").alias("dt"))
            write_days(rejected, lake, REJECTED, quarantined)
        for day in landed:
            if day not in quarantined:  # a re-run after the fix leaves no stale rejects
                lake.delete_partition(REJECTED, day)
        good = within.where(F.col("_reason") == "").orderBy("_day", *ORDER["interactions"], "_file_pos", "_row")
        write_days(good.select(*[F.col(c).cast(t).alias(c) for c, t in LANDED_TYPES["interactions"].items()],
                               F.col("_day").alias("dt")), lake, RAW["interactions"], landed)
    if stop is not None:
        raise stop
    return records


# ---------------------------------------------------------------- snapshots


def normalised(frame: DataFrame, what: str) -> DataFrame:
    """The landed columns and types (items: genres' elements as text, none for a null list)."""
    columns = []
    for name, kind in LANDED_TYPES[what].items():
        value = F.col(name)
        if name == "genres":
            value = F.coalesce(F.transform(value, lambda g: g.cast("string")), F.array().cast("array<string>"))
        columns.append(value.cast(kind).alias(name))
    return frame.select(*columns)


def snapshot_suite(what: str) -> list:
    return raw_rules.users_expectations() if what == "users" else raw_rules.items_expectations()


def land_snapshot(spark, lake, what: str, day: dt.date) -> int:
    """Land the `what` snapshot delivered for `day`, checked by its suite on the Spark DataFrame; returns its rows."""
    from reki_core.quality.gx import run_suite

    [delivery] = deliveries(spark, lake, what, [day])
    if not delivery.files:
        raise LandingError([Problem(delivery.folder, None, "delivered", f"no {what} snapshot delivered for this day")])
    snapshot = cache(normalised(union([read_delivery(spark, lake, p, delivery.sizes[p], what)
                                       for p in delivery.files]), what))
    result = run_suite("raw_snapshot", f"{what} dt={day}", snapshot, snapshot_suite(what))
    if not result.success:
        raise LandingError([Problem(", ".join(delivery.files), o.column,
                                    raw_rules.RULE_NAMES.get(o.expectation, o.expectation), o.describe())
                            for o in result.failed])
    write_partition(snapshot.orderBy(*ORDER[what]), lake, RAW[what], day)
    return result.rows


def snapshot_gate(spark, lake, what: str, day: dt.date):
    """The raw gate's suite on the landed `raw/<what>` snapshot of `day`, a Spark DataFrame (never read into Python)."""
    from reki_core.quality.gx import run_suite
    from spark_jobs.common import read_partition

    return run_suite("raw", f"{RAW[what]}/dt={day}", read_partition(spark, lake, RAW[what], day), snapshot_suite(what))


# ---------------------------------------------------------------- the job


@releases_cache
def run(spark, cfg, lake, day) -> dict:
    from reki_core.datasets.source import replay_delivery

    runs = f"{lake.root}/_runs/dt={day.isoformat()}"
    if lake.fs.exists(runs):  # landing starts every run of a date: its records describe this run only
        lake.fs.rm(runs, recursive=True)
    existing = lake.partitions(RAW["interactions"])
    # Snapshots land after every interaction day: without one, no first load finished (a retry redoes it).
    initial = not lake.partitions(RAW["users"])
    start = cfg.scenario.source.start_date
    if day < start:
        raise ValueError(f"{day} is before the source's start date {start} (scenario {cfg.scenario.name})")
    end = cfg.scenario.source.end_date
    if cfg.scenario.source.kind != "files" and day > end:
        raise ValueError(f"{day} is after the replayed dataset's last day {end} (scenario {cfg.scenario.name}, "
                         f"source {cfg.scenario.source.kind}): there is nothing to deliver for it")
    last_before = max((d for d in existing if d < day), default=None)
    first = start if initial or last_before is None else last_before + dt.timedelta(days=1)
    days = [first + dt.timedelta(n) for n in range((day - first).days + 1)]
    replay_delivery(cfg, lake, days, snapshot_day=day)  # the upstream stand-in, before anything is read
    per_day = land_interactions(spark, cfg, lake, days)
    users = land_snapshot(spark, lake, "users", day)
    items = land_snapshot(spark, lake, "items", day)
    return {
        "initial_load": initial,
        "days_landed": len(days),
        "rows": sum(r["rows"] for r in per_day.values()),
        "rows_today": per_day[day.isoformat()]["rows"],
        "rejected": sum(r["rejected"] for r in per_day.values()),
        "no_new_data": per_day[day.isoformat()]["rows"] == 0,
        "duplicate_deliveries": sum(len(r["duplicate_deliveries"]) for r in per_day.values()),
        "users": users,
        "items": items,
        "missed_days_landed": 0 if initial else len(days) - 1,  # days before `day` no run had landed
        "problems": [p for r in per_day.values() for p in r["problems"]][:50],
        "lake": lake.uri,
    }


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, STEP, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
