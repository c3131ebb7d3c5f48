"""The feature gate's rules on the datasets it would otherwise read whole: `features/items` and `features/clusters`.

Reads day D of `features/items`, the `features/user_history` state's user ids and, where it exists,
`features/clusters`; evaluates the item rules (ids present and unique, popularity not negative, a metadata hash) and
the group rules (each group within its clustering's size bound; every item and every user assigned exactly once in
each clustering, and nothing else assigned), and records in its run record (`_runs/dt=D/feature_checks.json`,
`checks`) the counts per rule, a few offending rows or keys, the clusterings present, the users and items counted
(the extraction mode) and a fingerprint of each partition checked. `reki_core.quality.features.run_feature_gates`
runs its expectations on those; the keyed datasets' row rules it checks on the day's changes itself.
"""

from __future__ import annotations

import sys

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from reki_core.quality.features import (CLUSTERINGS, CLUSTERS, FINGERPRINTED, GROUP_RULE, ITEM_COLUMNS, ITEM_RULES,
                                        ITEMS, MEMBER_RULE, STEP, USER_HISTORY)
from spark_jobs.checks import fingerprint, rule_checks
from spark_jobs.common import cache, releases_cache

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
