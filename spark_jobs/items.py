"""Item features as of `dt`: normalised title, year, genres, first genre, popularity, metadata hash, dirty flag.

Reads `raw/items/dt=D` (snapshot), `raw/interactions` newer than the previous `features/items`
partition (popularity is carried forward, so a daily run reads one day), and that previous partition.
Writes `features/items/dt=D`; `needs_refresh` marks items that are new or whose metadata changed.
Items that were interacted with but that the snapshot does not describe (not yet, or no longer) go to
`features/items_undescribed/dt=D` (item_id, popularity): their popularity is carried there, so an item
described later, or again, has the popularity a full build gives it.
"""

from __future__ import annotations

import sys

from pyspark.sql import DataFrame, Observation
from pyspark.sql import functions as F


DATASET = "features/items"
UNDESCRIBED = "features/items_undescribed"
UNKNOWN_GENRE = "unknown"


def normalise_title(title):
    """Column expression: trim, drop a trailing "(YYYY)", move a trailing ", The/A/An" to the front."""
    t = F.trim(F.regexp_replace(title, r"\s+", " "))
    t = F.trim(F.regexp_replace(t, r"\s*\((\d{4})\)$", ""))
    # "City of Lost Children, The (Cité des enfants perdus, La)" -> "The City of Lost Children (Cité ...)"
    return F.regexp_replace(t, r"^(.+?), (The|A|An)((?: \(.*\))?)$", "$2 $1$3")


def title_year(title):
    """Column expression: the year in a trailing "(YYYY)" of the raw title, or null."""
    found = F.regexp_extract(title, r"\((\d{4})\)\s*$", 1)
    return F.when(found != "", found.cast("int"))


def transform(raw_items: DataFrame, new_interactions: DataFrame, previous: DataFrame | None,
              previous_undescribed: DataFrame | None = None) -> DataFrame:
    """Item features; popularity = previous popularity + interactions since (all of them when no previous)."""
    return item_rows(raw_items, new_interactions, previous, previous_undescribed).where("described").drop("described")


def item_rows(raw_items: DataFrame, new_interactions: DataFrame, previous: DataFrame | None,
              previous_undescribed: DataFrame | None = None) -> DataFrame:
    """`transform`'s rows plus, with `described` false, the items interacted with (popularity > 0) that the
    snapshot does not describe: one pass yields the features and the undescribed items' popularity."""
    items = raw_items.select(
        F.col("item_id").cast("string").alias("item_id"),
        normalise_title(F.col("title")).alias("title"),
        F.coalesce(F.col("year").cast("int"), title_year(F.col("title"))).alias("year"),
        F.coalesce(F.col("genres"), F.array().cast("array<string>")).alias("genres"),
    ).withColumn("title", F.when(F.col("title") != "", F.col("title")))
    items = items.withColumn("first_genre", F.coalesce(F.try_element_at("genres", F.lit(1)), F.lit(UNKNOWN_GENRE))).withColumn(
        "metadata_hash",
        F.sha2(
            F.concat_ws(
                "\u001f",
                F.coalesce(F.col("title"), F.lit("")),
                F.coalesce(F.col("year").cast("string"), F.lit("")),
                F.array_join("genres", "\u001e"),
            ),
            256,
        ),
    )
    counts = new_interactions.groupBy("item_id").agg(F.count(F.lit(1)).alias("new_count"))
    items = items.withColumn("described", F.lit(True)).join(counts, "item_id", "full_outer")
    if previous is None:
        items = items.withColumn("popularity", F.coalesce("new_count", F.lit(0)).cast("long")).withColumn(
            "needs_refresh", F.lit(True)
        )
    else:
        prev = previous.select("item_id", F.col("popularity").alias("prev_pop"), F.col("metadata_hash").alias("prev_hash"))
        if previous_undescribed is not None:
            prev = prev.unionByName(previous_undescribed.select(
                "item_id", F.col("popularity").alias("prev_pop"), F.lit(None).cast("string").alias("prev_hash")))
        # Full outer: an item the snapshot stopped describing keeps its popularity among the undescribed.
        items = (
            items.join(prev, "item_id", "full_outer")
            .withColumn("popularity", (F.coalesce("prev_pop", F.lit(0)) + F.coalesce("new_count", F.lit(0))).cast("long"))
            # Never null (metadata_hash never is); the coalesce tells Spark so, so that a daily run's files have
            # the schema of a full build's (not null), whichever wrote the previous day.
            .withColumn("needs_refresh", F.coalesce(F.col("prev_hash").isNull() | (F.col("prev_hash") != F.col("metadata_hash")),
                                                    F.lit(True)))
        )
    items = items.withColumn("described", F.coalesce("described", F.lit(False)))
    # One sorted file: the item table is small, and a global sort would cost Spark a sampling job.
    return items.where(F.col("described") | (F.col("popularity") > 0)).select(
        "item_id", "title", "year", "genres", "first_genre", "popularity", "metadata_hash", "needs_refresh", "described"
    ).repartition(1).sortWithinPartitions("item_id")


def run(spark, cfg, lake, day) -> dict:
    """Read, transform, write `features/items/dt=day`; returns the counts recorded in the run log."""
    from spark_jobs.common import previous_day, read_interactions, read_partition, write_partition

    prev_day = previous_day(lake, DATASET, day)
    previous = read_partition(spark, lake, DATASET, prev_day) if prev_day else None
    previous_undescribed = read_partition(spark, lake, UNDESCRIBED, prev_day) \
        if prev_day and lake.has_partition(UNDESCRIBED, prev_day) else None
    raw_items = read_partition(spark, lake, "raw/items", day)
    new_interactions = read_interactions(spark, lake, prev_day, day)
    # Materialised once, out of the tables' lineage: a write to a table that a cached plan reads makes Spark
    # recompute that plan, and `rows` reads both tables it writes. Each write counts its own rows as it goes.
    rows = item_rows(raw_items, new_interactions, previous, previous_undescribed).localCheckpoint()
    described = F.col("described")
    undescribed_seen, described_seen = Observation("items_undescribed"), Observation("items")
    # The undescribed items first: a failure between the two writes then leaves no items partition that the
    # next day would read without its undescribed companion.
    write_partition(rows.where(~described).select("item_id", "popularity").observe(
        # Items that users rated but the snapshot does not describe: their prompts cannot name them.
        undescribed_seen, F.count(F.lit(1)).alias("unknown")), lake, UNDESCRIBED, day)
    write_partition(rows.where(described).drop("described").observe(
        described_seen,
        F.count(F.lit(1)).alias("items"),
        F.sum(F.col("needs_refresh").cast("int")).alias("dirty_items"),
        F.sum(F.col("title").isNull().cast("int")).alias("items_without_title"),
    ), lake, DATASET, day)
    stats = {**undescribed_seen.get, **described_seen.get}
    return {
        "items": int(stats["items"] or 0),
        "dirty_items": int(stats["dirty_items"] or 0),
        "items_without_title": int(stats["items_without_title"] or 0),
        "interacted_items_without_metadata": int(stats["unknown"] or 0),
        "incremental_from": prev_day.isoformat() if prev_day else None,
    }


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, "features_items", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
