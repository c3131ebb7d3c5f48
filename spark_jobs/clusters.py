"""Groups for collective knowledge extraction: items, and users twice (what they liked, what they disliked).

Spark MLlib bisecting k-means (seeded) on item features (genre multi-hot, year, log popularity) and on
user profiles (genre distribution of the items rated above / at-or-below the positive threshold).
Clusters above the size bound are clustered again, recursively; when k-means cannot split a cluster
(identical points), it is cut into chunks in entity-id order. Every entity gets exactly one group per
clustering; `group_id` is a hash of the sorted member ids, so an unchanged group keeps its id.

Reads `features/items/dt=D`, `features/user_history/dt=D`. Writes `features/clusters/dt=D`.
"""

from __future__ import annotations

import math
import sys

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

DATASET = "features/clusters"
MAX_ROUNDS = 8
SEED = 42


def _bisect(points: DataFrame, k: int, seed: int) -> DataFrame:
    """entity_id, cluster (int) for `points` (entity_id, features) with bisecting k-means."""
    from pyspark.ml.clustering import BisectingKMeans

    model = BisectingKMeans(k=k, seed=seed, featuresCol="features", predictionCol="cluster", maxIter=10).fit(points)
    return model.transform(points).select("entity_id", "cluster")


def bounded_groups(points: DataFrame, max_size: int, seed: int = SEED) -> DataFrame:
    """entity_id, path: a size-bounded partition of `points` (entity_id, features vector)."""
    points = points.select("entity_id", "features").cache()
    n = points.count()
    if n == 0:
        return points.sparkSession.createDataFrame([], "entity_id string, path string")
    if n <= max_size:
        return points.select("entity_id", F.lit("0").alias("path"))
    # Twice the minimum cluster count: bisecting k-means leaves uneven sizes, fewer re-splits follow.
    assigned = _bisect(points, min(n, 2 * math.ceil(n / max_size)), seed).select(
        "entity_id", F.col("cluster").cast("string").alias("path")
    )
    for round_no in range(MAX_ROUNDS):
        assigned = assigned.cache()
        sizes = {r["path"]: r["count"] for r in assigned.groupBy("path").count().collect()}
        oversized = sorted(p for p, c in sizes.items() if c > max_size)
        if not oversized:
            return assigned
        settled = assigned.where(~F.col("path").isin(oversized))
        parts = [settled]
        for path in oversized:
            members = points.join(assigned.where(F.col("path") == path), "entity_id")
            k = min(sizes[path], max(2, math.ceil(sizes[path] / max_size)))
            sub = _bisect(members, k, seed + round_no + 1) if round_no < MAX_ROUNDS - 1 else None
            if sub is None or sub.select("cluster").distinct().count() < 2:
                sub = _chunks(members, max_size)  # k-means could not separate these points
            parts.append(sub.select("entity_id", F.concat(F.lit(path + "."), F.col("cluster").cast("string")).alias("path")))
        assigned = parts[0]
        for part in parts[1:]:
            assigned = assigned.unionByName(part)
    return assigned


def _chunks(members: DataFrame, max_size: int) -> DataFrame:
    order = Window.orderBy("entity_id")
    return members.select("entity_id", ((F.row_number().over(order) - 1) / max_size).cast("int").alias("cluster"))


def name_groups(assigned: DataFrame, clustering: str) -> DataFrame:
    """clustering, entity_id, group_id (hash of the sorted member ids), group_size."""
    groups = assigned.groupBy("path").agg(F.sort_array(F.collect_list("entity_id")).alias("members"))
    groups = groups.select(
        "path",
        F.concat(F.lit(f"{clustering}-"), F.substring(F.sha2(F.array_join("members", "\u001f"), 256), 1, 16)).alias("group_id"),
        F.size("members").alias("group_size"),
    )
    return assigned.join(groups, "path").select(F.lit(clustering).alias("clustering"), "entity_id", "group_id", "group_size")


