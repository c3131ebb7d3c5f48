"""Groups for collective knowledge extraction: items, and users twice (what they liked, what they disliked).

Points: item features (genre multi-hot, year, log popularity) and user profiles (L1-normalised genre counts
of the items rated above / at-or-below the positive threshold in the user's knowledge window, the part of the
history the user prompt shows: a group never reflects an interaction a CTR sample after the window's `as_of`
is about), over one sorted genre vocabulary.
One Spark MLlib bisecting k-means pass (seeded) over all points aims at groups about half the size bound;
the few clusters still above the bound are then split in one grouped pass (each such cluster goes to one
Python worker, which bisects it with deterministic 2-means until every part fits, and cuts points that
2-means cannot separate into chunks in entity-id order). Every entity gets exactly one group per clustering;
`group_id` is a hash of the sorted member ids, so an unchanged group keeps its id.

The groups are a function of the items' features, the users' windows, the size bounds and this module's grouping:
the day is written with a fingerprint of those (`inputs_fingerprint`). A run that finds the same fingerprint recorded
with the day itself keeps the day's groups (a re-run: a backfill's reprocessing, a second run of a date), and one
that finds it with the previous day writes that day's groups again (a day on which no window and no item changed),
instead of fitting the same k-means again.

Reads `features/items/dt=D`, `features/user_history/dt=D`. Writes `features/clusters/dt=D`.
"""

from __future__ import annotations

import functools
import math
import sys

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_jobs.common import at_once, cache, empty_frame, releases_cache

DATASET = "features/clusters"
SEED = 42
LLOYD_ITERATIONS = 10
MAX_SPLIT_DEPTH = 32  # deeper than any sane 2-means tree: past it the rest is cut into id-ordered chunks
# Part of the inputs' fingerprint: change it with anything that changes the groups of the same inputs (the features,
# the algorithm), so that days grouped before are grouped again.
GROUPING_VERSION = 1


def _bisect(points: DataFrame, k: int, seed: int) -> DataFrame:
    """entity_id, cluster (int) for `points` (entity_id, features array) with bisecting k-means."""
    from pyspark.ml.clustering import BisectingKMeans
    from pyspark.ml.functions import array_to_vector

    vectors = points.select("entity_id", array_to_vector("features").alias("features"))
    model = BisectingKMeans(k=k, seed=seed, featuresCol="features", predictionCol="cluster", maxIter=10).fit(vectors)
    return model.transform(vectors).select("entity_id", "cluster")


def _two_means(x):
    """Boolean mask of one side of a deterministic 2-means split of the rows of `x`, or None if they are all equal."""
    import numpy as np

    a = x[np.argmax(((x - x.mean(axis=0)) ** 2).sum(axis=1))]  # farthest from the mean, then farthest from that
    b = x[np.argmax(((x - a) ** 2).sum(axis=1))]
    if np.array_equal(a, b):
        return None
    side = None
    for _ in range(LLOYD_ITERATIONS):
        new_side = ((x - a) ** 2).sum(axis=1) <= ((x - b) ** 2).sum(axis=1)
        if new_side.all() or not new_side.any():
            return None
        if side is not None and np.array_equal(side, new_side):
            break
        side = new_side
        a, b = x[side].mean(axis=0), x[~side].mean(axis=0)
    return side


def split_cluster(members, max_size: int):
    """Arrow grouped map: one oversized cluster (entity_id, path, features) -> entity_id, path, every part <= max_size."""
    import numpy as np
    import pyarrow as pa

    ids = np.array(members.column("entity_id").to_pylist(), dtype=object)
    order = np.argsort(ids.astype(str), kind="stable")  # id order: the result never depends on row arrival order
    ids = ids[order]
    features = members.column("features").combine_chunks()
    x = features.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), -1)[order]
    paths = np.empty(len(ids), dtype=object)
    todo = [(np.arange(len(ids)), members.column("path")[0].as_py(), 0)]
    while todo:
        idx, path, depth = todo.pop()
        if len(idx) <= max_size:
            paths[idx] = path
            continue
        side = _two_means(x[idx]) if depth < MAX_SPLIT_DEPTH else None
        if side is None:  # identical points (or too deep): cut into chunks in id order
            for chunk_no, start in enumerate(range(0, len(idx), max_size)):
                paths[idx[start:start + max_size]] = f"{path}.c{chunk_no}"
            continue
        todo += [(idx[side], f"{path}.0", depth + 1), (idx[~side], f"{path}.1", depth + 1)]
    return pa.table({"entity_id": pa.array(ids.tolist(), pa.string()), "path": pa.array(paths.tolist(), pa.string())})


