"""User histories and knowledge windows as of `dt`, plus the accumulated history of window versions.

A user's knowledge window (what the user prompt shows) is chosen by `scenario.knowledge_window`:
`earliest` = the first min((n+1)//2, max_window) interactions (the paper's rule), `recent` = the last
`recent_window_size` before the cut-off. The window only advances when it would change AND at least
`refresh_min_new_interactions` arrived since the last version; a user without a window gets one.
The rule is replayed day by day (at each day's end), so a full build equals the chain of daily runs.

Both outputs are keyed by user and written as changes (`KEYED_DATASETS` in reki_core/storage/lake.py): a
daily run finds the users whose rows can change (`touched_users`), reads only their state as of the previous
day and `raw/interactions` newer than that, and writes only their rows under `dt=D`; everyone else's rows stay
where they are, and a reader of D gets each user's newest rows. A first run (or one with no usable previous
day) writes every user, as a full day. Also reads `features/items` (titles; the previous day's too) and
`raw/users` (profile) of both days. Writes `features/user_history/dt=D` (a user's row, with the counts of the CTR
samples built from it: `with_sample_counts`) and `features/knowledge_versions/dt=D` (all of a user's versions so far).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_jobs.common import cache, empty_frame, releases_cache

DATASET = "features/user_history"
VERSIONS = "features/knowledge_versions"
HISTORY_TYPE = "array<struct<item_id:string,ts:bigint,rating:int>>"
# What a daily run takes of a touched user's previous row (`build_histories`, and the day of the last refresh).
CARRIED = ("user_id", "history", "n_interactions", "window_n", "refreshed_dt")
# And, from rows written with their sample counts (`with_sample_counts`), the earliest version's as_of.
CARRIED_COUNTS = ("knowledge_since", "samples")


@dataclass(frozen=True)
class WindowParams:
    mode: str  # "earliest" | "recent"
    recent_window_size: int
    max_window: int
    refresh_min_new_interactions: int

    @classmethod
    def from_config(cls, cfg) -> "WindowParams":
        s = cfg.scenario
        return cls(s.knowledge_window, s.recent_window_size, s.max_window, s.refresh_min_new_interactions)

    def key_sql(self, n: str) -> str:
        """SQL for what identifies the window of a user with `n` interactions (a change means a new window)."""
        if self.mode == "earliest":
            return f"least(({n} + 1) div 2, {self.max_window})"
        return n  # the last N interactions change with every new one

    def slice_sql(self, history: str, n: str) -> str:
        """SQL slicing the window out of the time-ordered `history` when the user had `n` interactions."""
        if self.mode == "earliest":
            return f"slice({history}, 1, {self.key_sql(n)})"
        size = self.recent_window_size
        return f"slice({history}, greatest({n} - {size}, 0) + 1, least({n}, {size}))"


def window_hash(window_col: str):
    """The window version key: sha256 over its (item_id, ts, rating) entries, in order."""
    return F.sha2(
        F.array_join(F.expr(f"transform({window_col}, e -> concat_ws(':', e.item_id, cast(e.ts as string), cast(e.rating as string)))"), "|"),
        256,
    )


# What build_histories takes of a user's previous row (none before the first day).
PREV_SCHEMA = T.StructType([
    T.StructField("user_id", T.StringType()),
    T.StructField("prev_events", T.ArrayType(T.StructType([T.StructField("ts", T.LongType()), T.StructField("item_id", T.StringType()),
                                                           T.StructField("rating", T.IntegerType())]))),
    T.StructField("prev_n", T.IntegerType()),
    T.StructField("prev_window_n", T.IntegerType()),
])


def build_histories(prev_history: DataFrame | None, new_interactions: DataFrame) -> DataFrame:
    """Per user: full time-ordered history, the day-end interaction counts of the new days, the previous window_n and
    interaction count."""
    day = F.to_date(F.timestamp_seconds("ts"))
    per_day = new_interactions.groupBy("user_id", day.alias("day")).agg(F.count(F.lit(1)).alias("cnt"))
    # Running count at each new day's end (the points where the daily run would have looked): a window sum, linear per user.
    so_far = Window.partitionBy("user_id").orderBy("day").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    per_day = per_day.withColumn("n", F.sum("cnt").over(so_far).cast("int"))
    new = new_interactions.groupBy("user_id").agg(
        F.collect_list(F.struct("ts", "item_id", "rating")).alias("new_events")
    )
    days = per_day.groupBy("user_id").agg(F.sort_array(F.collect_list(F.struct("day", "n"))).alias("day_cnts"))
    new = new.join(days, "user_id")
    if prev_history is None:
        prev = empty_frame(new.sparkSession, PREV_SCHEMA)
    else:
        prev = prev_history.select(
            "user_id",
            F.expr("transform(history, e -> struct(e.ts as ts, e.item_id as item_id, e.rating as rating))").alias("prev_events"),
            F.col("n_interactions").cast("int").alias("prev_n"),
            F.col("window_n").cast("int").alias("prev_window_n"),
        )
    both = prev.join(new, "user_id", "full_outer")
    merged = F.sort_array(
        F.concat(
            F.coalesce("prev_events", F.array().cast("array<struct<ts:bigint,item_id:string,rating:int>>")),
            F.coalesce("new_events", F.array().cast("array<struct<ts:bigint,item_id:string,rating:int>>")),
        )
    )
    # Most users have no new events on a given day: their stored history is already in order.
    events = F.when(F.col("new_events").isNull(), F.col("prev_events")).otherwise(merged)
    base = F.coalesce(F.col("prev_n"), F.lit(0))
    day_counts = F.coalesce("day_cnts", F.array().cast("array<struct<day:date,n:int>>"))
    return both.select(
        "user_id",
        F.transform(events, lambda e: F.struct(e["item_id"].alias("item_id"), e["ts"].alias("ts"), e["rating"].alias("rating"))).alias("history"),
        F.transform(day_counts, lambda x: F.struct(x["day"].alias("day"), (x["n"] + base).cast("int").alias("n"))).alias("day_counts"),
        "prev_window_n",
        "prev_n",  # null for a user new to the state: the run-log totals count what a run changed
    )


def advance_windows(histories: DataFrame, params: WindowParams) -> DataFrame:
    """Adds `new_versions` (array<struct<day, n>>: where the window advanced), `window_n`, `window`, `as_of`, hash."""
    k = params.refresh_min_new_interactions
    step = (
        f"(acc, x) -> IF(acc.last_n IS NULL OR (x.n - acc.last_n >= {k} AND "
        f"{params.key_sql('x.n')} != {params.key_sql('acc.last_n')}), "
        "named_struct('last_n', x.n, 'versions', concat(acc.versions, array(x))), acc)"
    )
    replay = (
        "aggregate(day_counts, named_struct('last_n', prev_window_n, "
        "'versions', cast(array() as array<struct<day:date,n:int>>)), " + step + ")"
    )
    out = histories.withColumn("_replay", F.expr(replay))
    out = out.withColumn("new_versions", F.col("_replay.versions")).withColumn("window_n", F.col("_replay.last_n"))
    out = out.withColumn("n_interactions", F.size("history").cast("int"))
    out = out.withColumn("window", F.expr(params.slice_sql("history", "window_n")))
    return out.withColumn("as_of", F.try_element_at("window", F.lit(-1))["ts"]).withColumn("window_hash", window_hash("window")).drop("_replay")


def version_rows(advanced: DataFrame, params: WindowParams) -> DataFrame:
    """One row per window version made in this run: user_id, window_n, window_size, as_of, window_hash, version_dt."""
    # Slice each version's window inside the row, then explode the small windows: exploding next to the full
    # history would copy it once per version (quadratic for heavy users).
    windows = F.expr(
        "transform(new_versions, v -> named_struct('day', v.day, 'n', v.n, 'w', " + params.slice_sql("history", "v.n") + "))"
    )
    v = advanced.select("user_id", F.explode(windows).alias("v")).select("user_id", "v.day", "v.n", "v.w")
    return v.select(
        "user_id",
        F.col("n").alias("window_n"),
        F.size("w").cast("int").alias("window_size"),
        F.try_element_at("w", F.lit(-1))["ts"].alias("as_of"),
        window_hash("w").alias("window_hash"),
        F.col("day").alias("version_dt"),
    )


def attach_titles_and_profile(advanced: DataFrame, items: DataFrame, users: DataFrame | None) -> DataFrame:
    """The user_history rows: the window's entries get title and year (null when the item has no metadata)."""
    entries = advanced.select("user_id", F.posexplode("window").alias("pos", "e"))
    entries = entries.join(F.broadcast(items.select("item_id", "title", "year")), entries["e.item_id"] == items["item_id"], "left")
    windows = entries.groupBy("user_id").agg(
        F.sort_array(
            F.collect_list(F.struct("pos", F.struct(F.col("e.item_id").alias("item_id"), F.col("e.ts").alias("ts"),
                                                     F.col("e.rating").alias("rating"), "title", "year").alias("entry")))
        ).alias("_entries")
    )
    rows = advanced.drop("window").join(windows, "user_id", "left").withColumn(
        "window", F.transform("_entries", lambda x: x["entry"])
    )
    if users is not None:
        rows = rows.join(users.select("user_id", F.col("age").cast("int"), "gender", "occupation"), "user_id", "left")
    else:
        rows = rows.withColumn("age", F.lit(None).cast("int")).withColumn("gender", F.lit(None).cast("string")).withColumn(
            "occupation", F.lit(None).cast("string"))
    last_version_dt = F.try_element_at("new_versions", F.lit(-1))["day"]
    return rows.select(
        "user_id",
        "n_interactions",
        "history",
        "window",
        F.size("window").cast("int").alias("window_size"),
        F.col("window_n").cast("int").alias("window_n"),
        "as_of",
        "window_hash",
        (F.size("new_versions") > 0).alias("needs_refresh"),
        last_version_dt.alias("refreshed_dt"),
        "age",
        "gender",
        "occupation",
    )


