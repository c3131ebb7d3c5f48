"""Landing: validate the day's deliveries from `incoming/` and write `raw/` partitions.

On an empty lake the first run lands all history up to its date (one partition per day); later
runs land their own day, and every day since the last landed one that is missing (a scheduler
that was down, with catchup off, skips days: their deliveries land with the next run instead of
never). A first load counts as done once its snapshots landed, so a first load that failed
part-way is redone whole by the retry. Re-running a date overwrites that date only. Bad input
stops the run with an error naming the file, column and rule; under `quality.raw_bad_rows_policy:
quarantine`, bad rows go to `raw/_rejected/dt=D/` with their reason and the rest lands, unless they
exceed `quality.raw_max_rejected_share` of the day's rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reki_core.config import Config
from reki_core.datasets import schema
from reki_core.datasets.source import delivery_files, replay_delivery
from reki_core.quality import raw as raw_suites
from reki_core.quality.gx import raise_if_any_failed, run_suite
from reki_core.quality.data_docs import keep_validations
from reki_core.runlog import timed_step
from reki_core.storage.lake import Lake, as_date, lake_of

RAW = {"interactions": "raw/interactions", "users": "raw/users", "items": "raw/items"}
REJECTED = "raw/_rejected"
SCHEMAS = {"interactions": schema.INTERACTIONS, "users": schema.USERS, "items": schema.ITEMS}
NORMALISE = {
    "interactions": schema.normalise_interactions,
    "users": schema.normalise_users,
    "items": schema.normalise_items,
}


@dataclass
class Problem:
    file: str
    column: str | None
    rule: str
    detail: str

    def __str__(self) -> str:
        col = f"column '{self.column}'" if self.column else "table"
        return f"{self.file}: {col}: rule '{self.rule}': {self.detail}"


class LandingError(ValueError):
    """Bad input; `problems` names each file, column and rule."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"landing rejected the input ({len(problems)} problem(s)):\n{shown}{more}")


def _type_ok(arrow_type: pa.DataType, logical: str) -> bool:
    if logical == "string":  # integer ids are accepted and landed as strings
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_integer(arrow_type)
    if logical == "integer":
        return pa.types.is_integer(arrow_type)
    if logical == "list":
        return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
    raise ValueError(logical)


def read_delivery(lake: Lake, path: str, what: str) -> pd.DataFrame:
    """One delivered file, schema-checked; raises LandingError naming the file and column."""
    expected = SCHEMAS[what]
    if lake.fs.size(path) == 0:
        raise LandingError([Problem(path, None, "readable", "empty file (0 bytes)")])
    try:
        with lake.fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same input problem
        raise LandingError([Problem(path, None, "readable", f"not readable as Parquet: {exc}")]) from None
    problems = []
    names = table.schema.names
    for col in expected:
        if col not in names:
            problems.append(Problem(path, col, "schema", "required column is missing"))
    for col in names:
        if col not in expected:
            problems.append(Problem(path, col, "schema", "unexpected column (upstream schema change?)"))
    for col, logical in expected.items():
        if col in names and not _type_ok(table.schema.field(col).type, logical):
            problems.append(Problem(path, col, "type", f"expected {logical}, found {table.schema.field(col).type}"))
    if problems:
        raise LandingError(problems)
    # Integer ids become text here, before any row rule: pandas would read an integer column holding a null
    # as floats ("196.0"), and 1 and "1" would pass the uniqueness rule as two ids.
    for col, logical in expected.items():
        if logical == "string" and pa.types.is_integer(table.schema.field(col).type):
            table = table.set_column(table.schema.get_field_index(col), col, pc.cast(table.column(col), pa.string()))
    return table.to_pandas()


def _read_day(lake: Lake, what: str, day: dt.date) -> tuple[pd.DataFrame, list[str], list[str]]:
    """All files delivered for (what, day); identical re-deliveries are read once."""
    frames, files, duplicates, seen = [], [], [], {}
    for path in delivery_files(lake, what, day):
        with lake.fs.open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        if digest in seen:
            duplicates.append(path)  # the same bytes delivered twice: idempotent, not new data
            continue
        seen[digest] = path
        df = read_delivery(lake, path, what)
        df["_source_file"] = path
        frames.append(df)
        files.append(path)
    if not frames:
        return pd.DataFrame(columns=list(SCHEMAS[what]) + ["_source_file"]), files, duplicates
    return pd.concat(frames, ignore_index=True), files, duplicates