def bounded_groups(points: DataFrame, max_size: int, seed: int = SEED) -> DataFrame:
    """entity_id, path: a size-bounded partition of `points` (entity_id, features array<double>)."""
    points = cache(points.select("entity_id", "features"))
    n = points.count()
    if n == 0:
        return empty_frame(points.sparkSession, T.StructType([T.StructField("entity_id", T.StringType()),
                                                               T.StructField("path", T.StringType())]))
    if n <= max_size:
        return points.select("entity_id", F.lit("0").alias("path"))
    # Twice the minimum cluster count: bisecting k-means leaves uneven sizes, fewer clusters need splitting.
    assigned = cache(_bisect(points, min(n, 2 * math.ceil(n / max_size)), seed).select(
        "entity_id", F.col("cluster").cast("string").alias("path")
    ))
    oversized = F.broadcast(assigned.groupBy("path").count().where(F.col("count") > max_size).select("path"))
    settled = assigned.join(oversized, "path", "left_anti")

    def split_one(members):  # a plain function: pyspark 4.3 cannot infer the eval type of a functools.partial
        return split_cluster(members, max_size)

    # All oversized clusters split in one grouped pass (not one Spark k-means job chain per cluster).
    split = (
        assigned.join(oversized, "path")
        .join(points, "entity_id")
        .groupBy("path")
        .applyInArrow(split_one, schema="entity_id string, path string")
    )
    return settled.select("entity_id", "path").unionByName(split)


def name_groups(assigned: DataFrame, clustering: str) -> DataFrame:
    """clustering, entity_id, group_id (hash of the sorted member ids), group_size."""
    groups = assigned.groupBy("path").agg(F.sort_array(F.collect_list("entity_id")).alias("members"))
    groups = groups.select(
        "path",
        F.concat(F.lit(f"{clustering}-"), F.substring(F.sha2(F.array_join("members", "\u001f"), 256), 1, 16)).alias("group_id"),
        F.size("members").alias("group_size"),
    )
    return assigned.join(groups, "path").select(F.lit(clustering).alias("clustering"), "entity_id", "group_id", "group_size")


def genre_vocabulary(items: DataFrame) -> list[str]:
    """Every item genre, sorted: the feature order of items and user profiles alike."""
    return sorted(r["g"] for r in items.select(F.explode("genres").alias("g")).distinct().collect())


def _vocab_array(vocabulary: list[str]):
    return F.array(*[F.lit(g) for g in vocabulary]) if vocabulary else F.array().cast("array<string>")


def item_points(items: DataFrame, vocabulary: list[str] | None = None) -> DataFrame:
    """entity_id, features: genre multi-hot, year scaled to [0, 1] (missing: middle), log popularity scaled."""
    vocabulary = genre_vocabulary(items) if vocabulary is None else vocabulary
    stats = items.agg(F.min("year").alias("y0"), F.max("year").alias("y1"), F.max(F.log1p("popularity")).alias("p1")).first()
    y0, y1 = stats["y0"] or 0, stats["y1"] or 1
    span = max(1, y1 - y0)
    multi_hot = F.transform(_vocab_array(vocabulary), lambda g: F.when(F.array_contains("genres", g), 1.0).otherwise(0.0))
    return items.select(
        F.col("item_id").alias("entity_id"),
        F.concat(
            multi_hot,
            F.array(
                F.coalesce((F.col("year") - y0) / span, F.lit(0.5)).cast("double"),
                (F.log1p("popularity") / max(stats["p1"] or 1.0, 1e-9)).cast("double"),
            ),
        ).alias("features"),
    )


def user_genre_counts(user_history: DataFrame, items: DataFrame, threshold: int) -> DataFrame:
    """user_id, liked, disliked (map genre -> count over the items rated in the knowledge `window`), every user of
    `user_history`: one pass."""
    events = user_history.select("user_id", F.explode("window").alias("e")).select(
        "user_id", F.col("e.item_id").alias("item_id"), (F.col("e.rating") > threshold).cast("int").alias("liked")
    )
    genres = events.join(F.broadcast(items.select("item_id", "genres")), "item_id").select(
        "user_id", "liked", F.explode("genres").alias("genre")
    )
    counts = genres.groupBy("user_id", "genre").agg(F.sum("liked").alias("pos"), F.sum(1 - F.col("liked")).alias("neg"))
    per_user = counts.groupBy("user_id").agg(
        F.map_from_entries(F.collect_list(F.struct("genre", "pos"))).alias("liked"),
        F.map_from_entries(F.collect_list(F.struct("genre", "neg"))).alias("disliked"),
    )
    return user_history.select("user_id").join(per_user, "user_id", "left")


