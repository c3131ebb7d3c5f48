"""The feature gate's rules, evaluated over every row in Spark so the gate reads only what this job records.

Reads day D of `features/items`, the `features/user_history` state's user ids, the rows of `features/user_history`
and `features/ctr_samples` written on D (a keyed dataset's changes; every row on a full day) and, where it exists,
`features/clusters`; evaluates the item rules (ids present and unique, popularity not negative, a metadata hash),
the user history rules (one row per user, history in time order and as long as its count, the window cut by the
scenario's rule and ending at `as_of`), the sample rules (unique keys, knowledge older than the sample, history
length, a known split) and the group rules (each group within its clustering's size bound; every item and every user
assigned exactly once in each clustering, and nothing else assigned), and records in its run record
(`_runs/dt=D/feature_checks.json`, `checks`) the counts per rule, a few offending rows or keys, the clusterings
present, the users and items counted (the extraction mode) and a fingerprint of each partition (or day's rows)
checked. `reki_core.quality.features.run_feature_gates` runs its expectations on those.
"""

from __future__ import annotations

import sys

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from reki_core.quality.features import (CLUSTERINGS, CLUSTERS, CTR_SAMPLES, DAY_FINGERPRINTED, FINGERPRINTED,
                                        GROUP_RULE, HISTORY_COLUMNS, HISTORY_OFFENDER_RULES, HISTORY_RULES,
                                        ITEM_COLUMNS, ITEM_RULES, ITEMS, MEMBER_RULE, SAMPLE_COLUMNS, SAMPLE_RULES,
                                        SPLITS, STEP, USER_HISTORY, max_window_len)
from spark_jobs.checks import fingerprint, rule_checks
from spark_jobs.common import cache, read_day_changes, releases_cache

CLUSTERINGS_SHOWN = 20  # distinct clusterings recorded (three are expected)


def item_flags(items: DataFrame) -> DataFrame:
    """`features/items` with the item rules' flags (true: the row breaks the rule), as the gate's suite reads them:
    a null popularity is not checked (GX skips nulls), a null id is not a duplicate."""
    same_id = F.count(F.lit(1)).over(Window.partitionBy("item_id"))
    flags = {
        "item_id_not_null": F.col("item_id").isNull(),
        "item_id_unique": F.col("item_id").isNotNull() & (same_id > 1),
        "popularity_not_negative": F.coalesce(F.col("popularity") < 0, F.lit(False)),
        "metadata_hash_not_null": F.col("metadata_hash").isNull(),
    }
    assert set(flags) == set(ITEM_RULES), "every item rule of the gate has its flag"
    return items.select(*ITEM_COLUMNS).select("*", *[flag.alias(f"_{rule}") for rule, flag in flags.items()])


def _length(column: str) -> F.Column:
    """An array's length, 0 for a null array (`size` gives -1 or null for one, by the ANSI setting)."""
    return F.when(F.col(column).isNull(), F.lit(0)).otherwise(F.size(column))


def _out_of_order() -> F.Column:
    """Entries not in (ts, item_id) order (the full-timestamp order with the item-id tie-break); a null breaks it. A
    function, not a module constant: a classic session needs its context to build a column."""
    return F.expr(
        "CASE WHEN size(history) > 1 THEN coalesce(exists(sequence(1, size(history) - 1), i -> "
        "history[i - 1].ts > history[i].ts OR (history[i - 1].ts = history[i].ts AND history[i - 1].item_id > "
        "history[i].item_id)), true) ELSE false END")