def _row_problems(df: pd.DataFrame, day: dt.date) -> tuple[pd.Series, list[Problem]]:
    """Per-row reasons (empty string = good row) and the problems to report, from the row suite."""
    data = df.drop(columns=["_source_file"]).reset_index(drop=True)
    result = run_suite("raw_rows", f"interactions dt={day}", data,
                       raw_suites.interactions_row_expectations(day), complete=True)
    reasons = pd.Series([""] * len(df), dtype="object")
    problems = []
    first_copy = ~data.duplicated(["user_id", "item_id", "ts"], keep="first")
    for outcome in result.outcomes:
        if outcome.success:
            continue
        rule = raw_suites.RULE_NAMES.get(outcome.expectation, outcome.expectation)
        rows = list(outcome.unexpected_index)
        if rule == "unique":  # keep the first copy of a duplicated row
            rows = [i for i in rows if not first_copy.iloc[i]]
        column = outcome.column or ",".join(outcome.kwargs.get("column_list", []))
        bound = ""
        if rule == "in_range":
            bound = f" ({outcome.kwargs.get('min_value')}..{outcome.kwargs.get('max_value')})"
        for i in rows:
            reasons.iloc[i] = (reasons.iloc[i] + ";" if reasons.iloc[i] else "") + f"{column}:{rule}"
        for path, group in df.iloc[rows].groupby("_source_file"):
            sample = group[outcome.column].head(3).tolist() if outcome.column else group[["user_id", "item_id", "ts"]].head(2).to_dict("records")
            problems.append(Problem(path, column, rule + bound, f"{len(group)} row(s), e.g. {sample}"))
    return reasons, problems


def _land_interactions(cfg: Config, lake: Lake, day: dt.date) -> dict:
    df, files, duplicates = _read_day(lake, "interactions", day)
    if not files:
        raise LandingError([Problem(lake.partition_path("incoming/interactions", day), None, "delivered",
                                    "no delivery for this day (expected at least one Parquet file)")])
    reasons, problems = _row_problems(df, day) if len(df) else (pd.Series([], dtype="object"), [])
    rejected = df[reasons != ""].copy()
    if len(rejected) and cfg.quality.raw_bad_rows_policy == "fail":
        raise LandingError(problems)
    share = cfg.quality.raw_max_rejected_share
    if len(rejected) > share * len(df):
        raise LandingError([Problem(", ".join(files), None, "max_rejected_share",
                                    f"{len(rejected)} of {len(df)} rows rejected, more than the {share:.0%} "
                                    "quarantine allows (an upstream format change?)"), *problems])
    if len(rejected):
        rejected["_reason"] = reasons[reasons != ""]
        lake.write_partition(rejected.astype({c: "string" for c in ("user_id", "item_id")}), REJECTED, day)
    else:  # a re-run after the fix leaves no stale rejects
        lake.delete_partition(REJECTED, day)
    good = schema.normalise_interactions(df[reasons == ""])
    lake.write_partition(good, RAW["interactions"], day)
    return {"rows": len(good), "rejected": len(rejected), "files": files, "duplicate_deliveries": duplicates,
            "problems": [str(p) for p in problems]}


def _land_snapshot(lake: Lake, what: str, day: dt.date) -> int:
    df, files, _ = _read_day(lake, what, day)
    if not files:
        raise LandingError([Problem(lake.partition_path(f"incoming/{what}", day), None, "delivered",
                                    f"no {what} snapshot delivered for this day")])
    if what == "items":
        df["genres"] = df["genres"].map(lambda g: list(g) if g is not None else [])
    result = run_suite("raw_snapshot", f"{what} dt={day}", df.drop(columns=["_source_file"]),
                       raw_suites.users_expectations() if what == "users" else raw_suites.items_expectations())
    if not result.success:
        raise LandingError([Problem(", ".join(files), o.column, raw_suites.RULE_NAMES.get(o.expectation, o.expectation),
                                    o.describe()) for o in result.failed])
    lake.write_partition(NORMALISE[what](df), RAW[what], day)
    return len(df)


def land(cfg: Config, day: str | dt.date) -> dict:
    """Land the deliveries for `day` (all history up to it on an empty lake); returns counts."""
    day = as_date(day)
    lake = lake_of(cfg)
    runs = f"{lake.root}/_runs/dt={day.isoformat()}"
    if lake.fs.exists(runs):  # landing starts every run of a date: its records describe this run only
        lake.fs.rm(runs, recursive=True)
    with timed_step(lake, day, "land") as record:
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
        replay_delivery(cfg, lake, days, snapshot_day=day)
        per_day = {d.isoformat(): _land_interactions(cfg, lake, d) for d in days}
        users = _land_snapshot(lake, "users", day)
        items = _land_snapshot(lake, "items", day)
        record.update({
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
        })
    return record


def run_raw_gate(cfg: Config, day: str | dt.date) -> dict:
    """The raw gate: the full suites on the landed partitions of `day`; raises GateError on failure."""
    day = as_date(day)
    lake = lake_of(cfg)
    with timed_step(lake, day, "raw_gate") as record:
        inter = lake.read_partition(RAW["interactions"], day)
        results = [
            run_suite("raw", f"{RAW['interactions']}/dt={day}", inter,
                      raw_suites.interactions_expectations(day, cfg.scenario.source.max_rows_per_day)),
            run_suite("raw", f"{RAW['users']}/dt={day}", lake.read_partition(RAW["users"], day),
                      raw_suites.users_expectations()),
            run_suite("raw", f"{RAW['items']}/dt={day}", lake.read_partition(RAW["items"], day),
                      raw_suites.items_expectations()),
        ]
        record["gates"] = [r.summary() for r in results]
        record["data_docs"] = keep_validations(lake, day, "raw_gate", results)
        record["success"] = all(r.success for r in results)
        record["no_new_data"] = len(inter) == 0
        record["rows"] = len(inter)
        raise_if_any_failed(results, f"raw gate failed for dt={day.isoformat()}")
    return record
