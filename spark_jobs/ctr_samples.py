"""CTR samples as of `dt`, joined point in time with the user's knowledge window versions.

A sample is one interaction at time t. It joins the newest window version of its user whose `as_of`
is strictly before t (an as-of join done as one ordered scan per user, not a range join), so the
knowledge it carries never shows that interaction or anything after it. Interactions with no earlier
version (the first window's own interactions, and anything at or before its `as_of`) give no sample.

Reads `features/user_history/dt=D` (histories), `features/knowledge_versions/dt=D`, `features/items/dt=D`.
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


def transform(user_history: DataFrame, versions: DataFrame, items: DataFrame, params: SampleParams) -> DataFrame:
    L = params.max_hist_len
    genres = F.broadcast(items.select("item_id", F.col("first_genre").alias("genre")))
    events = (
        user_history.select("user_id", F.posexplode("history").alias("pos", "e"))
        .select("user_id", "pos", F.col("e.item_id").alias("item_id"), F.col("e.ts").alias("ts"), F.col("e.rating").alias("rating"))
        .join(genres, "item_id", "left")
        .withColumn("genre", F.coalesce("genre", F.lit(UNKNOWN_GENRE)))
    )
    # The previous L interactions of the user (a join, not a map lookup: map lookups scan linearly).
    previous = Window.partitionBy("user_id").orderBy("pos").rowsBetween(-L, -1)
    events = events.withColumn("hist", F.collect_list(F.struct("item_id", "genre", "rating")).over(previous))
    # As-of join: versions sort after samples at equal time, so a version is visible only when as_of < ts.
    stream = events.select(
        "user_id", F.col("ts").alias("t"), F.lit(0).alias("kind"), "hist", "item_id", "genre", "ts", "rating",
        F.lit(None).cast("long").alias("v_as_of"), F.lit(None).cast("string").alias("v_hash"), F.lit(None).cast("int").alias("v_n"),
    ).unionByName(
        versions.select(
            "user_id", F.col("as_of").alias("t"), F.lit(1).alias("kind"), F.lit(None).cast(events.schema["hist"].dataType).alias("hist"),
            F.lit(None).cast("string").alias("item_id"), F.lit(None).cast("string").alias("genre"), F.lit(None).cast("long").alias("ts"),
            F.lit(None).cast("int").alias("rating"), F.col("as_of").alias("v_as_of"), F.col("window_hash").alias("v_hash"),
            F.col("window_n").cast("int").alias("v_n"),
        )
    )
    w = Window.partitionBy("user_id").orderBy("t", "kind", "v_n").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    joined = (
        stream.withColumn("knowledge_as_of", F.last("v_as_of", ignorenulls=True).over(w))
        .withColumn("knowledge_window_hash", F.last("v_hash", ignorenulls=True).over(w))
        .withColumn("knowledge_window_n", F.last("v_n", ignorenulls=True).over(w))
        .where((F.col("kind") == 0) & F.col("knowledge_as_of").isNotNull())
    )
    hist = F.col("hist")
    out = joined.select(
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
    return out.orderBy("user_id", "ts", "item_id")


def run(spark, cfg, lake, day) -> dict:
    from spark_jobs.common import read_partition, write_partition

    params = SampleParams.from_config(cfg)
    history = read_partition(spark, lake, "features/user_history", day)
    versions = read_partition(spark, lake, "features/knowledge_versions", day)
    items = read_partition(spark, lake, "features/items", day)
    out = transform(history, versions, items, params).cache()
    write_partition(out, lake, DATASET, day)
    stats = out.agg(F.count(F.lit(1)).alias("samples"), F.avg("label").alias("label_rate")).first()
    per_split = {r["split"]: int(r["count"]) for r in out.groupBy("split").count().collect()}
    out.unpersist()
    interactions = history.agg(F.sum("n_interactions")).first()[0] or 0
    return {
        "samples": int(stats["samples"]),
        "label_rate": float(stats["label_rate"]) if stats["label_rate"] is not None else None,
        "samples_per_split": per_split,
        "interactions_without_earlier_knowledge": int(interactions) - int(stats["samples"]),
    }


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, "features_ctr_samples", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