def advance(prev_history: DataFrame | None, new_interactions: DataFrame, params: WindowParams) -> DataFrame:
    """Every user's history and window as of the newest day given (both outputs are built from this)."""
    return advance_windows(build_histories(prev_history, new_interactions), params)


def with_sample_counts(history: DataFrame, since: DataFrame, positive_threshold: int) -> DataFrame:
    """The rows with what each user contributes to `features/ctr_samples` built from them: `knowledge_since`, the as_of
    of the user's earliest window version (`since`: `earliest_versions`); `samples`, the interactions after it (an
    interaction is a sample when a version is strictly older: ctr_samples' as-of rule); `positive_samples`, those rated
    above `positive_threshold` (its label)."""
    after = "e.ts > knowledge_since"  # null (no version yet) counts nothing
    return history.join(since, "user_id", "left").select(
        "*",
        F.expr(f"size(filter(history, e -> {after}))").cast("int").alias("samples"),
        F.expr(f"size(filter(history, e -> {after} AND e.rating > {int(positive_threshold)}))").cast("int")
        .alias("positive_samples"),
    )


def earliest_versions(versions: DataFrame, prev_since: DataFrame | None = None) -> DataFrame:
    """Per user, `knowledge_since`: the as_of of the earliest of `versions`, or of the versions summed up by `prev_since`
    (user_id, knowledge_since: the previous rows' own, so that a daily run needs only its new versions, not every
    version of its users again)."""
    since = versions.groupBy("user_id").agg(F.min("as_of").alias("knowledge_since"))
    if prev_since is None:
        return since
    before = prev_since.select("user_id", F.col("knowledge_since").alias("_before"))
    return since.join(before, "user_id", "full_outer").select(
        "user_id", F.least("knowledge_since", "_before").alias("knowledge_since"))  # least() skips a null