def item_points(items: DataFrame) -> DataFrame:
    """entity_id, features: genre multi-hot, year scaled to [0, 1] (missing: middle), log popularity scaled."""
    from pyspark.ml.feature import CountVectorizer, VectorAssembler

    stats = items.agg(F.min("year").alias("y0"), F.max("year").alias("y1"), F.max(F.log1p("popularity")).alias("p1")).first()
    y0, y1 = stats["y0"] or 0, stats["y1"] or 1
    span = max(1, y1 - y0)
    df = items.select(
        F.col("item_id").alias("entity_id"),
        "genres",
        F.coalesce((F.col("year") - y0) / span, F.lit(0.5)).alias("year_scaled"),
        (F.log1p("popularity") / max(stats["p1"] or 1.0, 1e-9)).alias("pop_scaled"),
    )
    vocab = CountVectorizer(inputCol="genres", outputCol="genre_vec", binary=True, minDF=1.0).fit(df)
    df = vocab.transform(df)
    return VectorAssembler(inputCols=["genre_vec", "year_scaled", "pop_scaled"], outputCol="features").transform(df).select(
        "entity_id", "features"
    )


def user_points(user_history: DataFrame, items: DataFrame, liked: bool, threshold: int) -> DataFrame:
    """entity_id, features: L1-normalised genre counts of the items the user liked (or disliked); zeros if none."""
    from pyspark.ml.feature import CountVectorizer, Normalizer

    events = user_history.select("user_id", F.explode("history").alias("e"))
    keep = F.col("e.rating") > threshold if liked else F.col("e.rating") <= threshold
    genres = events.where(keep).join(items.select(F.col("item_id"), "genres"), F.col("e.item_id") == F.col("item_id"))
    per_user = genres.groupBy("user_id").agg(F.flatten(F.collect_list("genres")).alias("g"))
    df = user_history.select("user_id").join(per_user, "user_id", "left").select(
        F.col("user_id").alias("entity_id"), F.coalesce("g", F.array().cast("array<string>")).alias("g")
    )
    vocab = CountVectorizer(inputCol="g", outputCol="counts", minDF=1.0)
    vocab_model = vocab.fit(items.select(F.col("genres").alias("g")))  # one vocabulary: the item genres
    counts = vocab_model.transform(df)
    return Normalizer(inputCol="counts", outputCol="features", p=1.0).transform(counts).select("entity_id", "features")


def transform(items: DataFrame, user_history: DataFrame, max_items: int, max_users: int, threshold: int) -> DataFrame:
    parts = [
        name_groups(bounded_groups(item_points(items), max_items), "item"),
        name_groups(bounded_groups(user_points(user_history, items, True, threshold), max_users), "user_pos"),
        name_groups(bounded_groups(user_points(user_history, items, False, threshold), max_users), "user_neg"),
    ]
    out = parts[0].unionByName(parts[1]).unionByName(parts[2])
    return out.orderBy("clustering", "group_id", "entity_id")


def run(spark, cfg, lake, day) -> dict:
    from spark_jobs.common import read_partition, write_partition

    from reki_core.prompts import resolve_mode

    s = cfg.scenario
    items = read_partition(spark, lake, "features/items", day).cache()
    history = read_partition(spark, lake, "features/user_history", day).select("user_id", "history").cache()
    mode = resolve_mode(cfg, history.count(), items.count())
    if mode == "individual":  # groups only serve collective extraction: the costliest job is skipped
        if lake.has_partition(DATASET, day):
            lake.fs.rm(lake.partition_path(DATASET, day), recursive=True)  # no stale groups from an earlier mode
        items.unpersist()
        history.unpersist()
        return {"skipped": True, "mode": mode, "reason": "individual extraction needs no groups"}
    out = transform(items, history, s.max_group_size_items, s.max_group_size_users, s.positive_rating_threshold)
    out = out.localCheckpoint()  # the k-means lineage is long; write and count one materialised result
    write_partition(out, lake, DATASET, day)
    summary = {
        r["clustering"]: {"groups": int(r["groups"]), "members": int(r["members"]), "max_group_size": int(r["max_size"])}
        for r in out.groupBy("clustering")
        .agg(F.countDistinct("group_id").alias("groups"), F.count(F.lit(1)).alias("members"), F.max("group_size").alias("max_size"))
        .collect()
    }
    items.unpersist()
    history.unpersist()
    return {"clusterings": summary}


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, "features_clusters", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
