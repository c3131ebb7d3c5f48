"""CTR samples as of `dt`, joined point in time with the user's knowledge window versions.

A sample is one interaction at time t. It joins the newest window version of its user whose `as_of`
is strictly before t (an as-of join done as one ordered scan per user, not a range join), so the
knowledge it carries never shows that interaction or anything after it. Interactions with no earlier
version (the first window's own interactions, and anything at or before its `as_of`) give no sample.

A user's samples depend only on the user's history and window versions and on the genres of the items
in it. A daily run therefore recomputes only the users with new interactions (new versions come only with
those) or with an item whose genre changed, and carries every other user's rows from the previous
partition. Like the knowledge windows, that assumes unchanged sample parameters (`max_hist_len`, the
threshold, the split fractions): after changing one, rebuild from the first affected date.

Reads `features/user_history/dt=D` (histories), `features/knowledge_versions/dt=D`, `features/items/dt=D`,
and for a daily run the previous `features/ctr_samples` partition with its `user_history` and `items`.
Writes `features/ctr_samples/dt=D` (every sample up to D; a user stays in one split every day).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

DATASET = "features/ctr_samples"
UNKNOWN_GENRE = "unknown"


@dataclass(frozen=True)
class SampleParams:
    max_hist_len: int
    positive_rating_threshold: int
    split_fractions: tuple[float, float, float]

    @classmethod
    def from_config(cls, cfg) -> "SampleParams":
        s = cfg.scenario
        return cls(s.max_hist_len, s.positive_rating_threshold, tuple(s.split_fractions))


def split_of(user_id, fractions: tuple[float, float, float]):
    """train/valid/test from the first 32 bits of sha256(user_id): stable across days, runs and engines."""
    unit = F.conv(F.substring(F.sha2(user_id, 256), 1, 8), 16, 10).cast("double") / float(16**8)
    return (
        F.when(unit < fractions[0], F.lit("train"))
        .when(unit < fractions[0] + fractions[1], F.lit("valid"))
        .otherwise(F.lit("test"))
    )


def transform(
    user_history: DataFrame, versions: DataFrame, items: DataFrame, params: SampleParams, ordered: bool = True
) -> DataFrame:
    """The samples; in (user_id, ts, item_id) order unless `ordered` is False (the caller orders a union)."""
    L = params.max_hist_len
    genres = F.broadcast(items.select("item_id", F.col("first_genre").alias("genre")))
    events = (
        user_history.select("user_id", F.posexplode("history").alias("pos", "e"))
        .select("user_id", "pos", F.col("e.item_id").alias("item_id"), F.col("e.ts").alias("ts"), F.col("e.rating").alias("rating"))
        .join(genres, "item_id", "left")
        .withColumn("genre", F.coalesce("genre", F.lit(UNKNOWN_GENRE)))
    )
    # As-of join: versions sort after samples at equal time, so a version is visible only when as_of < ts.
    stream = events.select(
        "user_id", F.col("ts").alias("t"), F.lit(0).alias("kind"), "pos", "item_id", "genre", "ts", "rating",
        F.lit(None).cast("long").alias("v_as_of"), F.lit(None).cast("string").alias("v_hash"), F.lit(None).cast("int").alias("v_n"),
    ).unionByName(
        versions.select(
            "user_id", F.col("as_of").alias("t"), F.lit(1).alias("kind"), F.lit(None).cast("int").alias("pos"),
            F.lit(None).cast("string").alias("item_id"), F.lit(None).cast("string").alias("genre"), F.lit(None).cast("long").alias("ts"),
            F.lit(None).cast("int").alias("rating"), F.col("as_of").alias("v_as_of"), F.col("window_hash").alias("v_hash"),
            F.col("window_n").cast("int").alias("v_n"),
        )
    )
    if ordered:  # one shuffle, of the narrow rows: both windows and the final user order reuse this range partitioning
        stream = stream.repartitionByRange("user_id")
    w = Window.partitionBy("user_id").orderBy("t", "kind", "v_n").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    joined = (
        stream.withColumn("knowledge_as_of", F.last("v_as_of", ignorenulls=True).over(w))
        .withColumn("knowledge_window_hash", F.last("v_hash", ignorenulls=True).over(w))
        .withColumn("knowledge_window_n", F.last("v_n", ignorenulls=True).over(w))
        .where(F.col("kind") == 0)
    )
    # The previous L interactions of the user (a sliding frame, not a map lookup: map lookups scan linearly).
    previous = Window.partitionBy("user_id").orderBy("pos").rowsBetween(-L, -1)
    joined = joined.withColumn("hist", F.collect_list(F.struct("item_id", "genre", "rating")).over(previous))
    # pos follows (ts, item_id): sorting by it within the user-ranged partitions gives the global (user_id, ts, item_id) order.
    joined = joined.where(F.col("knowledge_as_of").isNotNull())
    if ordered:
        joined = joined.sortWithinPartitions("user_id", "pos")
    hist = F.col("hist")
    return joined.select(
        "user_id",
        "item_id",
        "ts",
        "rating",
        (F.col("rating") > params.positive_rating_threshold).cast("tinyint").alias("label"),
        F.col("genre").alias("item_genre"),
        F.transform(hist, lambda e: e["item_id"]).alias("hist_item_ids"),
        F.transform(hist, lambda e: e["genre"]).alias("hist_genres"),
        F.transform(hist, lambda e: e["rating"]).alias("hist_ratings"),
        split_of(F.col("user_id"), params.split_fractions).alias("split"),
        # Filled downstream: prompts/ rows of kind `user` carry `window_hash`; join on (user_id, window_hash).
        F.lit(None).cast("string").alias("knowledge_prompt_hash"),
        "knowledge_as_of",
        "knowledge_window_hash",
        "knowledge_window_n",
    )


def item_genres(items: DataFrame) -> DataFrame:
    """item_id, genre: the genre a sample shows for the item."""
    return items.select("item_id", F.coalesce("first_genre", F.lit(UNKNOWN_GENRE)).alias("genre"))


def dirty_users(history: DataFrame, items: DataFrame, prev_history: DataFrame, prev_items: DataFrame) -> DataFrame:
    """user_id of every user whose samples may differ from the previous day's: new interactions, or a re-genred item."""
    prev_n = prev_history.select("user_id", F.col("n_interactions").alias("prev_n"))
    grown = history.select("user_id", "n_interactions").join(prev_n, "user_id", "left").where(
        F.col("prev_n").isNull() | (F.col("prev_n") != F.col("n_interactions"))
    )
    # Items missing on one side show the unknown genre there (a sample of an item without metadata shows it too).
    was = item_genres(prev_items).withColumnRenamed("genre", "was")
    changed = item_genres(items).join(was, "item_id", "full_outer").where(
        F.coalesce("genre", F.lit(UNKNOWN_GENRE)) != F.coalesce("was", F.lit(UNKNOWN_GENRE))
    ).select("item_id")
    rated = history.select("user_id", F.explode("history.item_id").alias("item_id"))
    touched = rated.join(F.broadcast(changed), "item_id").select("user_id")
    return grown.select("user_id").unionByName(touched).distinct()