def outputs(
    advanced: DataFrame,
    prev_history: DataFrame | None,
    prev_versions: DataFrame | None,
    items: DataFrame,
    users: DataFrame | None,
    params: WindowParams,
    positive_threshold: int,
    prev_since: DataFrame | None = None,
) -> tuple[DataFrame, DataFrame]:
    """(user_history, knowledge_versions) from the advanced windows. `prev_since` (user_id, knowledge_since), the
    previous rows' earliest versions where every one of them has its counts: then only the new versions are read for
    them (`earliest_versions`)."""
    new_versions = version_rows(advanced, params)
    versions = new_versions if prev_versions is None else prev_versions.select(*new_versions.columns).unionByName(new_versions)
    since = earliest_versions(versions) if prev_since is None else earliest_versions(new_versions, prev_since)
    history = attach_titles_and_profile(advanced, items, users)
    if prev_history is not None:
        # A user whose window did not advance keeps the day it was last refreshed.
        history = history.join(prev_history.select("user_id", F.col("refreshed_dt").alias("_prev_refreshed")), "user_id", "left")
        history = history.withColumn("refreshed_dt", F.coalesce("refreshed_dt", "_prev_refreshed")).drop("_prev_refreshed")
    return with_sample_counts(history, since, positive_threshold), versions