def user_points(genre_counts: DataFrame, column: str, vocabulary: list[str]) -> DataFrame:
    """entity_id, features: the L1-normalised genre counts in `column` (liked / disliked); zeros if none."""
    counts = F.transform(_vocab_array(vocabulary), lambda g: F.coalesce(F.element_at(column, g), F.lit(0)).cast("double"))
    df = genre_counts.select(F.col("user_id").alias("entity_id"), counts.alias("c"))
    total = F.aggregate("c", F.lit(0.0), lambda acc, x: acc + x)
    return df.select("entity_id", F.when(total > 0, F.transform("c", lambda x: x / total)).otherwise(F.col("c")).alias("features"))


def transform(items: DataFrame, user_history: DataFrame, max_items: int, max_users: int, threshold: int) -> DataFrame:
    vocabulary = genre_vocabulary(items)
    genre_counts = cache(user_genre_counts(user_history, items, threshold))  # users x genres: small, read by both profiles
    clusterings = {
        "item": (item_points(items, vocabulary), max_items),
        "user_pos": (user_points(genre_counts, "liked", vocabulary), max_users),
        "user_neg": (user_points(genre_counts, "disliked", vocabulary), max_users),
    }
    # Each k-means fit is a chain of a hundred tiny Spark jobs, bound by scheduling round trips rather than by the
    # cores: the three run at once on the one session.
    grouped = at_once(items.sparkSession, [functools.partial(bounded_groups, points, bound)
                                           for points, bound in clusterings.values()])
    parts = [name_groups(assigned, name) for name, assigned in zip(clusterings, grouped)]
    out = parts[0].unionByName(parts[1]).unionByName(parts[2])
    return out.orderBy("clustering", "group_id", "entity_id")


def inputs_fingerprint(items: DataFrame, history: DataFrame, bounds: tuple[int, int, int]) -> str:
    """sha256 over what the groups are computed from: each item's features (id, genres, year, popularity), each user's
    window (`window_hash`: its items, times and ratings), the size bounds and threshold, the grouping's version. The
    rows are summed as numbers (two 60-bit parts of each row's hash), so no order and no sort is needed."""
    import hashlib

    rows = items.select(F.to_json(F.struct("item_id", "genres", "year", "popularity")).alias("row")).unionByName(
        history.select(F.concat_ws("\u001f", "user_id", F.coalesce("window_hash", F.lit(""))).alias("row")))
    digest = F.sha2("row", 256)
    parts = [F.sum(F.conv(F.substring(digest, start, 15), 16, 10).cast("decimal(38,0)")).alias(f"part{start}")
             for start in (1, 16)]
    summed = rows.agg(F.count(F.lit(1)).alias("rows"), *parts).first()
    described = [GROUPING_VERSION, SEED, *bounds, summed["rows"], str(summed["part1"]), str(summed["part16"])]
    return hashlib.sha256(repr(described).encode()).hexdigest()


@releases_cache
def run(spark, cfg, lake, day) -> dict:
    from spark_jobs.common import previous_day, read_partition, write_partition

    from reki_core.prompts import resolve_mode, skip_groups

    s = cfg.scenario
    items = cache(read_partition(spark, lake, "features/items", day))
    history = cache(read_partition(spark, lake, "features/user_history", day).select("user_id", "window", "window_hash"))
    mode = resolve_mode(cfg, history.count(), items.count())
    if mode == "individual":  # groups only serve collective extraction: the costliest job is skipped
        return skip_groups(lake, day, mode)
    bounds = (s.max_group_size_items, s.max_group_size_users, s.positive_rating_threshold)
    fingerprint = inputs_fingerprint(items, history, bounds)
    # Grouped from these very inputs already: on this day (a re-run), or on the day before (nothing changed since).
    candidates = [d for d in (day, previous_day(lake, DATASET, day)) if d is not None and lake.has_partition(DATASET, d)]
    source = next((d for d in candidates if lake.day_inputs(DATASET, d) == fingerprint), None)
    if source is None:
        out = transform(items, history, *bounds)
        out = out.localCheckpoint()  # the k-means lineage is long; write and count one materialised result
    else:
        out = read_partition(spark, lake, DATASET, source)
    if source != day:
        write_partition(out, lake, DATASET, day, inputs=fingerprint)
    summary = {
        r["clustering"]: {"groups": int(r["groups"]), "members": int(r["members"]), "max_group_size": int(r["max_size"])}
        for r in out.groupBy("clustering")
        .agg(F.countDistinct("group_id").alias("groups"), F.count(F.lit(1)).alias("members"), F.max("group_size").alias("max_size"))
        .collect()
    }
    return {"clusterings": summary, "groups": sum(c["groups"] for c in summary.values()),
            "groups_kept": source is not None, "grouped_on": (source or day).isoformat()}


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, "features_clusters", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