def history_flags(history: DataFrame, cfg) -> DataFrame:
    """The user_history rows with HISTORY_COLUMNS (an offender column holds the user_id of a row that breaks its
    rule) and the rules' flags."""
    s = cfg.scenario
    window_len = _length("window")
    if s.knowledge_window == "earliest":  # the first (n + 1) // 2, at most max_window
        by_rule = F.least(F.expr("(window_n + 1) div 2"), F.lit(s.max_window))
    else:  # the last recent_window_size
        by_rule = F.least(F.col("window_n"), F.lit(s.recent_window_size))
    last_ts = F.when(window_len > 0, F.expr("window[size(window) - 1].ts"))
    same_user = F.count(F.lit(1)).over(Window.partitionBy("user_id"))
    broken = {
        "history_not_in_time_order": _out_of_order(),
        "history_len_not_n_interactions": ~F.coalesce(_length("history") == F.col("n_interactions"), F.lit(False)),
        "window_len_not_by_rule": ~F.coalesce(window_len == by_rule, F.lit(False)),
        "as_of_not_last_window_ts": ~F.coalesce(last_ts == F.col("as_of"), F.lit(False)),
    }
    assert tuple(broken) == HISTORY_OFFENDER_RULES, "every offender rule of the gate has its flag"
    flags = {
        "user_id_unique": F.col("user_id").isNotNull() & (same_user > 1),
        "window_len_in_bounds": (window_len < 1) | (window_len > max_window_len(cfg)),
        **broken,
    }
    assert set(flags) == set(HISTORY_RULES), "every user history rule of the gate has its flag"
    user = F.col("user_id").cast("string")
    columns = {"user_id": user, "window_len": window_len, **{rule: F.when(flag, user) for rule, flag in broken.items()}}
    assert list(columns) == HISTORY_COLUMNS
    return history.select(*[c.alias(name) for name, c in columns.items()],
                          *[flag.alias(f"_{rule}") for rule, flag in flags.items()])


def sample_flags(samples: DataFrame, cfg) -> DataFrame:
    """The ctr_samples rows with SAMPLE_COLUMNS and the rules' flags, as the gate's suite reads them (a null split is
    not checked: GX skips nulls)."""
    before = F.coalesce(F.col("knowledge_as_of") < F.col("ts"), F.lit(False))
    hist_len = _length("hist_item_ids")
    same_key = F.count(F.lit(1)).over(Window.partitionBy("user_id", "item_id", "ts"))
    flags = {
        "sample_key_unique": same_key > 1,
        "knowledge_not_before_sample": ~before,
        "hist_len_out_of_bounds": hist_len > cfg.scenario.max_hist_len,
        "split_unknown": F.coalesce(~F.col("split").isin(*SPLITS), F.lit(False)),
    }
    assert set(flags) == set(SAMPLE_RULES), "every sample rule of the gate has its flag"
    columns = {"user_id": F.col("user_id").cast("string"), "item_id": F.col("item_id").cast("string"),
               "ts": F.col("ts"), "split": F.col("split"), "knowledge_before_sample": before, "hist_len": hist_len}
    assert list(columns) == SAMPLE_COLUMNS
    return samples.select(*[c.alias(name) for name, c in columns.items()],
                          *[flag.alias(f"_{rule}") for rule, flag in flags.items()])


def group_flags(clusters: DataFrame, cfg) -> DataFrame:
    """One row per group (clustering, group_id), with `_group_over_size_bound` and the group's key
    `clustering:group_id (size)`."""
    s = cfg.scenario
    sizes = clusters.where(F.col("clustering").isNotNull() & F.col("group_id").isNotNull()).groupBy(
        "clustering", "group_id").agg(F.count(F.lit(1)).alias("group_size"))
    bound = F.when(F.col("clustering") == F.lit("item"), F.lit(s.max_group_size_items)).otherwise(
        F.lit(s.max_group_size_users))
    key = F.concat(F.col("clustering"), F.lit(":"), F.col("group_id"), F.lit(" ("),
                   F.col("group_size").cast("string"), F.lit(")"))
    over = F.col("group_size") > bound
    return sizes.select("clustering", "group_id", over.alias(f"_{GROUP_RULE}"), F.when(over, key).alias(GROUP_RULE))


