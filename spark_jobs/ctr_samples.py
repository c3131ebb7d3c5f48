"""CTR samples as of `dt`, joined point in time with the user's knowledge window versions.

A sample is one interaction at time t. It joins the newest window version of its user whose `as_of`
is strictly before t (an as-of join done as one ordered scan per user, not a range join), so the
knowledge it carries never shows that interaction or anything after it. Interactions with no earlier
version (the first window's own interactions, and anything at or before its `as_of`) give no sample.

A user's samples depend only on the user's history and window versions and on the genres of the items
in it. The dataset is user-bucketed (`spark_jobs/buckets.py`): a daily run recomputes only the buckets
whose interactions or window versions grew since the previous day (the bucket manifests' totals) or that
hold a user of an item whose genre changed, and hard-links every other bucket's file from the previous
partition. Like the
knowledge windows, that assumes unchanged sample parameters (`max_hist_len`, the threshold, the split
fractions): after changing one, rebuild from the first affected date.

Reads `features/user_history/dt=D` (histories), `features/knowledge_versions/dt=D`, `features/items/dt=D`
(a daily run reads only the recomputed buckets' files), and the previous day's `features/items`.
Writes `features/ctr_samples/dt=D` (every sample up to D; a user stays in one split every day), in
(bucket, user_id, ts, item_id) order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from spark_jobs.buckets import BUCKET, with_buckets
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


def transform(
    user_history: DataFrame, versions: DataFrame, items: DataFrame, params: SampleParams, n_buckets: int = 32
) -> DataFrame:
    """The samples, with the `bucket` column of the user, hash-partitioned by it (as the writer lays them out)."""
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
    # One shuffle, of the narrow rows: both windows and the bucketed write reuse this partitioning.
    stream = with_buckets(stream, n_buckets)
    w = Window.partitionBy(BUCKET, "user_id").orderBy("t", "kind", "v_n").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    joined = (
        stream.withColumn("knowledge_as_of", F.last("v_as_of", ignorenulls=True).over(w))
        .withColumn("knowledge_window_hash", F.last("v_hash", ignorenulls=True).over(w))
        .withColumn("knowledge_window_n", F.last("v_n", ignorenulls=True).over(w))
        .where(F.col("kind") == 0)
    )
    # The previous L interactions of the user (a sliding frame, not a map lookup: map lookups scan linearly).
    previous = Window.partitionBy(BUCKET, "user_id").orderBy("pos").rowsBetween(-L, -1)
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
        BUCKET,
    )


def previous_state(lake, day, n_buckets: int):
    """The day whose samples a daily run of `day` builds on, or None: rebuild (the previous samples cannot be
    compared with what they were built from)."""
    from spark_jobs.buckets import is_bucketed
    from spark_jobs.common import previous_day

    prev_day = previous_day(lake, DATASET, day)
    if prev_day is None or not (all(is_bucketed(lake, ds, prev_day, n_buckets) for ds in (DATASET, "features/user_history", "features/knowledge_versions"))
                                and lake.has_partition("features/items", prev_day)):
        return None
    return prev_day


def grown_user_buckets(lake, day, prev_day) -> set[int]:
    """Buckets whose interactions or window versions grew since the previous day (both only grow, so a
    bucket's total tells). With the buckets of users of a regenred item, all a day's samples can change by."""
    from spark_jobs.buckets import grown_buckets

    return grown_buckets(lake, "features/user_history", prev_day, day, "interactions") | grown_buckets(
        lake, "features/knowledge_versions", prev_day, day)


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


def summarise(table) -> dict[str, int]:
    """Samples and positives per split, for the run log and the label-rate gate."""
    split = table["split"].to_numpy(zero_copy_only=False)
    label = table["label"].to_numpy(zero_copy_only=False)
    return {k: int(v) for s in SPLITS for k, v in ((f"{s}_samples", (split == s).sum()),
                                                     (f"{s}_positives", label[split == s].sum()))}


@releases_cache
def run(spark, cfg, lake, day) -> dict:
    from spark_jobs.buckets import bucket_expr, read_buckets, write_bucketed
    from spark_jobs.common import read_partition

    params = SampleParams.from_config(cfg)
    n_buckets = cfg.spark.user_buckets
    items = read_partition(spark, lake, "features/items", day)
    prev_day = previous_state(lake, day, n_buckets)
    if prev_day is None:
        history = read_buckets(spark, lake, "features/user_history", day)
        versions = read_buckets(spark, lake, "features/knowledge_versions", day)
        rewritten = None
    else:
        rewritten = grown_user_buckets(lake, day, prev_day)
        regenred = regenred_items(lake, day, prev_day)
        if regenred:  # rare: only then are all histories scanned
            users = users_rating(read_buckets(spark, lake, "features/user_history", day),
                                 spark.createDataFrame([(i,) for i in regenred], "item_id string"))
            rewritten |= {r[0] for r in users.select(bucket_expr(F.col("user_id"), n_buckets)).distinct().collect()}
        history = read_buckets(spark, lake, "features/user_history", day, rewritten)
        versions = read_buckets(spark, lake, "features/knowledge_versions", day, rewritten)
    stats = write_bucketed(transform(history, versions, items, params, n_buckets), lake, DATASET, day, n_buckets,
                           ["user_id", "ts", "item_id"], summarise, ["split", "label"],
                           carry_from=prev_day, rewritten=rewritten)
    return payload(stats, lake, day, prev_day, rewritten)


def payload(stats: dict, lake, day, prev_day, rewritten: set[int] | None) -> dict:
    """The run-log counts of a run, from the totals of the written partition."""
    from spark_jobs.buckets import read_manifest, totals

    per_split = {s: (stats.get(f"{s}_samples", 0), stats.get(f"{s}_positives", 0)) for s in SPLITS}
    per_split = {s: counts for s, counts in per_split.items() if counts[0]}
    total = stats["rows"]
    interactions = totals(read_manifest(lake, "features/user_history", day)).get("interactions", 0)
    return {
        "samples": total,
        "label_rate": sum(p for _, p in per_split.values()) / total if total else None,
        "samples_per_split": {s: n for s, (n, _) in per_split.items()},
        "interactions_without_earlier_knowledge": int(interactions) - total,
        "incremental_from": prev_day.isoformat() if prev_day else None,
        "rewritten_buckets": None if rewritten is None else len(rewritten),
    }


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, "features_ctr_samples", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