def incremental_transform(
    history: DataFrame, versions: DataFrame, items: DataFrame, dirty: DataFrame, previous: DataFrame, params: SampleParams
) -> DataFrame:
    """The samples as of today: `dirty` users recomputed, every other user's rows carried from `previous`."""
    fresh = transform(history.join(dirty, "user_id", "left_semi"), versions.join(dirty, "user_id", "left_semi"), items, params,
                      ordered=False)
    carried = previous.join(dirty, "user_id", "left_anti").select(*fresh.columns)
    return carried.unionByName(fresh).repartitionByRange("user_id").sortWithinPartitions("user_id", "ts", "item_id")


def run(spark, cfg, lake, day) -> dict:
    from spark_jobs.common import previous_day, read_partition, write_partition

    params = SampleParams.from_config(cfg)
    history = read_partition(spark, lake, "features/user_history", day)
    versions = read_partition(spark, lake, "features/knowledge_versions", day)
    items = read_partition(spark, lake, "features/items", day)
    prev_day = previous_day(lake, DATASET, day)
    if prev_day is not None and not all(lake.has_partition(ds, prev_day) for ds in ("features/user_history", "features/items")):
        prev_day = None  # the previous samples cannot be compared with what they were built from: rebuild
    if prev_day is None:
        out, recomputed = transform(history, versions, items, params), None
    else:
        dirty = dirty_users(
            history, items, read_partition(spark, lake, "features/user_history", prev_day), read_partition(spark, lake, "features/items", prev_day)
        ).localCheckpoint()  # small, and read twice: computed once
        recomputed = dirty.count()
        out = incremental_transform(history, versions, items, dirty, read_partition(spark, lake, DATASET, prev_day), params)
    write_partition(out, lake, DATASET, day)
    # Counts from the written partition: two narrow columns read back, no cache of every sample.
    samples = read_partition(spark, lake, DATASET, day)
    per_split = {r["split"]: (int(r["samples"]), int(r["positives"])) for r in samples.groupBy("split").agg(
        F.count(F.lit(1)).alias("samples"), F.sum("label").alias("positives")).collect()}
    total = sum(n for n, _ in per_split.values())
    interactions = history.agg(F.sum("n_interactions")).first()[0] or 0
    return {
        "samples": total,
        "label_rate": sum(p for _, p in per_split.values()) / total if total else None,
        "samples_per_split": {split: n for split, (n, _) in per_split.items()},
        "interactions_without_earlier_knowledge": int(interactions) - total,
        "incremental_from": prev_day.isoformat() if prev_day else None,
        "recomputed_users": recomputed,
    }


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, "features_ctr_samples", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