def transform(
    prev_history: DataFrame | None,
    prev_versions: DataFrame | None,
    new_interactions: DataFrame,
    items: DataFrame,
    users: DataFrame | None,
    params: WindowParams,
    positive_threshold: int,
    prev_since: DataFrame | None = None,
) -> tuple[DataFrame, DataFrame]:
    """(user_history, knowledge_versions) as of the newest interaction day given (`outputs` for `prev_since`)."""
    return outputs(advance(prev_history, new_interactions, params), prev_history, prev_versions, items, users, params,
                   positive_threshold, prev_since)


def touched_users(spark, lake, day, prev_day, new_interactions: DataFrame) -> DataFrame:
    """The users whose rows may differ from the previous day's, one row each (`user_id`).

    New interactions, a profile change, or an item of the window whose metadata changed or vanished (titles
    are shown in the window). Anyone else's rows are the previous day's, unchanged: a refresh flagged
    yesterday falls back by itself (`DAY_FLAGS`). The small user and item tables are compared in the
    driver: the usual day costs a scan of its interactions.
    """
    from spark_jobs.common import read_partition, values_frame

    users = new_interactions.select("user_id")
    reprofiled = profile_changes(lake, day, prev_day)
    if reprofiled:
        users = users.unionByName(values_frame(spark, "user_id", reprofiled))
    changed = changed_items(lake, day, prev_day)
    if changed:  # rare: only then are the previous windows scanned
        shown = read_partition(spark, lake, DATASET, prev_day).select("user_id", F.explode("window.item_id").alias("item_id"))
        changed_df = F.broadcast(values_frame(spark, "item_id", changed))
        users = users.unionByName(shown.join(changed_df, "item_id", "left_semi").select("user_id"))
    return users.distinct()


def profile_changes(lake, day, prev_day) -> list[str]:
    """user_id of every user whose profile differs between the two days' `raw/users` (added or dropped too)."""
    profile = ["user_id", "age", "gender", "occupation"]
    snapshots = [lake.read_partition("raw/users", d, profile) if lake.has_partition("raw/users", d) else None
                 for d in (day, prev_day)]
    present = [s for s in snapshots if s is not None]
    if not present:
        return []
    if len(present) == 1:  # a profile snapshot appeared or went missing: every profile in it changed
        return sorted(set(present[0]["user_id"].astype(str)))
    both = pd.concat([s.astype({"user_id": str, "age": "Int64"}) for s in present], ignore_index=True)
    return sorted(set(both.drop_duplicates(keep=False)["user_id"]))


def changed_items(lake, day, prev_day) -> list[str]:
    """item_id of every item whose metadata changed since the previous day, or that vanished from the items."""
    now = lake.read_partition("features/items", day, ["item_id", "needs_refresh"])
    before = lake.read_partition("features/items", prev_day, ["item_id"])
    return sorted(set(now.loc[now["needs_refresh"], "item_id"]) | (set(before["item_id"]) - set(now["item_id"])))


def previous_state(lake, day):
    """The day whose state a daily run of `day` builds on, or None: rebuild from the raw history (no previous day,
    or one whose outputs or items are missing)."""
    from spark_jobs.common import previous_day

    prev_day = previous_day(lake, DATASET, day)
    if prev_day is None or not (lake.has_partition(VERSIONS, prev_day) and lake.has_partition("features/items", prev_day)):
        return None
    return prev_day