def member_flags(clusters: DataFrame, item_ids: DataFrame, user_ids: DataFrame) -> DataFrame:
    """One row per expected or assigned (clustering, entity_id): `_not_assigned_exactly_once` where an expected entity
    is assigned other than once or an assigned one is not expected, with its key `clustering:entity_id`."""
    expected = item_ids.select(F.lit("item").alias("clustering"), F.col("item_id").alias("entity_id"))
    for clustering in [c for c in CLUSTERINGS if c != "item"]:  # the user clusterings
        expected = expected.unionByName(user_ids.select(F.lit(clustering).alias("clustering"),
                                                        F.col("user_id").alias("entity_id")))
    expected = expected.where(F.col("entity_id").isNotNull()).distinct().withColumn("_expected", F.lit(True))
    counts = clusters.where(F.col("clustering").isNotNull() & F.col("entity_id").isNotNull()).groupBy(
        "clustering", "entity_id").agg(F.count(F.lit(1)).alias("assignments"))
    merged = expected.join(counts, ["clustering", "entity_id"], "full_outer")
    once = F.coalesce(F.col("_expected"), F.lit(False)) & F.coalesce(F.col("assignments") == 1, F.lit(False))
    key = F.concat(F.col("clustering"), F.lit(":"), F.col("entity_id"))
    return merged.select("clustering", "entity_id", (~once).alias(f"_{MEMBER_RULE}"), F.when(~once, key).alias(MEMBER_RULE))


def cluster_checks(clusters: DataFrame, item_ids: DataFrame, user_ids: DataFrame, cfg) -> dict:
    """rows; the group rule (`groups`) and the membership rule (`members`), counts and offending keys; the
    clusterings present."""
    groups = rule_checks(group_flags(clusters, cfg), [GROUP_RULE], ["clustering", GROUP_RULE],
                         ["clustering", "group_id"])
    members = rule_checks(member_flags(clusters, item_ids, user_ids), [MEMBER_RULE],
                          [MEMBER_RULE], ["clustering", "entity_id"])
    present = clusters.where(F.col("clustering").isNotNull() & F.col("group_id").isNotNull()).select(
        "clustering").distinct().orderBy("clustering").limit(CLUSTERINGS_SHOWN).collect()
    return {"rows": clusters.count(), "groups": groups, "members": members,
            "clusterings": [r["clustering"] for r in present]}


def strings(df: DataFrame, *columns: str) -> DataFrame:
    return df.select(*[F.col(c).cast("string").alias(c) if c in columns else F.col(c) for c in df.columns])


@releases_cache
def run(spark, cfg, lake, day) -> dict:
    from spark_jobs.common import read_partition

    items = cache(strings(read_partition(spark, lake, ITEMS, day), "item_id", "metadata_hash"))
    users = cache(strings(read_partition(spark, lake, USER_HISTORY, day).select("user_id"), "user_id"))
    found = rule_checks(item_flags(items), ITEM_RULES, ITEM_COLUMNS, ["item_id"])
    checks = {"items": {"rows": items.count(), **found}, "users": users.count(), "clusters": None,
              "fingerprint": {ITEMS: fingerprint(items, FINGERPRINTED[ITEMS]), CLUSTERS: None}}
    checks["day_fingerprint"] = {}
    for dataset, flagged, rules, columns, order in (
            (USER_HISTORY, history_flags, HISTORY_RULES, HISTORY_COLUMNS, ["user_id"]),
            (CTR_SAMPLES, sample_flags, SAMPLE_RULES, SAMPLE_COLUMNS, ["user_id", "item_id", "ts"])):
        if not lake.has_partition(dataset, day):
            raise FileNotFoundError(f"lake partition missing: {lake.describe(dataset, day)}")
        # Not cached: a first load's day is every row, arrays and all (at 4M interactions the cache stopped a 2 GB
        # server). The flags are cached narrow (`rule_checks`); the count and fingerprint read their columns only.
        rows = read_day_changes(spark, lake, dataset, day)
        found = rule_checks(flagged(rows, cfg), rules, columns, order)
        checks["day_fingerprint"][dataset] = fingerprint(rows, DAY_FINGERPRINTED[dataset])  # counts the rows too
        checks[dataset.rsplit("/", 1)[-1]] = {"rows": checks["day_fingerprint"][dataset]["rows"], **found}
    if lake.has_partition(CLUSTERS, day):
        clusters = cache(strings(read_partition(spark, lake, CLUSTERS, day), "clustering", "entity_id", "group_id"))
        checks["clusters"] = cluster_checks(clusters, items.select("item_id"), users, cfg)
        checks["fingerprint"][CLUSTERS] = fingerprint(clusters, FINGERPRINTED[CLUSTERS])
    return {"items": checks["items"]["rows"], "users": checks["users"], "checks": checks}


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, STEP, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
