"""CTR samples as of `dt`, joined point in time with the user's knowledge window versions.

A sample is one interaction at time t. It joins the newest window version of its user whose `as_of`
is strictly before t (an as-of join done as one ordered scan per user, not a range join), so the
knowledge it carries never shows that interaction or anything after it. Interactions with no earlier
version (the first window's own interactions, and anything at or before its `as_of`) give no sample.

A user's samples depend only on the user's history and window versions and on the genres of the items
in it. The dataset is keyed by user and written as changes (`KEYED_DATASETS` in reki_core/storage/lake.py):
a daily run recomputes the samples of the users that `features/user_history` wrote since the previous day
(their interactions or versions may have changed) and of the users of an item whose genre changed, and
writes only theirs under `dt=D`; a reader of D gets each user's newest samples. Like the knowledge windows,
that assumes unchanged sample parameters (`max_hist_len`, the threshold, the split fractions): after
changing one, rebuild from the first affected date.

Reads `features/user_history` and `features/knowledge_versions` as of D (a daily run: only the recomputed
users), `features/items/dt=D` and the previous day's `features/items`. Writes `features/ctr_samples/dt=D`
(a user stays in one split every day), in (user_id, ts, item_id) order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from spark_jobs.common import releases_cache

DATASET = "features/ctr_samples"
UNKNOWN_GENRE = "unknown"
SPLITS = ("train", "valid", "test")


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


def transform(user_history: DataFrame, versions: DataFrame, items: DataFrame, params: SampleParams) -> DataFrame:
    """The samples, hash-partitioned by user (as the writer lays them out)."""
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
    # One shuffle, of the narrow rows: both windows and the write reuse this partitioning.
    stream = stream.repartition("user_id")
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
    joined = joined.where(F.col("knowledge_as_of").isNotNull())
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
        # Left null: the trainer finds the user prompt by (user_id, knowledge_as_of) (reki_core.models.data).
        F.lit(None).cast("string").alias("knowledge_prompt_hash"),
        "knowledge_as_of",
        "knowledge_window_hash",
        "knowledge_window_n",
    )


def previous_state(lake, day):
    """The day whose samples a daily run of `day` builds on, or None: rebuild from every user (no previous day, or
    its items are missing)."""
    from spark_jobs.common import previous_day

    prev_day = previous_day(lake, DATASET, day)
    if prev_day is None or not lake.has_partition("features/items", prev_day):
        return None
    return prev_day


def regenred_items(lake, day, prev_day) -> list[str]:
    """item_id of every item whose shown genre changed since the previous day (the small item tables,
    compared in the driver)."""
    shown = [lake.read_partition("features/items", d, ["item_id", "first_genre"]).set_index("item_id")["first_genre"]
             for d in (day, prev_day)]
    # Items missing on one side show the unknown genre there (a sample of an item without metadata shows it too).
    now, was = (g.reindex(shown[0].index.union(shown[1].index)).fillna(UNKNOWN_GENRE) for g in shown)
    return sorted(now.index[now != was])


def users_rating(history: DataFrame, item_ids: DataFrame) -> DataFrame:
    """user_id of every user with one of `item_ids` in the history."""
    rated = history.select("user_id", F.explode("history.item_id").alias("item_id"))
    return rated.join(F.broadcast(item_ids), "item_id", "left_semi").select("user_id").distinct()


@releases_cache
def run(spark, cfg, lake, day) -> dict:
    from spark_jobs.common import cache, read_day_changes, read_partition, write_partition

    params = SampleParams.from_config(cfg)
    items = read_partition(spark, lake, "features/items", day)
    prev_day = previous_state(lake, day)
    touched = None
    if prev_day is not None:
        # The users whose history or versions changed since the previous samples: user_history wrote them.
        touched = read_day_changes(spark, lake, "features/user_history", day, since_exclusive=prev_day).select("user_id")
        regenred = regenred_items(lake, day, prev_day)
        if regenred:  # rare: only then are all histories scanned
            touched = touched.unionByName(users_rating(read_partition(spark, lake, "features/user_history", day),
                                                       spark.createDataFrame([(i,) for i in regenred], "item_id string")))
        touched = cache(touched.distinct())
    history = read_partition(spark, lake, "features/user_history", day, only_keys=touched)
    versions = read_partition(spark, lake, "features/knowledge_versions", day, only_keys=touched)
    samples = transform(history, versions, items, params).sortWithinPartitions("user_id", "ts", "item_id")
    write_partition(samples, lake, DATASET, day, changes_only=prev_day is not None)
    return payload(spark, lake, day, prev_day)


def payload(spark, lake, day, prev_day) -> dict:
    """The run-log counts of a run: samples and positives per split over the state as of `day` (its narrow columns),
    and how many samples this run wrote."""
    from spark_jobs.common import read_day_changes, read_partition

    state = read_partition(spark, lake, DATASET, day).select("split", "label")
    per_split = {r["split"]: (int(r["samples"]), int(r["positives"] or 0)) for r in state.groupBy("split").agg(
        F.count(F.lit(1)).alias("samples"), F.sum(F.col("label").cast("int")).alias("positives")).collect()}
    per_split = {s: per_split[s] for s in SPLITS if per_split.get(s, (0, 0))[0]}
    total = sum(n for n, _ in per_split.values())
    interactions = read_partition(spark, lake, "features/user_history", day).agg(F.sum("n_interactions")).first()[0]
    return {
        "samples": total,
        "label_rate": sum(p for _, p in per_split.values()) / total if total else None,
        "samples_per_split": {s: n for s, (n, _) in per_split.items()},
        "interactions_without_earlier_knowledge": int(interactions or 0) - total,
        "incremental_from": prev_day.isoformat() if prev_day else None,
        "samples_written": read_day_changes(spark, lake, DATASET, day).count(),
    }


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, "features_ctr_samples", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
