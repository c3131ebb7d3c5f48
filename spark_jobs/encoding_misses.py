"""The texts to encode: `embeddings/misses/dt=D`, the day's distinct knowledge texts the embedding cache lacks.

Validates `knowledge/assigned/dt=D` first (`EncodingError`, naming the dataset, the column and the rule): the columns,
`entity_kind` user or item, no empty `encode_text` (null, or only Python's whitespace), one row per entity, and every
entity known to the features of D (`features/user_history` as of D, `features/items` of D). Then the texts' hashes
(sha256 of the UTF-8 text, `reki_core.encoding.text_hash`) are anti-joined with the cache table `embeddings/cache`
rows of the encoder (`reki_core.encoding.encoder_id_of`): the misses are written with their text, one row per hash.
The Python task `encode` (`reki_core.encoding.encode_misses`) encodes them batch by batch into the cache; the job
`knowledge_vectors` then joins the assignment with the cache.

Reads `knowledge/assigned/dt=D`, the features of D, the cache. Writes `embeddings/misses/dt=D`; its run-log step is
`encoding_misses` (rows, users, items, unique_texts, cache_hits, misses, encoder_id), which `encode` reads.
"""

from __future__ import annotations

import math
import sys

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from reki_core.encoding import MISSES as DATASET
from reki_core.encoding import MISSES_STEP as STEP  # the run-log step (jobs_named); `encode_misses` reads it
from spark_jobs.common import cache, releases_cache

EXAMPLES = 5  # rows a message names


def with_text_hash(assigned: DataFrame) -> DataFrame:
    """`assigned` with `text_hash`: sha256 of `encode_text`'s UTF-8 bytes, as `reki_core.encoding.text_hash`."""
    return assigned.withColumn("text_hash", F.sha2(F.col("encode_text").cast("string"), 256))


def cached_hashes(spark, lake, encoder_id: str) -> DataFrame | None:
    """text_hash of every vector the cache holds for `encoder_id` (None before the cache's first append)."""
    from reki_core.encoding import EMBEDDING_CACHE
    from spark_jobs.common import table_of

    if lake.load_table(EMBEDDING_CACHE) is None:
        return None
    rows = spark.table(table_of(spark, lake, EMBEDDING_CACHE))
    return rows.where(F.col("encoder_id") == F.lit(encoder_id))


def _entity_rows(frame: DataFrame) -> list[dict]:
    return [r.asDict() for r in frame.select("entity_kind", "entity_id").orderBy("entity_kind", "entity_id")
            .limit(EXAMPLES).collect()]


def validate(assigned: DataFrame, known: dict[str, DataFrame], where: str) -> None:
    """Raise `EncodingError` at the first rule the assignment breaks (`known`: entity_kind -> a frame of the ids the
    features of the day know, column `entity_id`). Only counts and a few example rows reach the driver."""
    from reki_core.encoding import ASSIGNED_COLUMNS, EncodingError
    from spark_jobs.knowledge import strip_text

    missing_cols = [c for c in ASSIGNED_COLUMNS if c not in assigned.columns]
    if missing_cols:
        raise EncodingError(f"{where}: missing columns {missing_cols}")
    kind = F.col("entity_kind").cast("string")
    rows = assigned.select(kind.alias("entity_kind"), F.col("entity_id").cast("string").alias("entity_id"),
                           F.coalesce(kind.isin(*known), F.lit(False)).alias("_kind_ok"),
                           strip_text(F.col("encode_text")).isNull().alias("_empty"))
    stats = rows.agg(F.count(F.when(~F.col("_kind_ok"), 1)).alias("bad_kind"),
                     F.count(F.when(F.col("_empty"), 1)).alias("empty")).first()
    if stats["bad_kind"]:
        bad = [r["entity_kind"] for r in rows.where(~F.col("_kind_ok")).select("entity_kind").distinct()
               .orderBy("entity_kind").limit(EXAMPLES).collect()]
        raise EncodingError(f"{where}: column entity_kind has values {bad}, expected user/item")
    if stats["empty"]:
        raise EncodingError(f"{where}: column encode_text is empty for {stats['empty']} rows, "
                            f"e.g. {_entity_rows(rows.where(F.col('_empty')))}")
    repeated = rows.groupBy("entity_kind", "entity_id").count().where(F.col("count") > 1)
    dup = _entity_rows(repeated)
    if dup:
        raise EncodingError(f"{where}: more than one row per entity for {dup}")
    for entity_kind, ids in known.items():
        mine = rows.where(F.col("entity_kind") == F.lit(entity_kind)).select("entity_id").distinct()
        unknown = mine.join(ids.select(F.col("entity_id").cast("string").alias("entity_id")), "entity_id", "left_anti")
        found = unknown.agg(F.count(F.lit(1)).alias("n")).first()["n"]
        if found:
            examples = [r["entity_id"] for r in unknown.orderBy("entity_id").limit(EXAMPLES).collect()]
            raise EncodingError(
                f"{where}: {found} knowledge rows for unknown {entity_kind}s (entity_id not in the {entity_kind} "
                f"features of this date), e.g. {examples}")


def misses(texts: DataFrame, cached: DataFrame | None) -> DataFrame:
    """text_hash, encode_text of the distinct `texts` (text_hash, encode_text) whose hash `cached` lacks."""
    if cached is None:
        return texts
    return texts.join(cached.select("text_hash"), "text_hash", "left_anti")


@releases_cache
def run(spark, cfg, lake, day, encoder_id: str | None = None) -> dict:
    """`encoder_id`: the encoder's (default: the configured one's, `encoder_id_of(cfg)`)."""
    from reki_core.encoding import ASSIGNED, encoder_id_of
    from spark_jobs.common import read_partition, write_partition

    encoder_id = encoder_id or encoder_id_of(cfg)
    assigned = read_partition(spark, lake, ASSIGNED, day)
    known = {"user": read_partition(spark, lake, "features/user_history", day).select(F.col("user_id").alias("entity_id")),
             "item": read_partition(spark, lake, "features/items", day).select(F.col("item_id").alias("entity_id"))}
    validate(assigned, known, lake.describe(ASSIGNED, day))
    rows = with_text_hash(assigned)
    # One row per hash: the same hash is the same text.
    texts = cache(rows.groupBy("text_hash").agg(F.min(F.col("encode_text").cast("string")).alias("encode_text")))
    counts = rows.agg(F.count(F.lit(1)).alias("rows"),
                      F.count(F.when(F.col("entity_kind") == F.lit("user"), 1)).alias("users"),
                      F.count(F.when(F.col("entity_kind") == F.lit("item"), 1)).alias("items")).first().asDict()
    unique_texts = texts.count()
    todo = cache(misses(texts, cached_hashes(spark, lake, encoder_id)))
    n_misses = todo.count()
    # About one reader batch per data file: `encode` streams the misses with pyiceberg, which holds a whole data file
    # while it reads it (apache/iceberg-python#3036), so one file of the day's misses made its memory grow with the day.
    files = max(1, math.ceil(n_misses / cfg.lake.batch_rows))
    write_partition(todo.repartitionByRange(files, "text_hash").sortWithinPartitions("text_hash"), lake, DATASET, day)
    return {**{k: int(v) for k, v in counts.items()}, "unique_texts": unique_texts,
            "cache_hits": unique_texts - n_misses, "misses": n_misses, "encoder_id": encoder_id}


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, STEP, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