@releases_cache
def run(spark, cfg, lake, day) -> dict:
    from spark_jobs.common import STATE_ORDER, read_interactions, read_partition, totals_source, write_partition

    params = WindowParams.from_config(cfg)
    prev_day = previous_state(lake, day)
    new_interactions = read_interactions(spark, lake, prev_day, day)
    items = read_partition(spark, lake, "features/items", day)
    users = read_partition(spark, lake, "raw/users", day) if lake.has_partition("raw/users", day) else None
    prev_since = None
    if prev_day is None:
        prev_history = prev_versions = None
    else:
        # Only the touched users are recomputed and written; the others' rows stay as they are. Their previous rows
        # are few, and read twice (the histories, the refresh day): scanned once, and only the columns a run
        # carries forward (the scan decodes every user's row: the wide `window` would cost as much as `history`).
        touched = cache(touched_users(spark, lake, day, prev_day, new_interactions))
        counted = set(CARRIED_COUNTS) <= set(lake.column_names(DATASET))
        prev_history = cache(read_partition(spark, lake, DATASET, prev_day, only_keys=touched)
                             .select(*CARRIED, *(CARRIED_COUNTS if counted else ())))
        prev_versions = read_partition(spark, lake, VERSIONS, prev_day, only_keys=touched)
    # Both outputs derive from the advanced windows: compute them once.
    advanced = cache(advance(prev_history, new_interactions, params))
    change = run_changes(advanced, params)  # the first action: it fills the caches
    if prev_history is not None and counted and prev_history.where(F.col("samples").isNull()).isEmpty():
        # Every previous row has its counts (none predates them): its knowledge_since sums up its versions.
        prev_since = prev_history.select("user_id", "knowledge_since")
    history, versions = outputs(advanced, prev_history, prev_versions, items, users, params,
                                cfg.scenario.positive_rating_threshold, prev_since)
    changes = prev_day is not None
    write_partition(versions.repartition("user_id").sortWithinPartitions(*STATE_ORDER[VERSIONS]), lake, VERSIONS, day,
                    changes_only=changes)
    before = lake.state_totals(DATASET, prev_day) if changes else STATE_TOTALS_BEFORE_FIRST_DAY
    # Called once the rows are written: an aggregate of the state needs them (and the day recorded).
    write_partition(history.repartition("user_id").sortWithinPartitions(*STATE_ORDER[DATASET]), lake, DATASET, day,
                    changes_only=changes, totals=lambda: aggregated_totals(spark, lake, day, params)
                    if before is None else carried_totals(before, change), totals_read_the_day=before is None)
    return {
        **lake.state_totals(DATASET, day),
        "totals_from": totals_source(prev_day, before),
        "knowledge_window": params.mode,
        "incremental_from": prev_day.isoformat() if prev_day else None,
        "users_written": change["users_written"],
    }


# The run-log totals over the state as of a day (`TOTALS_PROPERTY`): before the first day, nothing.
STATE_TOTALS_BEFORE_FIRST_DAY = {"users": 0, "dirty_users": 0, "interactions": 0, "users_shorter_than_max_window": 0,
                                 "knowledge_versions": 0}


def run_changes(advanced: DataFrame, params: WindowParams) -> dict:
    """What this run changes in the totals, from its written users' rows before (`prev_n`) and after: a small
    aggregate of the cached, advanced rows."""
    mw = params.max_window
    before = F.col("prev_n")
    row = advanced.agg(
        F.count(F.lit(1)).alias("users_written"),
        F.sum(before.isNull().cast("int")).alias("new_users"),
        (F.sum("n_interactions") - F.sum(F.coalesce(before, F.lit(0)))).alias("new_interactions"),
        # A new user's `before < mw` is null; coalesce, else a day of only new users (a full build) sums to null.
        (F.sum((F.col("n_interactions") < mw).cast("int"))
         - F.sum(F.coalesce(before < mw, F.lit(False)).cast("int"))).alias("shorter_change"),
        F.sum((F.size("new_versions") > 0).cast("int")).alias("refreshed_users"),
        F.sum(F.size("new_versions")).alias("new_versions"),
    ).first()
    return {key: int(row[key] or 0) for key in row.asDict()}


def carried_totals(before: dict, change: dict) -> dict:
    """The totals as of this run's day: the previous day's plus what this run changed. Only this run's rows carry
    `needs_refresh` (a day flag), so its refreshed users are the day's dirty users; versions are only ever added."""
    return {
        "users": before["users"] + change["new_users"],
        "dirty_users": change["refreshed_users"],
        "interactions": before["interactions"] + change["new_interactions"],
        "users_shorter_than_max_window": before["users_shorter_than_max_window"] + change["shorter_change"],
        "knowledge_versions": before["knowledge_versions"] + change["new_versions"],
    }


def aggregated_totals(spark, lake, day, params: WindowParams) -> dict:
    """The totals aggregated over the whole state as of `day` (its narrow columns): when the previous day recorded
    none to carry (a lake written before totals were recorded, or a day another writer replaced)."""
    from spark_jobs.common import read_partition

    state = read_partition(spark, lake, DATASET, day).select("n_interactions", "needs_refresh")
    totals = state.agg(
        F.count(F.lit(1)).alias("users"),
        F.sum(F.col("needs_refresh").cast("int")).alias("dirty_users"),
        F.sum("n_interactions").alias("interactions"),
        F.sum((F.col("n_interactions") < params.max_window).cast("int")).alias("users_shorter_than_max_window"),
    ).first()
    versions = read_partition(spark, lake, VERSIONS, day).select("user_id").count()
    return {**{k: int(totals[k] or 0) for k in ("users", "dirty_users", "interactions", "users_shorter_than_max_window")},
            "knowledge_versions": versions}


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, "features_user_history", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
