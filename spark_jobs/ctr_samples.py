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
users),
`features/items/dt=D` and the previous day's `features/items`. Writes `features/ctr_samples/dt=D`
(a user stays in one split every day), in (user_id, ts, item_id) order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from pyspark.sql import DataFrame, Observation, Window
from pyspark.sql import functions as F

from reki_core.datasets.schema import day_bounds
from spark_jobs.common import releases_cache

DATASET = "features/ctr_samples"
HISTORY, VERSIONS = "features/user_history", "features/knowledge_versions"
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
    from spark_jobs.common import (STATE_ORDER, cache, read_day_changes, read_partition, totals_source, values_frame,
                                   write_partition)

    params = SampleParams.from_config(cfg)
    items = read_partition(spark, lake, "features/items", day)
    prev_day = previous_state(lake, day)
    touched = written_after = None
    if prev_day is not None:
        # The users whose history or versions changed since the previous samples: user_history wrote them.
        touched = read_day_changes(spark, lake, HISTORY, day, since_exclusive=prev_day).select("user_id")
        regenred = regenred_items(lake, day, prev_day)
        if regenred:  # rare: only then are all histories scanned
            touched = touched.unionByName(users_rating(read_partition(spark, lake, HISTORY, day),
                                                       values_frame(spark, "item_id", regenred)))
        else:  # every touched user's newest rows were written since the previous day: only those days are read
            written_after = prev_day
        touched = cache(touched.distinct())
    history = read_partition(spark, lake, HISTORY, day, only_keys=touched, written_after=written_after)
    versions = read_partition(spark, lake, VERSIONS, day, only_keys=touched, written_after=written_after)
    written = Observation("ctr_samples")
    counted = split_counts()
    if prev_day is not None:
        # The rewritten users' samples as of the previous day leave the totals: they are their samples up to that day's
        # end (a day's interactions lie within it, the landing's rule): the same interactions after the same earliest
        # version, with the same label and split. Counted as the samples are written: no read of the previous ones.
        earlier = F.col("ts") < F.lit(day_bounds(prev_day)[1])
        counted += split_counts(earlier.cast("int"), (earlier & (F.col("label") == 1)).cast("int"), prefix=EARLIER)
    samples = transform(history, versions, items, params).sortWithinPartitions(*STATE_ORDER[DATASET]).observe(
        written, *counted)
    before = STATE_TOTALS_BEFORE_FIRST_DAY if prev_day is None else lake.state_totals(DATASET, prev_day)

    def new_totals() -> dict:  # called once the rows are written: the observed counts, or an aggregate of the state, need them
        if before is None:
            return aggregated_totals(spark, lake, day)
        now = add(before, counts_of(written.get))
        return now if prev_day is None else subtract(now, counts_of(written.get, prefix=EARLIER))

    write_partition(samples, lake, DATASET, day, changes_only=prev_day is not None, totals=new_totals,
                    totals_read_the_day=before is None)
    totals = lake.state_totals(DATASET, day)
    per_split = {s: totals["samples_per_split"][s] for s in SPLITS if totals["samples_per_split"][s]}
    total = sum(per_split.values())
    interactions = (lake.state_totals(HISTORY, day) or {}).get("interactions")
    if interactions is None:  # user_history recorded no totals for the day
        interactions = read_partition(spark, lake, HISTORY, day).agg(F.sum("n_interactions")).first()[0]
    return {
        "samples": total,
        "label_rate": sum(totals["positives_per_split"].values()) / total if total else None,
        "samples_per_split": per_split,
        "interactions_without_earlier_knowledge": int(interactions or 0) - total,
        "incremental_from": prev_day.isoformat() if prev_day else None,
        "samples_written": sum(counts_of(written.get)["samples_per_split"].values()),
        "totals_from": totals_source(prev_day, before),
    }


# The run-log totals over the state as of a day (`TOTALS_PROPERTY`): samples and positives per split.
STATE_TOTALS_BEFORE_FIRST_DAY = {"samples_per_split": dict.fromkeys(SPLITS, 0),
                                 "positives_per_split": dict.fromkeys(SPLITS, 0)}


def split_counts(samples=None, positives=None, prefix: str = "") -> list:
    """Aggregates of samples and positives per split (for `counts_of`): over sample rows by default, or counting
    `samples` samples and `positives` positives of each row; `prefix` names them apart."""
    samples = F.lit(1) if samples is None else samples
    positives = F.col("label").cast("int") if positives is None else positives
    counts = []
    for split in SPLITS:
        in_split = (F.col("split") == split).cast("int")
        counts += [F.coalesce(F.sum(in_split * samples), F.lit(0)).alias(f"{prefix}samples_{split}"),
                   F.coalesce(F.sum(in_split * positives), F.lit(0)).alias(f"{prefix}positives_{split}")]
    return counts


# The prefix of the counts a daily run subtracts (`split_counts`): its rewritten users' samples as of the previous day.
EARLIER = "earlier_"


def counts_of(row: dict, prefix: str = "") -> dict:
    """{"samples_per_split": ..., "positives_per_split": ...} from a row of `split_counts`."""
    return {f"{kind}_per_split": {split: int(row[f"{prefix}{kind}_{split}"] or 0) for split in SPLITS}
            for kind in ("samples", "positives")}


def add(totals: dict, counts: dict, sign: int = 1) -> dict:
    return {key: {split: totals[key][split] + sign * counts[key][split] for split in SPLITS} for key in totals}


def subtract(totals: dict, counts: dict) -> dict:
    return add(totals, counts, -1)


def aggregated_totals(spark, lake, day) -> dict:
    """The totals aggregated over the whole state as of `day` (its narrow columns): when the previous day recorded
    none to carry (a lake written before totals were recorded, or a day another writer replaced)."""
    from spark_jobs.common import read_partition

    return counts_of(read_partition(spark, lake, DATASET, day).select("split", "label").agg(*split_counts())
                     .first().asDict())


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, "features_ctr_samples", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
